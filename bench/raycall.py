"""What one Ray actor call costs in CPU on this machine, on both sides.

raymta's hot paths are designed around this figure (one submit call per batch, leases for many
sites per call, results flushed per leader every 0.1 s, dispatch rounds spaced out while relays
hold work): a call that carries one small argument costs far more CPU than the work it asks
for. This runs a caller actor that calls a trivial method of another actor ``--calls`` times,
back to back and then at ``--rate`` calls/s, and reads both processes' CPU time (every thread:
the Python worker, the event loop, gRPC's) from /proc before and after.

    python bench/raycall.py [--calls 1000] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@ray.remote
class Callee:
    async def f(self, x: int) -> int:
        return x

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class Caller:
    async def run(self, callee: Any, n: int, rate: float) -> float:
        t = time.perf_counter()
        for i in range(n):
            await callee.f.remote(i)
            if rate:
                await asyncio.sleep(1.0 / rate)
        return time.perf_counter() - t

    def pid(self) -> int:
        return os.getpid()


def _cpu(pid: int) -> float:
    """utime + stime of a process, all its threads (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(calls: int, rate: float) -> dict[str, Any]:
    callee, caller = Callee.remote(), Caller.remote()
    pids = ray.get([callee.pid.remote(), caller.pid.remote()])
    time.sleep(1.0)   # both started and idle
    out: dict[str, Any] = {"calls": calls, "rate": rate or "back to back"}
    before = [_cpu(p) for p in pids]
    seconds = ray.get(caller.run.remote(callee, calls, rate))
    after = [_cpu(p) for p in pids]
    idle_per_s = 0.011   # a bare actor's idle cost, ~1.1 % of a core (measured separately)
    out["seconds"] = round(seconds, 2)
    out["callee_ms_per_call"] = round((after[0] - before[0]) * 1000 / calls, 3)
    out["caller_ms_per_call"] = round((after[1] - before[1]) * 1000 / calls, 3)
    out["idle_share_ms_per_call"] = round(idle_per_s * seconds * 1000 / calls, 3)
    ray.kill(callee)
    ray.kill(caller)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=100.0, help="calls/s for the paced run")
    args = ap.parse_args(argv)
    if not 1 <= args.calls <= 100_000:
        ap.error("--calls must be between 1 and 100000")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        runs = [measure(args.calls, 0.0), measure(args.calls, args.rate)]
    finally:
        ray.shutdown()
    res = {"bench": "raycall", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "cpus": os.cpu_count(), "ray": ray.__version__, "runs": runs}
    for r in runs:
        print(f"{r['calls']} calls, {r['rate']}: {r['seconds']} s; CPU per call: callee "
              f"{r['callee_ms_per_call']} ms, caller {r['caller_ms_per_call']} ms "
              f"(of which idle baseline ~{r['idle_share_ms_per_call']} ms each)")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"raycall-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=2))
    print(f"results: {path}")
    return res


if __name__ == "__main__":
    main()
