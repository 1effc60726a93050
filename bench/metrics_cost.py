"""What raymta's metrics cost: paired on/off rounds of the same workload, with a confidence
interval on the difference.

Single runs on a shared 2-core machine spread ±15-25 % in rate, so one "on" run against one
"off" run says nothing about a 3 % budget. This runs ``bench/throughput.py`` (a fresh embedded
cluster each round, the same workload) in pairs, the order alternating (on-off, off-on, ...)
so that a drift of the machine's load over the run falls on both settings alike, and reports
for each figure: the medians of each setting, and the mean of the paired relative differences
(on - off) / off with a 95 % t interval. CPU per message (Ray processes, from /proc) is the
steady figure; rates are the noisy ones. The load average is taken before and after every
round (other work on the machine shows there).

    python bench/metrics_cost.py --pairs 6 --messages 20000

Prints a table and writes ``bench/results/metrics-cost-<timestamp>.json``. From
``bench/run_all.py``: ``from bench.metrics_cost import run_pairs, summarize`` and
``summarize(run_pairs(pairs, messages))`` returns the same dict it prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c

__all__ = ["FIGURES", "main", "paired", "run_pairs", "run_round", "summarize"]

#: (name, where in throughput.py's result, True when higher is better)
FIGURES: list[tuple[str, tuple[str, ...], bool]] = [
    ("delivered_per_s", ("delivered_per_s",), True),
    ("delivered_per_s_10_90", ("delivered_per_s_10_90",), True),
    ("accepted_per_s_while_delivering", ("accepted_per_s",), True),
    ("accepted_per_s_intake_only", ("intake_only", "accepted_per_s"), True),
    ("cpu_ray_s_per_1000", ("cpu_ray_s_per_1000",), False),
    ("cpu_ray_s_per_1000_intake_only", ("intake_only", "cpu_ray_s_per_1000"), False),
]

# two-sided 95 % quantiles of Student's t, by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
        16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def _t95(df: int) -> float:
    if df in _T95:
        return _T95[df]
    below = [k for k in _T95 if k <= df]
    return _T95[max(below)] if below else _T95[1]


def _get(res: dict[str, Any], path: tuple[str, ...]) -> float | None:
    v: Any = res
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return float(v) if isinstance(v, (int, float)) else None


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_round(metrics: bool, messages: int, timeout: float, receiver: str) -> dict[str, Any]:
    """One ``bench/throughput.py`` run in its own process (a fresh Ray each time)."""
    script = Path(__file__).resolve().parent / "throughput.py"
    cmd = [sys.executable, str(script), "-n", str(messages), "--probe-rate", "0", "--quiet",
           "--metrics", "on" if metrics else "off", "--timeout", str(timeout),
           "--receiver", receiver]
    load_before = _load()
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120,
                       check=False)
    path = next((line.split(":", 1)[1].strip() for line in p.stdout.splitlines()
                 if line.startswith("results:")), None)
    if path is None:
        raise RuntimeError(f"throughput.py failed (exit {p.returncode}): "
                           f"{(p.stderr or p.stdout)[-2000:]}")
    res = json.loads(Path(path).read_text())
    out = {"metrics": metrics, "result_file": path, "ok": bool(res.get("ok")),
           "exit": p.returncode, "seconds": round(time.time() - t, 1),
           "load_before": load_before, "load_after": _load()}
    for name, where, _ in FIGURES:
        out[name] = _get(res, where)
    return out


def run_pairs(pairs: int, messages: int, *, timeout: float = 600.0, receiver: str = "auto",
              log: Any = print) -> list[dict[str, Any]]:
    """``pairs`` on/off pairs, alternating which setting goes first."""
    rounds = []
    for k in range(pairs):
        order = (True, False) if k % 2 == 0 else (False, True)
        for m in order:
            r = run_round(m, messages, timeout, receiver)
            r["pair"] = k
            rounds.append(r)
            log(f"pair {k + 1}/{pairs} metrics {'on ' if m else 'off'}: "
                + ", ".join(f"{name} {r[name]}" for name, _, _ in FIGURES)
                + f"; load {r['load_before'][0]} -> {r['load_after'][0]}"
                + ("" if r["ok"] else "  (NOT OK: see " + r["result_file"] + ")"))
    return rounds


def paired(on: list[float], off: list[float]) -> dict[str, Any]:
    """Relative differences (on - off) / off per pair: mean, 95 % t interval, median, and in
    how many pairs "on" was higher."""
    d = [(a - b) / b for a, b in zip(on, off) if b]
    if not d:
        return {"n": 0}
    mean = statistics.fmean(d)
    half = (_t95(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))) if len(d) > 1 \
        else math.inf
    return {"n": len(d), "mean_pct": round(100 * mean, 2),
            "ci95_pct": [round(100 * (mean - half), 2), round(100 * (mean + half), 2)],
            "median_pct": round(100 * statistics.median(d), 2),
            "on_higher_in": sum(1 for x in d if x > 0)}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    by_pair: dict[int, dict[bool, dict[str, Any]]] = {}
    for r in rounds:
        if r["ok"]:
            by_pair.setdefault(r["pair"], {})[r["metrics"]] = r
    full = [p for p in by_pair.values() if True in p and False in p]
    out: dict[str, Any] = {"pairs_complete": len(full), "rounds": rounds, "figures": {}}
    for name, _, higher_better in FIGURES:
        rows = [(p[True][name], p[False][name]) for p in full
                if p[True][name] is not None and p[False][name] is not None]
        if not rows:
            continue
        on, off = [a for a, _ in rows], [b for _, b in rows]
        out["figures"][name] = {
            "median_off": statistics.median(off), "median_on": statistics.median(on),
            "range_off": [min(off), max(off)], "range_on": [min(on), max(on)],
            "higher_is_better": higher_better, **paired(on, off)}
    return out


def print_summary(s: dict[str, Any]) -> None:
    print(f"\nmetrics on vs off, {s['pairs_complete']} complete pairs "
          "(paired relative difference (on - off) / off, mean and 95 % t interval)")
    print(f"{'figure':<32} {'median off':>11} {'median on':>10} {'mean diff':>10} "
          f"{'95 % CI':>18} {'on higher':>9}")
    for name, f in s["figures"].items():
        ci = f"[{f['ci95_pct'][0]:+.1f}, {f['ci95_pct'][1]:+.1f}] %"
        print(f"{name:<32} {f['median_off']:>11.3f} {f['median_on']:>10.3f} "
              f"{f['mean_pct']:>+9.1f}% {ci:>18} {f['on_higher_in']:>5}/{f['n']}")
    print(f"load average before / after: {s['uptime_before']} / {s['uptime_after']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6, help="on/off pairs (>= 2)")
    ap.add_argument("-n", "--messages", type=int, default=20_000, help="per round")
    ap.add_argument("--timeout", type=float, default=600.0, help="per round (s)")
    ap.add_argument("--receiver", choices=["auto", "smtp-sink", "aiosmtpd"], default="auto")
    args = ap.parse_args(argv)
    if args.pairs < 2:
        ap.error("--pairs: at least 2 (a confidence interval needs two differences)")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    rounds = run_pairs(args.pairs, args.messages, timeout=args.timeout,
                       receiver=args.receiver)
    s = summarize(rounds)
    s["uptime_before"] = uptime
    s["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True,
                                       check=False).stdout.strip()
    s["messages"], s["machine"] = args.messages, c.machine_info()
    print_summary(s)
    path = c.write_result("metrics-cost", s)
    print(f"results: {path}")
    return 0 if s["pairs_complete"] >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
