"""Which DSNs a shard leader queues and when (cluster/core/dsn_due.py), over a real
QueueState: the failed recipients of one submission share one DSN (one per-recipient group
each, RFC 3464 §2.1); a suppressed sender's DSN is settled as suppressed, never sent, and the
event stream says so; DSN debts restored from a backup (``n`` records) are owed once."""

from __future__ import annotations

import email
from email import policy

import pytest

from cluster.core import queue as q
from cluster.core.dsn import parse_message
from cluster.core.dsn_build import DSN_OF_KEY, DSN_REQUEST_KEY
from cluster.core.dsn_due import MAX_RECIPIENTS_PER_DSN, plan_dsns, ready_groups

SENDER = "alice@origin.test"
BODY = (b"From: Alice <alice@origin.test>\r\nSubject: hello\r\n"
        b"Message-ID: <m1@origin.test>\r\n\r\nthe body, never returned\r\n")
ASK = {DSN_REQUEST_KEY: True}
SUB = "01JD0000000000000000000S01"          # the submission: its body id, its first id
R = [SUB] + [f"01JD0000000000000000000S{k:02d}" for k in range(2, 5)]
RCPTS = ["a@fail.test", "b@fail.test", "c@other.test", "d@other.test"]


class Log:
    """A queue state fed records one lsn at a time; the events it produced."""

    def __init__(self) -> None:
        self.st = q.QueueState()
        self.events: list[dict] = []
        self.records: list[list] = []

    def add(self, *recs: list) -> None:
        for rec in recs:
            self.records.append(rec)
            ev = self.st.apply(rec, len(self.records))
            if ev is not None:
                self.events.append(ev)


def submission(log: Log, sender: str = SENDER, n: int = 4) -> None:
    """One message to ``n`` recipients: a body record and an accept per recipient."""
    log.add(q.body_record(SUB, BODY), *[
        q.accept_record(R[k], SUB, sender, RCPTS[k], RCPTS[k].split("@")[1], 100.0, None,
                        10_000.0, None, ASK, None, False) for k in range(n)])


def bounce(mid: str, ts: float) -> list:
    return q.final_record(mid, 1, "bounce", 550, "5.1.1", f"5.1.1 <{mid}> User unknown",
                          "fail.test", "invalid-recipient", ts)


def expire(mid: str, ts: float) -> list:
    return q.final_record(mid, 3, "expired", 451, "4.2.0", "message expired in queue",
                          "other.test", "message-expired", ts)


def groups(st: q.QueueState, now: float, window: float = 10.0, queued=frozenset()):
    return ready_groups(st.dsn_due, queued=set(queued), body_live=st.bodies.__contains__,
                        now=now, window=window)


def plan(st: q.QueueState, gs, now: float, ids=None):
    ids = ids or [f"01JD0000000000000000000D{k:02d}" for k in range(len(gs))]
    return plan_dsns(gs, st.dsn_due, ids, suppression=st.suppression,
                     reporting_mta="mx.raymta.test", now=now, max_age=86400.0)


def test_recipients_that_fail_together_share_one_dsn_listing_each():
    log = Log()
    submission(log)
    log.add(bounce(R[0], 200.0), bounce(R[1], 200.0))
    # two failed, two still queued: held for a sibling that may still fail in this pass
    assert groups(log.st, now=201.0) == []
    assert log.st.dsn_owed == 2     # (what tells the leader to look again after a commit)
    log.add(expire(R[2], 203.0), bounce(R[3], 204.0))
    # the last recipient finished: the submission's body is gone, so it goes at once
    assert SUB not in log.st.bodies
    [g] = groups(log.st, now=204.0)
    assert g == R
    p = plan(log.st, [g], now=204.0)
    [rec] = p.records
    assert p.queued == R and not p.suppressed and not p.bad
    assert rec[0] == q.REC_MESSAGE and rec[3] == "" and rec[4] == SENDER
    assert rec[10] == {DSN_OF_KEY: R}
    rep = parse_message(rec[2])
    assert rep.kind == "dsn" and rep.raymta_id == SUB
    assert [(r.recipient, r.action, r.status) for r in rep.recipients] == [
        ("a@fail.test", "failed", "5.1.1"), ("b@fail.test", "failed", "5.1.1"),
        ("c@other.test", "failed", "4.2.0"), ("d@other.test", "failed", "5.1.1")]
    msg = email.message_from_bytes(rec[2], policy=policy.SMTP)
    report = msg.get_payload()[1].get_payload()
    assert len(report) == 1 + 4        # per-message fields, then one group per recipient
    assert b"could not be delivered to 4 of its recipients" in rec[2]
    # the one record settles all four, live and on replay
    log.add(rec)
    assert log.st.dsn_due == {} and list(log.st.dsn_settled) == R
    replay = Log()
    for r in log.records:
        replay.add(r)
    assert replay.st.dsn_due == {}


def test_a_recipient_still_retried_holds_the_others_back_only_for_the_window():
    log = Log()
    submission(log, n=3)
    log.add(bounce(R[0], 200.0), bounce(R[1], 202.0))
    assert groups(log.st, now=209.9) == []                 # R[2] deferred: body live
    assert groups(log.st, now=210.0) == [[R[0], R[1]]]     # 10 s after the first failure
    assert groups(log.st, now=210.0, window=0) == [[R[0], R[1]]]
    # already on its way: not again; a later failure of R[2] is a DSN of its own
    log.add(plan(log.st, [[R[0], R[1]]], now=210.0).records[0])
    log.add(bounce(R[2], 500.0))
    assert groups(log.st, now=500.0) == [[R[2]]]


def test_groups_are_per_submission_and_cut_at_the_limit():
    # (an entry without a body id, from before groups existed, is a group of its own)
    other = ["x@o.test", "e@f.test", "bounce", 550, None, "no", "", 1.0, 5.0, b"", "OTHER"]
    due = {R[0]: ["s@o.test", "a@f.test", "bounce", 550, None, "no", "", 1.0, 6.0, b"", SUB],
           R[1]: ["s@o.test", "b@f.test", "bounce", 550, None, "no", "", 1.0, 5.0, b"", SUB],
           "OLD": ["s@o.test", "c@f.test", "bounce", 550, None, "no", "", 1.0, 5.0, b""],
           "X": other}
    got = ready_groups(due, queued=set(), body_live=lambda b: False, now=9.0, window=10.0)
    assert sorted(got) == sorted([[R[1], R[0]], ["OLD"], ["X"]])   # oldest failure first
    assert ready_groups(due, queued={R[0], "OLD", "X"}, body_live=lambda b: False,
                        now=9.0, window=10.0) == [[R[1]]]
    many = {f"M{k:04d}": ["s@o.test", f"r{k}@f.test", "bounce", 550, None, "no", "", 1.0,
                          5.0, b"", "BIG"] for k in range(MAX_RECIPIENTS_PER_DSN + 3)}
    cut = ready_groups(many, queued=set(), body_live=lambda b: False, now=9.0, window=1.0)
    assert [len(g) for g in cut] == [MAX_RECIPIENTS_PER_DSN, 3]


def test_a_suppressed_sender_gets_no_dsn_and_an_event_says_so():
    log = Log()
    submission(log, n=2)
    log.add(q.suppress_record("add", [[SENDER, "", "complaint", 50.0, None, "ev-1"]], 60.0))
    log.add(bounce(R[0], 200.0), bounce(R[1], 200.0))
    p = plan(log.st, groups(log.st, now=200.0), now=200.0)
    assert p.suppressed == [R[0], R[1]] and p.queued == [R[0], R[1]]
    accept, final = p.records
    assert final[0] == q.REC_FINAL and final[3] == "suppressed"
    n = len(log.events)
    log.add(accept, final)
    ev = log.events[n + 1]
    assert ev["type"] == "Suppressed" and ev["recipient"] == SENDER and ev["sender"] == ""
    assert ev["dsn_of"] == [R[0], R[1]]
    assert ev["text"].startswith(f"DSN not sent: {SENDER} is suppressed: complaint since 1970")
    # settled, nothing left to send
    assert log.st.dsn_due == {} and log.st.messages == {}
    assert log.st.status(accept[1])["state"] == "suppressed"


@pytest.mark.parametrize("entry,suppressed", [
    ([SENDER, "", "hard-bounce", 50.0, None, None], True),             # global
    ([SENDER, "mx.raymta.test", "manual", 50.0, None, None], True),    # DSNs' own domain
    ([SENDER, "origin.test", "unsubscribe", 50.0, None, None], False),  # another sender's
    ([SENDER, "", "hard-bounce", 50.0, 150.0, None], False),           # expired
    (["bob@origin.test", "", "manual", 50.0, None, None], False),      # someone else
])
def test_which_suppressions_stop_a_dsn(entry, suppressed):
    log = Log()
    submission(log, n=1)
    log.add(q.suppress_record("add", [entry], 60.0), bounce(R[0], 200.0))
    p = plan(log.st, groups(log.st, now=200.0), now=200.0)
    assert (p.suppressed == [R[0]]) is suppressed
    assert len(p.records) == (2 if suppressed else 1)


def test_dsns_owed_in_a_backup_are_owed_once_after_a_restore():
    a = Log()
    submission(a, n=2)
    a.add(bounce(R[0], 200.0))                 # R[1] still queued: the DSN waits
    snap = a.st.snapshot()
    rows = snap["dsn_due"]
    assert [r[0] for r in rows] == [R[0]]
    b = Log()                                  # a new cluster: the debt comes as an n record
    b.add(q.dsn_owed_record(rows, 300.0))
    assert b.st.dsn_due == a.st.dsn_due
    assert groups(b.st, now=300.0) == [[R[0]]]  # the body is not here: nothing to wait for
    b.add(plan(b.st, [[R[0]]], now=300.0).records[0])
    assert b.st.dsn_due == {} and R[0] in b.st.dsn_settled
    # a second restore of the same backup owes nothing again, and a snapshot keeps that
    b.add(q.dsn_owed_record(rows, 301.0))
    assert b.st.dsn_due == {} and b.st.dsn_owed == 1
    c = q.QueueState()
    c.restore(b.st.snapshot())
    c.apply(q.dsn_owed_record(rows, 302.0), c.last_lsn + 1)
    assert c.dsn_due == {} and c.dsn_settled == b.st.dsn_settled


@pytest.mark.parametrize("rows", [
    "x", [["id"]], [[1, SENDER, "a@f.test", "bounce", 550, None, "t", "", 1.0, 2.0, b""]],
    [["id", "", "a@f.test", "bounce", 550, None, "t", "", 1.0, 2.0, b""]],
    [["id", SENDER, "a@f.test", "cancelled", 550, None, "t", "", 1.0, 2.0, b""]],
    [["id", SENDER, "a@f.test", "bounce", 550, None, "t", "", 1.0, 2.0, "not bytes"]],
])
def test_a_malformed_dsn_record_is_quarantined_whole(rows):
    st = q.QueueState()
    assert st.apply_or_quarantine(q.dsn_owed_record(rows, 1.0), 1) is None
    assert st.counters_quarantined == 1 and st.dsn_due == {}
    assert st.quarantine[0]["reason"].startswith("DSN record at lsn 1: ")
    assert q.bad_dsn_owed_row(rows) is not None


def test_a_dsn_record_is_not_counted_as_a_pending_submission():
    """The leader's own DSN records were never marked pending: settling them must not drive
    the count below zero (it made ``wait_until_idle`` wait forever after any DSN)."""
    from cluster.core.intake import Intake
    it = Intake(0, 1)
    it.mark(["R1"])
    log = Log()
    submission(log, n=1)
    log.add(bounce(R[0], 200.0))
    dsn = plan(log.st, groups(log.st, now=200.0), now=200.0).records
    it.settle(dsn + [q.message_record("R1", b"x", "s@o.test", "r@o.test", "o.test", 1.0,
                                      None, 9.0, None, None, None, False)])
    assert it.pending_msgs == 0 and it.pending_ids == set()


@pytest.mark.parametrize("value,want", [("10s", 10.0), ("0s", 0.0), (0, 0.0), ("1h", 3600.0),
                                        ("2h", "between 0 and 1h"), ("-1s", "invalid"),
                                        ("soon", "invalid")])
def test_coalesce_config(value, want):
    from cluster.config import ConfigError, parse_config
    if isinstance(want, float):
        assert parse_config({"dsn": {"coalesce": value}}).dsn.coalesce == want
    else:
        with pytest.raises(ConfigError, match=f"dsn.coalesce.*{want}"):
            parse_config({"dsn": {"coalesce": value}})
