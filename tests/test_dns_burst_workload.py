"""The long-tail bench workload (bench/longtail.py): giants sharing MX sites, a Zipf tail, and the
zone the bench's DNS servers publish for it. Pure: no server is started."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from bench.longtail import GIANT_SHARE, GIANTS, longtail_domains, longtail_workload
from cluster.core.sites import SiteLimits, site_for


def test_giant_domains_of_one_provider_are_one_site_and_tail_domains_their_own():
    names, weights, zone = longtail_domains(1000)
    assert len(names) == len(set(names)) == 1000
    assert abs(sum(weights) - 1.0) < 1e-9
    giants = sum(len(doms) for doms, _ in GIANTS.values())
    sites = Counter(site_for(d, [h for _, h in zone.mx[d]], SiteLimits(), ()).key
                    for d in names)
    # 3 providers' domains collapse to 3 sites; every tail domain is a site of its own
    assert len(sites) == len(GIANTS) + (1000 - giants)
    assert sorted(sites.values(), reverse=True)[:len(GIANTS)] == sorted(
        (len(doms) for doms, _ in GIANTS.values()), reverse=True)
    # every MX host has an address in the zone
    assert all(h in zone.a for mx in zone.mx.values() for _, h in mx)


@pytest.mark.parametrize("domains", [100, 10_000])
def test_giants_take_their_share_and_the_tail_is_zipf(domains):
    _, weights, _ = longtail_domains(domains)
    giants = sum(len(doms) for doms, _ in GIANTS.values())
    assert abs(sum(weights[:giants]) - GIANT_SHARE) < 1e-9
    tail = weights[giants:]
    assert tail[0] / tail[9] == pytest.approx(10.0)   # 1/rank
    assert all(a >= b for a, b in itertools.pairwise(tail))


def test_zone_text_is_a_loadable_master_file():
    import dns.zone
    _, _, zone = longtail_domains(50)
    z = dns.zone.from_text(zone.zone_text("127.0.0.53"), origin="bench.test.",
                           relativize=False)
    mx = z.find_rdataset("gmail.bench.test.", "MX")
    assert sorted(r.preference for r in mx) == [5, 10, 20]
    assert z.find_rdataset("mx.t0.bench.test.", "A")[0].address == "127.0.0.2"


def test_workload_is_deterministic_and_bad_domain_counts_are_refused():
    w1, _ = longtail_workload(500, 1000, seed=3)
    w2, _ = longtail_workload(500, 1000, seed=3)
    assert [m["recipients"] for m in w1.messages] == [m["recipients"] for m in w2.messages]
    with pytest.raises(ValueError, match="--domains"):
        longtail_domains(5)
