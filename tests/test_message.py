"""Submission validation and rendering (cluster.core.message)."""

from __future__ import annotations

import email
import email.policy
import re
from typing import Any

import pytest

from cluster.core.message import (
    MAX_RECIPIENTS,
    PreparedMessage,
    ValidationError,
    message_id_time,
    new_message_id,
    prepare,
    validate_batch,
)

NOW = 1_700_000_000.0
NOW_DATE = "Tue, 14 Nov 2023 22:13:20 +0000"
RAW = (b"From: Alice <alice@example.com>\r\n"
       b"To: bob@example.org\r\n"
       b"Subject: hello\r\n"
       b"\r\n"
       b"Hi Bob,\r\n"
       b"bye.\r\n")


def raw_msg(**extra: Any) -> dict[str, Any]:
    return {"recipients": ["bob@example.org"], "raw": RAW, **extra}


def structured(**extra: Any) -> dict[str, Any]:
    return {"sender": "alice@example.com", "recipients": ["bob@example.org"],
            "from": "Alice <alice@example.com>", "subject": "hello", "text": "Hi Bob", **extra}


def without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


# --------------------------------------------------------------------------- malformed

MALFORMED: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, submission, field, reason fragment)
    ("missing_sender_and_from", without(structured(), "sender", "from"), "sender", "missing"),
    ("bad_sender", structured(sender="alice.example.com"), "sender", "missing @"),
    ("sender_wrong_type", structured(sender=["a@example.com"]), "sender", "must be a string"),
    ("bad_recipient_named_by_index", structured(recipients=["ok@example.org", "bad@@x.org"]),
     "recipients[1]", "invalid character '@' in the domain"),
    ("recipient_with_display_name", structured(recipients=["Bob <bob@example.org>"]),
     "recipients[0]", "display name not allowed"),
    ("missing_recipients", without(structured(), "recipients"), "recipients", "missing"),
    ("empty_recipients", structured(recipients=[]), "recipients", "must not be empty"),
    ("recipients_wrong_type", structured(recipients=42), "recipients",
     "must be a list of addresses or a single address string, not int"),
    ("recipient_item_wrong_type", structured(recipients=[b"bob@example.org"]), "recipients[0]",
     "must be a string, not bytes"),
    ("too_many_recipients",
     structured(recipients=[f"u{i}@example.org" for i in range(MAX_RECIPIENTS + 1)]),
     "recipients", "1001 recipients, over the limit of 1000"),
    ("unknown_key_suggests_fix", structured(subjet="x"), "subjet",
     "unknown key (did you mean 'subject'?)"),
    ("attachments_unsupported", structured(attachments=[]), "attachments", "not supported"),
    ("cr_lf_in_subject", structured(subject="hi\r\nBcc: victim@example.net"), "subject",
     "line breaks are not allowed"),
    ("lf_in_from", structured(**{"from": "Alice\n <alice@example.com>"}), "from",
     "U+000A (LF)"),
    ("control_char_in_subject", structured(subject="a\x07b"), "subject",
     "control character U+0007"),
    ("lf_in_header_name", structured(headers={"X-A\nB": "v"}), "headers['X-A\\nB']",
     "header name contains LF"),
    ("space_in_header_name", structured(headers={"X Campaign": "v"}), "headers['X Campaign']",
     "header name contains whitespace"),
    ("colon_in_header_name", structured(headers={"X-A:": "v"}), "headers['X-A:']",
     "header name contains ':'"),
    ("non_ascii_header_name", structured(headers={"X-Grüße": "v"}), "headers['X-Grüße']",
     "only printable ASCII"),
    ("crlf_in_header_value", structured(headers={"X-Id": "1\r\nBcc: x@example.net"}),
     "headers['X-Id']", "line breaks are not allowed"),
    ("reserved_header_subject", structured(headers={"Subject": "x"}), "headers['Subject']",
     "use the 'subject' field"),
    ("bcc_header_refused", structured(headers={"Bcc": "x@example.net"}), "headers['Bcc']",
     "disclose blind recipients"),
    ("duplicate_header_names", structured(headers={"X-A": "1", "x-a": "2"}), "headers['x-a']",
     "duplicate of header 'X-A'"),
    ("bad_date_header", structured(headers={"Date": "yesterday"}), "headers['Date']",
     "not an RFC 5322 date-time"),
    ("bad_message_id_header", structured(headers={"Message-ID": "nope"}),
     "headers['Message-ID']", "not a msg-id"),
    ("headers_wrong_type", structured(headers=[("X-A", "1")]), "headers", "must be a dict"),
    ("subject_wrong_type", structured(subject=5), "subject", "must be a string, not int"),
    ("bad_to_address_named_by_index", structured(to=["ok@example.org", "Bob <bob@-x.org>"]),
     "to[1]", "label starts with a hyphen"),
    ("unparsable_to", structured(to="Bob <bob@example.org"), "to",
     "not a valid address list"),
    ("two_from_addresses", structured(**{"from": "a@example.com, b@example.com"}), "from",
     "must be exactly one address"),
    ("null_sender_without_from", without(structured(sender="<>"), "from"), "from",
     "null reverse-path"),
    ("oversize_structured_body", structured(text="x" * 5000), "body",
     "over the limit of 4000"),
    ("oversize_raw_body", raw_msg(raw=RAW + b"x" * 4000 + b"\r\n"), "body",
     "over the limit of 4000"),
    ("raw_8bit_header_without_smtputf8",
     raw_msg(raw="From: a@example.com\r\nSubject: Grüße\r\n\r\nbody\r\n".encode()),
     "raw", "line 2: 8-bit byte in the 'Subject' header field needs smtputf8"),
    ("raw_8bit_header_not_utf8",
     raw_msg(raw=b"From: a@example.com\r\nSubject: Gr\xfc\xdfe\r\n\r\nbody\r\n", smtputf8=True),
     "raw", "line 2: 'Subject' header field is not valid UTF-8"),
    ("raw_bare_cr", raw_msg(raw=b"From: a@example.com\r\n\r\nline two\r\nbare\rCR\r\n"), "raw",
     "line 4: bare CR"),
    ("raw_line_over_998", raw_msg(raw=b"From: a@example.com\r\n\r\nok\r\n" + b"x" * 999 + b"\r\n"),
     "raw", "line 4: 999 octets, over the 998-octet line limit"),
    ("raw_nul", raw_msg(raw=b"From: a@example.com\n\none\ntwo\nth\x00ree\n"), "raw",
     "line 5: NUL byte"),
    ("raw_without_from", raw_msg(raw=b"To: bob@example.org\r\nSubject: x\r\n\r\nbody\r\n"),
     "raw", "missing From header field"),
    ("raw_without_separator_garbage_line",
     raw_msg(raw=b"From: a@example.com\r\nSubject: x\r\nHello Bob, here is the body\r\n"),
     "raw", "line 3: not a header field ('Name: value') or folded continuation line"),
    ("raw_starts_with_continuation", raw_msg(raw=b" From: a@example.com\r\n\r\nbody\r\n"),
     "raw", "line 1: starts with whitespace"),
    ("raw_invalid_header_name", raw_msg(raw=b"From: a@example.com\r\nX Bad: 1\r\n\r\nb\r\n"),
     "raw", "line 2: invalid header field name 'X Bad'"),
    ("raw_whitespace_only_header_line",
     raw_msg(raw=b"From: a@example.com\r\nSubject: a\r\n  \r\n\r\nbody\r\n"), "raw",
     "line 3: whitespace-only line in the header section"),
    ("raw_duplicate_subject",
     raw_msg(raw=b"From: a@example.com\r\nSubject: a\r\nSubject: b\r\n\r\nbody\r\n"),
     "raw", "line 3: second 'Subject' header field"),
    ("raw_from_unusable_as_sender",
     raw_msg(raw=b"From: a@example.com, b@example.com\r\n\r\nbody\r\n"), "sender",
     "holds 2 addresses: give 'sender'"),
    ("raw_empty", raw_msg(raw=b""), "raw", "empty message"),
    ("raw_mbox_separator_line",
     raw_msg(raw=b"From alice@example.com Mon Jan  1 12:00:00 2024\nFrom: a@example.com\n\nx\n"),
     "raw", "line 1: mbox 'From ' separator line"),
    ("raw_str_with_lone_surrogate", raw_msg(raw="From: a@example.com\n\n\udc80\n"), "raw",
     "not encodable as UTF-8"),
    ("text_with_lone_surrogate", structured(text="caf\udce9"), "text",
     "not encodable as UTF-8: surrogates not allowed at character 3"),
    ("text_with_nul", structured(text="a\x00b"), "text", "NUL"),
    ("raw_wrong_type", raw_msg(raw=12), "raw", "must be bytes or str, not int"),
    ("raw_and_text_together", raw_msg(text="hi"), "raw",
     "cannot be combined with the structured fields 'text'"),
    ("no_body_at_all", without(structured(), "text"), "text", "missing"),
    ("tags_wrong_type", structured(tags=["a", "b"]), "tags", "must be a dict"),
    ("tag_value_wrong_type", structured(tags={"k": 1}), "tags['k']",
     "value must be a string, not int"),
    ("tag_key_too_long", structured(tags={"k" * 65: "v"}), "tags['" + "k" * 65 + "']",
     "key must be 1-64 characters"),
    ("too_many_tags", structured(tags={f"k{i}": "v" for i in range(33)}), "tags",
     "33 tags, over the limit of 32"),
    ("metadata_not_json", structured(metadata={"s": {1, 2}}), "metadata",
     "not JSON-serialisable: Object of type set"),
    ("metadata_nan", structured(metadata={"x": float("nan")}), "metadata",
     "not JSON-serialisable"),
    ("metadata_too_big", structured(metadata={"blob": "x" * 5000}), "metadata",
     "over the limit of 4096"),
    ("metadata_wrong_type", structured(metadata="{}"), "metadata", "must be a dict"),
    ("unparsable_not_before", structured(not_before="next tuesday"), "not_before",
     "not an ISO-8601 date-time"),
    ("not_before_without_timezone", structured(not_before="2025-01-01T09:00:00"),
     "not_before", "without a timezone"),
    ("not_before_wrong_type", structured(not_before=[1]), "not_before",
     "must be epoch seconds or an ISO-8601 string"),
    ("not_before_bool", structured(not_before=True), "not_before", "must be epoch seconds"),
    ("max_age_zero", structured(max_age=0), "max_age", "must be a positive duration"),
    ("max_age_negative", structured(max_age=-5), "max_age", "must be a positive duration"),
    ("max_age_bad_unit", structured(max_age="5 fortnights"), "max_age", "unknown unit 'fortnights'"),
    ("max_age_zero_string", structured(max_age="0h"), "max_age", "positive duration"),
    ("idempotency_key_too_long", structured(idempotency_key="k" * 201), "idempotency_key",
     "201 characters, over the limit of 200"),
    ("idempotency_key_wrong_type", structured(idempotency_key=7), "idempotency_key",
     "must be a string"),
    ("smtputf8_not_bool", structured(smtputf8="yes"), "smtputf8", "must be true or false"),
    ("invalid_idna_recipient_domain", structured(recipients=["bob@xn--0.example"]),
     "recipients[0]", "invalid IDNA A-label 'xn--0'"),
    ("local_part_over_64", structured(recipients=["b" * 65 + "@example.org"]),
     "recipients[0]", "local part too long (65 octets, max 64"),
    ("utf8_recipient_without_smtputf8", structured(recipients=["jörg@example.org"]),
     "recipients[0]", "requires SMTPUTF8 (RFC 6531) (set smtputf8: true)"),
    ("utf8_from_without_smtputf8", structured(**{"from": "Jörg <jörg@example.com>"}), "from",
     "requires SMTPUTF8"),
]


@pytest.mark.parametrize("submission,field,fragment", [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_submission_names_field_and_reason(submission: dict, field: str,
                                                     fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        prepare(submission, now=NOW, max_size=4000)
    e = info.value
    assert (e.field, fragment in e.reason) == (field, True), str(e)
    assert str(e) == f"{e.field}: {e.reason}"
    assert isinstance(e, ValueError)


def test_enough_distinct_malformed_kinds_are_covered() -> None:
    assert len({c[0] for c in MALFORMED}) >= 18


def test_non_dict_submission_is_rejected() -> None:
    with pytest.raises(ValidationError, match="submission: must be a dict, not list"):
        prepare([], now=NOW)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- raw messages

def _split_prefix(body: bytes, n: int) -> tuple[list[bytes], bytes]:
    lines = body.split(b"\r\n", n)
    return lines[:n], lines[n]


def test_raw_message_bytes_are_kept_with_message_id_and_date_prepended() -> None:
    p = prepare(raw_msg(), now=NOW)
    (mid, date), rest = _split_prefix(p.body, 2)
    assert rest == RAW
    assert p.added_headers == ("Message-ID", "Date")
    assert mid.startswith(b"Message-ID: <") and mid.endswith(b"@example.com>")
    assert date == f"Date: {NOW_DATE}".encode()
    ulid = mid[len(b"Message-ID: <"):].split(b"@")[0].decode()
    assert message_id_time(ulid) == NOW
    assert p.sender == "alice@example.com"  # taken from From
    assert [str(a) for a in p.recipients] == ["bob@example.org"]


RAW_LINE_ENDINGS = [
    ("crlf_unchanged", RAW, RAW),
    ("bare_lf_becomes_crlf", RAW.replace(b"\r\n", b"\n"), RAW),
    ("mixed_endings", b"From: a@example.com\nSubject: x\r\n\nbody\n",
     b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"),
    ("missing_final_newline_added", b"From: a@example.com\r\n\r\nbody",
     b"From: a@example.com\r\n\r\nbody\r\n"),
    ("headers_only_message", b"From: a@example.com\nSubject: x\n",
     b"From: a@example.com\r\nSubject: x\r\n"),
    ("folded_header_kept", b"From: a@example.com\r\nSubject: a\r\n\tb\r\n\r\nx\r\n",
     b"From: a@example.com\r\nSubject: a\r\n\tb\r\n\r\nx\r\n"),
    ("8bit_body_kept_verbatim", b"From: a@example.com\r\n\r\ncaf\xc3\xa9 \xff\r\n",
     b"From: a@example.com\r\n\r\ncaf\xc3\xa9 \xff\r\n"),
    ("line_of_998_octets_ok", b"From: a@example.com\r\n\r\n" + b"y" * 998 + b"\r\n",
     b"From: a@example.com\r\n\r\n" + b"y" * 998 + b"\r\n"),
    ("body_may_contain_header_like_garbage",
     b"From: a@example.com\r\n\r\nnot: a header\r\n indented\r\n",
     b"From: a@example.com\r\n\r\nnot: a header\r\n indented\r\n"),
]


@pytest.mark.parametrize("raw,expected", [c[1:] for c in RAW_LINE_ENDINGS],
                         ids=[c[0] for c in RAW_LINE_ENDINGS])
def test_raw_message_only_line_endings_are_normalised(raw: bytes, expected: bytes) -> None:
    p = prepare(raw_msg(raw=raw), now=NOW)
    _, rest = _split_prefix(p.body, 2)
    assert rest == expected


def test_raw_message_with_message_id_and_date_is_unchanged() -> None:
    raw = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-Id: <x@example.com>\n" + RAW
    p = prepare(raw_msg(raw=raw), now=NOW)
    assert p.body == raw.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
    assert p.added_headers == ()


def test_raw_message_only_missing_date_is_added() -> None:
    p = prepare(raw_msg(raw=b"Message-ID: <x@example.com>\r\n" + RAW), now=NOW)
    assert p.added_headers == ("Date",)
    assert p.body == f"Date: {NOW_DATE}\r\n".encode() + b"Message-ID: <x@example.com>\r\n" + RAW


def test_raw_str_is_encoded_as_utf8() -> None:
    p = prepare(raw_msg(raw=RAW.decode() + "Grüße\r\n"), now=NOW)
    assert p.body.endswith("Grüße\r\n".encode())


def test_raw_8bit_header_accepted_with_smtputf8() -> None:
    raw = "From: jörg@bücher.de\r\nSubject: Grüße\r\n\r\nx\r\n".encode()
    p = prepare(raw_msg(raw=raw, smtputf8=True), now=NOW)
    assert p.body.endswith(raw) and p.smtputf8
    assert p.sender == "jörg@bücher.de"
    assert b"@xn--bcher-kva.de>" in p.body.split(b"\r\n")[0]


def test_raw_sender_header_is_preferred_over_from_for_envelope() -> None:
    raw = b"From: a@example.com, b@example.com\r\nSender: list@example.net\r\n\r\nx\r\n"
    assert prepare(raw_msg(raw=raw), now=NOW).sender == "list@example.net"


def test_explicit_null_sender_for_bounces() -> None:
    p = prepare(raw_msg(sender="<>"), now=NOW)
    assert p.sender == ""
    assert p.body.startswith(b"Message-ID: <") and b"@raymta.invalid>\r\n" in p.body


def test_size_limit_applies_to_final_bytes() -> None:
    exact = len(prepare(raw_msg(), now=NOW).body)
    assert len(prepare(raw_msg(), now=NOW, max_size=exact).body) == exact
    with pytest.raises(ValidationError, match=f"body: message is {exact} bytes, over the limit "
                                              f"of {exact - 1}"):
        prepare(raw_msg(), now=NOW, max_size=exact - 1)


# --------------------------------------------------------------------------- structured

def _parse(body: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(body, policy=email.policy.default)  # type: ignore[return-value]


def _content(part: Any) -> str:
    return part.get_content().replace("\r\n", "\n")


def test_structured_message_round_trips() -> None:
    p = prepare(structured(to=["Bob <bob@example.org>", "carol@example.org"],
                           cc="dave@example.org", reply_to="replies@example.com",
                           html="<p>Hi <b>Bob</b></p>",
                           headers={"X-Campaign": "spring", "List-Id": "<news.example.com>"}),
                now=NOW)
    assert b"\r\n" in p.body and b"\n" not in p.body.replace(b"\r\n", b"")
    assert p.added_headers == ("Message-ID", "Date")
    m = _parse(p.body)
    assert m["Subject"] == "hello"
    assert m["From"] == "Alice <alice@example.com>"
    assert m["To"] == "Bob <bob@example.org>, carol@example.org"
    assert m["Cc"] == "dave@example.org" and m["Reply-To"] == "replies@example.com"
    assert m["X-Campaign"] == "spring" and m["List-Id"] == "<news.example.com>"
    assert m["Date"] == NOW_DATE
    assert m["Message-ID"].endswith("@example.com>")
    assert m.get_content_type() == "multipart/alternative"
    assert _content(m.get_body(("plain",))) == "Hi Bob\n"
    assert _content(m.get_body(("html",))) == "<p>Hi <b>Bob</b></p>\n"
    # headers come out in a fixed order, generated ones first
    names = [line.split(b":")[0] for line in p.body.split(b"\r\n\r\n")[0].split(b"\r\n")
             if line[:1] not in (b" ", b"\t")]
    assert names[:8] == [b"Message-ID", b"Date", b"From", b"To", b"Cc", b"Reply-To",
                         b"Subject", b"X-Campaign"]
    assert p.body.count(b"MIME-Version") == 1


@pytest.mark.parametrize("fields,content_type", [
    ({"text": "only text"}, "text/plain"),
    ({"html": "<p>only html</p>"}, "text/html"),
    ({"text": "t", "html": "<p>h</p>"}, "multipart/alternative"),
], ids=["text_only", "html_only", "text_and_html"])
def test_structured_body_shape(fields: dict[str, str], content_type: str) -> None:
    sub = without(structured(), "text") | fields
    m = _parse(prepare(sub, now=NOW).body)
    assert m.get_content_type() == content_type


def test_non_ascii_subject_and_names_are_rfc2047_encoded() -> None:
    p = prepare(structured(subject="Grüße aus Köln ☕", text="Schöne Grüße",
                           **{"from": "Jörg Müller <joerg@bücher.de>"}, sender=None), now=NOW)
    assert p.body.isascii()  # 7-bit clean: headers encoded, body quoted-printable/base64
    assert b"=?utf-8?" in p.body.split(b"\r\n\r\n")[0]
    m = _parse(p.body)
    assert m["Subject"] == "Grüße aus Köln ☕"
    assert m["From"].addresses[0].display_name == "Jörg Müller"
    assert m["From"].addresses[0].domain == "xn--bcher-kva.de"  # A-label in the header
    assert p.sender == "joerg@xn--bcher-kva.de"  # sender taken from 'from'
    assert _content(m) == "Schöne Grüße\n"


def test_smtputf8_message_carries_utf8_headers() -> None:
    p = prepare(structured(smtputf8=True, subject="Grüße", sender="jörg@bücher.de",
                           recipients=["用户@例子.广告"], **{"from": "Jörg <jörg@bücher.de>"}),
                now=NOW)
    head = p.body.split(b"\r\n\r\n")[0]
    assert "Subject: Grüße".encode() in head
    assert "<jörg@bücher.de>".encode() in head
    assert p.recipients[0].needs_smtputf8 and str(p.recipients[0]) == "用户@例子.广告"
    assert _parse(p.body)["Subject"] == "Grüße"


def test_from_defaults_to_sender_and_user_message_id_is_kept() -> None:
    p = prepare(without(structured(headers={"Message-ID": "<own@example.com>"}), "from"),
                now=NOW)
    m = _parse(p.body)
    assert m["From"] == "alice@example.com"
    assert m["Message-ID"] == "<own@example.com>"
    assert p.added_headers == ("Date",)


def test_sender_defaults_to_the_from_address() -> None:
    p = prepare(without(structured(), "sender"), now=NOW)
    assert p.sender == "alice@example.com"


def test_recipients_deduped_in_order_and_single_string_accepted() -> None:
    p = prepare(structured(recipients=["b@example.org", "A@EXAMPLE.org", "b@Example.ORG",
                                       "<a@example.org>", "A@example.org"]), now=NOW)
    assert [str(a) for a in p.recipients] == ["b@example.org", "A@example.org", "a@example.org"]
    p = prepare(structured(recipients="solo@example.org"), now=NOW)
    assert [str(a) for a in p.recipients] == ["solo@example.org"]


def test_group_syntax_in_to_is_kept() -> None:
    m = _parse(prepare(structured(to="undisclosed-recipients:;"), now=NOW).body)
    assert m["To"] == "undisclosed-recipients:;"


@pytest.mark.parametrize("max_size,error", [(0, ValueError), (-1, ValueError),
                                            ("10", TypeError), (True, TypeError)])
def test_bad_max_size_is_a_caller_error(max_size: object, error: type) -> None:
    with pytest.raises(error, match="max_size"):
        prepare(structured(), now=NOW, max_size=max_size)  # type: ignore[arg-type]
    with pytest.raises(error, match="max_size"):
        validate_batch([structured()], now=NOW, max_size=max_size)  # type: ignore[arg-type]


def test_options_are_parsed_and_copied() -> None:
    meta = {"user": 7, "list": (1, 2)}
    tags = {"campaign": "spring"}
    p = prepare(structured(tags=tags, metadata=meta, idempotency_key="order-1",
                           not_before="2023-12-01T01:00:00+01:00", max_age="1h30m"), now=NOW)
    assert p.tags == tags and p.tags is not tags
    assert p.metadata == {"user": 7, "list": [1, 2]}  # exactly what JSON will store
    assert p.idempotency_key == "order-1"
    assert p.not_before == 1701388800.0
    assert p.max_age == 5400.0
    assert p.smtputf8 is False


def test_a_queue_lifetime_over_30_days_is_refused() -> None:
    with pytest.raises(ValidationError, match="max_age: 2592001 s is over the limit of 30 days"):
        prepare(structured(max_age="30d1s"), now=NOW)
    with pytest.raises(ValidationError, match="not_before: more than 30 days ahead"):
        prepare(structured(not_before=NOW + 31 * 86400), now=NOW)
    assert prepare(structured(max_age="30d", not_before=NOW + 29 * 86400), now=NOW).max_age


def test_none_values_count_as_absent() -> None:
    p = prepare(structured(tags=None, metadata=None, not_before=None, max_age=None,
                           idempotency_key=None, cc=None), now=NOW)
    assert (p.tags, p.metadata, p.not_before, p.max_age, p.idempotency_key) == \
        ({}, {}, None, None, None)


@pytest.mark.parametrize("value,seconds", [
    (90, 90.0), (1.5, 1.5), ("250ms", 0.25), ("45s", 45.0), ("10m", 600.0), ("2h", 7200.0),
    ("5d", 432000.0), ("1w", 604800.0), ("1h30m", 5400.0), ("1H 30M", 5400.0), ("1.5h", 5400.0),
])
def test_max_age_accepts_seconds_and_duration_strings(value: object, seconds: float) -> None:
    assert prepare(structured(max_age=value), now=NOW).max_age == seconds


@pytest.mark.parametrize("text", ["", "h", "5x", "-5m", "5m-", "5 fortnights", "0s"])
def test_max_age_rejects_a_malformed_or_empty_duration(text: str) -> None:
    # one duration grammar for the whole project (cluster.core.ratespec.parse_duration)
    with pytest.raises(ValidationError, match="max_age: "):
        prepare(structured(max_age=text), now=NOW)


@pytest.mark.parametrize("value,epoch", [
    (1_700_000_000, 1_700_000_000.0),
    (1_700_000_000.5, 1_700_000_000.5),
    ("2023-11-14T22:13:20Z", 1_700_000_000.0),
    ("2023-11-14T23:13:20+01:00", 1_700_000_000.0),
    ("2023-11-14 22:13:20.250+00:00", 1_700_000_000.25),
])
def test_not_before_accepts_epoch_and_iso8601(value: object, epoch: float) -> None:
    assert prepare(structured(not_before=value), now=NOW).not_before == epoch


# --------------------------------------------------------------------------- batches

def test_batch_isolates_bad_submissions() -> None:
    subs = [structured(), "not a dict", structured(recipients=[]), raw_msg(), 42]
    out = validate_batch(subs, now=NOW, max_size=1_000_000)  # type: ignore[arg-type]
    assert len(out) == len(subs)
    assert isinstance(out[0], PreparedMessage) and isinstance(out[3], PreparedMessage)
    assert isinstance(out[1], ValidationError) and str(out[1]) == \
        "submissions[1]: must be a dict, not str"
    assert isinstance(out[2], ValidationError) and out[2].field == "recipients"
    assert out[2].index == 2
    assert isinstance(out[4], ValidationError) and out[4].field == "submissions[4]"


def test_batch_requires_a_list() -> None:
    with pytest.raises(ValidationError, match="submissions: must be a list"):
        validate_batch({"recipients": []}, now=NOW)  # type: ignore[arg-type]


def test_empty_batch() -> None:
    assert validate_batch([], now=NOW) == []


# --------------------------------------------------------------------------- ULIDs

CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def test_ulid_format_and_time_round_trip() -> None:
    for now in (0.0, 1.001, NOW, NOW + 0.123, 2**48 / 1000 - 0.001):
        mid = new_message_id(now)
        assert len(mid) == 26 and set(mid) <= CROCKFORD
        assert message_id_time(mid) == round(now * 1000) / 1000
    assert message_id_time("<" + new_message_id(NOW) + "@example.com>") == NOW
    assert message_id_time(new_message_id(NOW).lower()) == NOW
    # the ULID spec's example: 01ARZ3NDEKTSV4RRFFQ69G5FAV was made at 1469922850259 ms
    assert new_message_id(1469922850.259)[:10] == "01ARZ3NDEK"
    assert new_message_id(0.0)[:10] == "0000000000"
    assert new_message_id(2**48 / 1000 - 0.001)[:10] == "7ZZZZZZZZZ"


def test_ulid_random_characters_are_uniform() -> None:
    """Each of the 16 random characters is drawn evenly from the 32 (80 random bits)."""
    from collections import Counter
    ids = [new_message_id(NOW) for _ in range(50_000)]
    for pos in (10, 17, 25):
        counts = Counter(i[pos] for i in ids)
        assert set(counts) == CROCKFORD
        assert all(abs(n - 50_000 / 32) < 0.15 * 50_000 / 32 for n in counts.values()), counts


@pytest.mark.parametrize("bad", ["", "short", "8" + "0" * 25, "0" * 25 + "!", "U" * 26])
def test_message_id_time_rejects_non_ulids(bad: str) -> None:
    with pytest.raises(ValueError, match="not a ULID"):
        message_id_time(bad)


@pytest.mark.parametrize("now", [-1.0, 2**48 / 1000])
def test_new_message_id_rejects_times_outside_range(now: float) -> None:
    with pytest.raises(ValueError, match="outside the ULID time range"):
        new_message_id(now)


def test_ulids_sort_by_time_and_are_unique_over_100k() -> None:
    base_ms = 1_700_000_000_000
    ids = [new_message_id((base_ms + i // 3) / 1000) for i in range(100_000)]
    assert len(set(ids)) == len(ids)
    times = [message_id_time(i) for i in ids]
    assert times == sorted(times)
    # string order is time order: sorting ids never puts a later millisecond first
    assert [message_id_time(i) for i in sorted(ids)] == times
    same_ms = [new_message_id(NOW) for _ in range(100_000)]
    assert len(set(same_ms)) == len(same_ms)


def test_ulids_after_fork_differ_from_the_parents() -> None:
    # the random bytes come from a pool: a forked child must not hand out the parent's
    import os
    new_message_id(NOW)                       # the parent's pool is filled
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                              # child: 100 ids, same millisecond as the parent's
        try:
            os.write(w, "".join(new_message_id(NOW) for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    child = {data[i:i + 26].decode() for i in range(0, len(data), 26)}
    parent = {new_message_id(NOW) for _ in range(100)}
    assert len(child) == 100 and len(parent) == 100 and not child & parent


def test_ids_made_to_hash_to_a_shard_stay_valid_distinct_ulids() -> None:
    from cluster.client import shard_of
    from cluster.core.message import id_for_shard
    now = 1_800_000_000.123
    for shards in (2, 4, 7, 64, 2000):
        seen = set()
        for k in range(300):
            mid = new_message_id(now)
            got = id_for_shard(mid, k % shards, shards)
            assert shard_of(got, shards) == k % shards
            assert message_id_time(got) == message_id_time(mid)   # a ULID of the same time
            seen.add(got)
        assert len(seen) == 300


def test_the_plain_message_fast_path_agrees_with_the_line_by_line_check(monkeypatch) -> None:
    """Every raw case here and every real message of the bounce and ARF corpora, as given and
    with LF line ends, with an envelope sender given (the fast path's case): the same body, or
    the same error, whether the message is checked by the fast path or line by line."""
    import cluster.core.message as message
    from tests.conftest import corpus
    raws = [c[1]["raw"] for c in MALFORMED if "raw" in c[1]] + [c[1] for c in RAW_LINE_ENDINGS]
    raws += [RAW, b"From: a@example.com\r\nX: 1\r\n \t folded\r\n\r\nb\r\n",
             b"From: a@example.com\r\nReceived: 1\r\nReceived: 2\r\n\r\nb\r\n",
             b"From: a@example.com\r\nSubject: a\r\n \t \r\n\r\nb\r\n",
             b"From: a@example.com\r\nDate: x\r\nDATE: y\r\n\r\nb\r\n",
             b"Subject: no from\r\n\r\nb\r\n", b"From: a@example.com\r\n\r\n",
             b"From: a@example.com\r\nno colon here\r\n\r\nb\r\n",
             # line ends: mixed, bare CR in the body, LF only, no end at the end
             b"From: a@example.com\r\nX: 1\n\r\nb\r\n", b"From: a@example.com\r\n\r\nb\rc\r\n",
             b"From: a@example.com\nX: 1\n\nb\n", b"From: a@example.com\r\n\r\nb",
             b"From: a@example.com\r\n\r\nb\r", b"From: a@example.com\n\nb\r\n",
             b"From: a@example.com\r\nX: 1\r\n", b"\r\nFrom: a@example.com\r\n\r\nb\r\n",
             # line lengths at and over the limit, in the body and in a header field
             b"From: a@example.com\r\n\r\n" + b"x" * 998 + b"\r\n",
             b"From: a@example.com\r\n\r\n" + b"x" * 999 + b"\r\n",
             b"From: a@example.com\n\n" + b"x" * 999,
             b"From: a@example.com\r\nX: " + b"y" * 995 + b"\r\n\r\nb\r\n",
             b"From: a@example.com\r\nX: " + b"y" * 996 + b"\r\n\r\nb\r\n",
             # 8-bit: in a header field (SMTPUTF8), in the body; a bad field name; folding
             "From: a@example.com\r\nSubject: caf\u00e9\r\n\r\nb\r\n".encode(),
             "From: a@example.com\r\n\r\ncaf\u00e9\r\n".encode(),
             b"From: a@example.com\r\nBad Name: 1\r\n\r\nb\r\n",
             b"From: a@example.com\r\n Folded first\r\n\r\nb\r\n",
             b" X: 1\r\nFrom: a@example.com\r\n\r\nb\r\n",
             b"From: a@example.com\r\nMessage-ID: <a@b>\r\nDate: x\r\n\r\nb\r\n"]
    files = sorted(p for sub in ("bounces", "arf") for p in corpus(sub).rglob("*.eml"))
    assert len(files) > 100, f"bounce and ARF corpora incomplete: {len(files)} messages"
    raws += [p.read_bytes() for p in files]
    raws += [r.replace(b"\r\n", b"\n") for r in raws if isinstance(r, bytes)]
    fast_path = message._plain_raw

    def outcome(raw: Any) -> Any:
        try:
            p = prepare({"sender": "s@example.com", "recipients": ["r@example.org"],
                         "raw": raw, "smtputf8": True}, now=NOW)
            # an added Message-ID is new each time
            return re.sub(rb"^Message-ID: <[0-9A-Z]{26}@", b"", p.body), p.added_headers
        except ValidationError as e:
            return e.field, e.reason

    used = 0
    for raw in raws:
        monkeypatch.setattr(message, "_plain_raw", lambda data: None)
        slow = outcome(raw)
        monkeypatch.setattr(message, "_plain_raw", fast_path)
        assert outcome(raw) == slow, raw[:200]
        if isinstance(raw, bytes) and b"\x00" not in raw and fast_path(raw) is not None:
            used += 1
    assert used > 150   # the fast path really was taken for most of them


def test_new_message_ids_are_ulids_of_the_time_that_hash_to_their_shard() -> None:
    from cluster.core.message import id_for_shard, new_message_ids
    from cluster.core.sites import stable_hash
    for shards in (1, 2, 3, 7):
        for shard in range(shards):
            ids = new_message_ids(NOW, 500, shard, shards)
            assert len(ids) == len(set(ids)) == 500
            assert all(stable_hash(i) % shards == shard for i in ids)
            assert {message_id_time(i) for i in ids} == {NOW}
            assert all(len(i) == 26 and set(i) <= set(CROCKFORD) for i in ids)
    assert id_for_shard(new_message_ids(NOW, 1)[0], 0, 1)[:10] == new_message_id(NOW)[:10]
    big = new_message_ids(NOW, 10_000)        # more than one refill of the random pool
    assert len(set(big)) == 10_000 and new_message_ids(NOW, 0) == []
    with pytest.raises(ValueError, match="outside the ULID time range"):
        new_message_ids(-1.0, 3)
