"""Building the DSN raymta sends to an envelope sender: RFC 3464 ``multipart/report``.

Role: turn what the queue knows about the permanent failures or expiries of the recipients
of one message that failed together (one or several) into the bytes of one delivery status
notification (the parser of received ones is :mod:`cluster.core.dsn`). Owns: the report's
shape — a human-readable part, the ``message/delivery-status`` part (Reporting-MTA,
Original-Envelope-Id, Arrival-Date; per failed recipient Final-Recipient, Action: failed,
Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date) and the original message's header
section only (``text/rfc822-headers``, RFC 6522; what
``RET=HDRS`` asks for in RFC 3461), cut at :data:`MAX_RETURNED_HEADERS` — and who may get
one: never the null sender ``<>`` and never about a DSN (RFC 3464 §2 / RFC 5321 §6.1: no
bounce of a bounce).

Deterministic: the bytes depend only on the arguments (the date is the failure's time, the
MIME boundary comes from the message id), so a leader rebuilding a DSN after a restart makes
the same one. Pure: no I/O, no clock, no Ray.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from cluster.core.addresses import AddressError, parse_address

__all__ = ["DSN_OF_KEY", "DSN_REQUEST_KEY", "MAX_RETURNED_HEADERS", "FailedRecipient",
           "build_dsn", "build_report", "dsn_for_entries", "dsn_for_entry", "dsn_of",
           "dsn_status", "entry_group", "header_section", "wants_dsn"]

#: metadata key of a message whose sender asked for a DSN on failure (set by the SMTP ingress,
#: or by a submission's ``dsn`` option)
DSN_REQUEST_KEY = "raymta.dsn"
#: metadata key of a DSN raymta made: the queue id of the message it reports on
DSN_OF_KEY = "raymta.dsn_of"
#: the most of the original header section a DSN returns (the body is never returned)
MAX_RETURNED_HEADERS = 16 * 1024
_DIAG_MAX = 900
_CTRL = re.compile(r"[\x00-\x1f\x7f]+")


def wants_dsn(sender: str, metadata: dict | None) -> bool:
    """Does a failure of this message get a DSN? Only if asked for, never to ``<>``, never
    about a DSN."""
    return bool(sender) and type(metadata) is dict and metadata.get(DSN_REQUEST_KEY) is True \
        and DSN_OF_KEY not in metadata


def dsn_of(metadata: Any) -> list[str]:
    """The originals a DSN reports on, from its metadata (``raymta.dsn_of``: one id, or a
    list of them for a DSN about several recipients); [] for any other message."""
    if type(metadata) is not dict:
        return []
    v = metadata.get(DSN_OF_KEY)
    if type(v) is str:
        return [v]
    if type(v) is list and all(type(x) is str for x in v):
        return v
    return []


def header_section(body: bytes, limit: int = MAX_RETURNED_HEADERS) -> bytes:
    """The message's header section (without the blank line), cut at ``limit`` bytes on a
    field boundary (a field never returned half), CRLF line ends."""
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[:end + 2]
    if len(head) > limit:
        cut = head[:limit]
        # the last field that starts in the cut and is whole: a line not followed by a fold
        k = len(cut)
        while True:
            k = cut.rfind(b"\r\n", 0, k)
            if k < 0:
                return b""
            nxt = head[k + 2:k + 3]
            if nxt not in (b" ", b"\t"):
                head = cut[:k + 2]
                break
    return head


def dsn_status(kind: str, code: int | None, enhanced: str | None) -> str:
    """The RFC 3463 status of a failed recipient: the reply's enhanced code when there is one;
    else from the reply code (5.0.0, or 4.0.0 for a transient reply), and for an expiry
    without one 4.4.7 (delivery time expired)."""
    if enhanced and re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", enhanced):
        return enhanced
    if kind == "expired":
        return "4.4.7"
    if code is not None and 400 <= code < 500:
        return "4.0.0"
    return "5.0.0"


def _one_line(text: str, limit: int) -> str:
    """Header-safe: controls (CR, LF) become spaces, non-ASCII becomes '?', bounded."""
    s = _CTRL.sub(" ", text).strip()
    s = s.encode("ascii", "replace").decode("ascii")
    return s[:limit]


def _fold(name: str, value: str) -> bytes:
    """``name: value`` folded at spaces to lines under 78 octets (RFC 5322 §2.2.3)."""
    out, line = [], f"{name}:"
    for word in value.split(" "):
        if not word:
            continue
        if len(line) + 1 + len(word) > 76 and line != f"{name}:":
            out.append(line)
            line = " " + word
        else:
            line += " " + word
    out.append(line)
    return ("\r\n".join(out) + "\r\n").encode("ascii")


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient's part of a DSN: its final record's ``kind`` ("bounce" or "expired"),
    the last reply (``code``/``enhanced``/``text``), the site or host that gave it
    (``remote_mta``, "" if none answered) and when it failed (``ts``)."""
    recipient: str
    kind: str
    code: int | None
    enhanced: str | None
    text: str
    remote_mta: str
    ts: float


def build_dsn(*, dsn_id: str, original_id: str, reporting_mta: str, envelope_sender: str,
              recipient: str, kind: str, code: int | None, enhanced: str | None, text: str,
              remote_mta: str, arrival: float, ts: float, headers: bytes) -> bytes:
    """The DSN about one ``recipient`` of message ``original_id``, to ``envelope_sender``
    (:func:`build_report` with one :class:`FailedRecipient`)."""
    return build_report(dsn_id=dsn_id, original_id=original_id, reporting_mta=reporting_mta,
                        envelope_sender=envelope_sender, arrival=arrival, headers=headers,
                        failed=[FailedRecipient(recipient, kind, code, enhanced, text,
                                                remote_mta, ts)])


def _per_recipient(f: FailedRecipient) -> tuple[bytes, str]:
    """The per-recipient fields of one failed recipient (RFC 3464 §2.3) and its line of the
    human-readable part."""
    if f.kind not in ("bounce", "expired"):
        raise ValueError(f"kind: a DSN reports a bounce or an expiry, not {f.kind!r}")
    status = dsn_status(f.kind, f.code, f.enhanced)
    why = _one_line(f.text, _DIAG_MAX) or ("delivery time expired" if f.kind == "expired"
                                           else "permanent failure")
    # the remote reply as it came (RFC 3464 §2.3.6): code, enhanced code, text; the queue
    # keeps the text without the codes
    diag = why
    lead = diag.split(" ", 2)[:2]
    if f.enhanced and f.enhanced not in lead:
        diag = f"{f.enhanced} {diag}"
    if f.code is not None and str(f.code) not in lead:
        diag = f"{f.code} {diag}"
    rcpt_type = "rfc822" if f.recipient.isascii() else "utf-8"
    remote = _one_line(f.remote_mta, 255)
    fields = (f"Final-Recipient: {rcpt_type}; {f.recipient}\r\n".encode() +
              b"Action: failed\r\n" +
              f"Status: {status}\r\n".encode() +
              (_fold("Remote-MTA", f"dns; {remote}") if remote else b"") +
              _fold("Diagnostic-Code", f"smtp; {diag}") +
              _fold("Last-Attempt-Date", _date(f.ts)))
    return fields, f"<{f.recipient}>: {why}\r\n"


def build_report(*, dsn_id: str, original_id: str, reporting_mta: str, envelope_sender: str,
                 arrival: float, headers: bytes, failed: Sequence[FailedRecipient]) -> bytes:
    """One DSN to ``envelope_sender`` about every recipient in ``failed`` of message
    ``original_id`` (the way Postfix reports the recipients of one message that failed
    together: one report, one per-recipient group each, RFC 3464 §2.1). ``arrival`` is when
    the message was accepted; ``headers`` its header section (:func:`header_section`)."""
    if not failed:
        raise ValueError("failed: a DSN reports at least one recipient")
    if not envelope_sender:
        raise ValueError("envelope_sender: never send a DSN to the null sender <>")
    host = _one_line(reporting_mta, 255) or "localhost"
    parts = [_per_recipient(f) for f in failed]
    ts = max(f.ts for f in failed)
    expired = all(f.kind == "expired" for f in failed)
    boundary = "=_raymta_dsn_" + hashlib.sha256(dsn_id.encode()).hexdigest()[:24]
    utf8 = not (envelope_sender.isascii() and headers.isascii() and
                all(f.recipient.isascii() for f in failed))
    subject = ("Undelivered Mail: delivery time expired" if expired
               else "Undelivered Mail Returned to Sender")
    top = b"".join([
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n".encode(),
        f"To: <{envelope_sender}>\r\n".encode(),
        f"Subject: {subject}\r\n".encode(),
        f"Date: {_date(ts)}\r\n".encode(),
        f"Message-ID: <{dsn_id}.dsn@{host}>\r\n".encode(),
        b"Auto-Submitted: auto-replied\r\n",          # RFC 3834 §5
        b"MIME-Version: 1.0\r\n",
        _fold("Content-Type", f'multipart/report; report-type=delivery-status; '
                              f'boundary="{boundary}"'),
        b"\r\n",
        b"This is a MIME-encapsulated delivery status notification (RFC 3464).\r\n",
    ])
    whom = "one of its recipients" if len(failed) == 1 else f"{len(failed)} of its recipients"
    human = (f"This is the mail system at {host}.\r\n\r\n"
             f"Your message could not be delivered to {whom}"
             f"{' before it expired' if expired else ''}. "
             f"It has been given up on; it will not be tried again.\r\n\r\n"
             + "".join(line for _, line in parts)).encode()
    per_message = (_fold("Reporting-MTA", f"dns; {host}") +
                   _fold("Original-Envelope-Id", original_id) +
                   _fold("Arrival-Date", _date(arrival)))
    # each per-recipient group is preceded by a blank line (RFC 3464 §2.1)
    per_rcpt = b"".join(b"\r\n" + fields for fields, _ in parts)
    b = boundary.encode()
    status_type = b"message/global-delivery-status" if utf8 else b"message/delivery-status"
    headers_type = b"message/global-headers" if utf8 else b"text/rfc822-headers"
    return b"".join([
        top, b"\r\n--", b, b"\r\n",
        b'Content-Type: text/plain; charset="utf-8"\r\n',
        b"Content-Description: Notification\r\n\r\n", human,
        b"\r\n--", b, b"\r\n",
        b"Content-Type: ", status_type, b"\r\n",
        b"Content-Description: Delivery report\r\n\r\n",
        per_message, per_rcpt,
        b"\r\n--", b, b"\r\n",
        b"Content-Type: ", headers_type, b"\r\n",
        b"Content-Description: Undelivered message headers\r\n\r\n",
        headers,
        b"\r\n--", b, b"--\r\n",
    ])


def entry_group(original_id: str, entry: Sequence[Any]) -> str:
    """The submission a :attr:`~cluster.core.queue.QueueState.dsn_due` entry belongs to: the
    body id its recipients share (an entry made before groups existed: its own id)."""
    return entry[10] if len(entry) > 10 else original_id


def dsn_for_entries(originals: Sequence[str], entries: Sequence[Sequence[Any]], *,
                    dsn_id: str, reporting_mta: str) -> tuple[bytes, str, str, bool]:
    """The one DSN that the :attr:`~cluster.core.queue.QueueState.dsn_due` entries of
    ``originals`` (recipients of one submission, one envelope sender) owe, as ``(body,
    recipient, recipient's A-label domain, smtputf8)`` — the envelope of a message from
    ``<>`` to the original envelope sender. Its Original-Envelope-Id is the submission's id
    (the id its first recipient was queued under, what the SMTP ingress answered). Raises
    ValueError (naming the message) if the sender is not an address mail can go to."""
    if not entries or len(originals) != len(entries):
        raise ValueError(f"DSN about {list(originals)[:3]}: one entry per original needed")
    sender, created, headers = entries[0][0], entries[0][7], entries[0][9]
    group = entry_group(originals[0], entries[0])
    for o, e in zip(originals, entries):
        if e[0] != sender or entry_group(o, e) != group:
            raise ValueError(f"DSN about {originals[0]}: {o} is of another submission")
    try:
        addr = parse_address(sender, field="sender", allow_smtputf8=True)
    except AddressError as e:
        raise ValueError(f"DSN about {originals[0]}: envelope sender {sender!r}: {e}") from None
    failed = [FailedRecipient(e[1], e[2], e[3], e[4], e[5] or "", e[6] or "", e[8])
              for e in entries]
    body = build_report(dsn_id=dsn_id, original_id=group, reporting_mta=reporting_mta,
                        envelope_sender=sender, arrival=created,
                        headers=bytes(headers), failed=failed)
    return body, str(addr), addr.ascii_domain, not body.isascii()


def dsn_for_entry(original_id: str, entry: Sequence[Any], *, dsn_id: str, reporting_mta: str
                  ) -> tuple[bytes, str, str, bool]:
    """:func:`dsn_for_entries` for one recipient."""
    return dsn_for_entries([original_id], [entry], dsn_id=dsn_id, reporting_mta=reporting_mta)
