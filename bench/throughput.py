"""raymta throughput on one machine: durable acceptance, end-to-end delivery, CPU per message.

Starts a receiving SMTP server (Postfix's ``smtp-sink`` on 127.0.0.2, or the aiosmtpd
fallback), a loopback DNS server publishing MX records for 100 test domains, and raymta on an
embedded local Ray; submits N messages (~2 KB, 3 big domains take 60 %) in batches of 100 from
a few threads; waits until the receiver has them all; prints and saves
``bench/results/throughput-<timestamp>.json`` (with delivered-over-time samples).

    python bench/throughput.py --messages 50000 [--timeout 600] [--profile]

``--profile`` samples the coordinator, relay and throttle processes with py-spy while they
deliver and prints their hottest frames (raw collapsed stacks are saved in bench/results/,
``flamegraph.pl`` or speedscope turn them into flame graphs).
"""

from __future__ import annotations

import argparse
import collections
import gc
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c

__all__ = ["main", "run_raymta"]


# ---------------------------------------------------------------------------------- profiling
def _profiler(handles: dict[str, Any], out_dir: Path, seconds: float
              ) -> Callable[[], None]:
    """A hook that runs py-spy on the coordinator, relay and throttle processes."""
    import ray

    targets = {name: ray.get(h.ping.remote()) for name, h in handles.items()
               if name.startswith(("coordinator:", "relay:", "throttle:"))}

    def run() -> None:
        if not shutil.which("py-spy"):
            print("py-spy not found: no profile (pip install py-spy)", file=sys.stderr)
            return
        time.sleep(1.0)   # let delivery get going
        procs = []
        for name, pid in targets.items():
            path = out_dir / f"pyspy-{name.split(':')[0]}-{pid}.txt"
            procs.append((name, path, subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)),
                 "--rate", "50", "--nonblocking", "--format", "raw", "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        for name, path, p in procs:
            try:
                p.wait(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        print(f"py-spy profiles in {out_dir}")
        for name, path, _ in procs:
            if path.exists():
                _print_profile(name, path)

    return run


#: frames on every stack (thread and event-loop plumbing, Ray's wrappers): not informative
_GENERIC = ("threading.py", "asyncio/", "concurrent/futures", "tracing_helper",
            "auto_init_hook", "worker.py", "<module>", "runpy.py")


def top_frames(path: Path, top: int = 12) -> tuple[list[tuple[str, float]],
                                                   list[tuple[str, float]]]:
    """(self, inclusive) shares of samples per frame from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = stack.split(";")
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    if not total:
        return [], []
    return ([(f, n / total) for f, n in own.most_common(top)],
            [(f, n / total) for f, n in incl.most_common()
             if not any(g in f for g in _GENERIC)][:top])


def _print_profile(name: str, path: Path) -> None:
    own, incl = top_frames(path)
    print(f"\n{name}: top frames by own samples")
    for f, share in own:
        print(f"  {share:6.1%}  {f[:110]}")
    print(f"{name}: top frames including callees")
    for f, share in incl:
        print(f"  {share:6.1%}  {f[:110]}")


# ---------------------------------------------------------------------------------- the run
def _dkim_config(spool: str, algorithm: str) -> Any:
    """A [dkim] section with one fresh key for the workload's From domain (in the spool)."""
    from cluster.adapters.dkim_keys import generate_private_key, write_private_key
    from cluster.config import parse_config
    path = Path(spool) / f"bench-dkim.{algorithm}.pem"
    write_private_key(generate_private_key(algorithm, 2048), path)
    return parse_config({"dkim": {"key": [{"domain": "origin.bench.test", "selector": "bench",
                                           "algorithm": algorithm,
                                           "key_file": str(path)}]}}).dkim


def _dkim_stats(mc: Any) -> dict[str, int]:
    """The relays' signing counters, summed (proves the run really signed)."""
    import ray

    from actors.remote import list_relays
    ns = mc.cfg.cluster.namespace
    out: dict[str, int] = {}
    for name in list_relays(ns):
        d = ray.get(ray.get_actor(name, namespace=ns).stats.remote()).get("dkim") or {}
        for k, v in d.items():
            if isinstance(v, int):
                out[k] = out.get(k, 0) + v
    return out


def run_raymta(n: int, *, domains: int = 100, threads: int = 4, batch: int = 100,
               timeout: float = 600.0, receiver: str = "auto", max_connections: int = 10,
               num_cpus: int = 2, progress: bool = True, profile: bool = False,
               profile_seconds: float = 10.0, shards: int | None = None,
               replicas: int | None = None, probe_rate: float = 1000.0,
               probe_seconds: float = 10.0, gc_freeze: bool = True,
               intake: int | None = None, dkim: str | None = None,
               metrics: bool = True, metrics_interval: float | None = None,
               watch: bool = False, workload: c.Workload | None = None,
               start_dns: Callable[[c.Workload, str], Any] | None = None,
               after: Callable[[Any, dict[str, Any]], None] | None = None,
               configure: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """One raymta run on an embedded local Ray; returns the measurements (see drive_raymta).

    dkim: "rsa" (RSA-2048) or "ed25519": the relays sign every message From the workload's
    domain with a fresh key of that kind (docs/dkim.md); None: no keys, no signing.

    metrics: ``[metrics] enabled`` (Ray metrics in every actor and the head's exporter, which
    a thread here scrapes every 10 s as Prometheus would); False measures their cost.

    workload / start_dns / after (bench/longtail.py): another workload than ``make_workload``'s,
    a function ``(workload, receiver host) -> started DNS server`` (``.host``, ``.port``,
    ``.query_count()``, ``.stop()``) instead of the Python one, and a hook called with the
    cluster and the results before the cluster closes (to read its counters); ``configure``
    maps the bench Config to the one deployed (e.g. more throttle actors)."""
    from cluster.client import MailCluster

    workload = workload or c.make_workload(n, domains=domains)
    spool = tempfile.mkdtemp(prefix="raymta-bench-")
    recv = c.make_receiver(receiver)
    dns = mc = None
    try:
        recv.start()
        dns = (start_dns or (lambda w, h: c.start_dns(w.domains, h)))(workload, recv.host)
        cfg = c.raymta_config(spool, dns.port, recv.port, max_connections=max_connections,
                              dns_host=getattr(dns, "host", "127.0.0.1"))
        from dataclasses import replace
        if shards:
            cfg = replace(cfg, queue=replace(cfg.queue, shards=shards))
        if replicas:
            cfg = replace(cfg, cluster=replace(cfg.cluster, replicas=replicas))
        if dkim:
            cfg = replace(cfg, dkim=_dkim_config(spool, dkim))
        cfg = replace(cfg, metrics=replace(cfg.metrics, enabled=metrics, port=0,
                                           interval=metrics_interval or cfg.metrics.interval))
        if configure is not None:
            cfg = configure(cfg)
        t = time.time()
        mc = MailCluster.connect(config=cfg, num_cpus=num_cpus)
        startup = time.time() - t
        scraper = _Scraper(mc) if metrics else None
        watcher = ShardWatch(mc) if watch else None
        during = None
        if profile:
            c.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            during = _profiler(mc.handles, c.RESULTS_DIR, profile_seconds)
        if gc_freeze:
            # The workload (N messages) and Ray's state live as long as the run: take them out
            # of Python's collector, as a sender holding a big batch in memory should. Without
            # it, full collections of this process took 140-200 ms with the GIL held, and were
            # the slowest submit calls (the p99) at 1,000 msgs/s offered.
            gc.collect()
            gc.freeze()
        res = c.drive_raymta(mc, workload, recv, threads=threads, batch=batch,
                             timeout=timeout, progress=progress, during=during)
        if watcher is not None:
            res["shards_watched"] = watcher.stop()
        if probe_rate > 0 and probe_seconds > 0:
            res["latency_probe"] = c.probe_latency(mc, workload.messages, rate=probe_rate,
                                                   batch=batch, seconds=probe_seconds)
        n_intake = min(n, 20_000) if intake is None else intake
        if n_intake > 0:
            res["intake_only"] = io = c.intake_only(mc, workload.messages[:n_intake],
                                                    receiver=recv, threads=threads, batch=batch)
            res["ok"] = bool(res.get("ok")) and io["ok"]   # a wrong intake phase fails the run
        if dkim:
            res["dkim"] = _dkim_stats(mc)
            res["dkim_algorithm"] = {"rsa": "rsa-sha256 (RSA-2048)",
                                     "ed25519": "ed25519-sha256"}[dkim]
        if scraper is not None:
            res["metrics_scrapes"] = scraper.stop()
        res.update(startup_seconds=round(startup, 2), domains=domains, gc_frozen=gc_freeze,
                   metrics_enabled=metrics,
                   message_bytes=round(workload.raw_bytes / n),
                   max_connections_per_site=max_connections, ray_num_cpus=num_cpus,
                   dns_queries=dns.query_count(), ray_nodes=1)
        if after is not None:
            after(mc, res)
        return res
    finally:
        if gc_freeze:
            gc.unfreeze()   # this run's objects may be collected again (run_all runs several)
        if mc is not None:
            mc.close()
        if dns is not None:
            dns.stop()
        recv.stop()
        shutil.rmtree(spool, ignore_errors=True)


class ShardWatch:
    """Samples each queue shard leader every ``every`` s in a thread: messages queued, body
    bytes, the leader process's resident memory, event-loop lag, and each compaction snapshot
    (its size, how long building it held the loop, how long writing it took). Gives the
    memory a queued message costs as the slope of RSS over queued messages."""

    def __init__(self, mc: Any, every: float = 1.0) -> None:
        import threading

        import ray
        self.coords = {name: h for name, h in mc.handles.items()
                       if name.startswith("coordinator:")}
        self.pids = {name: ray.get(h.ping.remote()) for name, h in self.coords.items()}
        self.samples: dict[str, list[list[float]]] = {n: [] for n in self.coords}
        self.snapshots: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in self.coords}
        self.lag_max_ms = {n: 0.0 for n in self.coords}
        self.gc: dict[str, Any] = {}
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        import ray
        t0 = time.time()
        while not self._stop.wait(self.every):
            for name, h in self.coords.items():
                try:
                    st = ray.get(h.stats.remote(), timeout=10)
                except Exception:   # a slow answer is a missing sample, not a failed run
                    continue
                self.samples[name].append([round(time.time() - t0, 2), st["live"],
                                           st["body_bytes"], self._rss(self.pids[name])])
                self.lag_max_ms[name] = max(self.lag_max_ms[name],
                                            float(st["loop_lag"].get("max_ms", 0.0)))
                self.gc[name] = st.get("gc", {}).get("pauses")
                snap = st.get("last_snapshot") or {}
                if snap:
                    self.snapshots[name][snap["lsn"]] = snap

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(30)
        out: dict[str, Any] = {}
        for name, rows in self.samples.items():
            peak = max(rows, key=lambda r: r[1]) if rows else [0, 0, 0, 0]
            out[name] = {"peak_queued": peak[1], "rss_at_peak": peak[3],
                         "rss_bytes_per_queued_message": _slope(
                             [(r[1], r[3]) for r in rows]),
                         "body_bytes_per_queued_message": round(peak[2] / peak[1])
                         if peak[1] else None,
                         "loop_lag_max_ms": self.lag_max_ms[name],
                         "gc_pauses": self.gc.get(name),
                         "snapshots": sorted(self.snapshots[name].values(),
                                             key=lambda x: x["lsn"]),
                         "samples": rows}
        return out


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x (None without spread in x)."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    if var == 0:
        return None
    return round(sum((p[0] - mx) * (p[1] - my) for p in points) / var, 1)


class _Scraper:
    """Scrapes the metrics exporter every 10 s in a thread, as Prometheus would."""

    def __init__(self, mc: Any, every: float = 10.0) -> None:
        import threading

        import ray

        from actors.metrics_exporter import EXPORTER_NAME
        self.url = ray.get(mc.handles[EXPORTER_NAME].status.remote())["url"]
        self.count = 0
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import urllib.request
        while not self._stop.wait(self.every):
            with urllib.request.urlopen(self.url, timeout=10) as r:
                r.read()
            self.count += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(15)
        return self.count


def print_raymta(res: dict[str, Any]) -> None:
    lat = res["batch_latency_ms"]
    rows = [
        ("messages", f"{res['messages']:,}"),
        ("receiver", res["receiver"] + (" (SINK-BOUND)" if res["receiver"] == "aiosmtpd"
                                        else "")),
        ("accepted (durable) msgs/s", res["accepted_per_s"]),
        ("delivered end-to-end msgs/s", res["delivered_per_s"]),
        ("delivered msgs/s between 10% and 90%", res["delivered_per_s_10_90"]),
        ("submit batch latency p50/p95/p99 ms, saturated",
         f"{lat['p50']} / {lat['p95']} / {lat['p99']}"),
        *([(f"submit latency p50/p95/p99 ms at {pr['offered_msgs_per_s']:g} msgs/s offered",
            f"{pr['latency_ms']['p50']} / {pr['latency_ms']['p95']} / "
            f"{pr['latency_ms']['p99']}" + (f" ({len(pr['errors'])} errors)"
                                             if pr['errors'] else ""))]
          if (pr := res.get("latency_probe")) else []),
        *([("accepted msgs/s, intake only (held, nothing delivering)",
            f"{io['accepted_per_s']} ({io['accepted']:,} msgs; batch p50/p99 "
            f"{io['batch_latency_ms']['p50']} / {io['batch_latency_ms']['p99']} ms; CPU s/1k "
            f"{io['cpu_ray_s_per_1000']} + {io['cpu_client_s_per_1000']} client)")]
          if (io := res.get("intake_only")) else []),
        ("CPU s / 1000 msgs, Ray processes", res["cpu_ray_s_per_1000"]),
        ("CPU s / 1000 msgs, client (driver)", res["cpu_client_s_per_1000"]),
        ("delivered / bounced / expired",
         f"{res['delivered']} / {res['bounced']} / {res['expired']}"),
        ("deferred attempts", res["deferred_attempts"]),
        ("still queued", res["still_queued"]),
        ("received by sink", res["received_by_sink"]),
        ("seconds end to end (startup)",
         f"{res['seconds_end_to_end']} ({res.get('startup_seconds')})"),
    ]
    w = max(len(k) for k, _ in rows)
    print(f"\nraymta throughput ({res.get('ray_nodes', 1)} Ray node(s))")
    print("-" * (w + 24))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    top = list(res["cpu_by_process"].items())[:8]
    print("CPU by process (s): " + ", ".join(f"{k} {v}" for k, v in top))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=50_000)
    ap.add_argument("--domains", type=int, default=100)
    ap.add_argument("--threads", type=int, default=4, help="concurrent submitting threads")
    ap.add_argument("--batch", type=int, default=100, help="messages per submit call")
    ap.add_argument("--max-connections", type=int, default=10, help="per destination site")
    ap.add_argument("--timeout", type=float, default=600.0, help="hard limit for the run (s)")
    ap.add_argument("--receiver", choices=["auto", "smtp-sink", "aiosmtpd"], default="auto")
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get install postfix when smtp-sink is missing")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the coordinator, relay and throttles while delivering")
    ap.add_argument("--profile-seconds", type=float, default=10.0)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--shards", type=int, help="queue shards (default: the config's, 2)")
    ap.add_argument("--replicas", type=int, help="copies per shard (default: the config's, 3)")
    ap.add_argument("--probe-rate", type=float, default=1000.0,
                    help="after the run, submit batches at this many msgs/s (open loop) and "
                         "report their latency; 0 skips it")
    ap.add_argument("--probe-seconds", type=float, default=10.0)
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="leave the workload in Python's collector (full collections of the "
                    "submitting process then pause it for 100-200 ms)")
    ap.add_argument("--intake", type=int, default=None,
                    help="after the run, this many messages (default min(N, 20,000); 0 skips) "
                    "are submitted held, with nothing delivering, to time the accept path "
                    "alone, then cancelled")
    ap.add_argument("--dkim", choices=["rsa", "ed25519"],
                    help="sign every message at the relays (RSA-2048 or Ed25519 key)")
    ap.add_argument("--metrics", choices=["on", "off"], default="on",
                    help="[metrics] enabled: Ray metrics and the head's exporter (scraped every "
                    "10 s); off measures their cost")
    ap.add_argument("--metrics-interval", type=float,
                    help="seconds between the exporter's gatherings (default: the config's, 5)")
    args = ap.parse_args(argv)
    if args.receiver != "aiosmtpd":
        c.ensure_postfix(install=not args.no_install)
    machine = c.machine_info()
    res = run_raymta(args.messages, domains=args.domains, threads=args.threads,
                     batch=args.batch, timeout=args.timeout, receiver=args.receiver,
                     max_connections=args.max_connections, progress=not args.quiet,
                     profile=args.profile, profile_seconds=args.profile_seconds,
                     shards=args.shards, replicas=args.replicas, probe_rate=args.probe_rate,
                     probe_seconds=args.probe_seconds, gc_freeze=not args.no_gc_freeze,
                     intake=args.intake, dkim=args.dkim, metrics=args.metrics == "on",
                     metrics_interval=args.metrics_interval)
    res["shards"], res["replicas"] = args.shards, args.replicas
    res["machine"] = machine
    print_raymta(res)
    path = c.write_result("throughput", res)
    print(f"results: {path}")
    return 0 if c.check_counts(res) else 1


if __name__ == "__main__":
    sys.exit(main())
