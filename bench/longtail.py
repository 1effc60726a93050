"""raymta with real traffic's long tail: a few giant providers, then thousands of small domains.

Domains are drawn like a real sender's mail: three giant providers take 60 % (20 % each), and
several giant domains share one provider's MX hosts, as Google-hosted domains do (gmail,
googlemail and two Workspace domains are one raymta *site*; outlook/hotmail/live another;
yahoo/aol a third); the other 40 % is a Zipf tail (s=1) over the remaining domains, each with its
own MX host, so its own MX lookup, connection and limits. The 100-domain workload of the same
shape is run first in the same invocation, so each long-tail rate is printed beside it.

DNS is Debian's ``nsd`` serving the generated zone with ``unbound`` as the caching resolver in
front (bench/common.py :class:`RealDns`), as on a production MTA host; without them (message
printed) the Python server. Writes ``bench/results/longtail-<ts>.json``.

    python bench/longtail.py [--messages 30000] [--domains 10000,100000] [--dns auto|real|python]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c
from bench.throughput import run_raymta

__all__ = ["GIANTS", "longtail_domains", "longtail_workload", "main", "run_longtail"]

ORIGIN = "bench.test"

#: provider → (its domains with their share of the provider's mail, its MX records): several
#: domains on one set of MX hosts are one site, like Google-hosted domains
GIANTS: dict[str, tuple[list[tuple[str, float]], list[tuple[int, str]]]] = {
    "google": ([("gmail", 0.55), ("googlemail", 0.15), ("ws-alpha", 0.15), ("ws-beta", 0.15)],
               [(5, "gmail-smtp-in.l.google"), (10, "alt1.gmail-smtp-in.l.google"),
                (20, "alt2.gmail-smtp-in.l.google")]),
    "microsoft": ([("outlook", 0.5), ("hotmail", 0.35), ("live", 0.15)],
                  [(10, "mx.outlook-protection")]),
    "yahoo": ([("yahoo", 0.7), ("aol", 0.3)],
              [(1, "mta5.am0.yahoodns"), (1, "mta6.am0.yahoodns")]),
}
GIANT_SHARE = 0.6


def _fq(label: str) -> str:
    return f"{label}.{ORIGIN}"


def longtail_domains(domains: int, giant_share: float = GIANT_SHARE
                     ) -> tuple[list[str], list[float], c.BenchZone]:
    """(domain names, their weights, the zone) for ``domains`` domains in all: the giants'
    domains first, then ``t<i>.bench.test`` with Zipf weights 1/rank."""
    names: list[str] = []
    weights: list[float] = []
    zone = c.BenchZone(ORIGIN, {}, {})
    per_site = giant_share / len(GIANTS)
    for doms, mx in GIANTS.values():
        for label, share in doms:
            names.append(_fq(label))
            weights.append(per_site * share)
            zone.mx[_fq(label)] = [[p, _fq(h)] for p, h in mx]
        for _, h in mx:
            zone.a[_fq(h)] = c.RECEIVER_HOST
    tail = domains - len(names)
    if tail < 1:
        raise ValueError(f"--domains must be more than the {len(names)} giant domains, "
                         f"got {domains}")
    harmonic = sum(1.0 / (k + 1) for k in range(tail))
    for k in range(tail):
        d = _fq(f"t{k}")
        names.append(d)
        weights.append((1.0 - giant_share) / (k + 1) / harmonic)
        zone.mx[d] = [[10, f"mx.{d}"]]
        zone.a[f"mx.{d}"] = c.RECEIVER_HOST
    return names, weights, zone


def longtail_workload(n: int, domains: int, seed: int = 1) -> tuple[c.Workload, c.BenchZone]:
    names, weights, zone = longtail_domains(domains)
    return c.make_workload(n, names=names, weights=weights, seed=seed), zone


def _cluster_counters(mc: Any, res: dict[str, Any]) -> None:
    """Read, before the cluster closes: deferrals by cause (the shards' DNS counters) and the
    throttles' resolver figures."""
    import ray
    st = mc.stats()
    dns: dict[str, int] = {}
    for s in st.get("shards", []):
        for k, v in (s.get("dns") or {}).items():
            dns[k] = dns.get(k, 0) + int(v)
    res["dns_coordinator"] = dns
    res["deferred_dns"] = dns.get("deferred_msgs", 0)
    res["deferred_other"] = res.get("deferred_attempts", 0) - res["deferred_dns"]
    if res.get("deferred_attempts"):
        # which failures: category counts and a few reply texts (events of this run only)
        cats: dict[str, int] = {}
        texts: list[str] = []
        for ev in mc.events(0, limit=1_000_000):
            if ev.get("type") == "TransientFailure":
                k = str(ev.get("category"))
                cats[k] = cats.get(k, 0) + 1
                if len(texts) < 5:
                    texts.append(f"{ev.get('code')} {str(ev.get('text'))[:160]}")
        res["deferred_by_category"] = cats
        res["deferred_samples"] = texts
    thr: dict[str, Any] = {}
    for name, h in mc.handles.items():
        if name.startswith("throttle:"):
            s = ray.get(h.stats.remote(), timeout=30)
            thr[name] = {"calls": s.get("calls"), "granted": s.get("granted"),
                         "sites": len(s.get("sites") or {}), "dns_cache": s.get("dns_cache")}
    res["throttles"] = thr
    relays: dict[str, Any] = {}
    for name, h in mc.handles.items():
        if name.startswith("relay:"):
            s = ray.get(h.stats.remote(), timeout=30)
            # sessions opened (one per site and connection) and how near the relay came to
            # its connection cap (sites waiting for a slot wait for an idle one to close)
            relays[name] = {k: s.get(k) for k in ("connections", "delivered",
                                                   "connect_failures", "connection_slots")}
    res["relays"] = relays


def run_longtail(n: int, domains: int, *, dns: str = "auto", timeout: float = 300.0,
                 progress: bool = True, seed: int = 1, throttles: int | None = None,
                 ipv6: bool = False, dns_concurrency: int | None = None) -> dict[str, Any]:
    """One raymta run of ``n`` messages over ``domains`` long-tail domains. Besides
    run_raymta's figures: the machine's CPU use over the run (``machine_cpu``: busy cores on
    average, and the share that was not this run's Ray processes, driver, receiver or DNS),
    since the machine is shared."""
    workload, zone = longtail_workload(n, domains, seed)
    busy0, _ = c.machine_cpu_times()
    t0 = time.time()
    used: dict[str, Any] = {}

    def start_dns(_w: c.Workload, _host: str) -> Any:
        t = time.time()
        srv = c.start_zone_dns(zone, dns)
        used.update(kind=srv.kind, start_seconds=round(time.time() - t, 2))
        return srv

    def configure(cfg: Any) -> Any:
        from dataclasses import replace
        if throttles:
            cfg = replace(cfg, delivery=replace(cfg.delivery, throttle_actors=throttles))
        # loopback is IPv4 here and so is the egress: no AAAA queries ([dns] ipv6 = false,
        # as Postfix's inet_protocols = ipv4), unless --ipv6
        return replace(cfg, dns=replace(cfg.dns, ipv6=ipv6, max_concurrent=dns_concurrency
                                        or cfg.dns.max_concurrent))

    res = run_raymta(n, domains=domains, timeout=timeout, progress=progress, probe_rate=0,
                     intake=0, workload=workload, start_dns=start_dns, after=_cluster_counters,
                     configure=configure)
    res["throttle_actors"] = throttles or 1
    res["dns_ipv6"] = ipv6
    busy1, _ = c.machine_cpu_times()
    wall = time.time() - t0
    ours = (res.get("cpu_ray_s") or 0.0) + (res.get("cpu_client_s") or 0.0)
    res["machine_cpu"] = {"wall_s": round(wall, 1),
                          "busy_cores": round((busy1 - busy0) / wall, 2) if wall else None,
                          "cores": os.cpu_count(),
                          "busy_cpu_s": round(busy1 - busy0, 1),
                          "raymta_and_driver_cpu_s": round(ours, 1),
                          "loadavg_end": list(os.getloadavg())}
    res["dns_server"] = used
    # what the throttle process costs: per message granted, and per call it served (grants,
    # leases, MX lookups: its calls counters); the lookups' share is the difference from the
    # 100-domain run, whose few routes cost next to nothing
    thr_cpu = sum(v for k, v in (res.get("cpu_by_process") or {}).items()
                  if k.startswith("ray::SiteThrott"))
    calls = sum(sum((t.get("calls") or {}).values()) for t in res.get("throttles", {}).values())
    granted = sum(t.get("granted") or 0 for t in res.get("throttles", {}).values())
    res["throttle_cpu"] = {"cpu_s": round(thr_cpu, 2), "calls": calls, "granted": granted,
                           "us_per_granted_msg": round(thr_cpu / granted * 1e6, 1)
                           if granted else None,
                           "ms_per_call": round(thr_cpu / calls * 1e3, 2) if calls else None}
    res["domains_with_mail"] = len(workload.per_domain())
    res["system"] = f"raymta-longtail-{domains}"
    return res


def print_rows(rows: list[dict[str, Any]], base: float | None) -> None:
    cols = ("domains", "with mail", "msgs", "delivered/s", "10-90%/s", "x 100-dom",
            "deferred DNS", "deferred other", "DNS timeouts retried", "CPU ms/msg",
            "busy cores", "hottest")
    out = []
    for r in rows:
        rate = r.get("delivered_per_s")
        hot = next(iter(r.get("cpu_by_process") or {}), "-")
        out.append((f"{r.get('domains', 0):,}", f"{r.get('domains_with_mail', 0):,}",
                    f"{r.get('messages', 0):,}", f"{rate or 0:,.0f}",
                    f"{r.get('delivered_per_s_10_90') or 0:,.0f}",
                    f"{rate / base:.2f}" if rate and base else "-",
                    str(r.get("deferred_dns", "-")), str(r.get("deferred_other", "-")),
                    str((r.get("dns_coordinator") or {}).get("timeouts_retried", "-")),
                    f"{r['cpu_ray_s_per_1000']:.2f}" if r.get("cpu_ray_s_per_1000") else "-",
                    str(r.get("machine_busy_cores", "-")), hot))
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *out)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    print(line.format(*cols))
    print(line.format(*("-" * w for w in widths)))
    for o in out:
        print(line.format(*o))


def _ours(r: dict[str, Any]) -> float:
    return (r.get("cpu_ray_s") or 0.0) + (r.get("cpu_client_s") or 0.0)


def extra_cpu(run: dict[str, Any], base: dict[str, Any]) -> dict[str, Any] | None:
    """Where a long-tail run's CPU beyond the 100-domain run's went (same messages, same
    machine, same invocation), from the first submit until all was delivered: raymta's
    processes and the driver, the far side (receiver, DNS servers: a remote site's and a
    resolver's work, on the same two cores here) and the rest of the machine (kernel, other
    processes); per process kind. ``seconds_without_ours``: the run's time had raymta's extra
    CPU cost nothing at the run's average busy cores, and the ratio to the 100-domain rate
    it would give: an estimate of what this machine allows, not a measurement."""
    keys = ("machine_busy_s", "cpu_far_side_s", "seconds_end_to_end", "delivered_per_s")
    if not all(run.get(k) for k in keys) or not all(base.get(k) for k in keys):
        return None
    ours = _ours(run) - _ours(base)
    far = run["cpu_far_side_s"] - base["cpu_far_side_s"]
    machine = run["machine_busy_s"] - base["machine_busy_s"]
    procs: dict[str, float] = {}
    for key in ("cpu_by_process", "cpu_far_side_by_process"):
        for name in set(run.get(key) or {}) | set(base.get(key) or {}):
            d = (run.get(key) or {}).get(name, 0.0) - (base.get(key) or {}).get(name, 0.0)
            if abs(d) >= 0.05:
                procs[name] = round(d, 2)
    busy = run.get("machine_busy_cores") or 0.0
    without = run["seconds_end_to_end"] - max(0.0, ours) / busy if busy else None
    rate = run["messages"] / without if without and without > 0 else None
    return {"raymta_and_driver_s": round(ours, 2), "far_side_s": round(far, 2),
            "rest_of_machine_s": round(machine - ours - far, 2),
            "by_process": dict(sorted(procs.items(), key=lambda kv: -kv[1])),
            "seconds_without_ours": round(without, 2) if without else None,
            "ratio_without_ours": round(rate / base["delivered_per_s"], 2) if rate else None}


def _ratios(round_rows: list[dict[str, Any]]) -> None:
    """Each run's ratio to its round's 100-domain run, and its extra CPU beyond it."""
    base_run = next((r for r in round_rows if r.get("domains") == 100), None)
    base = base_run.get("delivered_per_s") if base_run else None
    for r in round_rows:
        rate = r.get("delivered_per_s")
        r["ratio_to_100_domains"] = round(rate / base, 3) if rate and base else None
        if base_run is not None and r is not base_run:
            r["extra_cpu_vs_100_domains"] = extra_cpu(r, base_run)


def median_ratios(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per domain count over the rounds: the median delivered rate, the median of the
    ratios (each to its own round's 100-domain run) and the ratios themselves."""
    out: dict[int, dict[str, Any]] = {}
    for k in dict.fromkeys(r.get("domains") for r in rows):
        mine = [r for r in rows if r.get("domains") == k and r.get("ok")]
        ratios = [r["ratio_to_100_domains"] for r in mine if r.get("ratio_to_100_domains")]
        rates = [r["delivered_per_s"] for r in mine if r.get("delivered_per_s")]
        out[k] = {"delivered_per_s": c.median(rates) if rates else None,
                  "ratio_to_100_domains": round(c.median(ratios), 3) if ratios else None,
                  "ratios": ratios}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=30_000)
    ap.add_argument("--domains", default="10000,100000",
                    help="comma-separated domain counts (up to 100,000); the 100-domain run "
                         "comes first unless --no-baseline")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--dns", choices=["auto", "real", "python"], default="auto",
                    help="nsd+unbound (real), the Python server, or real when installed")
    ap.add_argument("--timeout", type=float, default=300.0, help="hard limit per run (s)")
    ap.add_argument("--throttles", type=int, default=None,
                    help="shared SiteThrottle actors ([delivery] throttle_actors; default 1)")
    ap.add_argument("--ipv6", action="store_true",
                    help="ask AAAA records of MX hosts too ([dns] ipv6; default off here: "
                         "the bench's egress and MX hosts are IPv4)")
    ap.add_argument("--dns-concurrency", type=int, default=None,
                    help="[dns] max_concurrent (default: the config's, 64)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every domain count this many times, interleaved (100, 10,000, "
                         "100,000, 100, ...): each ratio is to its own round's 100-domain "
                         "run, and the median ratio per count is printed (the machine's "
                         "noise moves one run's ratio by several hundredths)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if not 1 <= args.rounds <= 9:
        ap.error(f"--rounds: 1 to 9, got {args.rounds}")
    try:
        counts = [int(x) for x in args.domains.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--domains: comma-separated integers, got {args.domains!r}")
    if any(not 10 <= k <= 100_000 for k in counts):
        ap.error(f"--domains: each between 10 and 100,000, got {args.domains}")
    if not args.no_baseline and 100 not in counts:
        counts = [100] + counts
    c.ensure_postfix(install=True)
    machine = c.machine_info()
    t0 = time.time()
    rows = []
    for rnd in range(1, args.rounds + 1):
        round_rows = []
        for k in counts:
            print(f"\n=== long tail: {args.messages:,} messages over {k:,} domains"
                  + (f", round {rnd} of {args.rounds}" if args.rounds > 1 else "") + " ===",
                  flush=True)
            try:
                res = run_longtail(args.messages, k, dns=args.dns, timeout=args.timeout,
                                   progress=not args.quiet, throttles=args.throttles,
                                   ipv6=args.ipv6, dns_concurrency=args.dns_concurrency)
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                print(c.banner(f"{k} domains FAILED: {type(e).__name__}: {e}"),
                      file=sys.stderr)
                res = {"domains": k, "ok": False, "error": f"{type(e).__name__}: {e}"}
            else:
                c.check_counts(res)
            res["round"] = rnd
            round_rows.append(res)
        _ratios(round_rows)
        rows += round_rows
    print(f"\nraymta long tail, {args.messages:,} messages per run, DNS "
          f"{rows[0].get('dns_server', {}).get('kind', '?')}, load at start "
          f"{machine['loadavg_at_start'][0]:.1f}")
    for rnd in range(1, args.rounds + 1):
        round_rows = [r for r in rows if r["round"] == rnd]
        if args.rounds > 1:
            print(f"round {rnd}:")
        base_run = next((r for r in round_rows if r.get("domains") == 100), None)
        print_rows(round_rows, base_run.get("delivered_per_s") if base_run else None)
        for r in round_rows:
            x = r.get("extra_cpu_vs_100_domains")
            if x:
                print(f"{r['domains']:,} domains, CPU beyond the 100-domain run's: raymta "
                      f"{x['raymta_and_driver_s']} s, receiver+DNS {x['far_side_s']} s, rest "
                      f"{x['rest_of_machine_s']} s; by process "
                      + ", ".join(f"{k} {v:+}" for k, v in list(x["by_process"].items())[:7])
                      + f"; had raymta's extra cost nothing: ~{x['seconds_without_ours']} s, "
                      f"~{x['ratio_without_ours']}x")
    medians = median_ratios(rows)
    if args.rounds > 1:
        print("median over the rounds: " + ", ".join(
            f"{k:,} domains {m['delivered_per_s'] or 0:,.0f}/s, {m['ratio_to_100_domains']}x "
            f"(rounds {', '.join(str(x) for x in m['ratios'])})" for k, m in medians.items()))
    out = {"messages": args.messages, "rounds": args.rounds, "machine": machine,
           "loadavg_at_end": list(os.getloadavg()), "wall_seconds": round(time.time() - t0, 1),
           "runs": rows, "medians": {str(k): m for k, m in medians.items()}}
    path = c.write_result("longtail", out)
    print(f"results: {path}")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
