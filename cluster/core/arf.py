"""Complaint (feedback loop) reports: RFC 5965 Abuse Reporting Format, and RFC 6591 failures.

Role: read one received message and, if it is a feedback report, say what it reports: the
feedback type (abuse, fraud, virus, other, not-spam, auth-failure, opt-out...), who generated it
(User-Agent, Version), where the complained-of mail came from and went (Source-IP,
Original-Mail-From, Original-Rcpt-To, Reported-Domain, Arrival-Date, Reporting-MTA) and the
original recipient and Message-ID from the attached message or headers (RFC 5965 §2: the third
part is message/rfc822 or text/rfc822-headers). Providers that drop Original-Rcpt-To (most
redact it) leave the attached message's To: as the only recipient.

Owns: the parsing of ``message/feedback-report`` fields. Must not decide what a complaint does
(a complaint always suppresses: the suppression code decides how), touch I/O or raise on bad
input: anything unreadable gives ``None`` from :func:`find_feedback_part` or an
:class:`ArfReport` with the fields it could read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from email.utils import getaddresses

__all__ = ["ArfReport", "find_feedback_part", "parse_arf", "parse_fields"]

_MAX_FIELDS_BYTES = 64 * 1024     # a report's field block is a few hundred bytes


@dataclass(frozen=True)
class ArfReport:
    feedback_type: str | None
    user_agent: str | None = None
    version: str | None = None
    source_ip: str | None = None
    original_mail_from: str | None = None
    original_rcpt_to: tuple[str, ...] = ()
    reported_domain: tuple[str, ...] = ()
    arrival_date: str | None = None
    reporting_mta: str | None = None
    original_recipient: str | None = None      # Original-Rcpt-To, else the attached To:
    original_message_id: str | None = None
    original_headers: dict[str, str] = field(default_factory=dict)


def parse_fields(text: str) -> list[tuple[str, str]]:
    """``Name: value`` fields with RFC 5322 folding, in order; lines that are not fields are
    skipped (a truncated or sloppy report still gives what it has)."""
    out: list[tuple[str, str]] = []
    for line in text[:_MAX_FIELDS_BYTES].splitlines():
        if line[:1] in (" ", "\t") and out:
            name, value = out[-1]
            out[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        m = re.match(r"([!-9;-~]+)\s*:\s*(.*)", line)
        if m:
            out.append((m[1].lower(), m[2].strip()))
    return out


def _part_text(part: Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):
        # compat32 parses message/* bodies as messages: their "headers" are our fields
        return "\n".join(f"{k}: {v}" for m in payload if isinstance(m, Message)
                         for k, v in m.items())
    raw = part.get_payload(decode=True)
    if isinstance(raw, bytes):
        return raw[:_MAX_FIELDS_BYTES].decode("utf-8", "replace")
    return str(payload)[:_MAX_FIELDS_BYTES]


def find_feedback_part(msg: Message) -> Message | None:
    """The ``message/feedback-report`` part of ``msg``, if any (RFC 5965 §2)."""
    for part in msg.walk():
        if part.get_content_type() == "message/feedback-report":
            return part
    return None


def _addr(value: str | None) -> str | None:
    if not value:
        return None
    got = [a for _, a in getaddresses([value]) if "@" in a]
    return got[0] if got else value.strip().strip("<>") or None


def _original(msg: Message) -> Message | None:
    for part in msg.walk():
        ct = part.get_content_type()
        if ct == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if ct == "text/rfc822-headers":
            from email.parser import HeaderParser
            raw = part.get_payload(decode=True)
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
            return HeaderParser().parsestr(text[:_MAX_FIELDS_BYTES])
    return None


def parse_arf(msg: Message) -> ArfReport | None:
    """The feedback report in ``msg`` (a parsed message), or None if it carries none."""
    part = find_feedback_part(msg)
    if part is None:
        return None
    fields = parse_fields(_part_text(part))

    def first(name: str) -> str | None:
        return next((v for k, v in fields if k == name and v), None)

    def every(name: str) -> tuple[str, ...]:
        return tuple(v for k, v in fields if k == name and v)

    original = _original(msg)
    headers: dict[str, str] = {}
    if original is not None:
        for name in ("From", "To", "Subject", "Message-ID", "Date", "Return-Path",
                     "X-Raymta-Id"):
            v = original.get(name)
            if v is not None:
                headers[name] = " ".join(str(v).split())
    rcpt_to = tuple(a for a in (_addr(v) for v in every("original-rcpt-to")) if a)
    recipient = rcpt_to[0] if rcpt_to else _addr(headers.get("To"))
    ftype = first("feedback-type")
    return ArfReport(
        feedback_type=ftype.lower() if ftype else None,
        user_agent=first("user-agent"),
        version=first("version"),
        source_ip=first("source-ip"),
        original_mail_from=first("original-mail-from"),
        original_rcpt_to=rcpt_to,
        reported_domain=every("reported-domain"),
        arrival_date=first("arrival-date") or first("received-date"),
        reporting_mta=first("reporting-mta"),
        original_recipient=recipient,
        original_message_id=headers.get("Message-ID"),
        original_headers=headers,
    )
