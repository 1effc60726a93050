"""MxResolver's queries through c-ares (cluster/adapters/cares.py): what only a real resolver
shows (CNAME chains in an answer, negative TTLs from the SOA of a recursive answer), the loop
kinds the actors run (uvloop, a loop after another), and that a resolver's sockets are closed
when it is collected. Behaviour shared with dnspython's answers is in test_dns_resolver.py."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from bench.common import RealDns, have_real_dns
from cluster.adapters.dns import DnsFailure, MxResolver, Route
from cluster.devservers import LoopbackDNS

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
ORIGIN = "cn.test"
ZONE = f"""$TTL 300
{ORIGIN}. SOA ns.{ORIGIN}. admin.{ORIGIN}. 1 3600 600 86400 90
{ORIGIN}. NS ns.{ORIGIN}.
ns.{ORIGIN}. A {HOST}
real.{ORIGIN}. MX 10 mx.{ORIGIN}.
mx.{ORIGIN}. A 127.0.0.9
alias.{ORIGIN}. 120 CNAME real.{ORIGIN}.
alias2.{ORIGIN}. 100 CNAME alias.{ORIGIN}.
viahost.{ORIGIN}. MX 5 hostalias.{ORIGIN}.
hostalias.{ORIGIN}. 60 CNAME mx.{ORIGIN}.
dangling.{ORIGIN}. 200 CNAME nothere.{ORIGIN}.
_mta-sts.txtalias.{ORIGIN}. 150 CNAME policy.{ORIGIN}.
policy.{ORIGIN}. TXT "v=STSv1; " "id=20261205"
"""


class _Unbound(RealDns):
    """nsd serving :data:`ZONE`, unbound (not validating, no TTL caps) in front."""

    kind = "nsd+unbound"

    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]

    def _start(self, d: str) -> None:
        Path(d, "cn.zone").write_text(ZONE)
        self.start_nsd(HOST, {ORIGIN: f"{d}/cn.zone"}, f"ns.{ORIGIN}")
        self.start_unbound(HOST, [ORIGIN], f'  module-config: "iterator"\n'
                           f'  domain-insecure: "{ORIGIN}"\n', f"ns.{ORIGIN}")


@pytest.mark.skipif(not have_real_dns(), reason="nsd/unbound not installed (.ci/run installs "
                    "them)")
def test_cname_chains_and_negative_ttls_through_a_real_resolver() -> None:
    srv = _Unbound().start()
    try:
        r = MxResolver([HOST], srv.port, min_ttl=0, use_ipv6=False)
        now = time.time()

        async def run() -> list[Any]:
            out: list[Any] = []
            for d in ("alias", "alias2", "viahost", "dangling"):
                try:
                    out.append(await r.resolve(f"{d}.{ORIGIN}", now))
                except DnsFailure as e:
                    out.append(e)
            out.append(await r.txt_cached(f"_mta-sts.txtalias.{ORIGIN}", now))
            return out

        alias, alias2, viahost, dangling, txt = asyncio.run(run())
    finally:
        srv.stop()
    # MX at the end of a CNAME chain; the route lives as long as its shortest link
    for route, ttl in ((alias, 120), (alias2, 100)):
        assert isinstance(route, Route), route
        assert [(h.preference, h.name, h.addresses) for h in route.hosts] == \
            [(10, f"mx.{ORIGIN}", ("127.0.0.9",))]
        assert now + ttl - 3 <= route.expires_at <= now + ttl, (route, ttl)
    # an MX host that is a CNAME: its addresses are the target's (RFC 5321 §5.1 tolerates it)
    assert isinstance(viahost, Route) and viahost.hosts[0].addresses == ("127.0.0.9",)
    assert viahost.expires_at <= now + 60
    # a CNAME to nothing: NXDOMAIN, negative-cached min(CNAME 200, SOA TTL 300, MINIMUM 90)
    assert isinstance(dangling, DnsFailure) and dangling.kind == "nxdomain", dangling
    assert now + 87 <= dangling.expires_at <= now + 90
    # TXT through a CNAME: the strings of one record joined
    assert txt.error is None and txt.records == ("v=STSv1; id=20261205",), txt
    assert now + 147 <= txt.expires_at <= now + 150


def test_lookups_answer_and_time_out_under_uvloop_and_on_a_later_loop() -> None:
    """Ray actors run uvloop; a resolver outlives one asyncio.run and is used from the next
    (the channel's sockets move to the loop that asks)."""
    with LoopbackDNS() as zone:
        zone.add_mx("ok.test", [(10, "mx.ok.test")])
        zone.add_a("mx.ok.test", "127.0.0.7")
        zone.add_mx("slow.test", [(10, "mx.ok.test")])
        zone.set_delay("slow.test", 3.0)
        r = MxResolver([HOST], zone.port, timeout=0.5, use_ipv6=False)

        async def both(now: float) -> tuple[Any, Any]:
            ok, slow = await asyncio.gather(r.resolve_many(["ok.test"], now),
                                            r.resolve_many(["slow.test"], now))
            return ok["ok.test"], slow["slow.test"]

        for run, now in ((uvloop.run, 1e9), (asyncio.run, 2e9), (uvloop.run, 3e9)):
            t0 = time.monotonic()
            ok, slow = run(both(now))
            assert isinstance(ok, Route) and ok.hosts[0].addresses == ("127.0.0.7",), ok
            assert isinstance(slow, DnsFailure) and slow.kind == "timeout", slow
            assert time.monotonic() - t0 < 2.0
        assert zone.query_count("ok.test", "MX") == 3


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_collected_resolver_closes_its_sockets() -> None:
    with LoopbackDNS() as zone:
        zone.add_mx("ok.test", [(10, "mx.ok.test")])
        zone.add_a("mx.ok.test", "127.0.0.7")
        before = _open_fds()
        drivers = []
        for i in range(40):
            r = MxResolver([HOST], zone.port, use_ipv6=False)
            assert isinstance(asyncio.run(r.resolve("ok.test", float(i))), Route)
            drivers.append(r._channel._driver)
            del r
            gc.collect()
        # nothing keeps a resolver's channel alive: each was closed when collected
        assert all(d.closed and d.chan is None for d in drivers)
        deadline = time.monotonic() + 5
        while _open_fds() > before + 3 and time.monotonic() < deadline:
            time.sleep(0.05)   # destroyed on pycares' shutdown thread
        assert _open_fds() <= before + 3, (before, _open_fds())


def test_a_name_c_ares_cannot_encode_is_a_permanent_failure_not_a_servfail() -> None:
    """dnspython sent such names and the server said NXDOMAIN; c-ares refuses to send them.
    Either way the mail must bounce, not wait for a SERVFAIL to clear."""
    with LoopbackDNS() as zone:
        r = MxResolver([HOST], zone.port, timeout=1.0)

        async def run() -> tuple[Any, Any]:
            out = await r.resolve_many(["exa mple.test"], 1.0)
            return out["exa mple.test"], await r.txt("_mta-sts.exa mple.test")

        f, txt = asyncio.run(run())
        assert isinstance(f, DnsFailure), f
        assert (f.kind, f.permanent) == ("nxdomain", True), f
        assert txt == ([], "nxdomain")
        assert zone.query_count() == 0


def test_one_deadline_timer_expires_the_unanswered_and_forgets_the_answered() -> None:
    """A query's deadline is kept in the order sent, one timer for all: the slow query times
    out after ``timeout`` with the answered ones around it untouched, and once nothing is
    waiting the channel holds no deadline and no timer (nothing grows with the queries)."""
    with LoopbackDNS() as zone:
        zone.add_record("fast.test", "TXT", '"ok"')
        zone.add_record("slow.test", "TXT", '"late"')
        zone.set_delay("slow.test", 3.0)
        r = MxResolver([HOST], zone.port, timeout=0.5, use_ipv6=False)
        drv = r._channel._driver

        async def run() -> tuple[list[Any], float, Any]:
            t0 = time.monotonic()
            names = ["fast.test"] * 20 + ["slow.test"] + ["fast.test"] * 20
            out = await asyncio.gather(*(r.txt(n) for n in names))
            took = time.monotonic() - t0
            await asyncio.sleep(0.6)   # past every deadline
            return out, took, (len(drv.deadlines), drv.deadline_timer, len(drv.pending))

        out, took, left = asyncio.run(run())
    assert out[20] == ([], "timeout")
    assert all(x == (["ok"], None) for i, x in enumerate(out) if i != 20), out
    assert 0.45 <= took < 1.5, took
    assert left == (0, None, 0)


def test_answered_queries_cost_no_deadline_wake_ups() -> None:
    """Queries answered at once, sent over more than a timeout: the deadline timer wakes about
    once per timeout, not once per query sent (it skips the answered ones)."""
    with LoopbackDNS() as zone:
        zone.add_record("fast.test", "TXT", '"ok"')
        r = MxResolver([HOST], zone.port, timeout=0.3, use_ipv6=False)
        drv = r._channel._driver
        wake_ups = []
        expire = drv._on_deadline

        def counted() -> None:
            wake_ups.append(time.monotonic())
            expire()

        drv._on_deadline = counted  # type: ignore[method-assign]

        async def run() -> list[Any]:
            out = []
            for _ in range(12):
                out.append(await r.txt("fast.test"))
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.4)   # past the last deadline
            return out

        out = asyncio.run(run())
    assert out == [(["ok"], None)] * 12
    assert 1 <= len(wake_ups) <= 4, len(wake_ups)   # 12 with a wake-up per query
    assert (len(drv.deadlines), drv.deadline_timer, len(drv.pending)) == (0, None, 0)
