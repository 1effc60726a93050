"""The shard leader's intake (cluster.core.intake): a client cannot make a leader write a record
its own state machine would refuse, and a bad record never stops a replay.

Pure: no Ray. The fuzzer at the end throws random and mutated items at an intake and applies
every record it lets through to a queue state: none may be refused there.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any

import pytest

from cluster.core import queue as q
from cluster.core.intake import Intake, Limits, check_item, wire_item
from cluster.core.message import (
    MAX_METADATA_BYTES,
    ValidationError,
    _metadata,
    check_metadata,
    new_message_ids,
    prepare,
)

NOW = 1_790_000_000.0
SHARDS = 2
LIMITS = Limits(max_messages=100_000, max_bytes=1 << 30, max_message_size=1 << 20,
                default_max_age=86400.0)


def _item(rcpts: list[str], shard: int = 0, **extra: Any) -> list[Any]:
    p = prepare({"sender": "s@origin.test", "recipients": rcpts, "subject": "hi",
                 "text": "hello\n", **extra}, now=NOW)
    return wire_item(p, new_message_ids(NOW, len(p.recipients), shard, SHARDS))


def _commit(intake: Intake, state: q.QueueState, items: list[Any]) -> list[dict[str, Any]]:
    """Admit ``items`` and apply their records as the commit loop would; a record the state
    refuses fails the test."""
    results, records = intake.admit(items, state, LIMITS, NOW)
    for rec in records:
        state.apply(rec, state.last_lsn + 1)
    intake.settle(records)
    return results


def test_the_poison_call_of_the_issue_is_refused_and_writes_nothing():
    """One new id plus the id of a live message used to write a second accept record, which
    stopped the shard's commit loop and every replay after it."""
    intake, state = Intake(0, SHARDS), q.QueueState()
    live = _item(["a@x.test"])
    assert _commit(intake, state, [live]) == [{"ids": [live[0]]}]
    crafted = _item(["b@x.test", "c@x.test"])
    crafted[3][1][0] = live[0]          # the second recipient reuses the live message's id
    results, records = intake.admit([crafted], state, LIMITS, NOW)
    assert records == []
    assert results[0]["retryable"] is False
    assert "already queued" in results[0]["error"] and live[0] in results[0]["error"]
    # the same call made again exactly (every id known) is a retry: answered, not queued
    results, records = intake.admit([live], state, LIMITS, NOW)
    assert results == [{"ids": [live[0]], "duplicate": True}] and records == []


def _mutate(item: list[Any], path: tuple[Any, ...], value: Any) -> list[Any]:
    out = copy.deepcopy(item)
    target = out
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return out


GOOD = _item(["ann@example.org", "bob@example.net"])
OTHER_SHARD_ID = new_message_ids(NOW, 1, 1, SHARDS)[0]

BAD_ITEMS = [
    # (what, item, the words the error must contain)
    ("not a list", "junk", "item: must be a list"),
    ("too few fields", GOOD[:9], "item: must be a list of 10 fields"),
    ("body not bytes", _mutate(GOOD, (1,), "text"), "body: must be bytes"),
    ("empty body", _mutate(GOOD, (1,), b""), "body: must not be empty"),
    ("body too big", _mutate(GOOD, (1,), b"x" * (LIMITS.max_message_size + 1)),
     "body: 1048577 bytes exceeds"),
    ("sender with CR LF", _mutate(GOOD, (2,), "s@x.test\r\nRCPT TO:<v@y.test>"),
     "sender: contains control character U+000D"),
    ("sender not a string", _mutate(GOOD, (2,), 7), "sender: must be a string"),
    ("recipients empty", _mutate(GOOD, (3,), []), "recipients: must be a non-empty list"),
    ("recipient not a triple", _mutate(GOOD, (3, 0), ["x"]), "recipients[0]: must be"),
    ("id malformed", _mutate(GOOD, (3, 1, 0), "not-an-id"), "recipients[1].id: not a message id"),
    ("id of another shard", _mutate(GOOD, (3, 1, 0), OTHER_SHARD_ID),
     "belongs to shard 1, not 0"),
    ("id repeated in the message", _mutate(GOOD, (3, 1, 0), GOOD[3][0][0]), "appears twice"),
    ("address with a space", _mutate(GOOD, (3, 0, 1), "ann smith@example.org"),
     "contains a space"),
    ("address with LF", _mutate(GOOD, (3, 0, 1), "ann@example.org\n"),
     "control character U+000A"),
    ("address with NUL", _mutate(GOOD, (3, 0, 1), "an\x00n@example.org"),
     "control character U+0000"),
    ("address without a domain", _mutate(GOOD, (3, 0, 1), "ann"), "recipients[0]"),
    ("domain not the address's", _mutate(GOOD, (3, 0, 2), "evil.test"),
     "recipients[0].domain"),
    ("domain in U-label form", _mutate(_item(["u@bücher.example"]), (3, 0, 2), "bücher.example"),
     "IDNA (A-label)"),
    ("address not canonical", _mutate(GOOD, (3, 0, 1), "<ann@example.org>"),
     "not in canonical form"),
    ("address with a stray '>' (its domain known)", _mutate(GOOD, (3, 0, 1), "ann@example.org>"),
     "unbalanced angle brackets"),
    ("body id not the first id", _mutate(GOOD, (0,), GOOD[3][1][0]), "body_id: must be"),
    ("tags not strings", _mutate(GOOD, (4,), {"a": 1}), "tags['a']"),
    ("tag with a line break", _mutate(GOOD, (4,), {"a": "x\r\ny"}), "line breaks"),
    ("metadata not a dict", _mutate(GOOD, (5,), [1]), "metadata: must be"),
    ("metadata too big", _mutate(GOOD, (5,), {"k": "v" * 5000}), "metadata: "),
    ("idempotency key not a string", _mutate(GOOD, (6,), 5), "idempotency_key: must be"),
    ("idempotency key too long", _mutate(GOOD, (6,), "k" * 201), "idempotency_key: 201"),
    ("not_before NaN", _mutate(GOOD, (7,), float("nan")), "not_before: must be a finite"),
    ("not_before a string", _mutate(GOOD, (7,), "soon"), "not_before"),
    ("max_age negative", _mutate(GOOD, (8,), -5), "max_age: must be"),
    ("max_age infinite", _mutate(GOOD, (8,), float("inf")), "max_age"),
    ("smtputf8 not a bool", _mutate(GOOD, (9,), 1), "smtputf8: must be true or false"),
    ("non-ASCII local part without smtputf8", _mutate(GOOD, (3, 0, 1), "jösé@example.org"),
     "recipients[0]"),
]


@pytest.mark.parametrize("what,item,words", BAD_ITEMS, ids=[b[0] for b in BAD_ITEMS])
def test_a_bad_item_is_refused_naming_the_field_and_the_others_go_on(what, item, words):
    assert check_item(GOOD, 0, SHARDS, LIMITS.max_message_size) is None
    intake, state = Intake(0, SHARDS), q.QueueState()
    good = _item(["zed@example.com"])
    results = _commit(intake, state, [item, good])
    assert results[0]["retryable"] is False, results[0]
    assert words in results[0]["error"], results[0]["error"]
    assert results[1] == {"ids": [good[0]]}
    assert list(state.messages) == [good[0]]
    assert intake.counters["refused"] == 1


def test_an_id_used_twice_in_one_call_is_refused_once():
    intake, state = Intake(0, SHARDS), q.QueueState()
    a = _item(["a@x.test"])
    b = _item(["b@x.test"])
    b[3][0][0] = b[0] = a[0]
    results = _commit(intake, state, [a, b])
    assert results[0] == {"ids": [a[0]]}
    assert results[1]["retryable"] is False and "used twice in this call" in results[1]["error"]
    assert len(state.messages) == 1 and state.messages[a[0]].rcpt == "a@x.test"


def test_a_body_id_of_a_queued_body_cannot_be_reused():
    """A multi-recipient message whose first recipient finished keeps its body under that id;
    a new message naming it would be sent with someone else's body."""
    intake, state = Intake(0, SHARDS), q.QueueState(status_cache=0)
    first = _item(["a@x.test", "b@x.test"])
    _commit(intake, state, [first])
    state.apply(q.delivered_record(first[0], 1, 250, "ok", "s", NOW), state.last_lsn + 1)
    assert first[0] not in state.messages and first[0] in state.bodies
    again = _item(["c@x.test", "d@x.test"])
    again[0] = again[3][0][0] = first[0]
    results = _commit(intake, state, [again])
    assert "body_id" in results[0]["error"] and results[0]["retryable"] is False


def test_refusals_that_may_pass_later_are_retryable():
    intake, state = Intake(0, SHARDS), q.QueueState()
    small = Limits(1, 1 << 30, 1 << 20, 86400.0)
    a, b = _item(["a@x.test"]), _item(["b@x.test"])
    res, recs = intake.admit([a, b], state, small, NOW)
    assert res[0] == {"ids": [a[0]]}
    assert res[1]["retryable"] is True and "queue full" in res[1]["error"]
    # while a's record is not committed, a retry of it is told to wait (retryable, pending)
    res2, recs2 = intake.admit([a], state, small, NOW)
    assert recs2 == [] and res2[0]["retryable"] is True and res2[0]["pending"] is True
    k1, k2 = _item(["c@x.test"], idempotency_key="k"), _item(["d@x.test"], idempotency_key="k")
    res3, _ = intake.admit([k1, k2], state, LIMITS, NOW)
    assert res3[1]["retryable"] is True and "still being committed" in res3[1]["error"]


def test_replay_goes_past_a_bad_record_and_reports_it():
    """A log written before the leader checked its input may hold a second accept for a live
    id: replay sets it aside (quarantine) and applies everything after it."""
    recs = [q.message_record("01A", b"body", "s@x", "a@x.test", "x.test", NOW, None,
                             NOW + 100, None, None, None, False),
            q.message_record("01A", b"other", "s@x", "b@x.test", "x.test", NOW, None,
                             NOW + 100, None, None, None, False),
            ["zz", 1],
            q.message_record("01B", b"body2", "s@x", "c@x.test", "x.test", NOW, None,
                             NOW + 100, ["not", "a dict"], None, None, False),
            q.message_record("01C", b"body3", "s@x", "d@x.test", "x.test", NOW, None,
                             NOW + 100, None, None, None, False),
            q.delivered_record("01A", 1, 250, "ok", "site", NOW)]
    st = q.QueueState()
    events = [st.apply_or_quarantine(r, lsn) for lsn, r in enumerate(recs, 1)]
    assert [e["type"] if e else None for e in events] == \
        ["Reception", None, None, None, "Reception", "Delivery"]
    assert st.counters_quarantined == 3
    assert [x["lsn"] for x in st.quarantine] == [2, 3, 4]
    assert "accepted twice" in st.quarantine[0]["reason"]
    assert list(st.messages) == ["01C"] and st.last_lsn == 6
    assert st.body_bytes == len(b"body3")   # nothing of the refused records stayed behind


# ---------------------------------------------------------------------------- the fuzzer
_JUNK: list[Any] = [None, 0, -1, 2**70, 1.5, float("nan"), float("inf"), "", "x" * 300,
                    "a\r\nb", b"", b"\x00" * 10, [], {}, [[]], {"a": b"x"}, True, "\u00e9",
                    "01ARZ3NDEKTSV4RRFFQ69G5FAV", ["a", "b", "c"]]


def _random_mutation(rng: random.Random, item: list[Any], pool: list[list[Any]]) -> Any:
    it = copy.deepcopy(item)
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if len(it) != 10:
            break
        if r < 0.35:
            it[rng.randrange(len(it))] = rng.choice(_JUNK)
        elif r < 0.6 and isinstance(it[3], list) and it[3] and isinstance(it[3][0], list):
            rc = rng.choice(it[3])
            if isinstance(rc, list) and rc:
                rc[rng.randrange(len(rc))] = rng.choice(_JUNK + [p[3][0][0] for p in pool
                                                                 if isinstance(p, list)])
        elif r < 0.75:   # an id taken from another (maybe committed) item
            other = rng.choice(pool)
            if isinstance(other, list) and isinstance(it[3], list) and it[3] and \
                    isinstance(it[3][-1], list) and it[3][-1]:
                it[3][-1][0] = other[3][0][0]
        elif r < 0.85:
            it = it[: rng.randrange(len(it))] if rng.random() < 0.5 else it + [None]
        else:
            return rng.choice(_JUNK)
    return it


def test_fuzz_random_and_malformed_items_never_reach_the_log():
    rng = random.Random(1234)
    intake, state = Intake(0, SHARDS), q.QueueState()
    pool = [_item([f"p{i}@d{i % 7}.test"] + ([f"q{i}@e.test"] if i % 3 == 0 else []),
                  **({"idempotency_key": f"k{i}"} if i % 5 == 0 else {}),
                  **({"tags": {"c": str(i)}} if i % 4 == 0 else {})) for i in range(60)]
    accepted = refused = 0
    t0 = time.time()
    for rnd in range(400):
        batch = []
        for _ in range(rng.randint(1, 8)):
            base = rng.choice(pool)
            batch.append(base if rng.random() < 0.3 else _random_mutation(rng, base, pool))
        results, records = intake.admit(batch, state, LIMITS, NOW)
        assert len(results) == len(batch)
        for rec in records:   # what the commit loop applies: never refused
            state.apply(rec, state.last_lsn + 1)
        intake.settle(records)
        for r in results:
            assert ("ids" in r) != ("error" in r), r
            if "error" in r:
                refused += 1
                assert isinstance(r["retryable"], bool) and r["error"], r
            else:
                accepted += 1
        # a result now and then, as relays would report
        if rnd % 10 == 0 and state.messages:
            mid = rng.choice(list(state.messages))
            state.apply(q.delivered_record(mid, 1, 250, "ok", "s", NOW), state.last_lsn + 1)
    assert state.counters_quarantined == 0
    assert accepted > 50 and refused > 300, (accepted, refused)
    assert intake.pending_ids == set() and intake.pending_msgs == 0
    # the state's own invariants still hold: every live message's body is there
    for m in state.messages.values():
        assert m.body_id in state.bodies
    assert time.time() - t0 < 60


def test_a_queue_lifetime_beyond_the_limit_is_refused_at_the_leader_too():
    from cluster.core.message import MAX_QUEUE_LIFETIME
    intake, state = Intake(0, SHARDS), q.QueueState()
    far = _mutate(GOOD, (7,), NOW + MAX_QUEUE_LIFETIME + 1)
    old = _mutate(GOOD, (8,), 2.0**63)
    res = _commit(intake, state, [far, old])
    assert "not_before" in res[0]["error"] and "max_age" in res[1]["error"]
    assert not state.messages


def _verdict(fn: Any, value: Any) -> str | None:
    try:
        fn(value)
    except ValidationError as e:
        return str(e)
    return None


METADATA_CASES = [
    # (what, metadata): check_metadata's shortcut must judge each exactly as _metadata does
    ("the DSN request a front end sends", {"raymta.dsn": True}),
    ("flat strings and numbers", {"campaign": "c-17", "n": 3, "x": 1.5, "ok": False,
                                  "none": None}),
    ("the DSN request not true", {"raymta.dsn": "yes"}),
    ("the reserved dsn_of key", {"raymta.dsn_of": ["01ARZ3NDEKTSV4RRFFQ69G5FAV"]}),
    ("a NaN", {"x": float("nan")}),
    ("an infinity", {"x": float("-inf")}),
    ("a huge int", {"x": 1 << 70}),
    ("a non-string key", {1: "a"}),
    ("a non-ASCII value", {"name": "José"}),
    ("a lone surrogate", {"name": "\udc80"}),
    ("a nested dict", {"a": {"b": [1, 2, {"c": "d"}]}}),
    ("a set (not JSON)", {"a": {1, 2}}),
    ("bytes (not JSON)", {"a": b"x"}),
    ("just under the limit", {"k": "v" * (MAX_METADATA_BYTES - 8)}),
    ("just over the limit", {"k": "v" * (MAX_METADATA_BYTES - 7)}),
    ("controls that grow as JSON", {"k": "\x01" * ((MAX_METADATA_BYTES - 8) // 6)}),
    ("controls over the limit as JSON", {"k": "\x01" * (MAX_METADATA_BYTES // 6 + 1)}),
    ("many small entries", {f"k{i}": i for i in range(400)}),
    ("many entries over the limit", {f"key{i}": "value" for i in range(400)}),
]


@pytest.mark.parametrize("what,meta", METADATA_CASES, ids=[c[0] for c in METADATA_CASES])
def test_the_leaders_metadata_check_judges_as_the_full_check_does(what, meta):
    assert _verdict(check_metadata, meta) == _verdict(_metadata, meta)


def test_a_sender_checked_once_per_call_is_still_checked_per_smtputf8():
    """The leader checks a call's sender once (the items of a call share it), but a sender
    good with SMTPUTF8 is not thereby good without it, and a bad one is refused each time."""
    intake, state = Intake(0, SHARDS), q.QueueState()
    utf8 = _item(["ann@example.org"], sender="jösé@origin.test", smtputf8=True)
    plain = _mutate(_item(["bob@example.org"], sender="s@origin.test"), (2,), "jösé@origin.test")
    bad = _mutate(_item(["cy@example.org"]), (2,), "s@x.test\r\n")
    results = _commit(intake, state, [utf8, plain, bad, copy.deepcopy(bad)])
    assert results[0] == {"ids": [utf8[0]]}
    assert results[1]["retryable"] is False and "sender" in results[1]["error"], results[1]
    assert all("control character" in r["error"] for r in results[2:]), results
    assert list(state.messages) == [utf8[0]]
