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

__all__ = ["main", "run_on_nodes"]

#: Ray records the last head it started here; ``address="auto"`` reads it. Put it back after.
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")

WARNING = ("All nodes share ONE machine with 2 cores: more nodes means more processes on the "
           "same cores. These figures show Ray's per-node overhead, NOT speed-up.")


def run_on_nodes(nodes: int, n: int, *, cpus_per_node: int = 2, timeout: float = 600.0,
                 receiver: str = "auto", progress: bool = True) -> dict[str, Any]:
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
        res = c.drive_raymta(mc, workload, recv, timeout=timeout, progress=progress,
                             label=f"raymta x{nodes} nodes")
        relays = {name: ray.get(h.stats.remote()) for name, h in handles.items()
                  if name.startswith("relay:")}
        res.update(ray_nodes=alive, cluster_address=cluster.address,
                   startup_seconds=round(startup, 2),
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
    path = c.write_result("scaling", {"machine": machine, "warning": WARNING,
                                      "messages": args.messages, "results": results})
    print(f"results: {path}")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
