"""Run raymta, Postfix and the SMTP physical limit in interleaved rounds; table, JSON, chart.

Each round runs, in turn: raymta (``bench/throughput.py``), raymta with every message
DKIM-signed at the relay with an RSA-2048 key (``raymta-signed``), a private Postfix relaying the
same workload (``bench/peer_postfix.py``) and ``smtp-source`` → ``smtp-sink`` (the most SMTP
this machine moves). Interleaving spreads slow drifts (other load, page cache, thermal) over
all systems. Prints the medians with the ratios raymta/Postfix and raymta/physical, writes
``bench/results/summary-<ts>.json`` and ``bench/results/summary-<ts>.png`` (delivered over
time per system, with the ``bench`` extra's matplotlib: ``pip install -e ".[bench]"``).

    python bench/run_all.py [--messages 20000] [--rounds 3] [--no-longtail]

After the rounds, the long-tail workload (``bench/longtail.py``: giants sharing MX sites and a
Zipf tail over 10,000 and 100,000 domains, DNS by nsd + unbound) runs once, with its own
100-domain run of the same shape beside it; its rows go into the summary under ``longtail``.

``raymta bench`` calls :func:`main` with its arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c
from bench.longtail import print_rows, run_longtail
from bench.peer_postfix import print_peer, run_physical, run_pipelined_ceiling, run_postfix
from bench.throughput import print_raymta, run_raymta

__all__ = ["chart", "main", "summarize"]

SYSTEMS = ("raymta", "raymta-signed", "postfix", "physical")
COLOURS = {"raymta": "tab:blue", "raymta-signed": "tab:purple", "postfix": "tab:orange",
           "physical": "tab:green"}


def _metric(res: dict[str, Any], key: str) -> Any:
    if key == "cpu_s_per_1000":
        return res.get("cpu_ray_s_per_1000", res.get("cpu_postfix_s_per_1000"))
    if key == "intake_per_s":
        return (res.get("intake_only") or {}).get("accepted_per_s")
    if key.startswith("probe_"):
        return ((res.get("latency_probe") or {}).get("latency_ms") or {}).get(key[6:])
    if key.startswith("p"):
        lat = res.get("batch_latency_ms") or res.get("message_latency_ms") or {}
        return lat.get(key)
    return res.get(key)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per system over its successful rounds, and raymta's ratios to the others."""
    keys = ("delivered_per_s", "delivered_per_s_10_90", "accepted_per_s", "intake_per_s",
            "cpu_s_per_1000", "p50", "p95", "p99", "probe_p50", "probe_p99",
            "seconds_end_to_end")
    med: dict[str, dict[str, Any]] = {}
    for system, results in runs.items():
        good = [r for r in results if r.get("ok")]
        row: dict[str, Any] = {"rounds": len(results), "ok_rounds": len(good)}
        for k in keys:
            vals = [v for r in good if isinstance(v := _metric(r, k), (int, float))]
            row[k] = round(c.median(vals), 3) if vals else None
        med[system] = row
    ray_rate = med.get("raymta", {}).get("delivered_per_s")
    ratios = {}
    signed = med.get("raymta-signed", {}).get("delivered_per_s")
    if "raymta-signed" in med:
        ratios["raymta-signed/raymta"] = round(signed / ray_rate, 3) \
            if signed and ray_rate else None
    for other in ("postfix", "physical"):
        o = med.get(other, {}).get("delivered_per_s")
        ratios[f"raymta/{other}"] = round(ray_rate / o, 3) if ray_rate and o else None
    # the physical limit by a pipelining client (RFC 2920), beside smtp-source's
    pipes = [r["pipelined"]["delivered_per_s"] for r in runs.get("physical", [])
             if (r.get("pipelined") or {}).get("ok")]
    if pipes:
        p = c.median(pipes)
        med.setdefault("physical", {})["pipelined_delivered_per_s"] = round(p, 1)
        ratios["raymta/physical-pipelined"] = round(ray_rate / p, 3) if ray_rate else None
    return {"medians": med, "ratios": ratios}


def print_table(summary: dict[str, Any], n: int) -> None:
    med = summary["medians"]
    cols = ("system", "ok/rounds", "delivered/s", "10-90% /s", "accepted/s", "intake only/s",
            "CPU s/1k", "p50 ms", "p95 ms", "p99 ms", "p50/p99 ms at 1k/s")
    rows = []
    for system in SYSTEMS:
        m = med.get(system)
        if m is None:
            continue

        def f(v: Any, digits: int = 1) -> str:
            return "-" if v is None else f"{v:,.{digits}f}"
        rows.append((system, f"{m['ok_rounds']}/{m['rounds']}", f(m["delivered_per_s"]),
                     f(m["delivered_per_s_10_90"]), f(m["accepted_per_s"]),
                     f(m.get("intake_per_s")), f(m["cpu_s_per_1000"], 2), f(m["p50"]), f(m["p95"]), f(m["p99"]),
                     "-" if m.get("probe_p99") is None else
                     f"{m['probe_p50']:,.1f} / {m['probe_p99']:,.1f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    print(f"\nmedians over rounds, {n:,} messages each "
          "(raymta p50/95/99: per 100-message submit batch with 4 submitters flat out; "
          "at 1k/s: batches of 100 offered at 1,000 msgs/s after the run; intake only: "
          "accepted/s with nothing delivering; Postfix: per SMTP message when injected by "
          "Python, '-' when by smtp-source)")
    print(line.format(*cols))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))
    for k, v in summary["ratios"].items():
        print(f"{k} (delivered/s): {'-' if v is None else f'{v:.3f}'}")


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        # declared, not installed behind the user's back: `pip install -e ".[bench]"`
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def chart(runs: dict[str, list[dict[str, Any]]], path: Path, n: int) -> Path | None:
    """Messages received over time, one line per system and round."""
    plt = _matplotlib()
    if plt is None:
        print('no chart: matplotlib is not installed (pip install -e ".[bench]")',
              file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for system, results in runs.items():
        for k, r in enumerate(results):
            series = r.get("series") or []
            if not series:
                continue
            ts, vs = zip(*series)
            rate = r.get("delivered_per_s")
            ax.plot(ts, vs, color=COLOURS.get(system), alpha=0.9 if k == 0 else 0.45,
                    label=f"{system} ({rate:,.0f} msgs/s)" if k == 0 and rate else None)
    ax.set_xlabel("seconds since first message submitted")
    ax.set_ylabel("messages received by the sink")
    ax.set_title(f"Delivered over time, {n:,} messages of ~2 KB, loopback, "
                 f"{c.machine_info()['cpus']} cores")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="raymta bench", description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--physical-messages", type=int, default=100_000,
                    help="messages for the physical limit (at least --messages)")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated subset of raymta,raymta-signed,postfix,physical")
    ap.add_argument("--timeout", type=float, default=600.0, help="per run (s)")
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get install postfix")
    ap.add_argument("--no-chart", action="store_true")
    ap.add_argument("--postfix-injector", choices=["auto", "smtp-source", "python"],
                    default="auto", help="who submits to Postfix (auto: smtp-source, the "
                    "lightest, when installed; python: aiosmtplib, with per-message latency)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--no-longtail", action="store_true",
                    help="skip the long-tail workload (bench/longtail.py) after the rounds")
    ap.add_argument("--longtail-domains", default="10000,100000",
                    help="domain counts of the long-tail runs (a 100-domain run comes first)")
    ap.add_argument("--longtail-messages", type=int, default=30_000)
    ap.add_argument("--table-of", metavar="SUMMARY_JSON",
                    help="print the table of a saved summary-*.json (its medians recomputed "
                    "from its rounds) and exit")
    args = ap.parse_args(argv)
    if args.table_of:
        saved = json.loads(Path(args.table_of).read_text())
        print_table(summarize(saved["runs"]), saved["messages"])
        return 0
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems: {', '.join(sorted(unknown))}")
    have_postfix = c.ensure_postfix(install=not args.no_install)
    if not have_postfix:
        print(c.banner("Postfix/smtp-sink unavailable: Postfix and the physical limit are "
                       "skipped; raymta is measured against the aiosmtpd sink"),
              file=sys.stderr)
        systems = [s for s in systems if s.startswith("raymta")]
    ts = c.timestamp()
    machine = c.machine_info()
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    t0 = time.time()
    for rnd in range(1, args.rounds + 1):
        for system in systems:
            print(f"\n=== round {rnd}/{args.rounds}: {system} ({args.messages:,} messages) ===",
                  flush=True)
            try:
                if system in ("raymta", "raymta-signed"):
                    res = run_raymta(args.messages, timeout=args.timeout,
                                     progress=not args.quiet,
                                     dkim="rsa" if system == "raymta-signed" else None)
                    res["system"] = system
                    print_raymta(res)
                elif system == "postfix":
                    res = run_postfix(args.messages, timeout=args.timeout,
                                      progress=not args.quiet,
                                      injector=args.postfix_injector)
                    print_peer(res)
                else:
                    # the ceiling over enough messages that ramp-up does not decide it, by
                    # smtp-source and by a pipelining client (RFC 2920), to the same sink
                    res = run_physical(max(args.messages, args.physical_messages),
                                       timeout=args.timeout)
                    print_peer(res)
                    pipe = run_pipelined_ceiling(max(args.messages, args.physical_messages),
                                                 timeout=args.timeout)
                    print_peer(pipe)
                    res["pipelined"] = {k: pipe.get(k) for k in (
                        "delivered_per_s", "delivered_per_s_10_90", "messages", "sessions",
                        "ok", "skipped", "received_by_sink", "seconds_end_to_end")}
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                print(c.banner(f"{system} round {rnd} FAILED: {type(e).__name__}: {e}"),
                      file=sys.stderr)
                res = {"system": system, "ok": False, "error": f"{type(e).__name__}: {e}"}
            if "messages" in res:
                c.check_counts(res)
            res["round"] = rnd
            runs[system].append(res)
    longtail = [] if args.no_longtail else _longtail(args)
    summary = summarize(runs)
    print_table(summary, args.messages)
    if longtail:
        base = next((r.get("delivered_per_s") for r in longtail if r.get("domains") == 100),
                    None)
        print(f"\nlong tail, {args.longtail_messages:,} messages per run "
              f"(DNS {longtail[0].get('dns_server', {}).get('kind', '?')}):")
        print_rows(longtail, base)
    out = {"messages": args.messages, "rounds": args.rounds, "machine": machine,
           "wall_seconds": round(time.time() - t0, 1), **summary, "runs": runs,
           "longtail": longtail}
    path = c.write_result("summary", out, ts)
    print(f"\nresults: {path}")
    if not args.no_chart and _has_matplotlib():
        png = chart(runs, c.RESULTS_DIR / f"summary-{ts}.png", args.messages)
        if png is not None:
            print(f"chart:   {png}")
    all_ok = all(r.get("ok") for rs in [*runs.values(), longtail] for r in rs)
    return 0 if all_ok else 1


def _longtail(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The long-tail runs: 100 domains, then each of ``--longtail-domains``, same shape."""
    rows = []
    counts = [100] + [int(x) for x in args.longtail_domains.split(",") if x.strip()
                      and int(x) != 100]
    for k in counts:
        print(f"\n=== long tail: {args.longtail_messages:,} messages over {k:,} domains ===",
              flush=True)
        try:
            res = run_longtail(args.longtail_messages, k, timeout=args.timeout,
                               progress=not args.quiet)
            c.check_counts(res)
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            print(c.banner(f"long tail, {k} domains, FAILED: {type(e).__name__}: {e}"),
                  file=sys.stderr)
            res = {"domains": k, "ok": False, "error": f"{type(e).__name__}: {e}"}
        res.pop("series", None)
        rows.append(res)
    base = next((r.get("delivered_per_s") for r in rows if r.get("domains") == 100), None)
    for r in rows:
        rate = r.get("delivered_per_s")
        r["ratio_to_100_domains"] = round(rate / base, 3) if rate and base else None
    return rows


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('no chart: matplotlib is not installed (pip install -e ".[bench]")',
              file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
