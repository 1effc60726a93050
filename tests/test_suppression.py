"""The suppression list (cluster.core.suppression) and what the queue and the leader's intake
do with it. Pure: no Ray. (tests/test_suppression_cluster.py runs it on a real cluster.)"""

from __future__ import annotations

import time
import tracemalloc

import pytest

from cluster.core import queue as q
from cluster.core.intake import Intake, Limits, wire_item
from cluster.core.message import new_message_ids, prepare
from cluster.core.suppression import (SuppressionList, check_rows, normalize_address,
                                      rows_from_snapshot)

NOW = 1_790_000_000.0
DAY = 86400.0


def test_lookup_is_global_or_scoped_to_the_sender_domain_and_its_parents():
    s = SuppressionList()
    s.add("ann@x.test", "", "complaint", NOW, None, "report 1")
    s.add("bob@x.test", "news.example", "unsubscribe", NOW, None)
    s.add("cy@x.test", "", "hard-bounce", NOW, NOW + DAY)
    assert s.find("ann@x.test", "any.test", NOW)["reason"] == "complaint"
    assert s.find("ann@x.test", "any.test", NOW)["cause"] == "report 1"
    assert s.find("bob@x.test", "news.example", NOW)["scope"] == "news.example"
    assert s.find("bob@x.test", "bounces.news.example", NOW) is not None   # a sub-domain
    assert s.find("bob@x.test", "other.example", NOW) is None
    assert s.find("bob@x.test", "", NOW) is None
    assert s.find("cy@x.test", "a.test", NOW + DAY - 1) is not None
    assert s.find("cy@x.test", "a.test", NOW + DAY) is None                # expired
    assert s.expire(NOW + DAY) == 1 and len(s) == 2
    assert s.remove("ann@x.test", "") and not s.remove("ann@x.test", "")
    assert s.find("ann@x.test", "any.test", NOW) is None


def test_a_snapshot_restores_every_entry_and_a_backup_turns_back_into_rows():
    s = SuppressionList()
    s.add("a@x.test", "", "manual", NOW, None, "ops")
    s.add("b@x.test", "y.test", "hard-bounce", NOW, NOW + 5, None)
    t = SuppressionList()
    t.restore(s.snapshot())
    assert list(t.entries()) == list(s.entries())
    assert rows_from_snapshot(s.snapshot()) == [["a@x.test", "", "manual", "ops", None],
                                                ["b@x.test", "y.test", "hard-bounce", None,
                                                 NOW + 5]]


@pytest.mark.parametrize("rows,error", [
    ([["not an address", ""]], "rows[0].address"),
    ([["a@x.test", "", "annoyed"]], "rows[0].reason: 'annoyed' is not one of"),
    ([["a@x.test", "no dots"]], "rows[0].scope"),
    ([["a@x.test", "", "manual", None, NOW - 1]], "rows[0].expires_at"),
    ([["a@x.test", "", "manual", 5]], "rows[0].cause"),
    ([5], "rows[0]: must be"),
    ("a@x.test", "rows: must be a list"),
])
def test_bad_rows_are_refused_naming_the_row(rows, error):
    good, errors = check_rows("add", rows, NOW)
    assert good == [] and len(errors) == 1 and error in errors[0], errors


def test_rows_are_normalized_and_hard_bounces_get_their_ttl():
    good, errors = check_rows("add", [["Ann@X.Test", "Example.COM", "hard-bounce"],
                                      {"address": "<bob@x.test>", "reason": "complaint"}],
                              NOW, ttl=DAY)
    assert errors == []
    assert good == [["ann@x.test", "example.com", "hard-bounce", NOW, NOW + DAY, None],
                    ["bob@x.test", "", "complaint", NOW, None, None]]
    assert normalize_address(" <Z@Q.TEST> ") == "z@q.test"


def test_records_change_the_state_and_snapshot_it_with_the_outbox():
    st = q.QueueState()
    rows, _ = check_rows("add", [["a@x.test"], ["b@x.test"]], NOW)
    ev = st.apply(q.suppress_record("add", rows, NOW, propagate=True), 1)
    assert ev["type"] == "Suppression" and ev["count"] == 2 and ev["id"] is None
    assert len(st.suppression) == 2 and len(st.suppress_outbox) == 2
    st.apply(q.suppress_record("sent", ["a@x.test"], NOW), 2)
    assert list(st.suppress_outbox) == ["b@x.test"]
    ev = st.apply(q.report_record("complaint", "01X", "a@x.test",
                                  {"feedback_type": "abuse"}, NOW), 3)
    assert ev["type"] == "Complaint" and ev["feedback_type"] == "abuse"
    snap = st.snapshot()
    again = q.QueueState()
    again.restore(snap)
    assert len(again.suppression) == 2 and list(again.suppress_outbox) == ["b@x.test"]
    ev = again.apply(q.suppress_record("remove", [["a@x.test", ""]], NOW), 4)
    assert ev["type"] == "Unsuppression" and len(again.suppression) == 1
    # a malformed suppression record is refused whole, changing nothing
    bad = q.suppress_record("add", [["c@x.test", "", "nope", NOW, None, None]], NOW)
    assert again.apply_or_quarantine(bad, 5) is None and len(again.suppression) == 1


def _item(rcpts: list[str], **extra):
    p = prepare({"sender": "b@bounces.news.test", "recipients": rcpts, "subject": "s",
                 "text": "t\n", **extra}, now=NOW)
    return wire_item(p, new_message_ids(NOW, len(p.recipients), 0, 1))


def _state_with(*rows: list) -> q.QueueState:
    st = q.QueueState()
    good, errors = check_rows("add", list(rows), NOW)
    assert not errors
    st.apply(q.suppress_record("add", good, NOW), 1)
    return st


def test_a_suppressed_recipient_is_refused_with_the_reason_and_the_date():
    st = _state_with(["ann@x.test", "", "complaint"], ["bob@x.test", "news.test", "unsubscribe"])
    intake = Intake(0, 1)
    lim = Limits(1000, 1 << 30, 1 << 20, DAY)
    one, multi = _item(["ann@x.test"]), _item(["ann@x.test", "bob@x.test", "cy@x.test"])
    res, recs = intake.admit([one, multi], st, lim, NOW)
    assert res[0]["retryable"] is False
    assert "ann@x.test is suppressed: complaint since 2026-09-21" in res[0]["error"], res[0]
    # the three-recipient message goes to cy only; ann (global) and bob (unsubscribed from
    # news.test, the parent of the envelope sender's domain) are left out and listed
    assert res[1]["ids"] == [multi[3][2][0]]
    assert [n["recipient"] for n in res[1]["suppressed"]] == ["ann@x.test", "bob@x.test"]
    assert [r[0] for r in recs] == [q.REC_MESSAGE] and recs[0][4] == "cy@x.test"
    for r in recs:
        st.apply(r, st.last_lsn + 1)
    intake.settle(recs)
    # the same call again (a retry): answered as queued, nothing written twice
    res2, recs2 = intake.admit([multi], st, lim, NOW)
    assert res2[0]["duplicate"] and res2[0]["ids"] == [multi[3][2][0]] and recs2 == []


def test_with_drop_a_suppressed_recipient_is_queued_and_finished_as_suppressed():
    st = _state_with(["ann@x.test", "", "hard-bounce"])
    intake = Intake(0, 1)
    lim = Limits(1000, 1 << 30, 1 << 20, DAY, suppressed="drop")
    it = _item(["ann@x.test"])
    res, recs = intake.admit([it], st, lim, NOW)
    assert res[0]["ids"] == [it[0]] and res[0]["suppressed"][0]["reason"] == "hard-bounce"
    evs = [st.apply(r, st.last_lsn + 1) for r in recs]
    assert [e["type"] for e in evs] == ["Reception", "Suppressed"]
    assert st.status(it[0])["state"] == "suppressed" and not st.messages


def test_memory_and_lookup_cost_per_entry_are_bounded():
    """Measured, not timed: printed, and bounded loosely so a change that doubles them fails
    (bench/suppression.py measures a million in a running cluster)."""
    n = 200_000
    tracemalloc.start()
    s = SuppressionList()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    for i in range(n):
        s.add(f"user{i}@domain{i % 5000}.test", "", "hard-bounce", NOW, NOW + DAY)
    took = time.perf_counter() - t0
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    probes = [f"user{i}@domain{i % 5000}.test" for i in range(0, n, 10)]
    t0 = time.perf_counter()
    hits = sum(1 for a in probes if s.find(a, "news.test", NOW) is not None)
    per = (time.perf_counter() - t0) / len(probes)
    print(f"\n{n:,} suppressions: {used / n:.0f} bytes an entry, loaded in {took:.2f} s; "
          f"lookup {per * 1e6:.2f} us")
    assert hits == len(probes)
    assert used / n < 400
    assert per < 20e-6
