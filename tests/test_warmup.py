"""IP warm-up plans (cluster/core/warmup.py): the plan's day, today's cap per provider, the
per-shard ledger with durable reservations, the choice of source, the ``u`` records in the
queue state, and config errors naming the key. Pure: no Ray."""

from __future__ import annotations

import datetime as dt

import pytest

from cluster.config import ConfigError, parse_config
from cluster.core import queue as q
from cluster.core.warmup import (
    WarmupLedger,
    WarmupSchedule,
    block_size,
    choose_source,
    grant,
    home_shard,
    merge_status,
    next_day_start,
    parse_schedule,
    shard_status,
    utc_day,
)

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


@pytest.mark.parametrize("cap,shards,block", [
    (20, 2, 5), (20, 1, 10), (1, 4, 1), (10_000, 2, 50), (0, 2, 1),
])
def test_block_size_is_small_next_to_the_cap(cap, shards, block):
    assert block_size(cap, shards) == block


@pytest.mark.parametrize("total,cap,n,got", [(0, 20, 5, 5), (18, 20, 5, 2), (20, 20, 5, 0),
                                             (25, 20, 5, 0)])
def test_the_home_never_grants_past_the_cap(total, cap, n, got):
    assert grant(total, cap, n) == got


def test_home_shard_is_stable_and_in_range():
    assert {home_shard("ip1", 4) for _ in range(3)} == {home_shard("ip1", 4)}
    assert all(0 <= home_shard(f"ip{i}", 3) < 3 for i in range(50))


def test_utc_day_and_next_day_start():
    now = at("2026-12-01", 23)
    assert utc_day(now) == utc_day(at("2026-12-01", 0)) == utc_day(now + 3599.0)
    assert next_day_start(now) == at("2026-12-02", 0)


class Home:
    """A source's home shard, as the coordinator runs it: durable totals, granted blocks."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.total = 0      # what the u records say

    def ask(self, led: WarmupLedger, now: float) -> None:
        for src, prov, day, n in led.requests(now):
            g = grant(self.total, self.cap, n)
            self.total += g
            led.answered(src, prov, day, n, g)


def test_shards_send_only_granted_counts_and_never_past_the_cap_together():
    now = at("2026-12-01")
    home = Home(20)
    a = WarmupLedger({"cold": PLAN}, shards=2, shard=0)
    b = WarmupLedger({"cold": PLAN}, shards=2, shard=1)
    assert a.take("cold", "gmail", now) == "wait"      # nothing granted yet: asks a block
    assert a.requests(now) == [("cold", "gmail", utc_day(now), 5)]
    assert a.requests(now) == []                       # one request at a time
    a.asking.clear()
    sent = {"a": 0, "b": 0}
    # shard a has 50 messages, shard b 3: a may use what b does not
    for i in range(60):
        for name, led, want in (("a", a, 50), ("b", b, 3)):
            if sent[name] < want and led.take("cold", "gmail", now) == "ok":
                sent[name] += 1
            home.ask(led, now)
    assert sent["a"] + sent["b"] <= 20 and home.total == 20
    assert sent["b"] == 3 and sent["a"] >= 20 - 3 - 5   # b holds at most a block unused
    assert a.take("cold", "gmail", now) == "capped"
    assert f"cold|gmail|{utc_day(now)}|capped" in a.notes
    # a warm source is never counted
    assert all(a.take("warm", "gmail", now) == "ok" for _ in range(100))


def test_a_restarted_leader_starts_with_nothing_granted():
    now = at("2026-12-01")
    home = Home(20)
    home.total = 15          # granted before the SIGKILL (whatever of it was sent)
    led = WarmupLedger({"cold": PLAN}, shards=1, shard=0)
    oks = 0
    for _ in range(40):
        if led.take("cold", "gmail", now) == "ok":
            oks += 1
        home.ask(led, now)
    assert oks == 5 and home.total == 20


def test_a_failed_request_is_asked_again_and_old_days_are_forgotten():
    led = WarmupLedger({"cold": PLAN}, shards=1, shard=0)
    d1, d2 = at("2026-12-01"), at("2026-12-02")
    assert led.take("cold", "gmail", d1) == "wait"
    (req,) = led.requests(d1)
    led.answered(*req, None)                              # the home did not answer
    assert led.take("cold", "gmail", d1) == "wait" and led.requests(d1) == [req]
    led.answered(*req, 2)                                 # fewer than asked: capped
    assert [led.take("cold", "gmail", d1) for _ in range(3)] == ["ok", "ok", "capped"]
    assert led.take("cold", "gmail", d2) == "wait"        # a new day
    led.requests(d2)
    assert all(int(k.rsplit("|", 1)[1]) == utc_day(d2) for k in (*led.used, *led.granted))
    assert not led.capped


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
        rows.append(shard_status(led, now, {k: 18} if shard == home_shard("cold", 2) else {}))
    merged = {r["provider"]: r for r in merge_status(rows)}
    assert merged["gmail"]["sent"] == 16 and merged["gmail"]["count"] == 18
    assert merged["gmail"]["cap"] == 20 and merged["gmail"]["day"] == 1
    assert merged["default"]["sent"] == 0 and merged["default"]["cap"] == 50


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


def test_the_readme_warmup_example_parses_as_written():
    import re
    import tomllib
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Egress and warm-up", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.DOTALL).group(1)
    cfg = parse_config(tomllib.loads(block))
    plan = cfg.warmup_plans()["ip-new"]
    assert "ip-warm" not in cfg.warmup_plans() and plan.when_capped == "overflow"
    assert plan.cap("gmail", at("2026-12-01")) == 50
    assert plan.cap("apple", at("2026-12-04")) == 400             # the default column
    assert plan.cap("yahoo", at("2026-12-14")) == 4000            # day 14, the last
    assert plan.cap("yahoo", at("2026-12-15")) is None            # warm
