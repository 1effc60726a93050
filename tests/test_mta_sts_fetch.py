"""MTA-STS discovery and fetch (cluster.adapters.mta_sts) against real parts on loopback: the
test DNS server publishes ``_mta-sts`` TXT records and ``mta-sts.<domain>`` addresses, a
loopback HTTPS server with a test CA serves the policies. Covers: fetched once and cached, a
new TXT id fetches again, a failed fetch keeps the cached policy (RFC 8461 §5.1) and gives none
without one, the certificate is verified for the policy host, no redirects, the 64 KiB bound,
and the MX address guard applies to the policy host."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from cluster.adapters.dns import MxResolver
from cluster.adapters.mta_sts import StsFetcher
from cluster.core.mta_sts import StsPolicy
from cluster.core.mxguard import AddressGuard
from cluster.devservers import LoopbackDNS
from tests.ingress_certs import make_ca
from tests.mta_sts_helpers import PolicyServer, policy_text

pytestmark = pytest.mark.timeout(60)

HTTPS_HOST = "127.0.0.61"
DOMAINS = ["good.test", "newid.test", "gone.test", "wrongcert.test", "redirect.test",
           "huge.test", "badtype.test", "malformed.test", "none.test"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[tuple[LoopbackDNS, PolicyServer, str]]:
    ca = make_ca(tmp_path_factory.mktemp("stsca"))
    # one certificate for every policy host but wrongcert.test's
    names = [f"mta-sts.{d}" for d in DOMAINS if d != "wrongcert.test"]
    cert, key = ca.server_cert(names[0], [], stem="sts", also=names[1:])
    srv = PolicyServer(HTTPS_HOST, cert, key).start()
    dns = LoopbackDNS().start()
    try:
        for d in DOMAINS:
            dns.add_record(f"_mta-sts.{d}", "TXT", '"v=STSv1; id=1"')
            dns.add_a(f"mta-sts.{d}", HTTPS_HOST)
        for d in ("good.test", "newid.test", "gone.test", "wrongcert.test"):
            srv.serve(d, policy_text("enforce", [f"*.{d}"]))
        srv.serve("redirect.test", "", status=302)
        srv.serve("huge.test", policy_text("enforce", ["mx.huge.test"]) + "x: y\n" * 20000)
        srv.serve("badtype.test", policy_text("enforce", ["mx.badtype.test"]),
                  content_type="text/html")
        srv.serve("malformed.test", "version: STSv1\nmode: sometimes\nmx: a.b\nmax_age: 5\n")
        srv.serve("none.test", policy_text("none", []))
        yield dns, srv, str(ca.ca_file)
    finally:
        dns.stop()
        srv.stop()


def _fetcher(dns: LoopbackDNS, srv: PolicyServer, ca_file: str, allow: bool = True
             ) -> StsFetcher:
    r = MxResolver(["127.0.0.1"], dns.port, timeout=2.0, min_ttl=1)
    guard = AddressGuard.build(["127.0.0.0/8"] if allow else [])
    return StsFetcher(r, guard, ca_file=ca_file, port=srv.port, timeout=5.0, recheck=60)


def test_a_policy_is_fetched_once_cached_and_fetched_again_on_a_new_id(world) -> None:
    dns, srv, ca_file = world

    async def run() -> None:
        f = _fetcher(dns, srv, ca_file)
        want = StsPolicy("enforce", ("*.good.test",), 86400)
        assert await f.policy("good.test", now=1000) == want
        assert await f.policy("good.test", now=1010) == want        # no DNS, no HTTPS
        assert srv.requests["mta-sts.good.test"] == 1
        assert dns.queries[("_mta-sts.good.test", "TXT")] == 1
        # the TXT id changes: fetched again after the recheck interval
        srv.serve("newid.test", policy_text("testing", ["mx.newid.test"], 600))
        assert (await f.policy("newid.test", now=1000)).mode == "testing"
        dns.remove("_mta-sts.newid.test", "TXT")
        dns.add_record("_mta-sts.newid.test", "TXT", '"v=STSv1; id=2"')
        srv.serve("newid.test", policy_text("enforce", ["mx.newid.test"], 600))
        assert (await f.policy("newid.test", now=1030)).mode == "testing"   # recheck not due
        assert (await f.policy("newid.test", now=1061)).mode == "enforce"
        assert srv.requests["mta-sts.newid.test"] == 2
        assert f.stats()["sts_fetches"] == 3
    asyncio.run(run())


def test_a_failed_fetch_keeps_the_cached_policy_until_it_expires(world) -> None:
    dns, srv, ca_file = world

    async def run() -> None:
        f = _fetcher(dns, srv, ca_file)
        assert (await f.policy("gone.test", now=0)).mode == "enforce"
        dns.remove("_mta-sts.gone.test", "TXT")
        dns.add_record("_mta-sts.gone.test", "TXT", '"v=STSv1; id=9"')
        srv.serve("gone.test", "", status=500)
        pol = await f.policy("gone.test", now=100)      # new id, fetch fails: still in force
        assert pol is not None and pol.mode == "enforce"
        assert f.stats()["sts_fetch_failures"] == 1
        assert await f.policy("gone.test", now=86400 + 1) is None      # max_age is over
    asyncio.run(run())


@pytest.mark.parametrize("domain, why", [
    ("wrongcert.test", "TLS: "), ("redirect.test", "HTTP 302 (a 200 is needed, no redirects"),
    ("huge.test", "policy larger than 65536 bytes"),
    ("badtype.test", "media type 'text/html', not text/plain"),
    ("malformed.test", "line 2: mode 'sometimes', expected enforce, testing or none"),
    ("none.test", ""), ("nothing.test", "")])
def test_no_policy_without_a_valid_fetch(world, domain, why) -> None:
    dns, srv, ca_file = world

    async def run() -> None:
        f = _fetcher(dns, srv, ca_file)
        assert await f.policy(domain, now=0) is None
        failed = f.stats()["sts_fetch_failures"]
        # none.test fetched fine (mode none: nothing in force); nothing.test has no TXT record
        assert failed == (0 if domain in ("none.test", "nothing.test") else 1), f.stats()
        assert why in f.last_failure and (f.last_failure == "") == (not why), f.last_failure
    asyncio.run(run())


def test_the_policy_host_goes_through_the_mx_address_guard(world) -> None:
    dns, srv, ca_file = world

    async def run() -> None:
        f = _fetcher(dns, srv, ca_file, allow=False)
        before = srv.requests["mta-sts.good.test"]
        assert await f.policy("good.test", now=0) is None
        assert f.stats()["sts_fetch_failures"] == 1
        assert f.last_failure == ("good.test: mta-sts.good.test resolves only to 127.0.0.61; "
                                  "refused (delivery.allow_networks)")
        assert srv.requests["mta-sts.good.test"] == before     # never contacted
    asyncio.run(run())


def test_a_txt_answer_given_with_the_batch_replaces_the_relays_lookup(world) -> None:
    """The throttle looked the TXT record up beside the MX: the relay's fetcher uses it (no
    query of its own), still fetches the policy its id names, and looks up itself when the
    answer given is a failure or older than the recheck interval."""
    dns, srv, ca_file = world

    async def run() -> None:
        f = _fetcher(dns, srv, ca_file)
        before = dns.queries[("_mta-sts.good.test", "TXT")]
        before_none = dns.queries[("_mta-sts.none.test", "TXT")]
        fetched = srv.requests["mta-sts.good.test"]
        pol = await f.policy("good.test", now=2000, txt=[["v=STSv1; id=1"], None, 1990.0])
        assert pol == StsPolicy("enforce", ("*.good.test",), 86400)
        assert srv.requests["mta-sts.good.test"] == fetched + 1
        # no record (NXDOMAIN given): no policy, no query, known until the recheck is due
        assert await f.policy("none.test", now=2000, txt=[[], "nxdomain", 1995.0]) is None
        assert f.current("none.test", now=2000) == (True, None)
        assert f.due("none.test", now=1995 + 59) is False
        assert f.due("none.test", now=1995 + 60) is True
        assert dns.queries[("_mta-sts.good.test", "TXT")] == before
        assert dns.queries[("_mta-sts.none.test", "TXT")] == before_none
        assert (f.counters["sts_lookups"], f.counters["sts_txt_given"]) == (0, 2)
        # a failed lookup given, or one too old: the relay asks DNS itself
        await f.policy("gone.test", now=2000, txt=[[], "servfail", 2000.0])
        await f.policy("huge.test", now=2000, txt=[[], "nxdomain", 1900.0])
        assert f.counters["sts_lookups"] == 2
        assert dns.queries[("_mta-sts.gone.test", "TXT")] >= 1

    asyncio.run(run())


@pytest.mark.parametrize("txt,settled,current", [
    ([[], "nxdomain", 1995.0], True, (True, None)),            # no record: nothing to fetch
    ([["v=spf1 -all"], None, 1995.0], True, (True, None)),      # records, none STS
    ([["v=STSv1; id=1"], None, 1995.0], False, (False, None)),  # an id: the policy is fetched
    ([["v=STSv1; id=1", "v=STSv1; id=2"], None, 1995.0], False, (False, None)),  # invalid
    ([[], "servfail", 1995.0], False, (False, None)),           # a failure: the relay asks
    ([[], "nxdomain", 1900.0], False, (False, None)),           # older than the recheck
])
def test_settle_takes_a_given_answer_without_a_task_only_when_nothing_is_fetched(
        world, txt, settled, current) -> None:
    dns, srv, ca_file = world
    f = _fetcher(dns, srv, ca_file)
    assert f.settle("quiet.test", txt, now=2000) is settled
    assert f.current("quiet.test", now=2000) == current
    assert f.counters["sts_txt_given"] == int(settled)
    assert f.counters["sts_lookups"] == 0


def test_settle_keeps_a_cached_policy_whose_id_is_unchanged(world) -> None:
    dns, srv, ca_file = world

    async def run() -> None:
        f = _fetcher(dns, srv, ca_file)
        pol = await f.policy("good.test", now=2000, txt=[["v=STSv1; id=1"], None, 1990.0])
        fetched = srv.requests["mta-sts.good.test"]
        # the recheck is due; the throttle's new answer names the same id: no fetch, in force
        assert f.due("good.test", now=2100)
        assert f.settle("good.test", [["v=STSv1; id=1"], None, 2095.0], now=2100)
        assert f.current("good.test", now=2100) == (True, pol)
        assert not f.due("good.test", now=2100)
        # a new id: settle declines, policy() fetches it
        assert not f.settle("good.test", [["v=STSv1; id=2"], None, 2195.0], now=2200)
        assert srv.requests["mta-sts.good.test"] == fetched

    asyncio.run(run())
