"""raymta on 1, 2 and 3 Ray nodes of one machine (``ray.cluster_utils.Cluster``).

Each node is a separate raylet with ``num_cpus=2``, all on 127.0.0.1; ``deploy(cfg)`` puts one
RelayPool on every alive node, so the same workload (default 10,000 messages) is delivered by
1, 2 or 3 relays. On ONE 2-core machine every extra node adds processes competing for the
same two cores: this measures Ray's per-node overhead, not speed-up. Real scaling needs real
machines.

    python bench/scaling.py [--messages 10000] [--nodes 1,2,3]

Writes ``bench/results/scaling-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c

__all__ = ["idle_cpu", "main", "model", "run_on_nodes"]

#: Ray records the last head it started here; ``address="auto"`` reads it. Put it back after.
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")

WARNING = ("All nodes share ONE machine with 2 cores: more nodes means more processes on the "
           "same cores. These figures show Ray's per-node overhead, NOT speed-up.")


def run_on_nodes(nodes: int, n: int, *, cpus_per_node: int = 2, timeout: float = 600.0,
                 receiver: str = "auto", progress: bool = True,
                 idle_seconds: float = 10.0) -> dict[str, Any]:
    """Deliver ``n`` messages with raymta deployed on a ``nodes``-node local Ray cluster."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster.client import MailCluster
    from cluster.deploy import RAY_SYSTEM_CONFIG, deploy

    workload = c.make_workload(n)
    spool = tempfile.mkdtemp(prefix="raymta-scaling-")
    recv = c.make_receiver(receiver)
    dns = cluster = None
    saved_address = RAY_ADDRESS_FILE.read_bytes() if RAY_ADDRESS_FILE.exists() else None
    try:
        recv.start()
        dns = c.start_dns(workload.domains, recv.host)
        cfg = c.raymta_config(spool, dns.port, recv.port)
        t = time.time()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": cpus_per_node, "include_dashboard": False,
            "_system_config": RAY_SYSTEM_CONFIG})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=cfg.cluster.namespace,
                 log_to_driver=False)
        handles = deploy(cfg)
        coords = [handles[f"coordinator:{s}"] for s in range(cfg.queue.shards)]
        mc = MailCluster(cfg, coords, handles=handles)
        startup = time.time() - t
        alive = sum(1 for nd in ray.nodes() if nd.get("Alive"))
        idle = idle_cpu(idle_seconds)
        res = c.drive_raymta(mc, workload, recv, timeout=timeout, progress=progress,
                             label=f"raymta x{nodes} nodes")
        relays = {name: ray.get(h.stats.remote()) for name, h in handles.items()
                  if name.startswith("relay:")}
        res.update(ray_nodes=alive, cluster_address=cluster.address,
                   startup_seconds=round(startup, 2), idle_cpu=idle,
                   relay_delivered={k: v.get("delivered") for k, v in relays.items()},
                   relay_connections={k: v.get("connections") for k, v in relays.items()})
        rate = res.get("delivered_per_s")
        res["delivered_per_s_per_node"] = round(rate / nodes, 1) if rate else None
        return res
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        _restore(RAY_ADDRESS_FILE, saved_address)
        if dns is not None:
            dns.stop()
        recv.stop()
        shutil.rmtree(spool, ignore_errors=True)


def idle_cpu(seconds: float) -> dict[str, Any]:
    """CPU of this process's Ray processes over ``seconds`` with raymta deployed and no mail:
    what the nodes cost before any message moves (cores busy, and by process name)."""
    import os
    me = os.getpid()
    meter = c.CpuMeter(lambda: [p.pid for p in c.all_procs().values() if p.ppid == me]).start()
    time.sleep(seconds)
    out = meter.stop()
    return {"seconds": seconds, "cores": round(out["total_s"] / seconds, 4),
            "by_process": out["by_process"]}


#: actor kinds in ``cpu_by_process`` (Ray names processes ``ray::<Class>``, cut at 15 chars)
KINDS = {"relay": "ray::RelayPool", "leader": "ray::QueueCoord", "copy": "ray::ReplicaLog",
         "throttle": "ray::SiteThrott", "gcs": "gcs_server"}


def model(results: list[dict[str, Any]], cores: int = 2, shards: int = 2,
          copies: int = 3) -> dict[str, Any]:
    """The scale-out model (bench/README.md, "Scaling out").

    - **One box** (what the 2- and 3-node runs check): every node's processes share the same
      cores. ``E = R(1) * c(1) + idle(1)`` is the CPU the 1-node run kept busy (``c``: CPU
      seconds per message, Ray processes and client; ``idle``: the deployed, mail-less
      cluster's cores). The naive model keeps ``c`` and takes each node's idle cost out of
      ``E``: ``R(N) = (E - idle(N)) / c(1)``. The fitted one also lets the cost per message
      grow by ``d`` per node added (work split over more relays and throttles: the same calls
      carry fewer messages), ``d`` fitted on the 2-node run and checked on the others.
    - **N real machines of K cores**: each process kind is capped by its own CPU per message
      (taken from the run with the most nodes: the split regime), one core per process
      (Python): a relay per node, a leader per shard, two copies per shard (each takes every
      record of its shard), one throttle per node (``throttle_actors = "auto"``), one GCS; and
      all of them by the N x K cores. The smallest cap is the rate, and its kind is what
      saturates first."""
    ok = {r["nodes"]: r for r in results if r.get("ok")}
    one = ok.get(1)
    if one is None:
        return {"error": "no successful 1-node run"}

    def c_of(r: dict[str, Any]) -> float:    # CPU s per message
        return (r["cpu_ray_s"] + r["cpu_client_s"]) / r["delivered"]

    c1 = c_of(one)
    busy = one["delivered_per_s"] * c1 + one["idle_cpu"]["cores"]
    d = (c_of(ok[2]) - c1) if 2 in ok else None
    check = []
    for k, r in sorted(ok.items()):
        if k == 1:
            continue
        spare = busy - r["idle_cpu"]["cores"]
        naive = spare / c1
        row = {"nodes": k, "measured_per_s": r["delivered_per_s"],
               "cpu_ms_per_msg": round(1000 * c_of(r), 4),
               "naive_predicted_per_s": round(naive),
               "naive_measured_over_predicted": round(r["delivered_per_s"] / naive, 3)}
        if d is not None:
            fitted = spare / (c1 + d * (k - 1))
            row.update(fitted_predicted_per_s=round(fitted),
                       fitted_measured_over_predicted=round(r["delivered_per_s"] / fitted, 3),
                       fitted_on_this_run=(k == 2))
        check.append(row)
    big = ok[max(ok)]
    n = big["delivered"]
    per = {k: 1000 * big["cpu_by_process"].get(name, 0.0) / n for k, name in KINDS.items()}
    total_ms = sum(1000 * v / n for v in big["cpu_by_process"].values()) + \
        1000 * big["cpu_client_s"] / n
    proj = []
    for k_cores in (2, 8):
        for nodes in (1, 2, 3, 5, 10, 20):
            caps = {"cores": nodes * k_cores * 1000 / total_ms,
                    "relay": nodes * 1000 / per["relay"],
                    "leader": shards * 1000 / per["leader"],
                    "copy": shards * 1000 / (per["copy"] / (copies - 1)),
                    "throttle": nodes * 1000 / per["throttle"],
                    "gcs": 1000 / per["gcs"] if per["gcs"] > 0 else float("inf")}
            first = min(caps, key=caps.get)
            proj.append({"cores_per_node": k_cores, "nodes": nodes,
                         "rate": round(caps[first]), "saturates": first})
    return {"cpu_ms_per_msg": {k: round(v, 4) for k, v in per.items()},
            "cpu_ms_per_msg_all": round(total_ms, 4), "costs_from_nodes": big["nodes"],
            "busy_cores_1_node": round(busy, 3),
            "growth_ms_per_msg_per_node": round(1000 * d, 4) if d is not None else None,
            "check_one_box": check, "projection": proj, "shards": shards}


def print_model(m: dict[str, Any]) -> None:
    if "error" in m:
        print(f"model: {m['error']}")
        return
    print(f"\nCPU ms per message by kind ({m['costs_from_nodes']}-node run):",
          ", ".join(f"{k} {v}" for k, v in m["cpu_ms_per_msg"].items()),
          f"; all processes {m['cpu_ms_per_msg_all']}")
    print(f"one box: {m['busy_cores_1_node']} cores busy in the 1-node run; cost per message "
          f"grows {m['growth_ms_per_msg_per_node']} ms per node added (fitted on 2 nodes)")
    for ch in m["check_one_box"]:
        fit = (f", fitted {ch['fitted_predicted_per_s']:,}/s "
               f"({ch['fitted_measured_over_predicted']}x"
               f"{', the fit' if ch['fitted_on_this_run'] else ''})"
               if "fitted_predicted_per_s" in ch else "")
        print(f"  {ch['nodes']} nodes: measured {ch['measured_per_s']:,}/s; naive "
              f"{ch['naive_predicted_per_s']:,}/s ({ch['naive_measured_over_predicted']}x){fit}")
    print(f"projection, {m['shards']} shards x 3 copies, one relay and one throttle per node:")
    for p in m["projection"]:
        print(f"  {p['nodes']:>2} nodes x {p['cores_per_node']} cores: {p['rate']:>9,}/s, "
              f"first to saturate: {p['saturates']}")


def _restore(path: Path, content: bytes | None) -> None:
    try:
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)
    except OSError:
        pass


def print_scaling(results: list[dict[str, Any]]) -> None:
    cols = ("nodes", "delivered/s", "per node", "accepted/s", "CPU s/1k", "p50 ms", "p99 ms",
            "relay split", "ok")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((str(r["nodes"]), "-", "-", "-", "-", "-", "-", r["error"][:40], "no"))
            continue
        split = "/".join(str(v) for v in r["relay_delivered"].values())
        lat = r["batch_latency_ms"]
        rows.append((str(r["ray_nodes"]), f"{r['delivered_per_s']:,}",
                     f"{r['delivered_per_s_per_node']:,}", f"{r['accepted_per_s']:,}",
                     str(r["cpu_ray_s_per_1000"]), str(lat["p50"]), str(lat["p99"]), split,
                     "yes" if r["ok"] else "NO"))
    widths = [max(len(x) for x in col) for col in zip(cols, *rows)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    print("\nraymta on N Ray nodes of one machine")
    print(line.format(*cols))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print(c.banner(WARNING))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=10_000)
    ap.add_argument("--nodes", default="1,2,3", help="comma-separated node counts")
    ap.add_argument("--timeout", type=float, default=600.0, help="per node count (s)")
    ap.add_argument("--receiver", choices=["auto", "smtp-sink", "aiosmtpd"], default="auto")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    print(WARNING)
    if args.receiver != "aiosmtpd":
        c.ensure_postfix(install=not args.no_install)
    machine = c.machine_info()
    results = []
    for k in [int(x) for x in args.nodes.split(",") if x]:
        print(f"\n=== {k} node(s), {args.messages:,} messages ===", flush=True)
        try:
            r = run_on_nodes(k, args.messages, timeout=args.timeout, receiver=args.receiver,
                             progress=not args.quiet)
            c.check_counts(r)
        except Exception as e:  # noqa: BLE001 - report it and go on with the next size
            print(c.banner(f"{k} node(s) FAILED: {type(e).__name__}: {e}"), file=sys.stderr)
            r = {"nodes": k, "ok": False, "error": f"{type(e).__name__}: {e}"}
        r["nodes"] = k
        results.append(r)
    print_scaling(results)
    m = model(results)
    print_model(m)
    path = c.write_result("scaling", {"machine": machine, "warning": WARNING,
                                      "messages": args.messages, "results": results,
                                      "model": m})
    print(f"results: {path}")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
