"""Durations and rate specs round-trip through strings; GCRA keeps its burst + rate bound."""

import math
import random

import pytest

from cluster.core.ratespec import (
    UNLIMITED,
    Gcra,
    MultiLimiter,
    RateSpec,
    format_duration,
    parse_duration,
)

# ------------------------------------------------------------------------------ durations

DURATIONS = [
    (0, 0.0),
    (30, 30.0),
    (2.5, 2.5),
    ("30", 30.0),
    ("0.5", 0.5),
    ("250ms", 0.25),
    ("10s", 10.0),
    ("5m", 300.0),
    ("2h", 7200.0),
    ("5d", 432000.0),
    ("1w", 604800.0),
    ("1h30m", 5400.0),
    ("1h 30m", 5400.0),
    (" 1H30M ", 5400.0),
    ("1.5h", 5400.0),
    ("90 sec", 90.0),
    ("2 minutes", 120.0),
    ("3 hours", 10800.0),
    ("1 day", 86400.0),
    ("1m500ms", 60.5),
    ("2e3s", 2000.0),
]


@pytest.mark.parametrize("value, seconds", DURATIONS)
def test_parse_duration_reads_numbers_units_and_sums(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("soon", "soon"),
    ("5x", "unknown unit 'x'"),
    ("5 fortnights", "unknown unit 'fortnights'"),
    ("h", "'h'"),
    ("-5s", "-5s"),
    ("1h-30m", "1h-30m"),
    ("5m garbage", "garbage"),
])
def test_parse_duration_rejects_bad_text_naming_it(text, words):
    with pytest.raises(ValueError) as e:
        parse_duration(text)
    assert words in str(e.value)


@pytest.mark.parametrize("value", [-1, -0.5, math.inf, math.nan])
def test_parse_duration_rejects_negative_and_non_finite_numbers(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value", [None, True, [1], b"5s"])
def test_parse_duration_rejects_other_types(value):
    with pytest.raises(TypeError):
        parse_duration(value)


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"),
    (0.25, "250ms"),
    (1, "1s"),
    (10, "10s"),
    (60, "1m"),
    (300, "5m"),
    (5400, "1h30m"),
    (7200, "2h"),
    (86400, "1d"),
    (432000, "5d"),
    (604800, "1w"),
    (1209600, "2w"),
    (864000, "10d"),
    (3661.5, "1h1m1s500ms"),
    (0.0001, "0.0001s"),
])
def test_format_duration_uses_whole_units(seconds, text):
    assert format_duration(seconds) == text


def test_format_duration_round_trips_whole_units_and_random_values():
    rng = random.Random(7)
    values = [n * unit for unit in (0.001, 1, 60, 3600, 86400, 604800) for n in range(50)]
    values += [rng.uniform(0, 10 * 86400) for _ in range(500)]
    values += [rng.uniform(0, 1e-3) for _ in range(100)]
    for v in values:
        assert parse_duration(format_duration(v)) == v, v


@pytest.mark.parametrize("value", [-1, math.inf, math.nan])
def test_format_duration_refuses_what_parse_would(value):
    with pytest.raises(ValueError):
        format_duration(value)


# ------------------------------------------------------------------------------ rate specs

RATES = [
    ("100/s", 100, 1.0, 100),
    ("5000/h", 5000, 3600.0, 5000),
    ("100/h,burst=10", 100, 3600.0, 10),
    ("100/h, max_burst=10", 100, 3600.0, 10),
    ("10/5m", 10, 300.0, 10),
    ("1000/d", 1000, 86400.0, 1000),
    ("50/min", 50, 60.0, 50),
    ("50/m", 50, 60.0, 50),
    ("50/minute", 50, 60.0, 50),
    ("7/sec", 7, 1.0, 7),
    ("7/second", 7, 1.0, 7),
    ("3/hour", 3, 3600.0, 3),
    ("3/day", 3, 86400.0, 3),
    (" 20 / H , burst = 2 ", 20, 3600.0, 2),
    ("1/90s", 1, 90.0, 1),
    ("10/1h30m", 10, 5400.0, 10),
    ("5/250ms", 5, 0.25, 5),
]


@pytest.mark.parametrize("text, limit, period, burst", RATES)
def test_ratespec_parses_limit_period_and_burst(text, limit, period, burst):
    s = RateSpec.parse(text)
    assert (s.limit, s.period, s.burst) == (limit, period, burst)


@pytest.mark.parametrize("text", [t for t, *_ in RATES])
def test_ratespec_round_trips_through_str(text):
    s = RateSpec.parse(text)
    assert RateSpec.parse(str(s)) == s


@pytest.mark.parametrize("spec, text", [
    (RateSpec(100, 1), "100/s"),
    (RateSpec(50, 60), "50/min"),
    (RateSpec(5000, 3600), "5000/h"),
    (RateSpec(1000, 86400), "1000/d"),
    (RateSpec(10, 300), "10/5m"),
    (RateSpec(100, 3600, 10), "100/h,burst=10"),
])
def test_ratespec_str_is_canonical(spec, text):
    assert str(spec) == text


@pytest.mark.parametrize("text, words", [
    ("", "expected 'LIMIT/PERIOD"),
    ("100", "expected 'LIMIT/PERIOD"),
    ("fast", "'fast'"),
    ("0/s", "limit must be greater than zero"),
    ("-5/s", "expected 'LIMIT/PERIOD"),
    ("1.5/s", "expected 'LIMIT/PERIOD"),
    ("100/fortnight", "unknown period 'fortnight'"),
    ("100/0s", "period must be greater than zero"),
    ("100/s,burst=0", "burst must be an integer >= 1"),
    ("100/s,burst=-1", "burst must be an integer >= 1"),
    ("100/s,burst=x", "burst must be an integer >= 1"),
    ("100/s,speed=3", "unknown option 'speed'"),
    ("100/s,", "cannot read option"),
    ("100/s,burst", "cannot read option 'burst'"),
])
def test_ratespec_rejects_garbage_naming_text_and_problem(text, words):
    with pytest.raises(ValueError) as e:
        RateSpec.parse(text)
    assert words in str(e.value)
    assert repr(text) in str(e.value)


@pytest.mark.parametrize("kwargs", [
    {"limit": 0, "period": 1.0},
    {"limit": -1, "period": 1.0},
    {"limit": 1.5, "period": 1.0},
    {"limit": 10, "period": 0},
    {"limit": 10, "period": -1},
    {"limit": 10, "period": math.inf},
    {"limit": 10, "period": 1.0, "burst": -1},
])
def test_ratespec_constructor_validates(kwargs):
    with pytest.raises(ValueError):
        RateSpec(**kwargs)


def test_ratespec_burst_defaults_to_limit():
    assert RateSpec(100, 3600).burst == 100
    assert RateSpec.parse("100/h") == RateSpec(100, 3600.0, 100)


@pytest.mark.parametrize("text, per_second, interval", [
    ("100/s", 100.0, 0.01),
    ("3600/h", 1.0, 1.0),
    ("10/5m", 10 / 300, 30.0),
    ("1/d", 1 / 86400, 86400.0),
])
def test_ratespec_per_second_and_emission_interval(text, per_second, interval):
    s = RateSpec.parse(text)
    assert s.per_second == pytest.approx(per_second)
    assert s.emission_interval == pytest.approx(interval)


# ------------------------------------------------------------------------------ GCRA

@pytest.mark.parametrize("text, burst", [("100/s", 100), ("50/s,burst=5", 5), ("1/h", 1),
                                         ("10/m,burst=1", 1)])
def test_gcra_allows_exactly_the_burst_from_idle(text, burst):
    g = Gcra(RateSpec.parse(text))
    assert g.available(1000.0) == burst
    assert g.wait_time(1000.0) == 0.0
    assert g.take(1000.0, burst + 10) == burst
    assert g.available(1000.0) == 0
    assert g.take(1000.0, 1) == 0


def test_gcra_take_returns_how_many_it_took():
    g = Gcra(RateSpec.parse("10/s,burst=4"))
    assert g.take(0.0, 3) == 3
    assert g.take(0.0, 3) == 1
    assert g.take(0.0, 0) == 0
    assert g.take(0.1, 5) == 1     # one emission interval later: one more
    assert g.take(0.35, 5) == 2    # 2.5 intervals later: two whole ones


def test_gcra_wait_time_is_when_the_next_event_conforms():
    g = Gcra(RateSpec.parse("2/s,burst=2"))
    g.take(10.0, 2)
    assert g.wait_time(10.0) == pytest.approx(0.5)
    assert g.available(10.0 + g.wait_time(10.0)) == 1
    assert g.available(10.49) == 0
    assert g.wait_time(10.2) == pytest.approx(0.3)
    assert g.wait_time(11.0) == 0.0 and g.available(11.0) == 2


def test_gcra_refills_to_burst_and_no_further():
    g = Gcra(RateSpec.parse("10/s,burst=3"))
    g.take(0.0, 3)
    assert g.available(1e6) == 3


def test_gcra_treats_time_running_backwards_as_no_time_passing():
    g = Gcra(RateSpec.parse("1/s,burst=2"))
    assert g.take(100.0, 2) == 2
    assert g.available(50.0) == 0
    assert g.take(50.0, 1) == 0
    assert g.available(101.0) == 1


@pytest.mark.parametrize("n", [-1, 1.5, True])
def test_gcra_take_rejects_non_counts(n):
    with pytest.raises(ValueError):
        Gcra(RateSpec.parse("1/s")).take(0.0, n)


def test_gcra_keeps_precision_at_unix_timestamps():
    # 100000/s: T = 10 µs, only ~40 float steps of a Unix timestamp (2.4e-7 s); a TAT kept as
    # an absolute time is rounded on every take (here it would let 101007 through)
    g = Gcra(RateSpec.parse("100000/s,burst=1000"))
    t0 = 1_700_000_000.123
    total = sum(g.take(t0 + i * 0.001, 10_000) for i in range(1001))   # one second
    assert 1000 + 100_000 - 2 <= total <= 1000 + 100_000


def _window_violations(events, spec):
    """Brute force: every window [t_i, t_j] between take times obeys the bound."""
    times = [t for t, _ in events]
    counts = [n for _, n in events]
    worst = []
    for i in range(len(times)):
        total = 0
        for j in range(i, len(times)):
            total += counts[j]
            w = times[j] - times[i]
            bound = spec.burst + math.floor(w * spec.limit / spec.period + 1e-6)
            if total > bound:
                worst.append((times[i], times[j], total, bound))
    return worst


@pytest.mark.parametrize("seed", range(40))
def test_gcra_never_exceeds_burst_plus_rate_times_window(seed):
    rng = random.Random(seed)
    limit = rng.choice([1, 2, 3, 5, 10, 60, 100, 1000])
    period = rng.choice([0.1, 1.0, 7.0, 60.0, 3600.0])
    burst = rng.choice([1, 2, limit, max(1, limit // 3), limit * 2])
    spec = RateSpec(limit, period, burst)
    g = Gcra(spec)
    t = rng.uniform(0, 2e9)
    events = []
    for _ in range(250):
        # mixes idle gaps, same-instant retries and sub-interval steps
        t += rng.choice([0.0, 0.0, rng.uniform(0, spec.emission_interval),
                         rng.uniform(0, 5 * spec.emission_interval),
                         rng.uniform(0, period)])
        want = rng.choice([1, 1, 2, rng.randint(1, 3 * burst)])
        got = g.take(t, want)
        assert 0 <= got <= want
        if got < want:
            assert g.available(t) == 0
            w = g.wait_time(t)
            assert w > 0 and g.available(t + w) >= 1
        if got:
            events.append((t, got))
    assert not _window_violations(events, spec)


@pytest.mark.parametrize("text", ["10/s,burst=3", "100/h", "7/m,burst=1"])
def test_gcra_greedy_taker_reaches_the_bound_exactly(text):
    spec = RateSpec.parse(text)
    g = Gcra(spec)
    t0 = 5000.0
    total = g.take(t0, 10**9)
    k = 0
    for k in range(1, 50):
        total += g.take(t0 + k * spec.emission_interval, 10**9)
    assert total == spec.burst + k


# ------------------------------------------------------------------------------ several limits

def test_multilimiter_empty_is_unlimited():
    m = MultiLimiter()
    assert m.available(0.0) == UNLIMITED
    assert m.take(0.0, 12345) == 12345
    assert m.wait_time(0.0) == 0.0


def test_multilimiter_takes_the_minimum_from_every_member():
    per_s = Gcra(RateSpec.parse("10/s"))
    per_h = Gcra(RateSpec.parse("25/h"))
    m = MultiLimiter([per_s, per_h])
    assert m.available(0.0) == 10
    assert m.take(0.0, 100) == 10
    assert (per_s.available(0.0), per_h.available(0.0)) == (0, 15)
    assert m.take(1.0, 100) == 10
    assert m.take(2.0, 100) == 5            # the hourly budget is the tighter one now
    assert (per_s.available(2.0), per_h.available(2.0)) == (5, 0)


def test_multilimiter_wait_time_is_the_longest_member_wait():
    m = MultiLimiter(Gcra(s) for s in [RateSpec.parse("10/s"), RateSpec.parse("2/m")])
    m.take(0.0, 5)
    assert m.available(0.0) == 0
    assert m.wait_time(0.0) == pytest.approx(30.0)
    assert m.available(30.0) == 1


def _textbook_take(spec, tat, now, n):
    """GCRA in its textbook form (TAT as an absolute time, in exact fractions): how many of
    ``n`` events conform at ``now``, one at a time, and the TAT after them (with Gcra's
    slack of 1e-9 cells for float rounding)."""
    from fractions import Fraction
    t = Fraction(spec.period) / spec.limit
    tat, now = Fraction(tat), Fraction(now)
    k = 0
    while k < n and max(tat, now) + t <= now + (spec.burst + Fraction(1, 10**9)) * t:
        tat = max(tat, now) + t
        k += 1
    return k, tat


@pytest.mark.parametrize("seed", range(12))
def test_gcra_takes_as_the_textbook_algorithm(seed):
    # the limiter keeps its spec's burst and T at construction and answers an idle limiter
    # without arithmetic: the counts must be exactly those of the textbook GCRA
    rng = random.Random(seed)
    spec = RateSpec(rng.choice([1, 3, 10, 100]), rng.choice([0.5, 1.0, 60.0]),
                    rng.choice([1, 2, 5, 10]))
    g, tat, t = Gcra(spec), 0, 1000.0
    for _ in range(200):
        t += rng.choice([0.0, 0.25, 1.0, 3.0]) * spec.emission_interval
        want = rng.randint(0, 2 * spec.burst)
        k, tat = _textbook_take(spec, tat, t, want)
        assert g.take(t, want) == k, (t, want)


@pytest.mark.parametrize("seed", range(6))
def test_multilimiter_of_one_takes_as_its_limiter_alone(seed):
    rng = random.Random(seed)
    spec = RateSpec(rng.choice([2, 10, 100]), 1.0, rng.choice([1, 3, 10]))
    alone, m = Gcra(spec), MultiLimiter([Gcra(spec)])
    t = 50.0
    for _ in range(200):
        t += rng.choice([0.0, 0.01, 0.3, 2.0])
        want = rng.randint(0, 15)
        assert m.take(t, want) == alone.take(t, want)
        assert m.available(t) == alone.available(t)
        assert m.wait_time(t) == alone.wait_time(t)


@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.parametrize("n", [-1, 1.5, True, "3"])
def test_multilimiter_take_rejects_non_counts(members, n):
    m = MultiLimiter(Gcra(RateSpec.parse("10/s")) for _ in range(members))
    with pytest.raises(ValueError, match="whole number"):
        m.take(0.0, n)
