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


def test_extra_cpu_splits_a_tail_runs_cost_beyond_the_baseline():
    from bench.longtail import extra_cpu
    base = {"messages": 1000, "seconds_end_to_end": 2.0, "delivered_per_s": 500.0,
            "machine_busy_s": 4.0, "machine_busy_cores": 2.0, "cpu_ray_s": 2.0,
            "cpu_client_s": 0.5, "cpu_far_side_s": 0.5,
            "cpu_by_process": {"ray::RelayPool": 1.0, "ray::QueueCoord": 1.0},
            "cpu_far_side_by_process": {"smtp-sink": 0.5}}
    run = dict(base, seconds_end_to_end=4.0, delivered_per_s=250.0, machine_busy_s=8.0,
               cpu_ray_s=4.0, cpu_far_side_s=1.5,
               cpu_by_process={"ray::RelayPool": 2.5, "ray::QueueCoord": 1.5},
               cpu_far_side_by_process={"smtp-sink": 1.0, "unbound": 0.5})
    x = extra_cpu(run, base)
    assert x["raymta_and_driver_s"] == 2.0 and x["far_side_s"] == 1.0
    assert x["rest_of_machine_s"] == 1.0          # 4 s more busy, 3 s of it accounted for
    assert x["by_process"] == {"ray::RelayPool": 1.5, "ray::QueueCoord": 0.5,
                               "smtp-sink": 0.5, "unbound": 0.5}
    # raymta's 2 s extra at 2 busy cores is 1 s of the 4: 3 s -> 333/s -> 0.67x of 500/s
    assert x["seconds_without_ours"] == 3.0 and x["ratio_without_ours"] == 0.67
    assert extra_cpu(dict(run, machine_busy_s=None), base) is None   # an older result file


def test_median_ratios_take_each_rounds_own_baseline():
    from bench.longtail import _ratios, median_ratios
    rounds = [[{"domains": 100, "delivered_per_s": b, "ok": True},
               {"domains": 10_000, "delivered_per_s": t, "ok": True}]
              for b, t in ((5000.0, 3500.0), (4000.0, 3000.0), (6000.0, 3600.0))]
    for r in rounds:
        _ratios(r)
    rows = [x for r in rounds for x in r]
    m = median_ratios(rows)
    assert m[10_000]["ratios"] == [0.7, 0.75, 0.6]        # each to its own round's 100
    assert m[10_000]["ratio_to_100_domains"] == 0.7
    assert m[10_000]["delivered_per_s"] == 3500.0
    assert m[100]["ratio_to_100_domains"] == 1.0
    failed = rows + [{"domains": 10_000, "ok": False, "error": "boom"}]
    assert median_ratios(failed)[10_000]["ratios"] == [0.7, 0.75, 0.6]   # a failed run is left out
