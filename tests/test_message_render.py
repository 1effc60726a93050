"""The direct rendering of common structured messages (message._render_plain) writes exactly
the bytes the stdlib's email package writes for them (message._render_mime), and declines
everything the stdlib would quote, fold, encode or split into parts. Pure: no Ray, no I/O."""

from __future__ import annotations

import random

import pytest

from cluster.core import message as m
from cluster.core.message import _render_mime, _render_plain, prepare

NOW = 1_800_000_000.0
ADDED = [("Message-ID", "<01KT00000000000000000000AA@news.example>"),
         ("Date", "Fri, 15 Jan 2027 08:00:00 +0000")]


def _addrs(*specs: tuple[str, str, str]) -> list:
    return [m.HeaderAddress(display_name=n, username=u, domain=d) for n, u, d in specs]


NEWS = _addrs(("News", "news", "news.example"))

# (case, from, to, subject, text, html, taken by the direct path?)
CASES = [
    ("bench message", NEWS, [], "bench 1 7", "line 1 of a message\nline 2\n", None, True),
    ("html only", _addrs(("", "a", "b.example")), [], None, None, "<p>hi</p>", True),
    ("no trailing newline", NEWS, [], "s", "one line", None, True),
    ("blank lines and tabs", NEWS, _addrs(("Bob B", "bob", "x.example"), ("", "c", "d.test")),
     "Re: [list] 50% off, today!", "a\n\n\tb\n\n", None, True),
    ("plus and dots", _addrs(("", "first.last+tag", "mail.example.org")), [], "x", "y\n",
     None, True),
    ("just a newline", NEWS, [], "x", "\n", None, True),
    ("line of 78", NEWS, [], "x", "a" * 78 + "\n", None, True),
    ("line of 79: quoted-printable", NEWS, [], "x", "a" * 79 + "\n", None, False),
    ("non-ASCII text", NEWS, [], "x", "caf\u00e9\n", None, False),
    ("non-ASCII subject", NEWS, [], "caf\u00e9", "x\n", None, False),
    ("encoded-word lookalike", NEWS, [], "=?utf-8?q?x?=", "x\n", None, False),
    ("quoted display name", _addrs(("Smith, John", "j", "x.example")), [], "x", "y\n", None,
     False),
    ("dotted display name", _addrs(("J. Smith", "j", "x.example")), [], "x", "y\n", None,
     False),
    ("long subject: folded", NEWS, [], "word " * 20, "x\n", None, False),
    ("double space in subject", NEWS, [], "a  b", "x\n", None, False),
    ("text and html: multipart", NEWS, [], "x", "y\n", "<p>y</p>", False),
    ("carriage return in body", NEWS, [], "x", "a\rb\n", None, False),
    ("form feed in body", NEWS, [], "x", "a\x0cb\n", None, False),
    ("many recipients: folded", NEWS, _addrs(*[("", f"user{i}", "example.com")
                                              for i in range(8)]), "x", "y\n", None, False),
]


@pytest.mark.parametrize("case, from_, to, subject, text, html, direct", CASES,
                         ids=[c[0] for c in CASES])
def test_direct_rendering_is_the_stdlib_rendering_or_declines(case, from_, to, subject, text,
                                                              html, direct):
    fast = _render_plain(ADDED, from_, to, [], [], subject, text, html)
    slow = _render_mime(ADDED, from_, to, [], [], subject, {}, text, html, False, NOW)
    assert (fast is not None) == direct, case
    if fast is not None:
        assert fast == slow, case


def test_random_messages_render_alike_whenever_taken():
    rng = random.Random(20261205)
    words = ["a", "Zz", "50%", "x.y", "[tag]", "<b>", "caf\u00e9", "=?", "q\"", "(c)", "~",
             "", " ", "\t", "line", "x" * 40, "y" * 80]
    taken = 0
    for _ in range(1500):
        def phrase(n: int) -> str:
            return "".join(rng.choice(words) + rng.choice(["", " ", "\n", "\n\n", "\r\n"])
                           for _ in range(rng.randint(1, n)))
        name = rng.choice(["", "News", "Bob B", "A. B", "x" * 70])
        to = _addrs(*[(rng.choice(["", "T"]), rng.choice(["t", "a.b", "c+d", "e_f"]),
                       "ex.test") for _ in range(rng.randint(0, 4))])
        subject = rng.choice([None, phrase(3).replace("\n", " ").replace("\r", "")])
        text = phrase(12)
        html = rng.choice([None, None, "<p>" + phrase(3) + "</p>"])
        if rng.random() < 0.2:
            text, html = None, html or "<p>x</p>"
        from_ = _addrs((name, "news", "news.example"))
        try:
            slow = _render_mime(ADDED, from_, to, [], [], subject, {}, text, html, False, NOW)
        except Exception:           # noqa: BLE001 - what the stdlib refuses, ours must too
            assert _render_plain(ADDED, from_, to, [], [], subject, text, html) is None
            continue
        fast = _render_plain(ADDED, from_, to, [], [], subject, text, html)
        if fast is not None:
            taken += 1
            assert fast == slow, (name, to, subject, text, html)
    assert taken > 100                 # the comparison ran on many messages


def test_prepare_takes_the_direct_path_for_the_common_message(monkeypatch):
    sub = {"from": "News <news@news.example>", "recipients": ["u@x.example"],
           "subject": "hello", "text": "line\n" * 30}
    expected = prepare(sub, now=NOW).body

    def stdlib(*args, **kw):
        raise AssertionError("the common message went through the stdlib's email package")
    monkeypatch.setattr(m, "_render_mime", stdlib)
    for _ in range(2):          # the second time, the From string's parse comes from the cache
        p = prepare(sub, now=NOW)
        assert p.body.split(b"\r\n", 2)[2] == expected.split(b"\r\n", 2)[2]  # but Message-ID
        assert p.body.endswith(b"Content-Type: text/plain; charset=\"utf-8\"\r\n"
                               b"Content-Transfer-Encoding: 7bit\r\nMIME-Version: 1.0\r\n\r\n" +
                               b"line\r\n" * 30)
        assert p.added_headers == ("Message-ID", "Date")
    # a From the cache holds is still checked against the call's SMTPUTF8 and reported by field
    with pytest.raises(m.ValidationError) as e:
        prepare({**sub, "from": ["News <news@news.example>"]}, now=NOW)
    assert e.value.field == "from"
