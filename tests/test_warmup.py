"""IP warm-up plans (cluster/core/warmup.py): the plan's day, today's cap per provider, the
per-shard ledger with durable reservations, the choice of source, the ``u`` records in the
queue state, and config errors naming the key. Pure: no Ray."""

from __future__ import annotations

import datetime as dt

import pytest

from cluster.config import ConfigError, parse_config
from cluster.core import queue as q
from cluster.core.warmup import (WarmupLedger, WarmupSchedule, choose_source, merge_status,
                                 next_day_start, parse_schedule, shard_share, shard_status,
                                 utc_day)

PROVIDERS = ("gmail", "yahoo", "outlook")


def at(day: str, hour: int = 12) -> float:
    """Epoch seconds at ``hour`` UTC on ``day``."""
    return dt.datetime.fromisoformat(f"{day}T{hour:02d}:00:00+00:00").timestamp()


PLAN = parse_schedule("new-ip", {
    "start": "2026-12-01", "when_capped": "overflow",
    "days": [{"day": 1, "gmail": 20, "default": 50},
             {"day": 3, "gmail": 40, "default": 100},
             {"day": 5, "gmail": 80, "default": 200}]}, PROVIDERS)


@pytest.mark.parametrize("now,day,gmail,yahoo", [
    (at("2026-11-30"), 0, 0, 0),             # before the start: nothing
    (at("2026-12-01", 0), 1, 20, 50),        # day 1 from midnight UTC
    (at("2026-12-01", 23), 1, 20, 50),
    (at("2026-12-02"), 2, 20, 50),           # a row holds until the next one
    (at("2026-12-03"), 3, 40, 100),
    (at("2026-12-05", 23), 5, 80, 200),      # the last row, for its day
    (at("2026-12-06"), 6, None, None),       # past the last day: warm, no cap
    (at("2027-03-01"), 91, None, None),
])
def test_day_and_cap_per_provider(now, day, gmail, yahoo):
    assert PLAN.day_of(now) == day
    assert PLAN.cap("gmail", now) == gmail
    assert PLAN.cap("yahoo", now) == yahoo      # no column: the default's
    assert PLAN.warm(now) is (gmail is None)


def test_a_plan_without_default_leaves_other_providers_uncapped():
    p = parse_schedule("g", {"start": "2026-12-01", "days": [{"day": 1, "gmail": 5}]},
                       PROVIDERS)
    assert p.cap("gmail", at("2026-12-01")) == 5 and p.cap("yahoo", at("2026-12-01")) is None


@pytest.mark.parametrize("cap,shards,parts", [
    (20, 1, [20]), (20, 2, [10, 10]), (21, 2, [11, 10]), (2, 4, [1, 1, 0, 0]), (0, 3, [0] * 3),
])
def test_shard_shares_add_up_to_the_cap(cap, shards, parts):
    assert [shard_share(cap, shards, s) for s in range(shards)] == parts


def test_utc_day_and_next_day_start():
    now = at("2026-12-01", 23)
    assert utc_day(now) == utc_day(at("2026-12-01", 0)) == utc_day(now + 3599.0)
    assert next_day_start(now) == at("2026-12-02", 0)


def test_ledger_sends_only_what_was_reserved_and_never_past_the_share():
    now = at("2026-12-01")
    led = WarmupLedger({"cold": PLAN}, shards=2, shard=0, block=4)
    reserved: dict[str, int] = {}
    # nothing reserved yet: wait, and a reservation of one block is asked for
    assert led.take("cold", "gmail", now, reserved) == "wait"
    assert led.records(now, reserved, set()) == [("cold", "gmail", utc_day(now), 4, "")]
    assert led.records(now, reserved, set()) == []          # asked once (5 s before again)
    assert led.records(now + 6, reserved, set()) == [("cold", "gmail", utc_day(now), 4, "")]
    reserved[WarmupLedger.key("cold", "gmail", utc_day(now))] = 4    # it applied
    got = []
    for _ in range(30):
        r = led.take("cold", "gmail", now, reserved)
        got.append(r)
        for src, prov, day, n, note in led.records(now, reserved, set()):
            if not note:   # the record commits and applies
                k = WarmupLedger.key(src, prov, day)
                reserved[k] = max(reserved.get(k, 0), n)
    assert got.count("ok") == 10        # the share of 20 over 2 shards, exactly
    assert got[-1] == "capped"
    assert reserved[WarmupLedger.key("cold", "gmail", utc_day(now))] == 10
    # a warm source is never counted
    assert all(led.take("warm", "gmail", now, reserved) == "ok" for _ in range(100))


def test_a_restarted_leader_takes_every_reserved_count_as_sent():
    now = at("2026-12-01")
    k = WarmupLedger.key("cold", "gmail", utc_day(now))
    reserved = {k: 8}                    # 8 reserved before the SIGKILL, maybe 3 of them sent
    led = WarmupLedger({"cold": PLAN}, shards=1, shard=0, block=8)
    oks = 0
    for _ in range(40):
        if led.take("cold", "gmail", now, reserved) == "ok":
            oks += 1
        for src, prov, day, n, note in led.records(now, reserved, set()):
            reserved[WarmupLedger.key(src, prov, day)] = n
    assert oks == 20 - 8                 # never more than the cap in all


def test_counts_start_again_the_next_day_and_old_days_are_forgotten():
    led = WarmupLedger({"cold": PLAN}, shards=1, shard=0, block=100)
    d1, d2 = at("2026-12-01"), at("2026-12-02")
    reserved = {WarmupLedger.key("cold", "gmail", utc_day(d1)): 20}
    led.used[WarmupLedger.key("cold", "gmail", utc_day(d1))] = 20
    assert led.take("cold", "gmail", d1, reserved) == "capped"
    assert led.take("cold", "gmail", d2, reserved) == "wait"     # a new day, a new block
    led.records(d2, reserved, set())
    assert all(int(k.rsplit("|", 1)[1]) == utc_day(d2) for k in led.used)


def _taker(room: dict[str, int]):
    def take(src: str) -> str:
        if src not in room:
            return "ok"          # warm
        if room[src] <= 0:
            return "capped"
        room[src] -= 1
        return "ok"
    return take


@pytest.mark.parametrize("policy,room,want_src,want_outcome", [
    ("overflow", {"cold": 5}, "cold", "ok"),          # room: its own pick
    ("overflow", {"cold": 0}, "warm", "ok"),          # at its cap: a warm one of the pool
    ("hold", {"cold": 0}, None, "hold"),              # at its cap: the message waits
    ("overflow", {"cold": 0, "warm": 0}, None, "hold"),   # every source capped
])
def test_choose_source(policy, room, want_src, want_outcome):
    # a key whose weighted pick is "cold"
    key = next(k for k in (f"m{i}" for i in range(100))
               if choose_source(k, {"cold": 1, "warm": 1}, lambda s: "hold",
                                _taker({"warm": 0}))[0] == "cold")
    src, outcome, notes = choose_source(key, {"cold": 1, "warm": 1}, lambda s: policy,
                                        _taker(dict(room)))
    assert (src, outcome) == (want_src, want_outcome)
    if room["cold"] == 0:
        assert notes[0] == ("cold", "hold" if policy == "hold" else "overflow")


def test_overflow_goes_to_the_fallback_when_the_pool_is_capped():
    src, outcome, _ = choose_source("m1", {"cold": 1}, lambda s: "overflow",
                                    _taker({"cold": 0}), fallback={"cold": 1, "warm": 1})
    assert (src, outcome) == ("warm", "ok")


def test_warmup_records_in_the_queue_state():
    st = q.QueueState()
    day = utc_day(at("2026-12-01"))
    assert st.apply(q.warmup_record("cold", "gmail", day, 10, 1.0), 1) is None
    assert st.apply(q.warmup_record("cold", "gmail", day, 4, 2.0), 2) is None
    assert st.warmup == {f"cold|gmail|{day}": 10}          # counts never go back
    ev = st.apply(q.warmup_record("cold", "gmail", day, 10, 3.0, "capped"), 3)
    assert ev["type"] == "WarmupCapReached" and ev["source"] == "cold"
    assert st.apply(q.warmup_record("cold", "gmail", day, 10, 4.0, "capped"), 4) is None
    assert st.apply(q.warmup_record("cold", "gmail", day, 10, 4.0, "hold"), 5)["type"] == \
        "WarmupHold"
    # two days later: the old day's counts and notes go
    st.apply(q.warmup_record("cold", "gmail", day + 2, 1, 5.0, "overflow"), 6)
    assert st.warmup == {f"cold|gmail|{day + 2}": 1}
    assert st.warmup_notes == {f"cold|gmail|{day + 2}|overflow"}
    # snapshots carry them
    st2 = q.QueueState()
    st2.restore(st.snapshot())
    assert st2.warmup == st.warmup and st2.warmup_notes == st.warmup_notes
    with pytest.raises(q.StateError, match="warm-up record"):
        st.apply([q.REC_WARMUP, "cold", "gmail", "x", 1, 1.0, ""], 7)


def test_status_rows_add_up_over_shards():
    now = at("2026-12-01")
    k = WarmupLedger.key("cold", "gmail", utc_day(now))
    rows = []
    for shard, sent in ((0, 7), (1, 9)):
        led = WarmupLedger({"cold": PLAN}, shards=2, shard=shard)
        led.used[k] = sent
        rows.append(shard_status(led, now, {k: 10}))
    merged = {r["provider"]: r for r in merge_status(rows)}
    assert merged["gmail"]["sent"] == 16 and merged["gmail"]["cap"] == 20
    assert merged["gmail"]["day"] == 1 and merged["default"]["sent"] == 0


EGRESS = [{"name": "cold", "warmup": "new"}, {"name": "warm"}]
GOOD = {"start": "2026-12-01", "days": [{"day": 1, "gmail": 20}, {"day": 2, "gmail": 30}]}


def test_config_ties_a_plan_to_its_source():
    c = parse_config({"egress": EGRESS, "warmup": {"new": GOOD}})
    plans = c.warmup_plans()
    assert set(plans) == {"cold"} and isinstance(plans["cold"], WarmupSchedule)
    assert plans["cold"].start == dt.date(2026, 12, 1)


@pytest.mark.parametrize("plan,where,what", [
    ({**GOOD, "start": "2026-13-01"}, "warmup.new.start", "expected a date"),
    ({"days": GOOD["days"]}, "warmup.new.start", "missing"),
    ({**GOOD, "when_capped": "drop"}, "warmup.new.when_capped", "'overflow' or 'hold'"),
    ({**GOOD, "days": [{"day": 1, "gmail": 20}, {"day": 2, "gmail": 10}]},
     "warmup.new.days[1].gmail", "never goes down"),
    ({**GOOD, "days": [{"day": 2, "gmail": 20}, {"day": 2, "gmail": 30}]},
     "warmup.new.days[1].day", "not after day 2"),
    ({**GOOD, "days": [{"day": 0, "gmail": 20}]}, "warmup.new.days[0].day", ">= 1"),
    ({**GOOD, "days": [{"day": 1, "hotmale": 20}]}, "warmup.new.days[0].hotmale",
     "unknown provider"),
    ({**GOOD, "days": [{"day": 1, "gmail": -1}]}, "warmup.new.days[0].gmail", ">= 0"),
    ({**GOOD, "days": [{"day": 1, "gmail": 1}, {"day": 2, "yahoo": 2}]}, "warmup.new.days[1]",
     "same ones"),
    ({**GOOD, "days": []}, "warmup.new.days", "expected a list"),
    ({**GOOD, "color": 1}, "warmup.new.color", "unknown key"),
])
def test_bad_plans_are_refused_naming_the_key(plan, where, what):
    with pytest.raises(ConfigError) as e:
        parse_config({"egress": EGRESS, "warmup": {"new": plan}})
    assert e.value.key == where and what in str(e.value), str(e.value)


@pytest.mark.parametrize("raw,where,what", [
    ({"egress": [{"name": "cold", "warmup": "nope"}], "warmup": {"new": GOOD}},
     "egress[0].warmup", "unknown warm-up plan 'nope'"),
    ({"egress": [{"name": "cold"}], "warmup": {"new": GOOD}}, "warmup.new",
     "no [[egress]] source uses this plan"),
    ({"egress": [{"name": "cold", "warmup": 3}]}, "egress[0].warmup", "expected a string"),
])
def test_plans_and_sources_must_match(raw, where, what):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert e.value.key == where and what in str(e.value), str(e.value)
