"""``prepare_parsed`` (cluster.core.message): the SMTP listener's way into the client's
validation, with the addresses MAIL and RCPT already parsed, must give exactly what
``validate_batch`` + ``wire_item`` give for the same message (ids aside), or the same error."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cluster.core.addresses import parse_address
from cluster.core.intake import wire_item
from cluster.core.message import (
    MAX_RECIPIENTS,
    ValidationError,
    prepare_parsed,
    validate_batch,
)

NOW = 1_700_000_000.0
HEAD = b"From: A <a@example.com>\r\nTo: b@example.org\r\nSubject: hi\r\n"
DATED = HEAD + b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <x@example.com>\r\n"
BODY = b"\r\nline one\r\n.dot line\r\n"
RCPT = ["b@example.org"]

# (name, sender, recipients, raw, options)
CASES: list[tuple[str, str, list[str], Any, dict[str, Any]]] = [
    ("plain CRLF, dated", "a@example.com", RCPT, DATED + BODY, {}),
    ("Date and Message-ID added", "a@example.com", RCPT, HEAD + BODY, {}),
    ("with a Received field on top", "a@example.com", RCPT,
     b"Received: from x ([127.0.0.1])\r\n\tby raymta (raymta) with ESMTP id 1\r\n\tfor "
     b"<b@example.org>; Tue, 14 Nov 2023 22:13:20 +0000\r\n" + DATED + BODY, {}),
    ("two Received fields", "a@example.com", RCPT,
     b"Received: one\r\nReceived: two\r\n" + DATED + BODY, {}),
    ("LF line ends", "a@example.com", RCPT, (DATED + BODY).replace(b"\r\n", b"\n"), {}),
    ("no body", "a@example.com", RCPT, DATED, {}),
    ("empty body", "a@example.com", RCPT, DATED + b"\r\n", {}),
    ("null sender", "", RCPT, DATED + BODY, {}),
    ("dsn", "a@example.com", RCPT, DATED + BODY, {"dsn": True}),
    ("duplicate recipients (domain case)", "a@example.com",
     ["b@example.org", "b@EXAMPLE.org", "B@example.org"], DATED + BODY, {}),
    ("SMTPUTF8 recipient", "a@example.com", ["ü@example.org"], DATED + BODY,
     {"smtputf8": True}),
    ("8-bit header", "a@example.com", RCPT,
     DATED + "X-Note: grüße\r\n".encode() + BODY, {"smtputf8": True}),
    ("folded field", "a@example.com", RCPT, DATED + b"X-Long: a\r\n\tb\r\n" + BODY, {}),
    # refusals: the same field and reason
    ("bare CR", "a@example.com", RCPT, DATED + b"\r\nbad\rline\r\n", {}),
    ("bare LF among CRLF", "a@example.com", RCPT, DATED + b"\r\nbad\nline\r\n", {}),
    ("NUL", "a@example.com", RCPT, DATED + b"\r\nnul\x00\r\n", {}),
    ("999-octet line", "a@example.com", RCPT, DATED + b"\r\n" + b"x" * 999 + b"\r\n", {}),
    ("998-octet line", "a@example.com", RCPT, DATED + b"\r\n" + b"x" * 998 + b"\r\n", {}),
    ("no From", "a@example.com", RCPT, b"Subject: s\r\n" + BODY, {}),
    ("second Subject", "a@example.com", RCPT, DATED + b"Subject: again\r\n" + BODY, {}),
    ("whitespace-only continuation", "a@example.com", RCPT, DATED + b"X-A: a\r\n \r\n" + BODY,
     {}),
    ("empty message", "a@example.com", RCPT, b"", {}),
    ("too big", "a@example.com", RCPT, DATED + BODY + b"x" * 300 + b"\r\n", {"max_size": 300}),
    ("too big once completed", "a@example.com", RCPT, HEAD + BODY, {"max_size": len(HEAD) + 30}),
    ("too many recipients", "a@example.com",
     [f"r{i}@example.org" for i in range(MAX_RECIPIENTS + 1)], DATED + BODY, {}),
]


def _mask(item: list[Any]) -> list[Any]:
    """A wire item without its ids, and an added Message-ID's random token masked."""
    out = list(item)
    out[0] = None
    out[1] = re.sub(rb"Message-ID: <[^@>]+@", b"Message-ID: <*@", out[1])
    out[3] = [r[1:] for r in out[3]]
    return out


@pytest.mark.parametrize("name,sender,rcpts,raw,opts", CASES, ids=[c[0] for c in CASES])
def test_prepare_parsed_matches_validate_batch(name: str, sender: str, rcpts: list[str],
                                               raw: Any, opts: dict[str, Any]) -> None:
    utf8 = opts.get("smtputf8", False)
    dsn = opts.get("dsn", False)
    max_size = opts.get("max_size", 10_000_000)
    [want] = validate_batch([{"sender": sender or "<>", "recipients": rcpts, "raw": raw,
                              "smtputf8": utf8, "dsn": dsn}], now=NOW, max_size=max_size)
    parsed_sender = parse_address(sender, field="sender", allow_empty=True,
                                  allow_smtputf8=utf8)
    parsed_rcpts = [parse_address(r, allow_smtputf8=utf8) for r in rcpts]
    try:
        got: Any = prepare_parsed(parsed_sender, parsed_rcpts, raw, smtputf8=utf8, dsn=dsn,
                                  now=NOW, max_size=max_size)
    except ValidationError as e:
        got = e
    if isinstance(want, ValidationError):
        assert isinstance(got, ValidationError), f"{name}: accepted, validate_batch refused " \
            f"it: {want}"
        assert (got.field, got.reason) == (want.field, want.reason)
        return
    assert not isinstance(got, ValidationError), f"{name}: refused ({got}), validate_batch " \
        "accepted it"
    ids = [f"ID{i}" for i in range(len(want.recipients))]
    assert _mask(wire_item(got, iter(ids))) == _mask(wire_item(want, iter(ids)))
    assert got.added_headers == want.added_headers


def test_the_table_covers_both_outcomes() -> None:
    """The table means something only if it holds refusals and acceptances."""
    outcomes = {isinstance(validate_batch([{"sender": s or "<>", "recipients": r, "raw": raw,
                                            **{k: v for k, v in o.items() if k != "max_size"}}],
                                          now=NOW, max_size=o.get("max_size", 10_000_000))[0],
                           ValidationError) for _, s, r, raw, o in CASES}
    assert outcomes == {True, False}
