"""Queue state machine: records in, indexes and events out; replay rebuilds the same queue."""

import random

import pytest

from cluster.core import queue as q


def accept(qs, lsn, mid, *, domain="a.test", body="b1", created=100.0, not_before=None,
           expires=1e9, idem=None):
    evs = []
    if body not in qs.bodies:
        evs.append(qs.apply(q.body_record(body, b"hello"), lsn))
        lsn += 1
    evs.append(qs.apply(q.accept_record(mid, body, "s@x.test", f"u@{domain}", domain, created,
                                        not_before, expires, {"c": "1"}, None, idem, False), lsn))
    return lsn + 1, evs


def test_accept_makes_ready_and_reception_event():
    qs = q.QueueState()
    lsn, evs = accept(qs, 1, "m1")
    assert evs[0] is None and evs[1]["type"] == "Reception" and evs[1]["seq"] == 2
    assert qs.ready_count == 1 and qs.counts()["live"] == 1
    assert qs.status("m1")["state"] == "queued"


def test_body_stored_once_and_freed_with_last_message():
    qs = q.QueueState()
    lsn, _ = accept(qs, 1, "m1")
    lsn, _ = accept(qs, lsn, "m2")
    assert len(qs.bodies) == 1 and qs.bodies["b1"].refs == 2
    got = qs.take_ready("a.test", 10, 200.0)
    assert [m.id for m in got] == ["m1", "m2"]
    qs.apply(q.delivered_record("m1", 1, 250, "ok", "s", 201.0), lsn)
    assert "b1" in qs.bodies
    qs.apply(q.final_record("m2", 1, "bounce", 550, "5.1.1", "unknown", "s", "hard", 202.0),
             lsn + 1)
    assert not qs.bodies and qs.body_bytes == 0
    assert qs.status("m1")["state"] == "delivered"
    assert qs.status("m2")["state"] == "bounced"


@pytest.mark.parametrize("rec, etype, state", [
    (q.delivered_record("m1", 1, 250, "ok", "s", 1.0), "Delivery", "delivered"),
    (q.final_record("m1", 1, "bounce", 550, "5.1.1", "x", "s", "hard", 1.0), "Bounce", "bounced"),
    (q.final_record("m1", 1, "expired", None, None, "x", "s", "expired", 1.0), "Expiration",
     "expired"),
    (q.final_record("m1", 0, "cancelled", None, None, "x", "s", "cancelled", 1.0), "AdminBounce",
     "cancelled"),
    (q.transient_record("m1", 1, 500.0, 451, "4.3.0", "later", "s", "soft", 1.0),
     "TransientFailure", "deferred"),
])
def test_each_record_type_produces_its_event(rec, etype, state):
    qs = q.QueueState()
    lsn, _ = accept(qs, 1, "m1")
    qs.take_ready("a.test", 1, 1.0)
    ev = qs.apply(rec, lsn)
    assert ev["type"] == etype and ev["id"] == "m1" and ev["recipient"] == "u@a.test"
    assert qs.status("m1")["state"] == state


def test_transient_defers_until_next_attempt():
    qs = q.QueueState()
    lsn, _ = accept(qs, 1, "m1")
    qs.take_ready("a.test", 1, 100.0)
    qs.apply(q.transient_record("m1", 1, 160.0, 451, None, "later", "s", "soft", 100.0), lsn)
    assert qs.promote_due(159.9) == 0 and qs.ready_count == 0
    assert qs.next_due() == 160.0
    assert qs.promote_due(160.0) == 1 and qs.ready_count == 1
    assert qs.status("m1")["attempts"] == 1


def test_not_before_defers_and_expiry_ignores_inflight():
    qs = q.QueueState()
    lsn, _ = accept(qs, 1, "m1", not_before=150.0, expires=300.0)
    lsn, _ = accept(qs, lsn, "m2", expires=300.0)
    assert qs.ready_count == 1
    qs.take_ready("a.test", 1, 100.0)           # m2 in flight
    c = qs.counts()
    assert (c["live"], c["ready"], c["inflight"], c["deferred"]) == (2, 0, 1, 1)
    exp = qs.due_expiries(301.0)
    assert [m.id for m in exp] == ["m1"]


def test_requeue_returns_inflight_to_front():
    qs = q.QueueState()
    lsn = 1
    for i in range(3):
        lsn, _ = accept(qs, lsn, f"m{i}")
    got = qs.take_ready("a.test", 2, 1.0)
    assert qs.requeue([m.id for m in got]) == 2
    assert [m.id for m in qs.take_ready("a.test", 3, 2.0)] == ["m0", "m1", "m2"]


def test_lsn_must_increase_and_unknown_record_is_an_error():
    qs = q.QueueState()
    accept(qs, 5, "m1")
    with pytest.raises(q.StateError):
        qs.apply(q.body_record("b2", b"x"), 3)
    with pytest.raises(q.StateError, match="unknown record"):
        qs.apply(["z", "m1"], 100)


def test_idempotency_keys_are_remembered_within_the_window():
    qs = q.QueueState(idempotency_window=100.0)
    accept(qs, 1, "m1", idem="k1", created=10.0)
    assert qs.lookup_idempotency("k1", 50.0) == ["m1"]
    assert qs.lookup_idempotency("k1", 200.0) is None
    qs.prune_idempotency(200.0)
    assert not qs.idempotency


def test_status_cache_is_bounded():
    qs = q.QueueState(status_cache=10)
    lsn = 1
    for i in range(30):
        lsn, _ = accept(qs, lsn, f"m{i}", body=f"b{i}")
    qs.take_ready("a.test", 30, 1.0)
    for i in range(30):
        qs.apply(q.delivered_record(f"m{i}", 1, 250, "ok", "s", 2.0), lsn)
        lsn += 1
    assert len(qs.finished) == 10 and qs.status("m0") is None and qs.status("m29")


def test_a_message_record_is_a_body_and_its_accept_in_one():
    rec = ("s@x.test", "u@a.test", "a.test", 100.0, None, 1e9, {"c": "1"}, None, "k", False)
    one = q.QueueState()
    ev = one.apply(q.message_record("m1", b"hello", *rec), 1)
    two = q.QueueState()
    assert two.apply(q.body_record("m1", b"hello"), 1) is None
    ev2 = two.apply(q.accept_record("m1", "m1", *rec), 2)
    assert ev["type"] == ev2["type"] == "Reception" and ev["size"] == ev2["size"] == 5
    assert {k: v for k, v in ev.items() if k != "seq"} == {k: v for k, v in ev2.items()
                                                          if k != "seq"}
    assert one.snapshot()["messages"] == two.snapshot()["messages"]
    assert one.snapshot()["bodies"] == two.snapshot()["bodies"]
    assert one.body_bytes == two.body_bytes == 5 and one.counts() == two.counts()
    assert one.lookup_idempotency("k", 101.0) == ["m1"]
    with pytest.raises(q.StateError, match="accepted twice"):
        one.apply(q.message_record("m1", b"other", *rec), 2)
    assert one.bodies["m1"].data == b"hello" and one.body_bytes == 5
    one.apply(q.delivered_record("m1", 1, 250, "ok", "s", 101.0), 3)
    assert not one.bodies and one.body_bytes == 0 and one.status("m1")["state"] == "delivered"


def _random_history(seed):
    rng = random.Random(seed)
    recs = []
    live = []
    n = 0
    for step in range(400):
        r = rng.random()
        if r < 0.4 or not live:
            mid = f"m{n}"
            n += 1
            if rng.random() < 0.5:   # a message record (its body inside) or body + accept
                recs.append(q.message_record(mid, b"x" * rng.randint(1, 50), "s@x",
                                             f"u@d{n % 5}.test", f"d{n % 5}.test", 1.0, None,
                                             1e9, None, None, None, False))
            else:
                recs.append(q.body_record(f"b{mid}", b"x" * rng.randint(1, 50)))
                recs.append(q.accept_record(mid, f"b{mid}", "s@x", f"u@d{n % 5}.test",
                                            f"d{n % 5}.test", 1.0, None, 1e9, None, None, None,
                                            False))
            live.append(mid)
        else:
            mid = live[rng.randrange(len(live))]
            k = rng.random()
            if k < 0.4:
                recs.append(q.transient_record(mid, 1, rng.uniform(0, 100), 451, None, "t", "s",
                                               "soft", 2.0))
            else:
                recs.append(q.delivered_record(mid, 1, 250, "ok", "s", 3.0) if k < 0.8 else
                            q.final_record(mid, 1, "bounce", 550, None, "no", "s", "hard", 3.0))
                live.remove(mid)
    return recs


@pytest.mark.parametrize("seed", range(5))
def test_snapshot_plus_tail_equals_full_replay(seed):
    recs = _random_history(seed)
    full = q.QueueState()
    for i, r in enumerate(recs, 1):
        full.apply(r, i)
    cut = len(recs) // 2
    a = q.QueueState()
    for i, r in enumerate(recs[:cut], 1):
        a.apply(r, i)
    b = q.QueueState()
    b.restore(a.snapshot())
    for i, r in enumerate(recs[cut:], cut + 1):
        b.apply(r, i)
    assert b.snapshot()["messages"] == full.snapshot()["messages"]
    assert b.snapshot()["bodies"] == full.snapshot()["bodies"]
    assert b.counts() == full.counts()
    assert list(b.finished.items()) == list(full.finished.items())
    for qs in (full, b):   # the derived deferred count agrees with a full scan
        assert qs.counts()["deferred"] == sum(1 for m in qs.messages.values()
                                              if m.state == q.DEFERRED)


def test_expiring_a_large_ready_backlog_is_linear():
    """Lazy removal: 50,000 queued messages of one domain expire without O(n²) work."""
    import time as _t
    qs = q.QueueState(status_cache=0)
    lsn = 1
    qs.apply(q.body_record("b", b"x"), lsn)
    n = 50_000
    for i in range(n):
        lsn += 1
        qs.apply(q.accept_record(f"m{i}", "b", "s@x", "u@big.test", "big.test", 1.0, None,
                                 100.0, None, None, None, False), lsn)
    t0 = _t.perf_counter()
    # newest first: the worst order for removal by search (each id at the far end)
    for m in reversed(qs.due_expiries(200.0, limit=n)):
        lsn += 1
        qs.apply(q.final_record(m.id, 0, "expired", None, None, "x", "", "expired", 200.0), lsn)
    took = _t.perf_counter() - t0
    assert qs.counts()["live"] == 0 and qs.ready_count == 0
    assert "big.test" not in qs.ready and not qs.ready_live
    assert took < 5.0, f"{took:.1f}s to expire {n}: removal is not O(1)"


def test_stale_ready_entries_are_skipped_and_counts_stay_exact():
    qs = q.QueueState()
    lsn = 1
    for i in range(4):
        lsn, _ = accept(qs, lsn, f"m{i}")
    # m1 fails transiently while still queued (e.g. a late result after a restart) and comes
    # back later; m2 is cancelled while queued
    qs.apply(q.transient_record("m1", 1, 50.0, 451, None, "x", "s", "soft", 10.0), lsn)
    qs.apply(q.final_record("m2", 0, "cancelled", None, None, "x", "", "cancelled", 10.0),
             lsn + 1)
    assert qs.ready_count == 2 and qs.ready_live["a.test"] == 2
    qs.promote_due(60.0)
    assert qs.ready_count == 3
    got = [m.id for m in qs.take_ready("a.test", 10, 61.0)]
    assert sorted(got) == ["m0", "m1", "m3"] and len(got) == 3
    assert qs.ready_count == 0 and "a.test" not in qs.ready


def test_hold_keeps_a_message_with_a_known_outcome_from_being_sent_again():
    # a restarted leader gets a "delivered" for a message it replayed as ready: until that
    # record commits, the message must not be taken for another attempt
    qs = q.QueueState()
    lsn, _ = accept(qs, 1, "m1")
    lsn, _ = accept(qs, lsn, "m2")
    assert qs.hold("m1", 150.0)
    assert not qs.hold("m1", 150.0) and not qs.hold("nope", 150.0)
    assert [m.id for m in qs.take_ready("a.test", 10, 151.0)] == ["m2"]
    assert qs.counts()["inflight"] == 2 and qs.ready_count == 0
    qs.apply(q.delivered_record("m1", 1, 250, "ok", "s", 152.0), lsn)
    assert qs.status("m1")["state"] == "delivered" and qs.counts()["live"] == 1


def test_an_operators_suspension_is_durable_and_runs_out():
    st = q.QueueState()
    ev = st.apply(q.pause_record("gmail.com", 1000.0, 10.0), 1)
    assert ev["type"] == "SiteSuspended" and ev["until"] == 1000.0 and ev["id"] is None
    assert st.is_suspended("gmail.com", "gmail-smtp-in.l.google.com", 500.0)
    assert st.is_suspended("x.test", "gmail.com", 500.0)       # by site name too
    assert not st.is_suspended("yahoo.com", "yahoo", 500.0)
    again = q.QueueState()
    again.restore(st.snapshot())                               # survives a restart
    assert again.is_suspended("gmail.com", "", 999.0)
    assert not again.is_suspended("gmail.com", "", 1000.0)     # ran out
    assert again.suspended == {}
    ev = st.apply(q.pause_record("gmail.com", 0.0, 20.0), 2)
    assert ev["type"] == "SiteResumed" and not st.is_suspended("gmail.com", "", 30.0)
    assert st.apply_or_quarantine(q.pause_record("", 5.0, 1.0), 3) is None   # no name


def test_queue_shape_counts_domains_by_age_with_the_rest_as_other():
    """`raymta queue`: every live message by recipient domain and age, exactly (the metrics
    exporter samples the same function by site)."""
    from cluster.core.queue_shape import OTHER, queue_shape
    st = q.QueueState()
    now = 10_000.0
    lsn = 0
    for i, (domain, age) in enumerate([("a.test", 10), ("a.test", 400), ("a.test", 9999),
                                       ("b.test", 10), ("c.test", 700)]):
        lsn += 1
        st.apply(q.message_record(f"0{i}", b"x", "s@x.test", f"u@{domain}", domain,
                                  now - age, None, now + 100, None, None, None, False), lsn)
        st.messages[f"0{i}"].site = "mx.shared.test"     # one site for all of them
    shape = queue_shape(st.messages.values(), now, top=2, limit=0, by="domain")
    assert shape["site_ages"]["a.test"] == {"0-5m": 1, "5-10m": 1, "80m-4h": 1}
    # the top 2: a.test and one of the two single-message domains; the other one is "other"
    assert len(shape["site_ages"]) == 3 and sum(shape["site_ages"][OTHER].values()) == 1
    assert sum(shape["sites"].values()) == 5 and shape["sampled"] == 5
    assert queue_shape(st.messages.values(), now, limit=0)["sites"] == {"mx.shared.test": 5}
    with pytest.raises(ValueError):
        queue_shape(st.messages.values(), now, by="tag")


@pytest.mark.parametrize("seed", range(8))
def test_a_snapshot_built_in_slices_while_records_apply_equals_one_taken_at_the_end(seed):
    """SnapshotBuild: records applied between its slices (new messages, bodies before their
    accept, results, finished messages) are taken again, so the result is the state as of
    the last record, like snapshot(); and a state restored from it replays the rest to the
    same place as a full replay."""
    rng = random.Random(1000 + seed)
    recs = _random_history(seed)
    st = q.QueueState()
    lsn = 0
    start = rng.randrange(20, 200)
    for r in recs[:start]:
        lsn += 1
        st.apply(r, lsn)
    build = st.snapshot_begin()
    with pytest.raises(q.StateError, match="already being built"):
        st.snapshot_begin()
    stop = rng.randrange(start, len(recs))
    i = start
    while i < stop:
        build.step(rng.randint(1, 7))
        for r in recs[i:i + rng.randint(0, 6)]:
            lsn += 1
            st.apply(r, lsn)
            i += 1
    got = build.finish()
    want = st.snapshot()
    assert got["lsn"] == want["lsn"] == lsn
    assert sorted(got["messages"]) == sorted(want["messages"])
    assert sorted(got["bodies"]) == sorted(want["bodies"])
    again = q.QueueState()
    again.restore(got)
    full = q.QueueState()
    for k, r in enumerate(recs, 1):
        full.apply(r, k)
    for k, r in enumerate(recs[lsn:], lsn + 1):
        again.apply(r, k)
    assert sorted(again.snapshot()["messages"]) == sorted(full.snapshot()["messages"])
    assert again.counts() == full.counts()


@pytest.mark.parametrize("now, want", [
    (150.0, []),                      # nothing out longer than the timeout
    (161.0, ["m1"]),                  # handed out at 100: stale past 160
    (171.0, ["m1", "m2"]),            # m2 handed out at 110
    (181.0, ["m1", "m2", "m3"]),      # m3 went back to ready and out again at 120
])
def test_stale_inflight_in_hand_out_order(now, want):
    qs = q.QueueState()
    lsn = 1
    for mid in ("m1", "m2", "m3"):
        lsn, _ = accept(qs, lsn, mid)
    qs.take_ready("a.test", 1, 100.0)
    qs.take_ready("a.test", 2, 110.0)
    qs.requeue(["m3"])                 # its relay died: back to the front of the ready queue
    qs.take_ready("a.test", 1, 120.0)
    assert qs.stale_inflight(now, 60.0) == want


def test_ready_changed_names_domains_whose_ready_count_moved():
    qs = q.QueueState()
    lsn, _ = accept(qs, 1, "m1", domain="a.test")
    lsn, _ = accept(qs, lsn, "m2", domain="b.test")
    assert qs.take_ready_changed() == {"a.test", "b.test"}
    assert qs.take_ready_changed() == set()
    qs.take_ready("b.test", 1, 1.0)
    assert qs.take_ready_changed() == {"b.test"}
    qs.requeue(["m2"])
    qs.apply(q.final_record("m1", 0, "cancelled", None, None, "x", "", "other", 2.0), lsn)
    assert qs.take_ready_changed() == {"a.test", "b.test"}
