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


# ---------------------------------------------------------------- bounded memory, moving sites
TAIL = SiteLimits(rates=(RateSpec.parse("10/m,burst=2"),), max_connections=2,
                  deliveries_per_connection=100)


def test_100000_sites_stay_bounded_by_idle_eviction_and_the_cap():
    """The long tail: 100,000 sites asked for once each over 1,000 s (100 new sites a second);
    each in-flight report lapses after report_ttl. With 60 s idle eviction at most ~60 s worth
    of sites are held; the cap bounds it whatever the idle time."""
    b = ThrottleBook(idle_evict=60.0, max_sites=20_000)
    capped = ThrottleBook(idle_evict=1e9, max_sites=5_000)
    peak_books = peak_capped = 0
    for i in range(100_000):
        now = 1000.0 + i / 100
        for book in (b, capped):
            assert book.grant(0, f"site{i}", TAIL, 1, 0, now).count == 1
            book.evict(now)
        peak_books = max(peak_books, len(b.sites))
        peak_capped = max(peak_capped, len(capped.sites))
    # 60 s idle: then the in-flight report (5 s) and the limiter's backlog (6 s) are gone
    assert 6_000 <= peak_books <= 6_000 + 256, peak_books
    assert peak_capped <= 5_001, peak_capped
    assert b.evicted >= 100_000 - peak_books


def test_a_site_book_costs_about_a_kilobyte():
    """What the bound above means in bytes: 200,000 books (the default cap) < 400 MiB, 6,000
    (the idle bound above) a few MiB."""
    import tracemalloc
    b = ThrottleBook()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(2_000):
        b.grant(0, f"mx1.site{i}.example.com", TAIL, 1, 0, 1000.0)
    per_book = (tracemalloc.get_traced_memory()[0] - before) / 2_000
    tracemalloc.stop()
    assert 200 < per_book < 2_000, per_book


@pytest.mark.parametrize("state, kept", [
    ("nothing", False),
    ("lease", True),
    ("in flight", True),
    ("backoff", True),
    ("rate backlog", True),
])
def test_an_idle_site_is_evicted_only_when_its_book_holds_nothing_live(state, kept):
    lim = SiteLimits(rates=(RateSpec.parse("1/h"),), max_connections=2,
                     deliveries_per_connection=100)
    b = ThrottleBook(idle_evict=10.0, lease_ttl=1e6, backoff=100.0, backoff_max=100.0)
    now = 0.0
    b.grant(0, "s", lim if state == "rate backlog" else LIM, 1, 0, now)
    b.grant(0, "s", lim if state == "rate backlog" else LIM, 0,
            1 if state == "in flight" else 0, now)
    b.report_ttl = 1e6
    if state == "lease":
        b.acquire("s", LIM, "relay:n:a", "inc", 1, now)
    if state == "backoff":
        b.back_off("s", now)
    later = now + 150.0   # idle long enough; backoff over, but remembered for its doubling
    b.evict(later)
    assert ("s" in b.sites) is kept


def test_an_evicted_site_is_rebuilt_on_demand_with_the_same_answers():
    fresh, evicting = ThrottleBook(), ThrottleBook(idle_evict=1.0)
    for t in (0.0, 100.0):
        for book in (fresh, evicting):
            book.grant(0, "s", LIM, 100, 0, t)
            book.grant(0, "s", LIM, 0, 0, t + 0.5)
        evicting.evict(t + 50.0)
        assert "s" not in evicting.sites
    g1 = fresh.grant(0, "s", LIM, 100, 0, 200.0)
    g2 = evicting.grant(0, "s", LIM, 100, 0, 200.0)
    assert (g1.count, g1.retry_after) == (g2.count, g2.retry_after)


def test_eviction_never_lifts_a_shaping_suspension():
    from cluster.config import shipped_shaping_rules
    from cluster.core.shaping import ShapingEngine
    eng = ShapingEngine(shipped_shaping_rules())
    yahoo = "mta5.am0.yahoodns.net,mta6.am0.yahoodns.net,mta7.am0.yahoodns.net"
    [a] = eng.observe(yahoo, "", 421, "4.7.0", "[TSS04] deferred due to user complaints", 0.0)
    b = ThrottleBook(idle_evict=10.0, shaping=eng)
    assert b.grant(0, yahoo, LIM, 10, 0, 1.0).count == 0
    b.evict(1000.0)
    assert yahoo not in b.sites
    g = b.grant(0, yahoo, LIM, 10, 0, 1001.0)    # rebuilt: still suspended by the engine
    assert g.count == 0 and g.retry_after == a.until


def test_a_site_handed_to_another_throttle_keeps_its_limits_there():
    old = ThrottleBook(first_lease_id=1, lease_ttl=100.0)
    new = ThrottleBook(first_lease_id=1 << 40, lease_ttl=100.0)
    lim = SiteLimits(rates=(RateSpec.parse("10/s,burst=5"),), max_connections=3,
                     deliveries_per_connection=100)
    assert old.grant(0, "s", lim, 100, 0, 10.0).count == 5      # the burst is spent
    held = old.acquire("s", lim, "relay:n:a", "inc", 2, 10.0)
    old.back_off("s", 10.0)
    wire = old.hand_over("s", 10.0)
    assert "s" not in old.sites and old.hand_over("nothing", 10.0) is None
    import msgpack
    wire = msgpack.unpackb(msgpack.packb(wire), raw=False)     # as it crosses the actors
    new.take_over("s", lim, wire, 10.0)
    # backoff goes along; after it, the rate state does too (no fresh burst of 5)
    assert new.grant(0, "s", lim, 100, 5, 11.0).count == 0
    after = 10.0 + 30.0
    assert new.grant(0, "s", lim, 100, 5, after).count == 5    # 30 s at 10/s, burst caps it
    # the old leases count: one more connection, not three
    assert len(new.acquire("s", lim, "relay:n:b", "inc", 3, after)) == 1
    # the relay renews the old ids with the new throttle: kept, none refused
    assert new.renew("s", lim, "relay:n:a", "inc", held, after) == []
    # new ids never collide with the old throttle's
    assert not set(held) & set(new.sites["s"].leases) - set(held)
    assert min(set(new.sites["s"].leases) - set(held)) >= 1 << 40


def test_totals_count_sites_paused_sites_and_live_leases():
    b = ThrottleBook(lease_ttl=10.0, backoff=30.0)
    for s in ("a", "b", "c"):
        b.grant(0, s, LIM, 1, 0, 0.0)
    b.acquire("a", LIM, "relay:n:x", "i", 2, 0.0)
    b.acquire("b", LIM, "relay:n:x", "i", 1, 5.0)
    b.back_off("c", 0.0)
    assert b.totals(1.0) == (3, 1, 3)
    assert b.totals(12.0) == (3, 1, 1)      # a's leases expired (not renewed)
    assert b.totals(31.0) == (3, 0, 0)


def test_equal_limits_keep_the_book_and_new_limits_keep_what_is_real():
    # the book is kept for limits equal to its own (the same object from the wire cache, or
    # an equal copy); other limits rebuild the rate limiter but keep leases and in-flight counts
    lim = SiteLimits(rates=(RateSpec.parse("10/s"),), max_connections=3)
    b = ThrottleBook()
    assert b.grant(0, "s", lim, ready=100, inflight=0, now=0.0).count == 10
    lease = b.acquire("s", lim, "relay:a", "i1", 1, 0.0)
    book = b.sites["s"]
    same = SiteLimits(rates=(RateSpec.parse("10/s"),), max_connections=3)
    assert same is not lim and b.grant(0, "s", same, ready=100, inflight=10, now=0.0).count == 0
    assert b.sites["s"] is book                       # burst spent: same limiter
    other = SiteLimits(rates=(RateSpec.parse("20/s"),), max_connections=3)
    assert b.grant(0, "s", other, ready=5, inflight=10, now=0.0).count == 5  # a new limiter
    assert b.sites["s"] is not book
    assert b.sites["s"].leases.keys() == set(lease) and b.site_inflight(b.sites["s"], 0.0) == 15
