"""Building the DSN raymta sends to an envelope sender: RFC 3464 ``multipart/report``.

Role: turn what the queue knows about one recipient's permanent failure or expiry into the
bytes of a delivery status notification (the parser of received ones is
:mod:`cluster.core.dsn`). Owns: the report's shape — a human-readable part, the
``message/delivery-status`` part (Reporting-MTA, Original-Envelope-Id, Arrival-Date;
Final-Recipient, Action: failed, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date) and
the original message's header section only (``text/rfc822-headers``, RFC 6522; what
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
from datetime import UTC, datetime
from email.utils import format_datetime

from cluster.core.addresses import AddressError, parse_address

__all__ = ["DSN_OF_KEY", "DSN_REQUEST_KEY", "MAX_RETURNED_HEADERS", "build_dsn",
           "dsn_for_entry", "dsn_status", "header_section", "wants_dsn"]

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


def build_dsn(*, dsn_id: str, original_id: str, reporting_mta: str, envelope_sender: str,
              recipient: str, kind: str, code: int | None, enhanced: str | None, text: str,
              remote_mta: str, arrival: float, ts: float, headers: bytes) -> bytes:
    """The DSN about ``recipient`` of message ``original_id``, to ``envelope_sender``.

    ``kind`` is the final record's ("bounce" or "expired"); ``code``/``enhanced``/``text`` the
    last reply; ``remote_mta`` the site or host that gave it ("" if none answered);
    ``arrival`` when the message was accepted and ``ts`` when it failed; ``headers`` the
    original header section (:func:`header_section`)."""
    if kind not in ("bounce", "expired"):
        raise ValueError(f"kind: a DSN reports a bounce or an expiry, not {kind!r}")
    if not envelope_sender:
        raise ValueError("envelope_sender: never send a DSN to the null sender <>")
    host = _one_line(reporting_mta, 255) or "localhost"
    status = dsn_status(kind, code, enhanced)
    boundary = "=_raymta_dsn_" + hashlib.sha256(dsn_id.encode()).hexdigest()[:24]
    why = _one_line(text, _DIAG_MAX) or ("delivery time expired" if kind == "expired"
                                         else "permanent failure")
    # the remote reply as it came (RFC 3464 §2.3.6): code, enhanced code, text; the queue
    # keeps the text without the codes
    diag = why
    lead = diag.split(" ", 2)[:2]
    if enhanced and enhanced not in lead:
        diag = f"{enhanced} {diag}"
    if code is not None and str(code) not in lead:
        diag = f"{code} {diag}"
    utf8 = not (envelope_sender.isascii() and recipient.isascii() and headers.isascii())
    rcpt_type = "rfc822" if recipient.isascii() else "utf-8"
    subject = ("Undelivered Mail Returned to Sender" if kind == "bounce"
               else "Undelivered Mail: delivery time expired")
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
    human = (f"This is the mail system at {host}.\r\n\r\n"
             f"Your message could not be delivered to one of its recipients"
             f"{'' if kind == 'bounce' else ' before it expired'}. "
             f"It has been given up on; it will not be tried again.\r\n\r\n"
             f"<{recipient}>: {why}\r\n").encode()
    per_message = (_fold("Reporting-MTA", f"dns; {host}") +
                   _fold("Original-Envelope-Id", original_id) +
                   _fold("Arrival-Date", _date(arrival)))
    per_rcpt = (f"Final-Recipient: {rcpt_type}; {recipient}\r\n".encode() +
                b"Action: failed\r\n" +
                f"Status: {status}\r\n".encode() +
                (_fold("Remote-MTA", f"dns; {_one_line(remote_mta, 255)}")
                 if _one_line(remote_mta, 255) else b"") +
                _fold("Diagnostic-Code", f"smtp; {diag}") +
                _fold("Last-Attempt-Date", _date(ts)))
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
        per_message, b"\r\n", per_rcpt,
        b"\r\n--", b, b"\r\n",
        b"Content-Type: ", headers_type, b"\r\n",
        b"Content-Description: Undelivered message headers\r\n\r\n",
        headers,
        b"\r\n--", b, b"--\r\n",
    ])


def dsn_for_entry(original_id: str, entry: list, *, dsn_id: str, reporting_mta: str
                  ) -> tuple[bytes, str, str, bool]:
    """The DSN a queue's :attr:`~cluster.core.queue.QueueState.dsn_due` entry owes, as
    ``(body, recipient, recipient's A-label domain, smtputf8)`` — the envelope of a message
    from ``<>`` to the original envelope sender. Raises ValueError (naming the message) if
    the sender is not an address mail can go to."""
    sender, rcpt, kind, code, enhanced, text, site, created, ts, headers = entry
    try:
        addr = parse_address(sender, field="sender", allow_smtputf8=True)
    except AddressError as e:
        raise ValueError(f"DSN about {original_id}: envelope sender {sender!r}: {e}") from None
    body = build_dsn(dsn_id=dsn_id, original_id=original_id, reporting_mta=reporting_mta,
                     envelope_sender=sender, recipient=rcpt, kind=kind, code=code,
                     enhanced=enhanced, text=text or "", remote_mta=site or "",
                     arrival=created, ts=ts, headers=bytes(headers))
    return body, str(addr), addr.ascii_domain, not body.isascii()
