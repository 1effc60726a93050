"""Retry schedule: attempt number -> delay, capped and jittered; expiry; attempts from age."""

import random

import pytest

from cluster.core.retry import RetryPolicy

P = RetryPolicy()
NO_JITTER = RetryPolicy(jitter=0.0)


def test_defaults_follow_kumomta_and_postfix():
    assert (P.initial, P.factor, P.max_delay, P.jitter, P.max_age, P.dns_initial) == \
        (600.0, 2.0, 14400.0, 0.2, 5 * 86400.0, 60.0)


# rand = 0.5 is the middle of the jitter range: exactly the base delay
@pytest.mark.parametrize("attempt, kind, seconds", [
    (1, "normal", 600),        # first retry after 10 min
    (2, "normal", 1200),
    (3, "normal", 2400),
    (4, "normal", 4800),
    (5, "normal", 9600),
    (6, "normal", 14400),      # capped at 4 h
    (7, "normal", 14400),
    (100, "normal", 14400),
    (10_000, "normal", 14400),  # factor**9999 overflows a float: still the cap
    (1, "throttle", 600),      # same schedule as normal
    (3, "throttle", 2400),
    (1, "dns", 60),            # DNS failures retry sooner
    (2, "dns", 120),
    (5, "dns", 960),
    (9, "dns", 14400),         # 60 * 2**8 = 15360: capped too
])
def test_delay_doubles_from_initial_up_to_the_cap(attempt, kind, seconds):
    assert P.delay(attempt, 0.5, kind) == seconds


@pytest.mark.parametrize("attempt, rand, seconds", [
    (1, 0.0, 480.0),           # 600 * (1 - 0.2)
    (1, 0.25, 540.0),
    (1, 0.75, 660.0),
    (6, 0.0, 14400 * 0.8),
    (6, 0.999999, 14400 * 1.2 - 14400 * 0.2 * 2 * 0.000001),
])
def test_jitter_spreads_the_delay_around_its_base(attempt, rand, seconds):
    assert P.delay(attempt, rand) == pytest.approx(seconds)


def test_delay_stays_within_jitter_bounds_for_any_draw():
    rng = random.Random(3)
    for _ in range(5000):
        attempt = rng.randint(1, 40)
        kind = rng.choice(["normal", "dns", "throttle"])
        d = P.delay(attempt, rng.random(), kind)
        base = P.base_delay(attempt, kind)
        assert 0 <= base * 0.8 <= d < base * 1.2 <= P.max_delay * 1.2


def test_factor_one_gives_a_constant_delay():
    p = RetryPolicy(initial=300, factor=1, max_delay=300, jitter=0)
    assert [p.delay(n, 0.3) for n in (1, 2, 50)] == [300, 300, 300]


def test_next_attempt_at_adds_the_delay_to_now():
    assert P.next_attempt_at(1000.0, 2, 0.5) == 1000.0 + 1200
    assert P.next_attempt_at(1000.0, 1, 0.5, "dns") == 1060.0


@pytest.mark.parametrize("attempt, rand, kind", [
    (0, 0.5, "normal"),
    (-1, 0.5, "normal"),
    (1.0, 0.5, "normal"),
    (True, 0.5, "normal"),
    (1, -0.1, "normal"),
    (1, 1.0, "normal"),
    (1, float("nan"), "normal"),
    (1, 0.5, "smtp"),
])
def test_delay_rejects_bad_arguments(attempt, rand, kind):
    with pytest.raises(ValueError):
        P.delay(attempt, rand, kind)


@pytest.mark.parametrize("kwargs, words", [
    ({"initial": 0}, "initial delay must be greater than zero"),
    ({"initial": -5}, "initial delay must be greater than zero"),
    ({"factor": 0.5}, "factor must be >= 1"),
    ({"max_delay": 60}, "max_delay (60.0) must be >= the initial delay (600.0)"),
    ({"jitter": 1.0}, "jitter must be in [0, 1)"),
    ({"jitter": -0.1}, "jitter must be in [0, 1)"),
    ({"max_age": 0}, "max_age must be greater than zero"),
    ({"dns_initial": 0}, "DNS retry initial delay must be greater than zero"),
    ({"initial": float("inf")}, "must be a finite number"),
    ({"factor": "2"}, "must be a finite number"),
])
def test_policy_validates_its_settings_with_clear_errors(kwargs, words):
    with pytest.raises(ValueError) as e:
        RetryPolicy(**kwargs)
    assert words in str(e.value)
