"""CPU per DNS query of :class:`cluster.adapters.dns.MxResolver` (issue 17).

A fresh resolver resolves N long-tail domains of the bench zone (MX, the MX host's A, and the
``_mta-sts`` TXT, as the throttle asks them: ``resolve_batch``, or ``resolve_many`` and
``txt_cached`` for a copy without it) against nsd + unbound on loopback, unbound's cache
warmed by a first pass; prints the process CPU time per query (all threads, so the resolver
layer's asyncio work is included) and the wall time. ``--compare PATH``: also time the
``MxResolver`` of another copy of ``cluster/adapters/dns.py`` (e.g. dnspython's, from
``git show 8499bbb:cluster/adapters/dns.py > /tmp/dns_old.py``), alternating.

    python bench/dns_cpu.py --domains 3000 --rounds 3 --compare /tmp/dns_old.py
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c
from bench.longtail import longtail_workload
from cluster.adapters.dns import MxResolver


def _load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("dns_compared", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--compare {path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dns_compared"] = mod
    spec.loader.exec_module(mod)
    return mod.MxResolver


async def _run(cls: Any, host: str, port: int, domains: list[str]) -> tuple[int, float, float, int]:
    r = cls([host], port, timeout=5.0, use_ipv6=False)
    now = time.time()
    t0, c0 = time.perf_counter(), time.process_time()
    if hasattr(r, "resolve_batch"):   # what the throttle calls: routes and TXT in one batch
        res, _ = await r.resolve_batch(domains, [f"_mta-sts.{d}" for d in domains], now)
    else:
        res = await r.resolve_many(domains, now)
        await asyncio.gather(*(r.txt_cached(f"_mta-sts.{d}", now) for d in domains))
    c1, t1 = time.process_time(), time.perf_counter()
    q = r.cache_info()["queries"]
    failed = sum(1 for v in res.values() if not hasattr(v, "hosts"))
    return q, (c1 - c0) / q * 1e6, t1 - t0, failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", metavar="PATH", help="another dns.py to time alternately")
    a = ap.parse_args(argv)
    kinds: list[tuple[str, Any]] = [("this", MxResolver)]
    if a.compare:
        kinds.insert(0, (Path(a.compare).name, _load(a.compare)))
    _, zone = longtail_workload(a.domains, a.domains)
    domains = sorted(zone.mx)[:a.domains]
    srv = c.start_zone_dns(zone, "real")
    try:
        host = getattr(srv, "host", "127.0.0.1")
        print(f"DNS {srv.kind} {host}:{srv.port}, {len(domains)} domains, "
              f"load {os.getloadavg()[0]:.1f}")

        async def go() -> None:
            await _run(MxResolver, host, srv.port, domains)  # warm unbound's cache
            for _ in range(a.rounds):
                for name, cls in kinds:
                    q, us, wall, failed = await _run(cls, host, srv.port, domains)
                    print(f"{name:14s} {q} queries  {us:6.0f} µs CPU/query  "
                          f"wall {wall:5.2f} s  failed {failed}")
        asyncio.run(go())
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
