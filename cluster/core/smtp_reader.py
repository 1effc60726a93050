"""Bytes in, SMTP server events out: the command lines and message bodies of one session.

Owns the framing of what an SMTP client sends (RFC 5321 §2.3.8, §4.5.2), and nothing else: no
I/O, no replies, no policy. A session feeds whatever the socket gave it (:meth:`feed`) and pulls
events (:meth:`next_event`) until there are none; the session decides when a DATA body begins
(:meth:`begin_data`, after it answered 354), so pipelined commands that follow a refused DATA
are read as commands. Events:

- :class:`Line`: a command line (or an AUTH response) without its line end; a bare LF ends a
  command line as CRLF does (what most servers accept);
- :class:`LineTooLong`: a command line longer than ``max_line``, reported once its end
  arrived (RFC 5321 §4.5.3.1.4; the bytes in between are dropped, not buffered);
- :class:`Body`: a DATA body up to CRLF.CRLF, dot-unstuffed (§4.5.2), its line ends as sent.
  Only CRLF.CRLF ends it: a bare LF before or after the dot does not (SMTP smuggling);
- :class:`BodyRefused`: the body ended but exceeded the size limit ("size": 552) or had a line
  longer than :data:`MAX_TEXT_LINE` ("line": 500); what was past the limit was dropped as it came.

Bounded: between events it holds at most one command line of ``max_line`` bytes or, in DATA,
the body up to its limit plus one read.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MAX_TEXT_LINE",
    "Body",
    "BodyRefused",
    "Event",
    "Line",
    "LineTooLong",
    "SmtpReader",
    "has_long_line",
]

#: longest text line of a body, without its CRLF (RFC 5321 §4.5.3.1.6 says 998; aiosmtpd,
#: which this replaces, took up to 1001, and so do we, so no message it took is refused now)
MAX_TEXT_LINE = 1001

_END = b"\r\n.\r\n"


@dataclass(frozen=True, slots=True)
class Line:
    text: bytes


@dataclass(frozen=True, slots=True)
class LineTooLong:
    length: int


@dataclass(frozen=True, slots=True)
class Body:
    content: bytes


@dataclass(frozen=True, slots=True)
class BodyRefused:
    reason: str      # "size" or "line"


Event = Line | LineTooLong | Body | BodyRefused


def has_long_line(raw: bytes) -> bool:
    """Whether a line of ``raw`` (CRLF-terminated lines, as a body up to its final CRLF) is
    longer than :data:`MAX_TEXT_LINE` without its CRLF, as ``raw.split(b"\\r\\n")`` would
    cut it. Looks for the last CRLF within reach of each line start, so a body of short lines
    costs one ``rfind`` per ~1000 bytes instead of a list of all its lines (that split was
    ~2 % of the ingress process's CPU at load)."""
    reach = MAX_TEXT_LINE + 2     # a line of MAX_TEXT_LINE octets has its CRLF inside this
    start, n = 0, len(raw)
    while n - start > MAX_TEXT_LINE:
        end = raw.rfind(b"\r\n", start, start + reach)
        if end < 0:    # the line at ``start`` runs past the limit
            return True
        start = end + 2
    return False


class SmtpReader:
    """The framing state of one session's input."""

    def __init__(self, max_line: int = 12288) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._skipped = 0              # >0: dropping an overlong command line up to its LF
        self._limit: int | None = None  # set: in a DATA body of at most this many bytes
        self._scan = 0                 # DATA: where the search for CRLF.CRLF resumes
        self._dropped = 0              # DATA: bytes dropped past the limit

    @property
    def buffered(self) -> int:
        """Bytes held that no event has returned yet."""
        return len(self._buf)

    @property
    def in_data(self) -> bool:
        return self._limit is not None

    def feed(self, data: bytes) -> None:
        self._buf += data

    def discard(self) -> None:
        """Forget what is buffered (STARTTLS: nothing sent before the handshake counts,
        RFC 3207 §4.2)."""
        self._buf.clear()
        self._skipped = 0

    def begin_data(self, limit: int) -> None:
        """What follows is a message body of at most ``limit`` bytes (the 354 was sent)."""
        self._limit = limit
        self._scan = 0
        self._dropped = 0

    def next_event(self) -> Event | None:
        """The next complete event, or None until more bytes are fed."""
        if self._limit is not None:
            return self._body()
        buf = self._buf
        i = buf.find(b"\n")
        if self._skipped:
            if i < 0:
                self._skipped += len(buf)
                buf.clear()
                return None
            n = self._skipped + (i - 1 if i and buf[i - 1] == 13 else i)
            self._skipped = 0
            del buf[:i + 1]
            return LineTooLong(n)
        if i < 0:
            if len(buf) > self.max_line:
                self._skipped = len(buf)
                buf.clear()
            return None
        end = i - 1 if i and buf[i - 1] == 13 else i
        if end > self.max_line:
            del buf[:i + 1]
            return LineTooLong(end)
        line = bytes(buf[:end])
        del buf[:i + 1]
        return Line(line)

    def _body(self) -> Event | None:
        buf = self._buf
        assert self._limit is not None
        if self._scan == 0 and self._dropped == 0 and buf[:3] == b".\r\n":
            del buf[:3]                            # the body is empty
            self._limit = None
            return Body(b"")
        j = buf.find(_END, self._scan)
        if j < 0:
            if len(buf) + self._dropped > self._limit:
                # too big: keep only what may be the start of CRLF.CRLF
                keep = len(_END) - 1
                self._dropped += len(buf) - keep
                del buf[:-keep]
            self._scan = max(0, len(buf) - (len(_END) - 1))
            return None
        raw = bytes(buf[:j + 2])
        del buf[:j + 5]
        limit, self._limit = self._limit, None
        if len(raw) + self._dropped > limit:
            return BodyRefused("size")
        if has_long_line(raw):
            return BodyRefused("line")
        # RFC 5321 §4.5.2: a line's leading dot was added by the client; take it away
        if raw[:1] == b".":
            raw = raw[1:]
        return Body(raw.replace(b"\r\n.", b"\r\n"))
