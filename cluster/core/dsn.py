"""Bounce (DSN) parsing: what came back, about which recipient and message, and why.

Role: read one received message (bytes) and say what it is (:func:`parse_message`):

- ``dsn``: a delivery status notification. RFC 3464 ``multipart/report`` (per-message fields,
  then per-recipient Final-Recipient, Original-Recipient, Action, Status, Diagnostic-Code,
  Remote-MTA; RFC 6533 ``message/global-delivery-status`` too), and the common non-standard
  notices (qmail, Exim, Postfix and Sendmail without DSN, Exchange/Office 365, Gmail, Yahoo...),
  read from their text: the recipient line, the reply quoted after it, the X-Failed-Recipients
  field. Each recipient gets the category and class of :mod:`cluster.core.replies`.
  A bounce of a bounce (the returned message is itself a report) is read the same way and
  marked ``loop``: its ``reason`` says so, and the bounce listener records nothing from it
  (acting on it could loop).
- ``arf``: a complaint (RFC 5965, :mod:`cluster.core.arf`).
- ``autoreply``: an out-of-office or other automatic answer (RFC 3834 Auto-Submitted,
  X-Autoreply, Precedence, typical subjects), which is not a bounce.
- ``unknown``: anything else, with the reason: not a report, malformed MIME, nothing readable.

It ties the report to our message: ``original_message_id`` (the returned message's Message-ID)
and ``raymta_id`` (our queue id, a ULID, from the RFC 3461 Original-Envelope-Id, the
VERP-shaped address the report was sent to, or an X-Raymta-Id field of the returned headers).
``raymta_id`` is *unverified* here; the bounce listener checks the VERP tag
(:mod:`cluster.core.verp`) before acting on it.

Bad input never raises: input is capped at ``max_bytes`` (default :data:`MAX_BYTES`; a report's
useful part is at its start, attachments are not read past the cap), and any failure to parse
gives kind ``unknown`` with the reason. Pure: stdlib ``email`` only, no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from email import policy
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.utils import getaddresses

from cluster.core.arf import ArfReport, parse_arf, parse_fields
from cluster.core.bounce_rules import RuleSet
from cluster.core.replies import classify, parse_reply

__all__ = ["CONTRACT_KEYS", "KINDS", "MAX_BYTES", "Recipient", "Report", "contract",
           "parse_message"]

KINDS = ("dsn", "arf", "autoreply", "unknown")
#: The most of a message read (a DSN's fields are in its first few KiB; a returned message
#: can be as large as the original).
MAX_BYTES = 1 << 20
_TEXT_MAX = 64 * 1024
_ULID = r"[0-9a-hjkmnp-tv-z]{26}"
_ULID_RE = re.compile(rf"^{_ULID}$", re.IGNORECASE)
_VERP_ID = re.compile(rf"-[a-z0-9]{{1,8}}[a-z2-7]{{10}}-({_ULID})@", re.IGNORECASE)
_ADDR = r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+"
_ADDR_RE = re.compile(_ADDR)
_ENH = re.compile(r"(?<![\w.])([245])\.([0-7])\.(\d{1,3})(?![\w.])")   # RFC 3463 subjects
_NULL_MX = re.compile(r"\bnull mx\b|\brfc ?7505\b", re.IGNORECASE)


@dataclass(frozen=True)
class Recipient:
    """One recipient's status in a report (RFC 3464 §2.3); ``category`` and ``bounce_class``
    are ours (None for a successful delivery action)."""

    recipient: str | None
    original_recipient: str | None = None
    action: str | None = None
    status: str | None = None
    diagnostic: str | None = None
    remote_mta: str | None = None
    reply_code: int | None = None
    category: str | None = None
    bounce_class: str | None = None


@dataclass(frozen=True)
class Report:
    """What one received message is. ``reason`` says why for kind ``unknown``, and which
    format was recognised otherwise (``rfc3464``, ``text``, ``arf``, ``autoreply``)."""

    kind: str
    reason: str
    recipients: tuple[Recipient, ...] = ()
    original_message_id: str | None = None
    raymta_id: str | None = None
    reporting_mta: str | None = None
    arrival_date: str | None = None
    feedback: ArfReport | None = None
    truncated: bool = False
    subject: str | None = None
    #: the returned message is itself a delivery report: nothing is recorded from it
    loop: bool = False

    @property
    def first(self) -> Recipient | None:
        """The first failed recipient, else the first one."""
        failed = [r for r in self.recipients if r.action in ("failed", None)]
        return (failed or list(self.recipients) or [None])[0]


#: What ``Report.reason`` says of a bounce of a bounce.
LOOP_REASON = ("bounce of a bounce: the returned message is itself a delivery report "
               "(nothing is recorded from it, acting on it could loop)")

#: The keys of ``raymta parse-bounce --json`` (a stable contract, documented in the README).
CONTRACT_KEYS = ("file", "kind", "recipient", "original_message_id", "raymta_id", "action",
                 "status", "diagnostic", "remote_mta", "category", "class", "feedback_type",
                 "reason", "recipients")
_RECIPIENT_KEYS = ("recipient", "action", "status", "diagnostic", "remote_mta", "category",
                   "class")


def contract(report: Report, file: str) -> dict[str, object]:
    """One report as the JSON object of ``raymta parse-bounce --json``: the first failed
    recipient's fields at the top level, every recipient under ``recipients``."""
    def rcpt(r: Recipient | None) -> dict[str, object]:
        if r is None:
            return dict.fromkeys(_RECIPIENT_KEYS)
        return {"recipient": r.recipient, "action": r.action, "status": r.status,
                "diagnostic": r.diagnostic, "remote_mta": r.remote_mta,
                "category": r.category, "class": r.bounce_class}
    first = rcpt(report.first)
    if report.kind == "arf":
        first.update(action=None, category=None, **{"class": None})
    out: dict[str, object] = {
        "file": file, "kind": report.kind, **first,
        "original_message_id": report.original_message_id, "raymta_id": report.raymta_id,
        "feedback_type": report.feedback.feedback_type if report.feedback else None,
        "reason": report.reason,
        "recipients": [rcpt(r) for r in report.recipients],
    }
    return {k: out[k] for k in CONTRACT_KEYS}


# ---------------------------------------------------------------------------------- helpers

def _text_of(part: Message) -> str:
    try:
        raw = part.get_payload(decode=True)
    except Exception:   # noqa: BLE001 - a broken transfer encoding: take it as it is
        raw = None
    if isinstance(raw, bytes):
        charset = part.get_content_charset() or "utf-8"
        try:
            return raw[:_TEXT_MAX].decode(charset, "replace")
        except LookupError:
            return raw[:_TEXT_MAX].decode("utf-8", "replace")
    payload = part.get_payload()
    return payload[:_TEXT_MAX] if isinstance(payload, str) else ""


def _notice_text(msg: Message) -> str:
    """The human-readable notice: text parts outside any attached message (HTML stripped when
    there is no plain text)."""
    plain: list[str] = []
    html: list[str] = []

    def walk(m: Message) -> None:
        # "text/plain\n charset=..." (a missing ";") is still text/plain
        ct = m.get_content_type().split(None, 1)[0]
        if ct.startswith("message/") or ct == "text/rfc822-headers":
            return
        if m.is_multipart():
            payload = m.get_payload()
            for sub in payload if isinstance(payload, list) else []:
                if isinstance(sub, Message):
                    walk(sub)
            return
        if ct == "text/plain":
            plain.append(_text_of(m))
        elif ct == "text/html":
            html.append(re.sub(r"<[^>]*>", " ", _text_of(m)))

    walk(msg)
    text = "\n".join(plain) if plain else "\n".join(html)
    return text[:_TEXT_MAX]


def _clean_addr(value: str | None) -> str | None:
    """The address of an RFC 3464 recipient field ("rfc822; a@b"), lowercased domain."""
    if not value:
        return None
    v = value.split(";", 1)[1] if ";" in value else value
    m = _ADDR_RE.search(v)
    return m.group(0) if m else (v.strip().strip("<>") or None)


def _status(value: str | None) -> str | None:
    if not value:
        return None
    m = _ENH.search(value)
    return f"{m[1]}.{int(m[2])}.{int(m[3])}" if m else None


def _one_line(text: str | None, limit: int = 1000) -> str | None:
    if text is None:
        return None
    t = " ".join(text.split())
    return t[:limit] or None


def _classify(diagnostic: str | None, status: str | None, action: str | None,
              rules: RuleSet | None, phase: str = "response_text"
              ) -> tuple[int | None, str | None, str | None]:
    """(reply code, category, class) of one recipient."""
    # RFC 3464 §2.3.3 successes, and "deliverable", which address-verification reports give
    # (Postfix "sendmail -bv": "Action: deliverable", "Status: 2.1.5")
    if action in ("delivered", "relayed", "expanded", "deliverable"):
        return None, None, None
    diag = diagnostic or ""
    reply = parse_reply(diag) if diag else None
    code = reply.code if reply and reply.code and 400 <= reply.code < 600 else None
    # the remote's own enhanced code is more specific than a reporting MTA's generic Status
    enhanced = (reply.enhanced if reply and reply.enhanced else None) or status
    if enhanced and enhanced.startswith("2"):
        enhanced = None
    if code is None and enhanced is None and action == "delayed":
        enhanced = "4.0.0"
    if code is None and enhanced and enhanced[0] == "4" and action == "failed":
        # RFC 3464 §2.3.3: "failed" is a permanent failure, whatever class a sloppy Status has
        enhanced = "5" + enhanced[1:]
    try:
        c = classify(code, diag, enhanced=enhanced, phase=phase, rules=rules)
    except ValueError:
        c = classify(None, diag, phase=phase, rules=rules)
    if c.category is None:      # the text looked like a success or an auto-reply
        return code, "other", "soft"
    if c.bounce_class == "hard" and status and status[0] == "4" and (
            code is None or code < 500) and not _NULL_MX.search(diag):
        # RFC 3463 §3.1: a 4.X.X status reports "persistence of some temporary condition"
        # that "caused abandonment or delay"; a reporter that gave up (Action: failed) on a
        # temporary condition has not learnt that the address or domain is gone. A null MX
        # is the exception: RFC 7505 §3 makes it a definitive "accepts no mail", whatever
        # class the reporter put on it
        return code, c.category, "soft"
    return code, c.category, c.bounce_class


def _header(msg: Message, name: str) -> str | None:
    try:
        v = msg.get(name)
    except Exception:   # noqa: BLE001 - an undecodable header: as absent
        return None
    return _one_line(str(v)) if v is not None else None


# ------------------------------------------------------------------- the returned message

_COPY_MARK = re.compile(
    r"^[ \t]*[-=_*]{2,}.*\b(?:original|returned|copy|undelivered|unsent|headers?)\b.*$|"
    r"^.*(?:copy of (?:the |your )?(?:message|original|mail)|below this line).*$|"
    r"^[ \t]*(?:original message headers|original message follows|original headers|"
    r"message headers follow|headers of (?:the |your )?(?:original )?message|"
    r"undelivered message|returned message|unsent message below|message text follows|"
    r"the original message headers)[^\n]{0,20}$|"
    r"^content-type: message/rfc822", re.IGNORECASE | re.MULTILINE)
_MSGID = re.compile(r"^message-id:[ \t]*(?:\r?\n[ \t]+)?(<[^>\s]+>|\S+)", re.IGNORECASE |
                    re.MULTILINE)


def _returned(msg: Message, notice: str) -> tuple[Message | None, str]:
    """The returned message's headers (parsed) and their text, from the attached message part
    or from the notice text after the "copy of the message" line."""
    for part in msg.walk():
        ct = part.get_content_type()
        if ct in ("message/rfc822", "message/global", "message/rfc822-headers"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                inner = payload[0]
                return inner, "\n".join(f"{k}: {v}" for k, v in inner.items())
        if ct in ("text/rfc822-headers", "message/global-headers"):
            text = _text_of(part)
            return HeaderParser().parsestr(text), text
    m = _COPY_MARK.search(notice)
    if m:
        rest = notice[m.end():].lstrip("\r\n")
        return HeaderParser().parsestr(rest[:_TEXT_MAX]), rest
    return None, ""


def _is_report(m: Message) -> bool:
    ct = m.get_content_type()
    if ct == "multipart/report" and (m.get_param("report-type") or "").lower() in (
            "delivery-status", "feedback-report"):
        return True
    sender = (_header(m, "From") or "").lower()
    subject = (_header(m, "Subject") or "").lower()
    return bool(re.search(r"mailer-daemon|postmaster@", sender)) and \
        bool(_BOUNCE_SUBJECT.search(subject))


# ------------------------------------------------------------------------ RFC 3464 reports

def _status_blocks(part: Message) -> list[list[tuple[str, str]]]:
    payload = part.get_payload()
    if isinstance(payload, list):   # compat32: each block parsed as a header block
        blocks = [[(k.lower(), _one_line(str(v)) or "") for k, v in b.items()]
                  for b in payload if isinstance(b, Message)]
    else:
        text = _text_of(part)
        blocks = [parse_fields(b) for b in re.split(r"\r?\n[ \t]*\r?\n", text) if b.strip()]
    return [piece for b in blocks for piece in _split_recipients(b)]


def _split_recipients(block: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """A block holding several recipients' fields with no blank line between them (AOL's
    reports do this, against RFC 3464 §2.1): a new block starts at a second Final-Recipient
    or a second Original-Recipient."""
    out: list[list[tuple[str, str]]] = [[]]
    for k, v in block:
        if k in ("final-recipient", "original-recipient"):
            seen = {n for n, _ in out[-1]}
            if k in seen:
                out.append([])
        out[-1].append((k, v))
    return [b for b in out if b]


def _rfc3464(part: Message, rules: RuleSet | None,
            notice: str) -> tuple[list[Recipient], dict[str, str]]:
    blocks = [b for b in _status_blocks(part) if b]
    per_message: dict[str, str] = {}
    recipients = []
    for block in blocks:
        f: dict[str, str] = {}
        for k, v in block:
            f.setdefault(k, v)
        if "final-recipient" not in f and "original-recipient" not in f:
            for k, v in f.items():
                per_message.setdefault(k, v)
            continue
        action = (f.get("action") or "").split()[0].lower() if f.get("action") else None
        status = _status(f.get("status"))
        diag = f.get("diagnostic-code")
        if diag and ";" in diag and not diag.lower().startswith(("smtp", "x-")):
            diag = diag.split(";", 1)[1].strip()
        explained = diag
        if not diag:
            # "Status: 4.0.0 (cat.example.net: host name lookup failure)": a comment in the
            # Status field is the only explanation a report without a Diagnostic-Code gives
            # (classified, not reported as the diagnostic)
            c = re.search(r"\(([^()]{4,})\)", f.get("status") or "")
            if c and not re.fullmatch(r"[\w ]*(?:permanent|temporary|transient)[\w ]*", c[1],
                                      re.IGNORECASE):
                explained = c[1].strip()
        code, category, klass = _classify(explained, status, action, rules,
                                          _phase(explained, notice))
        # RFC 3464 §2.3.6: diagnostic-type ";" text; the contract gives the text
        text = diag.split(";", 1)[1] if diag and re.match(r"\s*[\w-]+\s*;", diag) else diag
        recipients.append(Recipient(
            recipient=_clean_addr(f.get("final-recipient") or f.get("original-recipient")),
            original_recipient=_clean_addr(f.get("original-recipient")),
            action=action, status=status, diagnostic=_one_line(text),
            remote_mta=_clean_mta(f.get("remote-mta")), reply_code=code,
            category=category, bounce_class=klass))
    return recipients, per_message


def _ses_notification(notice: str, rules: RuleSet | None
                      ) -> tuple[list[Recipient], dict[str, str]]:
    """An Amazon SES bounce notification (JSON, sent by e-mail directly or inside an SNS
    envelope whose "Message" is the JSON as a string): ``bounce.bouncedRecipients`` carry
    RFC 3464 action, status and diagnosticCode (docs.aws.amazon.com/ses, "Contents of
    notifications"). Other notification types (Delivery, Complaint) give nothing here."""
    start = notice.find("{")
    try:
        # strict=False: a mail system may have wrapped the long line inside a string
        doc = json.loads(notice[start:], strict=False) if start >= 0 else None
        if isinstance(doc, dict) and isinstance(doc.get("Message"), str):
            doc = json.loads(doc["Message"], strict=False)
    except ValueError:
        return [], {}
    if not isinstance(doc, dict) or doc.get("notificationType") != "Bounce" or \
            not isinstance(doc.get("bounce"), dict):
        return [], {}
    bounce = doc["bounce"]
    out = []
    for r in bounce.get("bouncedRecipients") or []:
        if not isinstance(r, dict) or not isinstance(r.get("emailAddress"), str):
            continue
        diag = r.get("diagnosticCode") if isinstance(r.get("diagnosticCode"), str) else None
        status = _status(r.get("status") if isinstance(r.get("status"), str) else None)
        action = str(r.get("action") or "failed").lower()
        if status is None and bounce.get("bounceType") == "Transient":
            status = "4.0.0"
        code, category, klass = _classify(diag, status, action, rules, _phase(diag))
        text = diag.split(";", 1)[1] if diag and re.match(r"\s*[\w-]+\s*;", diag) else diag
        out.append(Recipient(recipient=_clean_addr(r["emailAddress"]), action=action,
                             status=status, diagnostic=_one_line(text), reply_code=code,
                             category=category, bounce_class=klass))
    mta = bounce.get("reportingMTA")
    return out, ({"reporting-mta": mta} if isinstance(mta, str) else {})


def _clean_mta(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(";", 1)[1].strip() if ";" in value else value.strip()


# ------------------------------------------------------------------ non-standard notices

_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (?:status )?notification|delivery fail|failure notice|"
    r"returned mail|returned to sender|could not be delivered|mail delivery|non[- ]?remis|"
    r"delivery problem|delivery report|failed delivery|permanent (?:error|failure)|"
    r"\bbounce|warning: (?:could not|delayed)|delayed mail|unzustellbar|nicht zustellbar|"
    r"message not delivered|rejected|delivery has failed|delivery error", re.IGNORECASE)
_UNDELIVERED_TO = re.compile(
    rf"\b(?:could not|couldn't|cannot|can't|was not|unable to) be delivered to\s*:?\s*<?{_ADDR}",
    re.IGNORECASE)
_DAEMON = re.compile(r"mailer-daemon|post_?master|mail delivery (?:system|subsystem)|"
                     r"mail administrator|\bmta\b|mdaemon|mailerdaemon", re.IGNORECASE)
_DELAY = re.compile(r"\b(?:delayed|will (?:be )?retr(?:y|ied)|still trying|not yet been "
                    r"delivered|has not been delivered yet|warning:)", re.IGNORECASE)
# a line that names the failed recipient: "<a@b>:", "a@b", "  a@b", "Name<mailto:a@b>",
# "<a@b>: host x said: ...", "<a@b>... User unknown", "RCPT TO:<a@b>"
_RCPT_LINE = re.compile(
    rf"^(?P<indent>[ \t]*)(?:>>>\s*)?(?P<label>(?:final-recipient|original-recipient|"
    rf"recipient(?: address)?|failed recipient|address(?:es)?)\s*:\s*(?:rfc822;\s*)?)?"
    rf"(?:[^<>\n@:\s]{{0,40}}<mailto:(?P<a1>{_ADDR})>|[<\"]?(?P<a2>{_ADDR})[>\"]?)"
    rf"(?P<rest>\s*(?:\(.*?\))?\s*(?::|\.\.\.|$|on \w{{3}},|\[).*)$",
    re.IGNORECASE | re.MULTILINE)
# the command a quoted reply answered (RFC 5321 §3): Postfix "(in reply to end of DATA
# command)", Exim "after RCPT TO:<...>", "after end of data", Sendmail transcripts ">>> DATA"
_PHASE_HINTS = (
    (re.compile(r"in reply to (?:end of )?data|after (?:end of )?data\b|>>> data\b|"
                r"after (?:the )?message (?:body|content)|"
                # m-FILTER: "-------SMTP command\nDATA"
                r"-smtp command\s+data\b|"
                # qmail-remote: "x failed on DATA command", "x failed after I sent the message"
                r"failed on data command|failed after i sent the message", re.IGNORECASE), "data"),
    (re.compile(r"in reply to rcpt|after rcpt|>>> rcpt|\[rcpt_to\]|"
                r"does not like recipient|"     # (qmail-remote)
                # Postfix smtpd: "<a@b>: Recipient address rejected: ..." is the refusal of its
                # smtpd_recipient_restrictions, which it applies to RCPT TO (SMTPD_ACCESS_README)
                r"<[^<>\s]*>: recipient address rejected:", re.IGNORECASE), "rcpt"),
    (re.compile(r"in reply to mail|after mail from|>>> mail from|\[mail_from\]|"
                r"but sender was rejected", re.IGNORECASE), "mail"),      # (qmail-remote)
    (re.compile(r"after initial connection|in reply to (?:the )?(?:initial )?(?:greeting|"
                r"banner)|while connecting|after connect|"
                # Postfix: "host x refused to talk to me: <its greeting>"
                r"refused to talk to me|"
                # qmail-remote: "Connected to x but greeting failed."
                r"but greeting failed", re.IGNORECASE), "greeting"),
    # Exim "SMTP error from remote mail server after EHLO x", Postfix "in reply to EHLO"
    # qmail-remote "Connected to x but my name was rejected."
    (re.compile(r"after (?:EHLO|HELO)\b|in reply to (?:EHLO|HELO)\b|but my name was rejected",
                re.IGNORECASE), "ehlo"),
)


def _phase(*texts: str | None) -> str:
    """The SMTP phase the texts say the reply answered (the last command named wins within a
    text: a transcript ends with the refused command), else "response_text"."""
    for text in texts:
        if not text:
            continue
        best, where = None, -1
        for pat, phase in _PHASE_HINTS:
            for m in pat.finditer(text):
                if m.start() > where:
                    best, where = phase, m.start()
        if best == "data" and re.search(
                r"(?:503|554)\b.{0,40}?(?:need (?:rcpt|recipient)|no valid recipients)",
                text[where:where + 2000], re.IGNORECASE | re.DOTALL):
            # a pipelined transcript: the refusal read after DATA answered the RCPT (the
            # server then refuses the DATA itself with "503 need RCPT"/"554 no valid
            # recipients")
            best = "rcpt"
        if best:
            return best
    return "response_text"


_REPLY_IN_TEXT = re.compile(r"(?<![\d.])(?:[45]\d\d[ -](?:[245]\.\d{1,3}\.\d{1,3})?|"
                            r"[245]\.\d{1,3}\.\d{1,3})")


# Sendmail's "Transcript of session follows" (RFC 5321 §4.2 replies quoted as the client saw
# them): ">>> COMMAND" is what Sendmail sent, "<<< reply" what the server answered, a line
# "550 <a@b>... text" Sendmail's verdict on one recipient, other lines the output of a local
# mailer (mail.local, procmail); "While talking to host:" starts a new session
_TS_SESSION = re.compile(r"^\s*(?:while talking to|\.\.\. while talking to)\b", re.IGNORECASE)
_TS_SENT = re.compile(r"^\s*>>>\s*(?P<cmd>[A-Za-z]+(?: [A-Za-z]+)?)", re.IGNORECASE)
_TS_RECEIVED = re.compile(r"^\s*<<<\s*(?P<reply>.*)$")
_TS_VERDICT = re.compile(rf"^\s*(?P<code>[45]\d\d)(?:[ -](?:[245]\.\d{{1,3}}\.\d{{1,3}}))?\s+"
                         rf"<?(?P<addr>{_ADDR})>?\.\.\.\s*(?P<text>.*)$")
_TS_HOST_VERDICT = re.compile(r"^\s*[45]\d\d\s+\S+\s+\(\w+\)\.\.\.")   # "421 host (smtp)..."
# the SMTP command sent -> the phase its reply answered (RFC 5321 §3.3: MAIL, RCPT, DATA)
_TS_PHASES = {"mail": "mail", "rcpt": "rcpt", "data": "data", "ehlo": "ehlo", "helo": "ehlo",
              "starttls": "starttls"}


_PIPELINED_RCPT = re.compile(r"^\s*<<<\s*(?:503|554)\b.{0,40}?(?:need (?:rcpt|recipient)|"
                             r"no valid recipients)", re.IGNORECASE | re.MULTILINE)


def _session_rest(lines: list[str], i: int) -> str:
    """The lines after ``i`` up to the next "While talking to" (the rest of one session)."""
    rest = []
    for line in lines[i + 1:i + 60]:
        if _TS_SESSION.match(line):
            break
        rest.append(line)
    return "\n".join(rest)


def _transcript_recipients(section: str) -> list[tuple[str, str, str]]:
    """(address, diagnostic, phase) per recipient verdict of a Sendmail session transcript.

    A verdict takes the server's reply read since the last command (and the phase of that
    command) when there is one not already taken by an earlier verdict; else the local
    mailer's output since the previous verdict (no phase: no SMTP command was answered);
    else only its own text. A pipelined batch (RFC 2920: the replies to MAIL, RCPT and DATA
    read after ">>> DATA") names the phase of each reply by what follows: a server that then
    refuses the DATA itself ("503 Need RCPT", "554 no valid recipients") refused the
    recipients at RCPT; that case keeps the notice-level judgement of :func:`_phase`."""
    out: list[tuple[str, str, str]] = []
    cmd: str | None = None
    replies: list[str] = []        # server replies since the last command, not yet taken
    local: list[str] = []          # mailer output since the last verdict
    lines = section.splitlines()
    for i, line in enumerate(lines):
        if _TS_SESSION.match(line):
            cmd, replies, local = None, [], []
            continue
        m = _TS_SENT.match(line)
        if m:
            cmd, replies, local = m["cmd"].split()[0].lower(), [], []
            continue
        m = _TS_RECEIVED.match(line)
        if m:
            replies.append(m["reply"].strip())
            continue
        m = _TS_VERDICT.match(line)
        if m:
            own = line.strip()
            if replies:
                diag, phase = replies.pop(0), _TS_PHASES.get(cmd or "", "response_text")
                if phase == "data" and _PIPELINED_RCPT.search(_session_rest(lines, i)):
                    phase = "rcpt"
            elif local:
                diag, phase = f"{own} {' '.join(local)}", "response_text"
            else:
                diag, phase = own, "response_text"
            out.append((m["addr"], diag, phase))
            local = []
            continue
        if _TS_HOST_VERDICT.match(line) or not line.strip() or re.match(
                r"\s*-{3,}", line):
            continue
        local.append(line.strip())
    return out


_SENTENCE_RCPT = re.compile(
    rf"(?:deliver(?:ing|ed|y)?|sent|send(?:ing)?|message|mail)\b[^\n]{{0,60}}?\b(?:to|for)\s*:?\s*"
    rf"<?(?P<addr>{_ADDR})>?", re.IGNORECASE)


def _text_recipients(notice: str, header_rcpts: list[str], ours: set[str],
                     rules: RuleSet | None, returned_to: list[str] | None = None
                     ) -> list[Recipient]:
    """Recipients and their diagnostics from a notice without a delivery-status part."""
    section = notice
    mark = _COPY_MARK.search(notice)
    if mark:
        section = notice[:mark.start()]
    lines = section.splitlines()
    found: list[tuple[str, str]] = []          # (address, its paragraph)
    for i, line in enumerate(lines):
        m = _RCPT_LINE.match(line)
        if not m:
            continue
        addr = m["a1"] or m["a2"]
        # a bare "<a@b>:" line names a recipient even when it is the sender (mail to oneself);
        # a labelled one ("To: ...") may be the returned message's header quoted in the text
        if m["label"] and addr.lower() in ours or re.match(r"mailer-daemon@", addr, re.IGNORECASE):
            continue
        parts = [m["rest"] or ""]
        indent = len(m["indent"].expandtabs())
        for nxt in lines[i + 1:i + 12]:
            if not nxt.strip():
                if any(p.strip(" :") for p in parts):
                    break
                continue
            n = _RCPT_LINE.match(nxt)
            if n and (n["a1"] or n["a2"]).lower() != addr.lower() and \
                    len(n["indent"].expandtabs()) <= indent and any(p.strip() for p in parts):
                break       # the next recipient of a list without blank lines (Sendmail)
            parts.append(nxt.strip())
        found.append((addr, " ".join(p.strip(" :") for p in parts if p.strip(" :"))))
    transcript = _transcript_recipients(section) if re.search(
        r"transcript of session|^\s*>>>", section, re.IGNORECASE | re.MULTILINE) else []
    if not found and transcript:
        return _transcript_result(transcript, section, rules)
    verdicts = {a.lower(): (d, p) for a, d, p in reversed(transcript)}
    if not found:
        for a in header_rcpts:
            found.append((a, ""))
    if not found:
        # "There was an error delivering your mail to <a@b>.", "could not be delivered to a@b"
        m = _SENTENCE_RCPT.search(section)
        if m:
            found.append((m["addr"], section[m.end():m.end() + 600]))
    if not found and returned_to:
        # the notice names nobody: the returned message's own recipient (single-recipient
        # notices such as "Delivery report unavailable" or a bare transcript)
        found.extend((a, "") for a in returned_to[:1])
    if not found:
        # last resort: the first address in the notice that is not ours
        for m in _ADDR_RE.finditer(section):
            a = m.group(0)
            if a.lower() not in ours and not re.match(r"(?:mailer-daemon|postmaster)@", a, re.IGNORECASE):
                found.append((a, ""))
                break
    action = _action_of(section)
    # an address named twice (Exchange: once for people, once "for administrators" with the
    # reply): the paragraph that quotes a reply wins
    best: dict[str, tuple[str, str]] = {}
    for addr, para in found:
        key = addr.lower()
        if key not in best or (_REPLY_IN_TEXT.search(para)
                               and not _REPLY_IN_TEXT.search(best[key][1])):
            best[key] = (addr, para)
    out: list[Recipient] = []
    whole = _one_line(section, 4000) or ""
    for addr, para in best.values():
        diag = para
        if not _REPLY_IN_TEXT.search(para):
            # the reply is quoted further on (Gmail "The error that the other server returned
            # was:", Exchange's part for administrators): the first one after the address
            pos = whole.lower().find(addr.lower())
            m = _REPLY_IN_TEXT.search(whole, max(pos, 0))
            before = None
            if m is None and pos > 0:
                # "Could not be delivered because of 550 5.1.1 User unknown. The following
                # recipients were affected: a@b" (MailMarshal and others): the reply before
                for before in _REPLY_IN_TEXT.finditer(whole, 0, pos):
                    pass
            if m:
                diag = f"{para} {whole[m.start():m.start() + 600]}".strip()
            elif before is not None:
                diag = whole[before.start():pos].strip()
            elif len(para) <= 20:
                diag = whole[:1500]
        context = diag
        m = re.search(r"(?<![\d.])[45]\d\d[ -]", diag)
        if m and m.start() > 0:
            diag = diag[m.start():]     # the reply itself; what led to it gives the phase
        first = re.match(r"[45]\d\d", diag)
        if first:
            # a transcript goes on with other replies (the next recipient's, a 421 at QUIT):
            # the recipient's reply ends where a reply with another code starts
            nxt = re.search(rf"(?<=\s)(?!{first.group(0)})[45]\d\d[ -]", diag[3:])
            if nxt:
                diag = diag[:3 + nxt.start()].rstrip()
        phase = _phase(context, section)
        if addr.lower() in verdicts:
            # the transcript's own verdict on this recipient, with the reply it answered
            diag, phase = verdicts[addr.lower()]
        status = _status(diag)
        code, category, klass = _classify(diag, status, action, rules, phase)
        out.append(Recipient(recipient=addr, action=action, status=status,
                             diagnostic=_one_line(diag), reply_code=code,
                             category=category, bounce_class=klass))
    return out


def _transcript_result(transcript: list[tuple[str, str, str]], section: str,
                       rules: RuleSet | None) -> list[Recipient]:
    action = _action_of(section)
    out: list[Recipient] = []
    seen: set[str] = set()
    for addr, diag, phase in transcript:
        if addr.lower() in seen:
            continue
        seen.add(addr.lower())
        status = _status(diag)
        code, category, klass = _classify(diag, status, action, rules, phase)
        out.append(Recipient(recipient=addr, action=action, status=status,
                             diagnostic=_one_line(diag), reply_code=code,
                             category=category, bounce_class=klass))
    return out


def _action_of(section: str) -> str:
    """"delayed" for a warning that delivery is still being tried, else "failed"."""
    delayed = bool(_DELAY.search(section[:4000])) and not re.search(
        r"permanent|given up|gave up|failed permanently", section[:4000], re.IGNORECASE)
    return "delayed" if delayed else "failed"


# ------------------------------------------------------------------------------ autoreplies

_AUTO_SUBJECT = re.compile(
    r"^(?:auto(?:matic)?[- ]?(?:reply|response|antwort)|out of (?:the )?office|"
    r"abwesenheit|vacation|on leave|away from|r[ée]ponse automatique|autoreply|"
    r"auto:)|\b(?:out of (?:the )?office|auto(?:matic)? reply|autoreply|vacation reply)\b",
    re.IGNORECASE)


def _is_autoreply(msg: Message) -> str | None:
    auto = (_header(msg, "Auto-Submitted") or "").lower()
    if auto.startswith("auto-replied"):
        return "Auto-Submitted: auto-replied (RFC 3834)"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-Auto-Response-Suppress"):
        v = _header(msg, name)
        if v and name != "X-Auto-Response-Suppress":
            return f"{name}: {v}"
    prec = (_header(msg, "Precedence") or "").lower()
    if prec in ("auto_reply", "auto-reply"):
        return f"Precedence: {prec}"
    subject = _header(msg, "Subject") or ""
    if _AUTO_SUBJECT.search(subject):
        return f"subject {subject[:60]!r}"
    return None


# ---------------------------------------------------------------------------------- the entry

def _raymta_id(msg: Message, returned: Message | None, envid: str | None) -> str | None:
    if envid and _ULID_RE.match(envid.strip()):
        return envid.strip().upper()
    for name in ("To", "Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To",
                 "Original-Recipient"):
        v = _header(msg, name) or ""
        m = _VERP_ID.search(v)
        if m:
            return m[1].upper()
    if returned is not None:
        v = _header(returned, "X-Raymta-Id")
        if v and _ULID_RE.match(v.strip()):
            return v.strip().upper()
        m = _VERP_ID.search(_header(returned, "Return-Path") or "")
        if m:
            return m[1].upper()
    return None


def parse_message(raw: bytes, *, max_bytes: int = MAX_BYTES,
                  rules: RuleSet | None = None) -> Report:
    """What ``raw`` (one received message) is; never raises (see the module docstring)."""
    try:
        return _parse(raw, max_bytes, rules)
    except Exception as e:   # noqa: BLE001 - the contract: bad input is "unknown", not a crash
        return Report("unknown", f"unreadable: {type(e).__name__}: {e}"[:300])


def _parse(raw: bytes, max_bytes: int, rules: RuleSet | None) -> Report:
    if not isinstance(raw, (bytes, bytearray)):
        return Report("unknown", "not bytes")
    truncated = len(raw) > max_bytes
    data = bytes(raw[:max_bytes])
    if not data.strip():
        return Report("unknown", "empty message")
    msg = BytesParser(policy=policy.compat32).parsebytes(data)
    if not msg.keys():
        return Report("unknown", "no header fields: not a message", truncated=truncated)
    subject = _header(msg, "Subject")

    arf = parse_arf(msg)
    if arf is not None:
        return Report("arf", "rfc5965", original_message_id=arf.original_message_id,
                      raymta_id=_raymta_id(msg, None, None) or _id_field(arf), feedback=arf,
                      recipients=(Recipient(arf.original_recipient),),
                      reporting_mta=arf.reporting_mta, arrival_date=arf.arrival_date,
                      truncated=truncated, subject=subject)

    notice = _notice_text(msg)
    if not notice.strip():
        # MIME that does not parse (a boundary that never occurs): read the body as text
        head_end = re.search(rb"\r?\n\r?\n", data)
        body = data[head_end.end():] if head_end else b""
        notice = body[:_TEXT_MAX].decode("utf-8", "replace")
    returned, _returned_text = _returned(msg, notice)
    status_part = next((p for p in msg.walk() if p.get_content_type() in (
        "message/delivery-status", "message/global-delivery-status",
        "text/delivery-status")), None)
    recipients: list[Recipient] = []
    per_message: dict[str, str] = {}
    fmt = ""
    if status_part is None and re.search(r"^final-recipient\s*:", notice,
                                         re.IGNORECASE | re.MULTILINE):
        # RFC 3464 fields in a part that lost its Content-Type (or a broken MIME structure)
        start = re.search(r"^(?:reporting-mta|final-recipient)\s*:", notice,
                          re.IGNORECASE | re.MULTILINE)
        assert start is not None
        status_part = Message()
        status_part.set_payload(notice[start.start():])
    if status_part is not None:
        recipients, per_message = _rfc3464(status_part, rules, notice)
        fmt = "rfc3464"
    elif "notificationType" in notice:
        recipients, per_message = _ses_notification(notice, rules)
        fmt = "ses-notification" if recipients else fmt
    sender = (_header(msg, "From") or "").lower()
    looks_bounce = bool(recipients) or bool(_DAEMON.search(sender)) or bool(
        _BOUNCE_SUBJECT.search(subject or "")) or msg.get("X-Failed-Recipients") is not None \
        or (msg.get_content_type() == "multipart/report") or (
            # a notice that returns the message and says it could not be delivered to an
            # address (a provider's own format, its subject in another language: au/KDDI)
            returned is not None and _UNDELIVERED_TO.search(notice[:_TEXT_MAX]) is not None)
    if not looks_bounce:
        why = _is_autoreply(msg)
        if why:
            return Report("autoreply", why, truncated=truncated, subject=subject,
                          original_message_id=_header(msg, "In-Reply-To"))
        return Report("unknown", "not a delivery report, complaint or auto-reply",
                      truncated=truncated, subject=subject)
    # a bounce of a bounce: read like any report (what it says is true of the returned
    # report's recipient), but marked, so that nothing is recorded from it (acting on it
    # could loop); ``raymta parse-bounce`` still shows what it says
    loop = returned is not None and _is_report(returned)
    ours = {a.lower() for _, a in getaddresses([_header(msg, "To") or "",
                                                _header(msg, "From") or ""]) if a}
    if returned is not None:
        ours |= {a.lower() for _, a in getaddresses([_header(returned, "From") or "",
                                                     _header(returned, "Return-Path") or "",
                                                     _header(returned, "Sender") or ""])
                 if a}
    failed = [a for _, a in getaddresses([_header(msg, "X-Failed-Recipients") or ""])
              if "@" in a]
    returned_to = [a for _, a in getaddresses([_header(returned, "To") or ""]) if "@" in a] \
        if returned is not None else []
    from_text = _text_recipients(notice, failed, ours, rules, returned_to)
    if not recipients:
        recipients = from_text
        fmt = "text"
    else:
        # a report whose fields say little (no Diagnostic-Code, a generic X.0.0 status) is
        # explained by its notice text: the reply quoted there for the same recipient
        said = {r.recipient.lower(): r for r in from_text if r.recipient and r.diagnostic}
        for i, r in enumerate(recipients):
            t = said.get((r.recipient or "").lower())
            if t is None or r.action not in ("failed", "delayed", None) or (
                    r.category != "other" and (r.diagnostic or r.status and
                                               not r.status.endswith(".0"))):
                continue
            diag = t.diagnostic if not r.diagnostic else f"{r.diagnostic} {t.diagnostic}"
            code, category, klass = _classify(diag, r.status, r.action, rules,
                                              _phase(diag, notice))
            recipients[i] = replace(r, reply_code=r.reply_code or code, category=category,
                                    bounce_class=klass)
    if not recipients:
        why = "a delivery report without any recipient found"
        return Report("unknown", f"{why}; {LOOP_REASON}" if loop else why, loop=loop,
                      truncated=truncated, subject=subject)
    msgid = _header(returned, "Message-ID") if returned is not None else None
    if msgid is None and returned is None:
        m = _MSGID.search(notice)
        msgid = m[1] if m else None
    return Report(
        "dsn", f"{fmt}; {LOOP_REASON}" if loop else fmt, tuple(recipients), loop=loop,
        original_message_id=msgid,
        raymta_id=_raymta_id(msg, returned, per_message.get("original-envelope-id")),
        reporting_mta=_clean_mta(per_message.get("reporting-mta")),
        arrival_date=per_message.get("arrival-date"),
        truncated=truncated, subject=subject)


def _id_field(arf: ArfReport) -> str | None:
    v = arf.original_headers.get("X-Raymta-Id")
    return v.strip().upper() if v and _ULID_RE.match(v.strip()) else None
