"""Throttle book: grants obey rates and in-flight caps; leases obey connection limits."""

import pytest

from cluster.core.ratespec import RateSpec
from cluster.core.sites import SiteLimits
from cluster.core.throttle import (MAX_ROUND_INTERVAL, QUEUED_PER_CONNECTION, ThrottleBook,
                                   ideal_connections, max_inflight, round_interval)

LIM = SiteLimits(rates=(RateSpec.parse("50/s,burst=5"),), max_connections=2,
                 deliveries_per_connection=100)


def test_grants_follow_the_rate_over_time():
    b = ThrottleBook()
    total = 0
    t = 1000.0
    for _ in range(1000):               # 10 s in 10 ms steps, always 1000 ready
        total += b.grant(0, "s", LIM, 1000, 0, t).count
        t += 0.01
    assert 5 + 50 * 10 - 2 <= total <= 5 + 50 * 10 + 1


def test_first_grant_is_the_burst_and_retry_after_is_given():
    b = ThrottleBook()
    g = b.grant(0, "s", LIM, 100, 0, 10.0)
    assert g.count == 5 and g.retry_after > 10.0


def test_inflight_cap_counts_every_shard():
    lim = SiteLimits(rates=(RateSpec.parse("100000/s"),), max_connections=1,
                     deliveries_per_connection=10)
    cap = max_inflight(lim)
    b = ThrottleBook()
    assert b.grant(0, "s", lim, 1000, 0, 1.0).count == cap
    assert b.grant(1, "s", lim, 1000, 0, 1.0).count == 0     # shard 0 holds them all
    assert b.grant(0, "s", lim, 1000, cap - 3, 2.0).count == 3  # results came back


def test_leases_cap_connections_and_die_with_the_pool_incarnation():
    b = ThrottleBook(lease_ttl=10)
    a = b.acquire("s", LIM, "relay:1", "inc1", 5, 0.0)
    assert len(a) == 2
    assert b.acquire("s", LIM, "relay:2", "x", 1, 1.0) == []
    again = b.acquire("s", LIM, "relay:1", "inc2", 1, 2.0)   # relay:1 restarted
    assert len(again) == 1
    b.release("s", again)
    assert len(b.acquire("s", LIM, "relay:2", "x", 2, 3.0)) == 2


def test_leases_expire_unless_renewed_and_restart_adopts_them():
    b = ThrottleBook(lease_ttl=10)
    ids = b.acquire("s", LIM, "r", "i", 2, 0.0)
    assert b.renew("s", LIM, "r", "i", ids, 8.0) == []
    assert b.acquire("s", LIM, "other", "j", 1, 15.0) == []   # renewed: still held
    fresh = ThrottleBook(lease_ttl=10)                         # throttle restarted
    fresh.bump_ids(ids)
    assert fresh.renew("s", LIM, "r", "i", ids, 16.0) == []    # adopted
    assert fresh.acquire("s", LIM, "other", "j", 1, 16.0) == []
    assert all(i not in ids for i in fresh.acquire("s", LIM, "other", "j", 1, 40.0))


def test_backoff_pauses_grants_and_doubles():
    b = ThrottleBook(backoff=10, backoff_max=25)
    b.grant(0, "s", LIM, 1, 0, 0.0)
    assert b.back_off("s", 1.0) == 11.0
    assert b.grant(0, "s", LIM, 10, 0, 5.0).count == 0
    assert b.acquire("s", LIM, "r", "i", 1, 5.0) == []
    assert b.back_off("s", 5.0) == 11.0          # same burst of complaints counts once
    assert b.back_off("s", 12.0) == 32.0         # 20 s
    assert b.back_off("s", 40.0) == 65.0         # capped at 25 s


def test_a_shard_that_stops_reporting_does_not_hold_the_others_back():
    # shard 0 filled the site, then its messages finished and it had nothing more to ask for:
    # its last report (300 in flight) must not keep shard 1 at zero for ever
    lim = SiteLimits(rates=(RateSpec.parse("100000/s"),), max_connections=6)
    b = ThrottleBook(report_ttl=5.0)
    assert b.grant(0, "s", lim, ready=1000, inflight=0, now=100.0).count == max_inflight(lim)
    assert b.grant(1, "s", lim, ready=50, inflight=0, now=101.0).count == 0   # full, truly
    assert b.grant(1, "s", lim, ready=50, inflight=0, now=104.9).count == 0   # still recent
    g = b.grant(1, "s", lim, ready=50, inflight=0, now=105.5)                 # shard 0 went quiet
    assert g.count == 50
    assert b.snapshot(105.5)["s"]["inflight"] == 50


# ------------------------------------------------------------------ connection count, rounds


@pytest.mark.parametrize("queued,max_conn,per_conn,want", [
    (0, 10, 100, 0),                              # nothing queued: no connection
    (1, 10, 100, 1),
    (QUEUED_PER_CONNECTION, 10, 100, 1),
    (QUEUED_PER_CONNECTION + 1, 10, 100, 2),      # one more per 20 queued ...
    (10 * QUEUED_PER_CONNECTION, 10, 100, 10),
    (5000, 10, 100, 10),                          # ... up to the site's max_connections
    (5000, 2, 100, 2),
    (10, 10, 3, 4),                               # short-lived connections: one per 3 queued
    (10, 10, 1, 10),
])
def test_ideal_connections_grow_with_the_backlog(queued, max_conn, per_conn, want):
    lim = SiteLimits(max_connections=max_conn, deliveries_per_connection=per_conn)
    assert ideal_connections(queued, lim) == want


def test_round_interval_is_short_when_relays_run_low_and_capped_when_they_hold_plenty():
    base = 0.02
    assert round_interval(base, 0, 500.0) == base            # nothing out: go now
    assert round_interval(base, 1000, 0.0) == base           # no rate known yet (a start)
    assert round_interval(base, 20, 1000.0) == base          # 20 ms of work out: every round
    assert round_interval(base, 400, 1000.0) == pytest.approx(0.1)   # a quarter of 0.4 s
    assert round_interval(base, 100_000, 10.0) == MAX_ROUND_INTERVAL  # capped
    assert round_interval(0.5, 100_000, 10.0) == 0.5         # a slower configured base wins
