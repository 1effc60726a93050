"""SMTP reply policy: what a reply means for the message, the recipient and the site.

All of raymta's reply policy lives here (as all of Postfix's lives in ``smtp_trouble.c``):
parsing reply lines (:func:`parse_reply`), turning a reply into an outcome (delivered,
transient, permanent), a bounce category and class, and a "site wants us to slow down" signal
(:func:`classify`), and the failures raymta produces itself, without a server reply
(:func:`dns_failure`, :func:`connection_failure`, :func:`expired`).

The category and class come from the rules of :mod:`cluster.core.bounce_rules` (data an operator
can read and extend from config); this module decides the outcome, which the rules never do:
2xx delivered, 4xx transient, 5xx permanent (RFC 5321 §4.2.1), with the exceptions the RFCs name.

Pure: no I/O, no Ray, no clock. Must not decide *when* to retry (:mod:`cluster.core.retry`) or
how fast to send (the throttle); it only says what the reply asked for.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from cluster.core.bounce_rules import CATEGORIES, CATEGORY_CLASS, CLASSES, PHASES, RULES, RuleSet

__all__ = [
    "AUTO_REPLY",
    "CATEGORIES",
    "CLASSES",
    "DEFAULT_RULES",
    "EXPIRED_CATEGORY",
    "PACE_CATEGORIES",
    "PHASES",
    "Classification",
    "Outcome",
    "Reply",
    "address_refused",
    "classify",
    "connection_failure",
    "dane_failure",
    "dns_failure",
    "expired",
    "mta_sts_failure",
    "parse_reply",
    "route_refused",
    "tls_failure",
]


class Outcome(str, enum.Enum):
    DELIVERED = "delivered"   # 2xx: done
    TRANSIENT = "transient"   # 4xx (and friends): defer and retry
    PERMANENT = "permanent"   # 5xx: bounce


# ---------------------------------------------------------------------------------- parsing

# RFC 5321 §4.2: Reply-code = %x32-35 %x30-35 %x30-39, then SP or "-" (continuation).
# Servers in the wild also send 1xx/3xx codes and second digits above 5 (570, 571): accepted.
_CODE_LINE = re.compile(r"(?P<code>[1-5]\d\d)(?:(?P<sep>[ -])(?P<rest>.*)|$)", re.DOTALL)
# RFC 3463 §2: class.subject.detail, class 2/4/5, subject and detail 1-3 digits.
# Subjects 0-7 are the ones RFC 3463 §3 defines: "5.13.68" in a version string is not a code.
_ENH = r"[245]\.[0-7]\.\d{1,3}"
_ENH_LEAD = re.compile(rf"#?(?P<enh>{_ENH})(?!\d|\.\d)[\s:;,-]*", re.DOTALL)
_ENH_ANY = re.compile(rf"(?<![\w.])#?(?P<enh>{_ENH})(?!\d|\.\d)")
_ENH_FULL = re.compile(r"(?P<c>[245])\.(?P<s>\d{1,3})\.(?P<d>\d{1,3})")
# What bounce reports and MTA logs put in front of a reply (RFC 3464 §2.3.6 Diagnostic-Code
# "smtp; 550 ...", Postfix "host x said: 550 ...", Exchange "#550 ...", "Remote host said:").
_PREFIX = re.compile(r"(?:e?smtp\s*;\s*|[#:]\s*|.{0,200}?\bsaid:\s*)", re.IGNORECASE | re.DOTALL)
# Other RFC 3464 diagnostic types ("X-Unix; 255", "X-Postfix; ..."): what follows is not an
# SMTP reply, so a number there is not a reply code.
_NON_SMTP_DIAG = re.compile(r"x-[\w.-]+\s*;\s*", re.IGNORECASE)
# A second reply embedded in text: "220-laposte 421 4.2.1 Service refused".
_QUOTED_REPLY = re.compile(rf"(?<![\w.])(?P<code>[45]\d\d)[ -]['\"]?(?P<enh>{_ENH})(?!\d|\.\d)\s*")
_EMBEDDED = re.compile(rf"(?<!\S)(?P<code>[45]\d\d)[ -](?P<enh>{_ENH})(?!\d|\.\d)\s*")


@dataclass(frozen=True)
class Reply:
    """A parsed reply: basic code (None if the text had none), enhanced status code (RFC 3463,
    None if absent), and the text without either."""

    code: int | None
    enhanced: str | None
    text: str

    def __str__(self) -> str:
        return " ".join(str(p) for p in (self.code, self.enhanced, self.text) if p)


def _norm_enhanced(enh: str) -> str:
    m = _ENH_FULL.fullmatch(enh.lstrip("#"))
    assert m is not None
    return f"{m['c']}.{int(m['s'])}.{int(m['d'])}"


def parse_reply(line: str) -> Reply:
    """Parse a reply as a server sent it, or as a log or DSN quotes it.

    Handles single and multi-line replies (RFC 5321 §4.2: ``550-...`` lines then ``550 ...``;
    texts are joined with a space), enhanced codes after the basic code (RFC 2034), texts
    with no code, enhanced codes without a basic code (``"5.2.2 Mailbox full"``,
    ``"... #5.1.1"``) and the usual quoting prefixes (``"smtp; 550 ..."``, ``"said: 550 ..."``).
    """
    lines = [ln.strip() for ln in line.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return Reply(None, None, "")
    first = lines[0]
    diag = _NON_SMTP_DIAG.match(first)
    if diag:
        text = " ".join([first[diag.end():], *lines[1:]]).strip()
        a = _ENH_ANY.search(text)
        return Reply(None, _norm_enhanced(a["enh"]) if a else None, text)
    if not _CODE_LINE.match(first) and not _ENH_LEAD.match(first):
        p = _PREFIX.match(first)
        if p and (_CODE_LINE.match(first, p.end()) or _ENH_LEAD.match(first, p.end())):
            lines[0] = first[p.end():]
    code: int | None = None
    enhanced: str | None = None
    texts: list[str] = []
    for ln in lines:
        m = _CODE_LINE.match(ln)
        if m:
            c = int(m["code"])
            if code is None or m["sep"] != "-":   # the last line's code is the reply's
                code = c
            ln = (m["rest"] or "").strip()
        e = _ENH_LEAD.match(ln)
        # Servers do send "554 4.4.7" and "552 4.2.2": a failure reply keeps an enhanced code
        # of the other failure class (the basic code decides the outcome, the enhanced code
        # still carries the detail).
        if e and (code is None or code >= 400 or e["enh"][0] == str(code)[0]):
            enhanced = enhanced or _norm_enhanced(e["enh"])
            ln = ln[e.end():]
            # "2.1.5 250 OK": an enhanced code followed by a basic code of the same class
            if code is None:
                m2 = _CODE_LINE.match(ln)
                if m2 and m2["code"][0] == enhanced[0]:
                    code = int(m2["code"])
                    ln = (m2["rest"] or "").strip()
        if ln:
            texts.append(ln)
    text = " ".join(texts)
    if code is not None and code < 400:
        # A positive or intermediate code with a failure reply inside it is a transcript of
        # two replies (a multi-line greeting cut short by "421 ..."): the failure counts.
        emb = _EMBEDDED.search(text)
        if emb and emb["code"][0] == emb["enh"][0]:
            code, enhanced = int(emb["code"]), _norm_enhanced(emb["enh"])
            text = text[emb.end():]
    if enhanced is None:
        # RFC 2034 puts it right after the basic code, but quoted texts carry it anywhere
        # ("... #5.1.1"); only one of the reply's class is believed there.
        for a in _ENH_ANY.finditer(text):
            if code is None or a["enh"][0] == str(code)[0]:
                enhanced = _norm_enhanced(a["enh"])
                break
    if code is None and enhanced is not None and enhanced.endswith(".0"):
        # a relay's generic status, then the remote server's own reply quoted (Amazon SES:
        # "5.1.0 - Unknown address error 550-'5.7.1 <a@b>... Access denied'"): the remote
        # reply is the more specific, and its words are the reply's
        q = _QUOTED_REPLY.search(text)
        if q:
            code, enhanced = int(q["code"]), _norm_enhanced(q["enh"])
            text = text[q.end():].strip(" '\"")
    if code is not None and enhanced is not None:
        text = _unflatten(text, code, enhanced)
    return Reply(code, enhanced, text.strip())


def _unflatten(text: str, code: int, enhanced: str) -> str:
    # Multi-line replies flattened into one line by a log: drop the repeated "550-5.7.26 "
    # line prefixes so the rules see the sentence.
    subject = enhanced.split(".")[1]
    pat = re.compile(rf"(?<!\S){code}(?:-|\s+(?=[245]\.{subject}\.))"
                     rf"(?:\s*[245]\.{subject}\.\d{{1,3}}(?![\w.]))?\s*")
    return " ".join(pat.sub(" ", text).split())


# ---------------------------------------------------------------------------- classification

#: The shipped rules, compiled once (config may give :func:`classify` another set).
DEFAULT_RULES = RuleSet(RULES, "shipped rules (cluster.core.bounce_rules)")

#: The category of a message raymta gave up on (queue lifetime reached; class soft).
EXPIRED_CATEGORY = "message-expired"

#: Categories whose transient failures are retried on the slower "throttle" schedule: the site
#: is pacing us, and coming back soon only earns another refusal.
PACE_CATEGORIES = frozenset({"rate-limited", "reputation"})

#: Auto-replies are not bounces (sisimai "vacation"); only checked for text without any code.
AUTO_REPLY = re.compile(
    r"\b(?:out of (?:the )?office|on (?:vacation|holiday|leave)|i am (?:currently )?away|"
    r"i will be (?:away|out|traveling|travelling|on)|auto(?:matic)?[- ]?(?:reply|response)|"
    r"away (?:from|until) )", re.IGNORECASE)

_TOO_MANY_RECIPIENTS = re.compile(r"too many recipients", re.IGNORECASE)
# Rules read the start of a text only: a reply says what it means early, and the cost of the
# match grows with the text
_RULE_TEXT_MAX = 4096

# Addresses are masked before the rules run: a local part such as "userunknown@" or
# "filtered@" is not a statement by the server.
_ADDRESS = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
# URLs reach the rules without their query and fragment ("?p=...", "/reason/#filtered" name
# a help page, not what happened), while host and path can say it ("www.spamhaus.org",
# "groups.google.com", ".../dnsbl-lookup.cgi")
_URL = re.compile(r"\bhttps?://([\w.-]+(?:/[^\s<>\"'()?#]*)?)[^\s<>\"')]*", re.IGNORECASE)


def _mask(text: str) -> str:
    text = _ADDRESS.sub("addr", text)
    return _URL.sub(r"\1", text) if "://" in text else text


@dataclass(frozen=True)
class Classification:
    """What one reply (or raymta-made failure) means.

    ``outcome`` says what happens to the message; ``category`` what went wrong and
    ``bounce_class`` what the sender must do about it (see :mod:`cluster.core.bounce_rules`;
    both None for a success or an auto-reply); ``site_backoff`` whether the whole site asked us
    to slow down; ``rule`` the name of the rule that decided (for operators asking "why").
    """

    outcome: Outcome
    category: str | None
    code: int | None
    enhanced: str | None
    text: str
    site_backoff: bool = False
    bounce_class: str | None = None
    rule: str = ""

    def __post_init__(self) -> None:
        if self.category is not None and self.category not in CATEGORY_CLASS:
            raise ValueError(f"unknown bounce category {self.category!r} "
                             f"(known: {', '.join(CATEGORIES)})")
        if self.bounce_class is None and self.category is not None:
            object.__setattr__(self, "bounce_class", CATEGORY_CLASS[self.category])
        if self.bounce_class is not None and self.bounce_class not in CLASSES:
            raise ValueError(f"unknown bounce class {self.bounce_class!r} "
                             f"(known: {', '.join(CLASSES)})")

    @property
    def permanent(self) -> bool:
        return self.outcome is Outcome.PERMANENT


def classify(code: int | None, text: str = "", *, enhanced: str | None = None,
             phase: str = "rcpt", rules: RuleSet | None = None) -> Classification:
    """Classify a reply: basic ``code`` (None if none), its ``text``, the enhanced code (found
    in the text when not given), the ``phase`` it answered (see :data:`PHASES`) and the
    ``rules`` to use (default: :data:`DEFAULT_RULES`).

    Outcome: 2xx delivered; 4xx transient; 5xx permanent, except 552 "too many recipients"
    on RCPT, which RFC 5321 §4.5.3.1.10 says to treat as 452. Mailbox-full 552s stay
    permanent (the server chose 5xx; many providers do so only after a long over-quota
    period) but are class "soft". With no basic code, the enhanced code's class decides, else
    the rule's class (hard and block bounce; soft and transient retry).

    Category and class: the first matching rule. A 4xx is never "hard" (it becomes "soft"):
    a temporary reply does not prove that an address is gone. The site backs off only on a
    transient reply that closes the channel (421) or that a rule marks as pacing.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown SMTP phase {phase!r} (known: {', '.join(sorted(PHASES))})")
    if code is not None and (isinstance(code, bool) or not isinstance(code, int)
                             or not 100 <= code <= 599):
        raise ValueError(f"invalid SMTP reply code {code!r} (expected 100..599)")
    if enhanced is not None:
        if _ENH_FULL.fullmatch(enhanced.strip().lstrip("#")) is None:
            raise ValueError(f"invalid enhanced status code {enhanced!r} (expected e.g. '5.1.1')")
        enhanced = _norm_enhanced(enhanced.strip())
    parsed = parse_reply(text or "")
    if code is None:
        code = parsed.code
    if enhanced is None and parsed.enhanced is not None:
        enhanced = parsed.enhanced
    body = parsed.text

    # The reply's class: the basic code's, else the enhanced code's (RFC 3463 §2).
    klass: int | None = None
    if code is not None and code // 100 in (2, 4, 5):
        klass = code // 100
    elif enhanced is not None:
        klass = int(enhanced[0])

    if klass == 2:
        return Classification(Outcome.DELIVERED, None, code, enhanced, body)
    if klass is None and code is None and AUTO_REPLY.search(body):
        return Classification(Outcome.DELIVERED, None, code, enhanced, body, rule="auto-reply")

    rule = (rules or DEFAULT_RULES).match(klass, code, enhanced, phase,
                                          _mask(body[:_RULE_TEXT_MAX]))
    if rule is None:   # an operator's replacement set without a catch-all
        category, bclass, backoff, name = "other", "soft", False, ""
    else:
        category, bclass, backoff, name = (rule.category, rule.bounce_class, rule.backoff,
                                           rule.name)
    if klass == 4 and bclass == "hard":
        bclass = "soft"

    if klass == 5:
        outcome = Outcome.PERMANENT
        # RFC 5321 §4.5.3.1.10: RFC 821 wrongly listed "too many recipients" as 552; clients
        # SHOULD treat a 552 in this case as temporary (the rest go in a new transaction).
        if code == 552 and phase == "rcpt" and _TOO_MANY_RECIPIENTS.search(body):
            outcome = Outcome.TRANSIENT
    elif klass == 4:
        outcome = Outcome.TRANSIENT
    else:
        outcome = Outcome.PERMANENT if bclass in ("hard", "block") else Outcome.TRANSIENT
    # A site pauses only when the server closes the channel (421) or the reply is about our
    # pace. Per-recipient soft failures — greylisting (RFC 6647), a busy mailbox — also say
    # "try again later" but concern one recipient: pausing the whole site for them would
    # starve every other recipient there (Postfix defers only the recipient).
    site_backoff = outcome is Outcome.TRANSIENT and (code == 421 or backoff)
    return Classification(outcome, category, code, enhanced, body, site_backoff, bclass, name)


# ------------------------------------------------------------------ raymta's own failures

_DNS_KINDS: dict[str, tuple[Outcome, str, str, str]] = {
    # kind: outcome, category, enhanced code, default text
    # NXDOMAIN: the domain does not exist (RFC 3463 X.1.2 bad destination system address)
    "nxdomain": (Outcome.PERMANENT, "bad-domain", "5.1.2", "recipient domain does not exist"),
    # null MX "0 ." (RFC 7505 §3): the domain accepts no mail; X.1.10 is registered for it
    "null_mx": (Outcome.PERMANENT, "bad-domain", "5.1.10",
                "recipient domain accepts no mail (null MX)"),
    # SERVFAIL / timeout: the resolver or the zone is having a bad day (X.4.3 directory failure)
    "servfail": (Outcome.TRANSIENT, "dns-failure", "4.4.3", "DNS lookup failed (SERVFAIL)"),
    "timeout": (Outcome.TRANSIENT, "dns-failure", "4.4.3", "DNS lookup timed out"),
    # MX hosts exist but none has an address (X.4.4 unable to route): usually transient
    "no_address": (Outcome.TRANSIENT, "routing", "4.4.4", "no address for any MX host"),
}


def dns_failure(kind: str, text: str = "", *, permanent: bool | None = None) -> Classification:
    """A route that could not be resolved. ``kind``: nxdomain, null_mx (permanent,
    bad-domain), servfail, timeout (transient, dns-failure), no_address (transient, routing).
    ``permanent`` overrides the kind's default (the resolver knows when a "no address" answer
    is authoritative: then the domain is as good as absent)."""
    if kind not in _DNS_KINDS:
        raise ValueError(f"unknown DNS failure kind {kind!r} (known: {', '.join(_DNS_KINDS)})")
    outcome, category, enh, default = _DNS_KINDS[kind]
    if permanent is not None and permanent != (outcome is Outcome.PERMANENT):
        if permanent:
            outcome, category, enh = Outcome.PERMANENT, "bad-domain", "5" + enh[1:]
        else:
            outcome, category, enh = Outcome.TRANSIENT, "dns-failure", "4" + enh[1:]
    return Classification(outcome, category, None, enh, text or default, False,
                          rule=f"dns-{kind}")


# RFC 3463 §3.5: X.4.1 no answer from host, X.4.2 bad connection, X.4.0 other network trouble
_CONNECTION_CODES = (
    (re.compile(r"lost|reset|closed|broken|eof|disconnect", re.IGNORECASE), "4.4.2"),
    (re.compile(r"time[d ]?out|refused|unreachable|no route|connect", re.IGNORECASE), "4.4.1"),
)


def connection_failure(text: str) -> Classification:
    """No usable reply: the connection could not be made or broke. Always worth retrying,
    and not a reason to slow the whole site down (that is what 421 is for)."""
    enh = next((e for pat, e in _CONNECTION_CODES if pat.search(text or "")), "4.4.0")
    return Classification(Outcome.TRANSIENT, "no-answer", None, enh,
                          text or "connection failed", False, rule="connection-failure")


def tls_failure(text: str, *, no_starttls: bool = False) -> Classification:
    """The site's TLS policy could not be met: STARTTLS not offered (X.7.10 encryption
    needed, RFC 5248), or the handshake or the certificate check failed (X.7.5 cryptographic
    failure). Transient (the receiver may fix its certificate, an operator its CA file), never
    a reason to send in plaintext; category auth-failure, class soft (nothing is wrong with
    the recipient or the sender)."""
    enh = "4.7.10" if no_starttls else "4.7.5"
    return Classification(Outcome.TRANSIENT, "auth-failure", None, enh, text, False,
                          bounce_class="soft", rule="tls-policy")


def mta_sts_failure(text: str) -> Classification:
    """A recipient domain's MTA-STS policy in mode enforce (RFC 8461 §5) could not be met: no
    MX host matches its patterns, or a matching host offered no STARTTLS or no certificate
    valid for its name. Transient X.7.5 (the domain may fix its MX, policy or certificate),
    category auth-failure, never sent in plaintext or to another host instead."""
    return Classification(Outcome.TRANSIENT, "auth-failure", None, "4.7.5", text, False,
                          bounce_class="soft", rule="mta-sts")


def dane_failure(text: str) -> Classification:
    """An MX host with usable DNSSEC-secure TLSA records (DANE, RFC 7672 §2.2) offered no
    STARTTLS, or its certificate matched none of them, or its TLSA records could not be had
    securely. Transient X.7.5 (the receiver may fix its records or certificate), category
    auth-failure, never sent in plaintext."""
    return Classification(Outcome.TRANSIENT, "auth-failure", None, "4.7.5", text, False,
                          bounce_class="soft", rule="dane")


def address_refused(text: str) -> Classification:
    """Every address of the route is one raymta refuses to connect to (loopback, private,
    its own: :mod:`cluster.core.mxguard`). Permanent (the domain's DNS points there; retrying
    changes nothing until it is fixed), X.4.4 unable to route, category routing."""
    return Classification(Outcome.PERMANENT, "routing", None, "5.4.4", text, False,
                          rule="mx-guard")


def route_refused(text: str) -> Classification:
    """Every address of a ``[routes]`` smart host is one the MX address guard refuses: the
    operator's configuration, not the recipient's DNS, is at fault, so the mail waits
    (transient X.4.4, category routing) for the route or ``delivery.allow_networks`` to be
    fixed instead of bouncing."""
    return Classification(Outcome.TRANSIENT, "routing", None, "4.4.4", f"[routes] {text}",
                          False, bounce_class="soft", rule="mx-guard")


def expired(text: str = "") -> Classification:
    """raymta gave up: the message reached its maximum age (RFC 3463 X.4.7 delivery time
    expired) without a permanent reply. Category message-expired, class soft."""
    return Classification(Outcome.PERMANENT, EXPIRED_CATEGORY, None, "5.4.7",
                          text or "delivery time expired", False, rule="expired")
