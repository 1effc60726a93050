"""The SMTP session's framing (cluster/core/smtp_reader.py), as tables: what the client sends,
cut into reads as given, and the events a session gets from it."""

from __future__ import annotations

import random

import pytest

from cluster.core.smtp_reader import (
    MAX_TEXT_LINE,
    Body,
    BodyRefused,
    Line,
    LineTooLong,
    SmtpReader,
    has_long_line,
)

BIG = 100


def run(reads: list[bytes], *, data_after: set[int] = frozenset(), limit: int = BIG,
        max_line: int = 64) -> list[object]:
    """Feed ``reads`` one by one; after the n-th command line (0-based) in ``data_after``, a
    body begins (as a session does once it answered DATA with 354)."""
    r = SmtpReader(max_line=max_line)
    events: list[object] = []
    lines = 0
    for chunk in reads:
        r.feed(chunk)
        while (ev := r.next_event()) is not None:
            events.append(ev)
            if isinstance(ev, Line):
                if lines in data_after:
                    r.begin_data(limit)
                lines += 1
    return events


CASES = [
    # (what it shows, reads, DATA after command line n, events)
    ("one command, CRLF", [b"NOOP\r\n"], set(), [Line(b"NOOP")]),
    ("a line split across reads", [b"MAIL FR", b"OM:<a@b.test>", b"\r", b"\n"], set(),
     [Line(b"MAIL FROM:<a@b.test>")]),
    ("pipelined commands in one read", [b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"],
     set(), [Line(b"MAIL FROM:<a@b.test>"), Line(b"RCPT TO:<c@d.test>"), Line(b"DATA")]),
    ("a bare LF ends a command line", [b"NOOP\nQUIT\r\n"], set(), [Line(b"NOOP"), Line(b"QUIT")]),
    ("an incomplete line is no event", [b"NOOP"], set(), []),
    ("an empty line is a line", [b"\r\n"], set(), [Line(b"")]),
    ("a body, dot-unstuffed", [b"DATA\r\n", b"a\r\n..b\r\n.c\r\n.\r\n"], {0},
     [Line(b"DATA"), Body(b"a\r\n.b\r\nc\r\n")]),
    ("the first body line unstuffed too", [b"DATA\r\n..x\r\n.\r\n"], {0},
     [Line(b"DATA"), Body(b".x\r\n")]),
    ("an empty body", [b"DATA\r\n.\r\n"], {0}, [Line(b"DATA"), Body(b"")]),
    ("an empty body in pieces", [b"DATA\r\n", b".", b"\r", b"\n"], {0},
     [Line(b"DATA"), Body(b"")]),
    ("a body of one empty line", [b"DATA\r\n\r\n.\r\n"], {0}, [Line(b"DATA"), Body(b"\r\n")]),
    ("the end dot split across reads", [b"DATA\r\nhi\r", b"\n.", b"\r", b"\nQUIT\r\n"], {0},
     [Line(b"DATA"), Body(b"hi\r\n"), Line(b"QUIT")]),
    ("commands pipelined after the body", [b"DATA\r\nx\r\n.\r\nMAIL FROM:<a@b.test>\r\n"],
     {0}, [Line(b"DATA"), Body(b"x\r\n"), Line(b"MAIL FROM:<a@b.test>")]),
    ("a bare LF does not end a body (SMTP smuggling)",
     [b"DATA\r\nx\n.\nMAIL FROM:<e@vil>\r\n.\r\n"], {0},
     [Line(b"DATA"), Body(b"x\n.\nMAIL FROM:<e@vil>\r\n")]),
    ("nor does LF.CRLF", [b"DATA\r\nx\n.\r\ny\r\n.\r\n"], {0},
     [Line(b"DATA"), Body(b"x\n.\r\ny\r\n")]),
    ("a body never ended is no event", [b"DATA\r\nx\r\n"], {0}, [Line(b"DATA")]),
    ("a body over the limit, refused once it ended",
     [b"DATA\r\n", b"y" * 60 + b"\r\n", b"y" * 60 + b"\r\n", b".\r\nNOOP\r\n"], {0},
     [Line(b"DATA"), BodyRefused("size"), Line(b"NOOP")]),
    ("a body exactly at the limit is taken", [b"DATA\r\n" + b"z" * 98 + b"\r\n.\r\n"], {0},
     [Line(b"DATA"), Body(b"z" * 98 + b"\r\n")]),
    ("an overlong command line, reported at its end",
     [b"NOOP " + b"x" * 40, b"x" * 40, b"x\r\nQUIT\r\n"], set(),
     [LineTooLong(86), Line(b"QUIT")]),
    ("an overlong line in one read", [b"x" * 70 + b"\r\nNOOP\r\n"], set(),
     [LineTooLong(70), Line(b"NOOP")]),
]


@pytest.mark.parametrize("what,reads,data_after,want", CASES, ids=[c[0] for c in CASES])
def test_framing(what, reads, data_after, want):
    assert run(reads, data_after=data_after) == want


def test_a_body_line_longer_than_the_limit_is_refused():
    r = SmtpReader()
    r.begin_data(10_000)
    r.feed(b"ok\r\n" + b"w" * (MAX_TEXT_LINE + 1) + b"\r\n.\r\n")
    assert r.next_event() == BodyRefused("line")
    r.begin_data(10_000)
    r.feed(b"w" * MAX_TEXT_LINE + b"\r\n.\r\n")
    assert r.next_event() == Body(b"w" * MAX_TEXT_LINE + b"\r\n")


_M = MAX_TEXT_LINE
#: (what it shows, body up to its final CRLF, has a line over MAX_TEXT_LINE)
LONG_LINES = [
    ("short lines", b"a\r\n" * 3000, False),
    ("one line exactly at the limit", b"w" * _M + b"\r\n", False),
    ("one line one past the limit", b"w" * (_M + 1) + b"\r\n", True),
    ("a long line last", b"a\r\n" * 500 + b"w" * (_M + 1) + b"\r\n", True),
    ("a long line first", b"w" * (_M + 1) + b"\r\n" + b"a\r\n" * 500, True),
    ("at the limit between short lines", b"ab\r\n" + b"w" * _M + b"\r\nc\r\n", False),
    ("lines of the limit back to back", (b"w" * _M + b"\r\n") * 5, False),
    ("a bare LF does not end a line", b"w" * 600 + b"\n" + b"w" * 600 + b"\r\n", True),
    ("a bare CR does not either", b"w" * 600 + b"\r" + b"w" * 600 + b"\r\n", True),
    ("CR CR LF: the line keeps one CR", b"w" * (_M - 1) + b"\r\r\n", False),
    ("CR CR LF one past", b"w" * _M + b"\r\r\n", True),
    ("no CRLF at the end, short", b"w" * _M, False),
    ("no CRLF at the end, long", b"a\r\n" + b"w" * (_M + 1), True),
    ("empty", b"", False),
]


@pytest.mark.parametrize("what,raw,want", LONG_LINES, ids=[c[0] for c in LONG_LINES])
def test_has_long_line(what, raw, want):
    assert has_long_line(raw) is want
    assert want == (max(map(len, raw.split(b"\r\n"))) > MAX_TEXT_LINE)   # the definition


def test_has_long_line_agrees_with_splitting_on_crlf():
    """Random bodies of CR, LF and letters, lines around the limit: the same answer as the
    definition (cut at CRLF, longest piece over MAX_TEXT_LINE)."""
    rnd = random.Random(5321)
    for _ in range(2000):
        parts = []
        for _ in range(rnd.randint(0, 6)):
            n = rnd.choice([0, 1, _M - 2, _M - 1, _M, _M + 1, rnd.randint(0, 3 * _M)])
            parts.append(bytes(rnd.choice(b"ab\r\n") if rnd.random() < 0.01 else 97
                               for _ in range(n)))
        raw = b"\r\n".join(parts) + rnd.choice([b"", b"\r\n", b"\r", b"\n"])
        assert has_long_line(raw) == (max(map(len, raw.split(b"\r\n"))) > _M), raw[:80]


def test_memory_stays_bounded():
    """A body past its limit and a command line without end are dropped as they come."""
    r = SmtpReader(max_line=512)
    r.begin_data(1000)
    for _ in range(100):
        r.feed(b"q" * 997 + b"\r\n")
        assert r.next_event() is None
        assert r.buffered < 2 * 1000
    r.feed(b".\r\n")
    assert r.next_event() == BodyRefused("size")
    for _ in range(100):
        r.feed(b"n" * 1000)
        assert r.next_event() is None
        assert r.buffered <= 1000
    r.feed(b"\r\n")
    assert r.next_event() == LineTooLong(100_000)


def test_starttls_discards_what_was_sent_before_the_handshake():
    r = SmtpReader()
    r.feed(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
    assert r.next_event() == Line(b"STARTTLS")
    r.discard()
    assert r.next_event() is None and r.buffered == 0
