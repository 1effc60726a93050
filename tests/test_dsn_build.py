"""The DSN raymta sends to an envelope sender (cluster/core/dsn_build.py), and the queue's debt
of DSNs (QueueState.dsn_due): built reports read back with raymta's own parser and with
Python's email package; who gets one and who never does; a debt survives replay and a
snapshot, and is settled exactly once."""

from __future__ import annotations

import email
from email import policy

import pytest

from cluster.core import queue as q
from cluster.core.dsn import parse_message
from cluster.core.dsn_build import (
    DSN_OF_KEY,
    DSN_REQUEST_KEY,
    MAX_RETURNED_HEADERS,
    build_dsn,
    dsn_for_entry,
    dsn_status,
    header_section,
    wants_dsn,
)
from cluster.core.message import ValidationError, prepare

ORIG = "01JD0000000000000000000001"
DSN_ID = "01JD0000000000000000000002"
HEAD = (b"From: Alice <alice@origin.test>\r\nTo: <bob@fail.test>\r\nSubject: hello\r\n"
        b"Message-ID: <m1@origin.test>\r\n")
BODY = HEAD + b"\r\nthe body, never returned\r\n"


def _build(**kw):
    args = {"dsn_id": DSN_ID, "original_id": ORIG, "reporting_mta": "mx.raymta.test",
            "envelope_sender": "alice@origin.test", "recipient": "bob@fail.test",
            "kind": "bounce", "code": 550, "enhanced": "5.1.1",
            "text": "5.1.1 <bob@fail.test>: User unknown", "remote_mta": "mx.fail.test",
            "arrival": 1_800_000_000.0, "ts": 1_800_000_060.0, "headers": header_section(BODY)}
    args.update(kw)
    return build_dsn(**args)


@pytest.mark.parametrize("kind,code,enhanced,text,status,category", [
    ("bounce", 550, "5.1.1", "5.1.1 <bob@fail.test>: User unknown", "5.1.1",
     "invalid-recipient"),
    ("bounce", 552, "5.2.2", "5.2.2 mailbox full", "5.2.2", "quota"),
    ("bounce", 554, None, "rejected for policy reasons", "5.0.0", None),
    ("expired", 451, "4.3.0", "message expired after 5 attempts; last reply: 4.3.0 try later",
     "4.3.0", "message-expired"),
    ("expired", None, None, "message expired in queue after 0 attempts", "4.4.7",
     "message-expired"),
])
def test_a_built_dsn_parses_back_with_its_recipient_and_status(kind, code, enhanced, text,
                                                                status, category):
    raw = _build(kind=kind, code=code, enhanced=enhanced, text=text)
    rep = parse_message(raw)
    assert rep.kind == "dsn" and rep.reason == "rfc3464"
    assert rep.raymta_id == ORIG and rep.reporting_mta == "mx.raymta.test"
    assert rep.original_message_id == "<m1@origin.test>"
    [r] = rep.recipients
    assert (r.recipient, r.action, r.status) == ("bob@fail.test", "failed", status)
    assert r.remote_mta == "mx.fail.test"
    if code is not None:
        assert r.diagnostic.startswith(str(code))
    if category:
        assert r.category == category
    # the email package reads it as a well-formed multipart/report
    msg = email.message_from_bytes(raw, policy=policy.SMTP)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert str(msg["From"]) == "Mail Delivery System <MAILER-DAEMON@mx.raymta.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = [p.get_content_type() for p in msg.iter_parts()]
    assert parts == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert not msg.defects and all(not p.defects for p in msg.walk())
    assert b"the body, never returned" not in raw
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_the_same_failure_builds_the_same_bytes():
    assert _build() == _build()
    assert _build() != _build(dsn_id="01JD0000000000000000000003")


def test_header_section_is_cut_on_a_field_boundary():
    folded = b"X-Long: " + b"word " * 10 + b"\r\n\tcontinued\r\n"
    head = HEAD + folded * 2000
    cut = header_section(head + b"\r\nbody\r\n")
    assert len(cut) <= MAX_RETURNED_HEADERS and cut.endswith(b"continued\r\n")
    assert cut.startswith(HEAD)
    assert header_section(BODY) == HEAD
    assert header_section(b"no blank line at all\r\n") == b"no blank line at all\r\n"


@pytest.mark.parametrize("sender,meta,want", [
    ("a@x.test", {DSN_REQUEST_KEY: True}, True),
    ("", {DSN_REQUEST_KEY: True}, False),                  # never to <>
    ("a@x.test", None, False),                             # not asked for
    ("a@x.test", {DSN_REQUEST_KEY: True, DSN_OF_KEY: ORIG}, False),   # never about a DSN
    ("a@x.test", {DSN_REQUEST_KEY: "yes"}, False),
])
def test_who_gets_a_dsn(sender, meta, want):
    assert wants_dsn(sender, meta) is want


def test_status_table():
    assert dsn_status("bounce", 550, "5.7.1") == "5.7.1"
    assert dsn_status("bounce", 550, "junk") == "5.0.0"
    assert dsn_status("bounce", 450, None) == "4.0.0"
    assert dsn_status("expired", 421, None) == "4.4.7"


def test_bad_input_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="null sender"):
        _build(envelope_sender="")
    with pytest.raises(ValueError, match="kind"):
        _build(kind="cancelled")
    entry = ["not an address", "b@x.test", "bounce", 550, None, "no", "", 0.0, 1.0, b""]
    with pytest.raises(ValueError, match=ORIG):
        dsn_for_entry(ORIG, entry, dsn_id=DSN_ID, reporting_mta="h.test")


def test_header_injection_in_the_reply_text_cannot_add_fields():
    raw = _build(text="550 no\r\nBcc: evil@x.test\r\n\r\nX: y")
    msg = email.message_from_bytes(raw, policy=policy.SMTP)
    assert msg["Bcc"] is None
    ds = msg.get_payload()[1]
    assert "Bcc" not in str(ds.get_payload()[1].keys())


def test_submission_dsn_option_and_reserved_metadata():
    sub = {"sender": "a@x.test", "recipients": ["b@y.test"], "raw": BODY}
    assert prepare(sub, now=1e9).metadata == {}
    assert prepare({**sub, "dsn": True}, now=1e9).metadata == {DSN_REQUEST_KEY: True}
    assert prepare({**sub, "dsn": True, "metadata": {"k": 1}}, now=1e9).metadata == \
        {"k": 1, DSN_REQUEST_KEY: True}
    with pytest.raises(ValidationError, match="dsn"):
        prepare({**sub, "dsn": "yes"}, now=1e9)
    with pytest.raises(ValidationError, match=f"metadata.{DSN_OF_KEY}: reserved"):
        prepare({**sub, "metadata": {DSN_OF_KEY: ORIG}}, now=1e9)


# ------------------------------------------------------------------ the queue's debt of DSNs

def _accept(mid, sender="alice@origin.test", meta=None, rcpt="bob@fail.test"):
    return q.message_record(mid, BODY, sender, rcpt, rcpt.split("@")[1], 100.0, None,
                            10_000.0, None, meta, None, False)


def _bounce(mid, ts=200.0):
    return q.final_record(mid, 1, "bounce", 550, "5.1.1", "5.1.1 User unknown", "fail.test",
                          "invalid-recipient", ts)


def _replay(records):
    st = q.QueueState()
    for lsn, rec in enumerate(records, 1):
        st.apply(rec, lsn)
    return st


def test_a_bounce_of_a_message_that_asked_owes_one_dsn_settled_by_its_record():
    A, B, C, D = (f"01JD00000000000000000000{k}A" for k in "ABCD")
    recs = [_accept(A, meta={DSN_REQUEST_KEY: True}), _accept(B),             # not asked
            _accept(C, sender="", meta={DSN_REQUEST_KEY: True}),              # <> sender
            _bounce(A), _bounce(B), _bounce(C)]
    st = _replay(recs)
    assert list(st.dsn_due) == [A]
    entry = st.dsn_due[A]
    assert entry[:3] == ["alice@origin.test", "bob@fail.test", "bounce"]
    assert entry[9] == HEAD and entry[10] == A   # the headers; the submission (body id)
    # the leader builds it from the entry alone (the original's body is gone by now)
    assert A not in st.bodies
    body, rcpt, domain, utf8 = dsn_for_entry(A, entry, dsn_id=D, reporting_mta="mx.test")
    assert (rcpt, domain, utf8) == ("alice@origin.test", "origin.test", False)
    # a snapshot keeps the debt; a restarted leader finds it
    st2 = q.QueueState()
    st2.restore(st.snapshot())
    assert st2.dsn_due == st.dsn_due
    # the DSN's own record settles it; replaying the whole log gives the same, once
    dsn = q.message_record(D, body, "", rcpt, domain, 201.0, None, 9_000.0, None,
                           {DSN_OF_KEY: A}, None, utf8)
    st.apply(dsn, len(recs) + 1)
    assert st.dsn_due == {} and st.messages[D].sender == ""
    assert _replay(recs + [dsn]).dsn_due == {}
    # a bounce of the DSN owes nothing (its sender is <>)
    st.apply(_bounce(D), len(recs) + 2)
    assert st.dsn_due == {}
    # a second record for the same DSN id is refused (quarantined), never a second DSN
    st3 = _replay(recs + [dsn])
    assert st3.apply_or_quarantine(dsn, len(recs) + 2) is None
    assert st3.counters_quarantined == 1 and st3.counters["accepted"] == 4


def test_expiry_owes_a_dsn_and_cancel_does_not():
    A, B = "01JD00000000000000000000EA", "01JD00000000000000000000FA"
    st = _replay([_accept(A, meta={DSN_REQUEST_KEY: True}),
                  _accept(B, meta={DSN_REQUEST_KEY: True}),
                  q.final_record(A, 3, "expired", 451, "4.3.0", "expired", "fail.test",
                                 "message-expired", 300.0),
                  q.final_record(B, 0, "cancelled", None, None, "cancelled", "", "other",
                                 300.0)])
    assert list(st.dsn_due) == [A] and st.dsn_due[A][2] == "expired"


@pytest.mark.parametrize("code,enhanced,text,want", [
    (550, "5.1.1", "User unknown", "550 5.1.1 User unknown"),     # the queue keeps bare text
    (550, "5.1.1", "5.1.1 User unknown", "550 5.1.1 User unknown"),
    (550, "5.1.1", "550 5.1.1 User unknown", "550 5.1.1 User unknown"),
    (554, None, "no", "554 no"),
    (None, None, "expired in queue", "expired in queue"),
])
def test_diagnostic_code_carries_the_remote_reply_whole(code, enhanced, text, want):
    r = parse_message(_build(code=code, enhanced=enhanced, text=text)).recipients[0]
    assert r.diagnostic == want
