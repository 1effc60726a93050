"""What one grant costs a SiteThrottle, by number of sites and number of shared throttles.

Two measurements, each at 100, 10,000 and 100,000 sites:

- **core**: :meth:`cluster.core.throttle.ThrottleBook.grant` alone (CPU µs per grant, one
  process, no Ray), with idle eviction on as in the actor;
- **actor**: grant rounds as a shard leader sends them (one call per throttle per round, the
  sites of the round as msgpack rows, at most ``--chunk`` rows a call) to 1 and to 2 real
  ``throttle:pool:<k>`` actors on a local Ray: the throttles' CPU µs per grant (all their
  threads, from /proc), the wall µs per grant of a round, and each throttle's resident memory
  after the run.

The machine's load average is recorded beside every figure (2 shared cores: other work moves
them).

    python bench/throttle_grant.py [--sites 100,10000,100000] [--throttles 1,2]
                                   [--grants 200000] [--chunk 5000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import msgpack
from common import _read_stat, machine_info, write_result

from cluster.core.ratespec import RateSpec
from cluster.core.sites import SiteLimits, limits_to_wire
from cluster.core.throttle import ThrottleBook

LIMITS = SiteLimits(rates=(RateSpec.parse("100/s"),), max_connections=10,
                    deliveries_per_connection=100)


def site_names(n: int) -> list[str]:
    return [f"mx1.site{i}.bench.test,mx2.site{i}.bench.test" for i in range(n)]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def core(n_sites: int, grants: int) -> dict[str, Any]:
    sites = site_names(n_sites)
    book = ThrottleBook(idle_evict=300.0)
    rounds = max(3, grants // n_sites)
    la0 = load()
    t0 = time.process_time()
    now = 1000.0
    for _ in range(rounds):
        for s in sites:
            book.grant(0, s, LIMITS, 1, 0, now)
        book.evict(now)
        now += 0.05
    cpu = time.process_time() - t0
    return {"sites": n_sites, "grants": rounds * n_sites,
            "cpu_us_per_grant": round(cpu / (rounds * n_sites) * 1e6, 2),
            "books": len(book.sites), "loadavg": [la0, load()]}


def proc_cpu(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` (utime + stime)."""
    st = _read_stat(f"/proc/{pid}/stat")
    return st.own if st is not None else 0.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def actor_runs(site_counts: list[int], throttle_counts: list[int], grants: int,
               chunk: int) -> list[dict[str, Any]]:
    import ray

    from actors.remote import ensure_throttle
    from actors.throttle_pool import publish_view
    from cluster.config import parse_config
    from cluster.core.throttle_pool import PoolView, pool_owner
    from cluster.deploy import init_local_ray
    out = []
    wire = limits_to_wire(LIMITS)
    init_local_ray(num_cpus=2)
    try:
        for n_thr in throttle_counts:
            for n_sites in site_counts:
                spool = tempfile.mkdtemp(prefix="thrbench-")
                # a namespace per run: fresh throttles, so memory and books start empty
                ns = f"thrbench-{n_thr}-{n_sites}"
                cfg = parse_config({"spool": {"directory": spool},
                                    "cluster": {"namespace": ns},
                                    "delivery": {"throttle_actors": n_thr}})
                publish_view(cfg, PoolView(n_thr, n_thr, 0.0))
                names = [f"throttle:pool:{k}" for k in range(n_thr)]
                hs = {name: ensure_throttle(cfg, name) for name in names}
                pids = dict(zip(names, ray.get([h.ping.remote() for h in hs.values()])))
                rows: dict[str, list[list[Any]]] = {name: [] for name in names}
                for s in site_names(n_sites):
                    rows[pool_owner(s, n_thr)].append([s, 1, 0, wire])
                calls = [(name, msgpack.packb(r[i:i + chunk], use_bin_type=True))
                         for name, r in rows.items() for i in range(0, len(r), chunk)]
                rounds = max(3, grants // n_sites)
                ray.get([hs[name].grant.remote(0, b) for name, b in calls])   # warm up
                la0 = load()
                cpu0 = {n: proc_cpu(p) for n, p in pids.items()}
                t0 = time.perf_counter()
                given = 0
                for _ in range(rounds):
                    for reply in ray.get([hs[name].grant.remote(0, b) for name, b in calls]):
                        given += len(reply)
                wall = time.perf_counter() - t0
                cpu = {n: proc_cpu(p) - cpu0[n] for n, p in pids.items()}
                total = rounds * n_sites
                assert given == total, (given, total)
                res = {"throttles": n_thr, "sites": n_sites, "grants": total,
                       "rounds": rounds, "calls_per_round": len(calls),
                       "throttle_cpu_us_per_grant": round(sum(cpu.values()) / total * 1e6, 2),
                       "wall_us_per_grant": round(wall / total * 1e6, 2),
                       "grants_per_s": round(total / wall),
                       "cpu_s_by_throttle": {n: round(c, 2) for n, c in cpu.items()},
                       "rss_mib_by_throttle": {n: rss_mib(p) for n, p in pids.items()},
                       "loadavg": [la0, load()]}
                print(f"  actor {n_thr} throttle(s) {n_sites:>7} sites: "
                      f"{res['throttle_cpu_us_per_grant']:6.2f} µs CPU/grant, "
                      f"{res['wall_us_per_grant']:6.2f} µs wall/grant "
                      f"({res['grants_per_s']:,}/s), RSS {res['rss_mib_by_throttle']} "
                      f"load {res['loadavg']}", flush=True)
                out.append(res)
                for h in hs.values():
                    ray.kill(h, no_restart=True)
    finally:
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", default="100,10000,100000")
    ap.add_argument("--throttles", default="1,2")
    ap.add_argument("--grants", type=int, default=200_000, help="grants per measurement")
    ap.add_argument("--chunk", type=int, default=5_000, help="sites per grant call at most")
    a = ap.parse_args(argv)
    site_counts = [int(x) for x in a.sites.split(",")]
    throttle_counts = [int(x) for x in a.throttles.split(",")]
    info = machine_info()
    print(f"throttle grant cost; load average at start {info['loadavg_at_start']}", flush=True)
    cores = []
    for n in site_counts:
        r = core(n, a.grants)
        print(f"  core {n:>7} sites: {r['cpu_us_per_grant']:6.2f} µs CPU/grant "
              f"(books held {r['books']}) load {r['loadavg']}", flush=True)
        cores.append(r)
    actors = actor_runs(site_counts, throttle_counts, a.grants, a.chunk)
    path = write_result("throttle-grant", {"machine": info, "args": vars(a), "core": cores,
                                           "actor": actors})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
