"""Does raymta's cost grow with the queue? (issue 16, item 4)

Runs ``bench/throughput.py``'s workload twice in one invocation on the same machine: a small
run (20,000 messages by default) and a large one (1,000,000), each on a fresh embedded Ray,
and compares delivered msgs/s and CPU per message per process kind. While each runs, every
queue shard leader is sampled each second: messages queued, its resident memory (the slope of
RSS over queued messages is the memory a queued message costs), its event-loop lag, and each
compaction snapshot (bytes, milliseconds building it on the loop, milliseconds writing it).

    python bench/scale.py [--small 20000] [--large 1000000] [--timeout 1800]

Prints a table and writes ``bench/results/scale-<timestamp>.json``. The submitter sends as
fast as the cluster accepts, so in the large run intake and delivery share the cores for most
of the run; the small run's intake is over in seconds. The comparison says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c
from bench.throughput import run_raymta

__all__ = ["main", "summarize"]

_KINDS = ("RelayPool", "QueueCoord", "ReplicaLog", "SiteThrott")


def _per_kind(res: dict[str, Any]) -> dict[str, float]:
    """CPU ms per message by process kind."""
    n = max(1, res["delivered"])
    out = {k: 0.0 for k in _KINDS}
    for proc, secs in res["cpu_by_process"].items():
        for k in _KINDS:
            if k in proc:
                out[k] += secs
    return {k: round(v / n * 1000, 4) for k, v in out.items()}


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    watched = res.get("shards_watched", {})
    shards = {}
    for name, w in watched.items():
        snaps = w["snapshots"]
        shards[name] = {
            "peak_queued": w["peak_queued"], "rss_at_peak_mb": round(w["rss_at_peak"] / 2**20),
            "rss_bytes_per_queued_message": w["rss_bytes_per_queued_message"],
            "body_bytes_per_queued_message": w["body_bytes_per_queued_message"],
            "loop_lag_max_ms": w["loop_lag_max_ms"],
            "snapshots": len(snaps),
            "snapshot_max_bytes": max((s["bytes"] for s in snaps), default=0),
            "snapshot_max_build_ms": max((s["build_ms"] for s in snaps), default=0),
            "snapshot_max_write_ms": max((s["write_ms"] for s in snaps), default=0),
            "snapshot_bodies_referenced": sum(s["bodies_referenced"] for s in snaps),
            "snapshot_bodies_copied": sum(s["bodies_copied"] for s in snaps)}
    lat = res["batch_latency_ms"]
    return {"messages": res["messages"], "delivered": res["delivered"],
            "delivered_per_s": res["delivered_per_s"],
            "delivered_per_s_10_90": res["delivered_per_s_10_90"],
            "accepted_per_s": res["accepted_per_s"], "submit_seconds": res["submit_seconds"],
            "seconds_end_to_end": res["seconds_end_to_end"],
            "cpu_ms_per_msg": round(res["cpu_ray_s_per_1000"], 4),
            "cpu_ms_per_msg_by_kind": _per_kind(res),
            "submit_batch_ms_p50_p99": [lat.get("p50"), lat.get("p99")],
            "deferred_attempts": res["deferred_attempts"], "ok": res.get("ok"),
            "shards": shards}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--timeout", type=float, default=1800.0, help="hard limit per run (s)")
    ap.add_argument("--no-install", action="store_true",
                    help="do not try to install smtp-sink (postfix) with apt-get")
    args = ap.parse_args(argv)
    c.ensure_postfix(install=not args.no_install)
    runs = {}
    for label, n in (("small", args.small), ("large", args.large)):
        print(f"--- {label}: {n:,} messages", flush=True)
        res = run_raymta(n, timeout=args.timeout, progress=False, probe_seconds=0, intake=0,
                         watch=True)
        runs[label] = summarize(res)
        runs[label]["raw"] = res
    s, lg = runs["small"], runs["large"]
    ratio = round(lg["delivered_per_s"] / s["delivered_per_s"], 3) if s["delivered_per_s"] else 0
    cpu_ratio = round(lg["cpu_ms_per_msg"] / s["cpu_ms_per_msg"], 3) if s["cpu_ms_per_msg"] else 0
    out = {"machine": c.machine_info(), "small": s, "large": lg,
           "delivered_rate_ratio_large_over_small": ratio,
           "cpu_per_msg_ratio_large_over_small": cpu_ratio}
    rows = [("messages", s["messages"], lg["messages"]),
            ("delivered msgs/s (end to end)", s["delivered_per_s"], lg["delivered_per_s"]),
            ("delivered msgs/s (10-90 %)", s["delivered_per_s_10_90"],
             lg["delivered_per_s_10_90"]),
            ("accepted msgs/s / submit seconds", f"{s['accepted_per_s']} / {s['submit_seconds']}",
             f"{lg['accepted_per_s']} / {lg['submit_seconds']}"),
            ("CPU ms per message (Ray processes)", s["cpu_ms_per_msg"], lg["cpu_ms_per_msg"]),
            *[(f"  {k}", s["cpu_ms_per_msg_by_kind"][k], lg["cpu_ms_per_msg_by_kind"][k])
              for k in _KINDS],
            ("submit batch p50 / p99 ms", s["submit_batch_ms_p50_p99"],
             lg["submit_batch_ms_p50_p99"])]
    for name in sorted(lg["shards"]):
        a, b = s["shards"].get(name, {}), lg["shards"][name]
        rows += [(f"{name}: peak queued", a.get("peak_queued"), b["peak_queued"]),
                 (f"{name}: RSS at peak MB", a.get("rss_at_peak_mb"), b["rss_at_peak_mb"]),
                 (f"{name}: RSS bytes per queued msg (slope)",
                  a.get("rss_bytes_per_queued_message"), b["rss_bytes_per_queued_message"]),
                 (f"{name}: snapshots / max MB", f"{a.get('snapshots')} / "
                  f"{round((a.get('snapshot_max_bytes') or 0) / 2**20, 1)}",
                  f"{b['snapshots']} / {round(b['snapshot_max_bytes'] / 2**20, 1)}"),
                 (f"{name}: max snapshot build (loop) / write ms",
                  f"{a.get('snapshot_max_build_ms')} / {a.get('snapshot_max_write_ms')}",
                  f"{b['snapshot_max_build_ms']} / {b['snapshot_max_write_ms']}"),
                 (f"{name}: bodies referenced / copied in snapshots",
                  f"{a.get('snapshot_bodies_referenced')} / {a.get('snapshot_bodies_copied')}",
                  f"{b['snapshot_bodies_referenced']} / {b['snapshot_bodies_copied']}"),
                 (f"{name}: event-loop lag max ms", a.get("loop_lag_max_ms"),
                  b["loop_lag_max_ms"])]
    print(f"\n{'':48} {'small':>22} {'large':>22}")
    for label, x, y in rows:
        print(f"{label:48} {str(x):>22} {str(y):>22}")
    print(f"\nlarge/small delivered rate {ratio}, CPU per message {cpu_ratio}")
    path = c.write_result("scale", out)
    print(f"results: {path}")
    return 0 if s["ok"] and lg["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
