"""raymta's DNS under a burst of new domains: cache and retry policy (tables), bounded concurrent
lookups against a real DNS server on loopback, and a real cluster that delivers mail to 2,000 new
domains, some of whose lookups time out at first, without deferring a single message."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest

from cluster.adapters.dns import DnsFailure, MxResolver, Route
from cluster.core.dns_policy import DnsPolicy, TimeoutRetry
from cluster.devservers import LoopbackDNS
from tests.conftest import MAIN_SINKS, pipeline_config, raw_message

pytestmark = pytest.mark.timeout(180)

P = DnsPolicy(min_ttl=5, max_ttl=3600, transient_ttl=10, timeout_ttl=1, retry_initial=1,
              retry_max_delay=8, retry_budget=30, refresh_ahead=30)


# ---------------------------------------------------------------------------------- policy
@pytest.mark.parametrize("outcome,record_ttl,expected", [
    ("answer", 300, 300),          # the record's TTL
    ("answer", 0, 5),              # clamped up to min_ttl
    ("answer", 86400, 3600),       # clamped down to max_ttl
    ("permanent", 900, 900),       # RFC 2308 negative TTL from the SOA
    ("permanent", 1, 5),
    ("servfail", 300, 10),         # transient: short whatever the records said
    ("timeout", 300, 1),           # a timeout: asked again in seconds, cached only briefly
])
def test_cache_time_per_outcome(outcome, record_ttl, expected):
    assert P.cache_ttl(outcome, record_ttl) == expected


def test_unknown_outcome_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'refused'"):
        P.cache_ttl("refused")  # type: ignore[arg-type]


@pytest.mark.parametrize("resolved_at,expires_at,now,needed", [
    (None, None, 100, True),        # never resolved
    (0, 3600, 100, False),          # fresh
    (0, 3600, 3569, False),         # 31 s left: not yet
    (0, 3600, 3571, True),          # inside refresh_ahead (30 s): refreshed before expiry
    (0, 3600, 4000, True),          # expired
    (0, 10, 4, False),              # a 10 s route is refreshed at half its life, not at once
    (0, 10, 5, True),
])
def test_routes_are_refreshed_ahead_of_expiry(resolved_at, expires_at, now, needed):
    assert P.needs_lookup(resolved_at, expires_at, now) is needed
    # the time a leader keeps with the route says the same
    assert (now >= P.refresh_at(resolved_at, expires_at)) is needed


def test_timeout_retry_schedule_doubles_to_the_cap_then_gives_up_at_the_budget():
    # (time of the timeout, expected next try or None)
    steps = [(0, 1), (1, 3), (3, 7), (7, 15), (15, 23), (23, None)]
    prev: TimeoutRetry | None = None
    for now, expected in steps:
        nxt = P.timeout_retry_at(prev, now)
        if expected is None:
            assert nxt is None, (now, nxt)   # 23 + 8 - 0 > 30 s budget: counts against mail
            break
        assert nxt is not None and nxt.next_at == expected, (now, nxt)
        assert nxt.first_at == 0
        prev = nxt


@pytest.mark.parametrize("kw,what", [
    ({"retry_initial": 0}, "retry_initial"),
    ({"retry_max_delay": 0.5}, "retry_max_delay"),
    ({"min_ttl": 10, "max_ttl": 5}, "max_ttl"),
    ({"refresh_ahead": float("nan")}, "refresh_ahead"),
    ({"retry_budget": -1}, "retry_budget"),
])
def test_bad_policy_values_are_refused_by_name(kw, what):
    with pytest.raises(ValueError, match=what):
        DnsPolicy(**kw)


def test_dns_config_keys_round_trip_and_bad_ones_name_the_key():
    from cluster.config import ConfigError, parse_config
    c = parse_config({"dns": {"max_concurrent": 16, "retry_initial": "2s",
                              "retry_max_delay": "20s", "retry_budget": "5m",
                              "refresh_ahead": "10s", "ipv6": False}}).dns
    p = c.policy()
    assert (c.max_concurrent, p.retry_initial, p.retry_max_delay, p.retry_budget,
            p.refresh_ahead, c.ipv6) == (16, 2.0, 20.0, 300.0, 10.0, False)
    with pytest.raises(ConfigError, match="dns.ipv6"):
        parse_config({"dns": {"ipv6": "no"}})
    with pytest.raises(ConfigError, match="dns.max_concurrent"):
        parse_config({"dns": {"max_concurrent": 0}})
    with pytest.raises(ConfigError, match="retry_max_delay"):
        parse_config({"dns": {"retry_initial": "30s"}})


# ---------------------------------------------------------------------------------- resolver
def test_a_timed_out_route_is_flagged_and_cached_only_briefly():
    with LoopbackDNS() as zone:
        zone.add_mx("slowhosts.test", [(10, "mx.slowhosts.test")])
        zone.add_a("mx.slowhosts.test", "127.0.20.1")
        zone.set_delay("mx.slowhosts.test", 3.0)
        r = MxResolver(["127.0.0.1"], zone.port, timeout=0.5, use_ipv6=False)
        now = 1000.0
        with pytest.raises(DnsFailure) as ei:
            asyncio.run(r.resolve("slowhosts.test", now))
        f = ei.value
        # "no MX host has an address" because the host lookup timed out: a slow resolver,
        # not a broken domain; cached 1 s (not the 10 s of a SERVFAIL)
        assert (f.kind, f.permanent, f.timed_out) == ("no_address", False, True)
        assert f.expires_at == now + 1.0
        zone.set_delay("mx.slowhosts.test", 0)
        route = asyncio.run(r.resolve("slowhosts.test", now + 1.0))
        assert route.hosts[0].addresses == ("127.0.20.1",)


def test_burst_of_2000_new_domains_resolves_with_bounded_concurrency():
    n, limit, delay = 2000, 16, 0.02
    with LoopbackDNS() as zone:
        for i in range(3):
            zone.add_a(f"mx{i}.burst.test", f"127.0.30.{i + 1}")
        names = [f"b{i}.burst.test" for i in range(n)]
        for i, d in enumerate(names):
            zone.add_mx(d, [(10, f"mx{i % 3}.burst.test")])
            zone.set_delay(d, delay)   # every MX answer takes 20 ms, like a real resolver
        # a 1 s lifetime: had the burst been sent at once, the server's queue would not matter
        # (delays overlap), so the wall time below is what shows the bound
        r = MxResolver(["127.0.0.1"], zone.port, timeout=1.0, use_ipv6=False,
                       max_concurrent=limit)
        t0 = time.monotonic()

        async def burst() -> dict[str, Route | DnsFailure]:
            # several callers at once, as several shards' resolve calls arrive together
            parts = await asyncio.gather(*(r.resolve_many(names[k::4], 0.0) for k in range(4)))
            return {d: v for p in parts for d, v in p.items()}

        res = asyncio.run(burst())
        elapsed = time.monotonic() - t0
    bad = {d: v for d, v in res.items() if not isinstance(v, Route)}
    assert not bad, list(bad.items())[:3]
    info = r.cache_info()
    assert info["timeouts"] == 0
    assert 1 <= info["queries_peak"] <= limit, info
    # never more than `limit` 20 ms answers outstanding: the burst takes at least n/limit waves
    assert elapsed >= 0.9 * n * delay / limit, elapsed
    assert zone.query_count(rdtype="MX") == n   # each domain asked once; hosts cached
    assert zone.query_count(rdtype="A") == 3


# ---------------------------------------------------------------------------------- cluster
def test_cluster_delivers_2000_new_domains_with_slow_lookups_and_no_deferral(tmp_path):
    """A burst of 2,000 domains never seen before; the MX lookups of 300 of them are slower
    than the 1 s DNS timeout for the first 2.5 s (a healthy resolver under load). Every message
    is delivered on its first attempt: timeouts are asked again in seconds, not deferred."""
    from cluster.client import MailCluster
    from cluster.devservers import SinkGroup
    n, slow, limit = 2000, 300, 32
    with LoopbackDNS() as zone, SinkGroup(MAIN_SINKS) as sinks:
        for i, a in enumerate(MAIN_SINKS):
            zone.add_a(f"mx{i + 1}.sinks.test", a)
        names = [f"n{i}.burst.test" for i in range(n)]
        for i, d in enumerate(names):
            zone.add_mx(d, [(10, f"mx{i % 3 + 1}.sinks.test")])
        for d in names[:slow]:
            zone.set_delay(d, 3.0)
        cfg = pipeline_config(str(tmp_path / "spool"), zone.port, sinks.port)
        cfg = replace(cfg, dns=replace(cfg.dns, max_concurrent=limit))
        mc = MailCluster.connect(config=cfg, num_cpus=2)
        try:
            msgs = [{"sender": "bounces@origin.test", "recipients": [f"u{i}@{d}"],
                     "raw": raw_message(i, f"u{i}@{d}", size=300)}
                    for i, d in enumerate(names)]
            heal = threading.Timer(2.5, lambda: [zone.set_delay(d, 0) for d in names[:slow]])
            heal.start()
            try:
                res = mc.submit(msgs)
                assert all(x.accepted for x in res), [x.error for x in res if not x.accepted][:3]
                assert mc.wait_until_idle(timeout=120), mc.stats()
            finally:
                heal.cancel()
            st = mc.stats()
            dns = [s["dns"] for s in st["shards"]]
            import ray
            peaks = [ray.get(h.stats.remote())["dns_cache"].get("queries_peak", 0)
                     for name, h in mc.handles.items() if name.startswith("throttle:pool:")]
        finally:
            mc.close()
        got = sinks.counts_by_rcpt()
    assert st["delivered"] == n and st["transient"] == 0, (st["delivered"], st["transient"])
    assert sum(d["deferred_msgs"] for d in dns) == 0, dns
    # the slow lookups did time out, and were asked again rather than charged to the mail
    assert sum(d["timeouts_retried"] for d in dns) >= 1, dns
    assert sum(got.values()) == n and set(got.values()) == {1}
    assert peaks and max(peaks) <= limit, peaks
