"""One hot site's delivery rate with 1 relay and with 3 relays (one per node), same box.

A 3-node ``ray.cluster_utils.Cluster`` on this machine; each node owns one egress source
(``node_label``, its own 127.0.0.x), so each node has one relay. Two sites with the same
limits (``--connections`` connections, unthrottled rate): ``d0.bench.test`` pinned to one relay
(``relays = 1``), ``d1.bench.test`` spread over three (``relays = 3``: its top three relays by
rendezvous weight, one per node). The same ``--messages`` go to each in turn, queued while the
site is suspended; the figure is delivered messages per second from its resumption to the last
message at the receiver, and between the 10 % and 90 % marks. All three nodes share the machine's cores, so this shows
what one relay process caps a site at here, not what more machines would give.

    python bench/hotsite.py [--messages 10000] [--connections 12] [--timeout 300]

Writes ``bench/results/hotsite-<timestamp>.json``.
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

__all__ = ["main", "run"]

RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")
NODES = 3
SOURCES = [(f"e{i}", f"127.0.0.{11 + i}", f"egress-{i}") for i in range(NODES)]


def _messages(n: int, domain: str) -> list[dict[str, Any]]:
    out = []
    for m in c.make_workload(n, domains=1).messages:
        rcpt = m["recipients"][0].replace("d0.bench.test", domain)
        out.append({**m, "recipients": [rcpt],
                    "raw": m["raw"].replace(b"d0.bench.test", domain.encode())})
    return out


def _phase(mc: Any, recv: Any, n: int, domain: str, timeout: float) -> dict[str, Any]:
    """Queue ``n`` messages for ``domain`` while it is suspended, then resume it and time the
    deliveries alone (the submissions are not part of the figure)."""
    msgs = _messages(n, domain)
    base = recv.count()
    mc.suspend(domain, timeout)
    rep = c.submit_concurrently(mc, msgs, deadline=time.time() + timeout)
    t0 = time.time()
    sampler = c.Sampler(lambda: recv.count() - base, interval=0.05, t0=t0).start()
    mc.resume(domain)
    try:
        while recv.count() - base < n and time.time() < t0 + timeout:
            time.sleep(0.05)
    finally:
        series = sampler.stop()
    got = recv.count() - base
    end = recv.last_at() if got >= n else time.time()
    return {"domain": domain, "messages": n, "accepted": rep.accepted, "delivered": got,
            "seconds": round(end - t0, 2),
            "delivered_per_s": round(got / max(end - t0, 1e-9), 1),
            "delivered_per_s_10_90": c.steady_rate(series, n)}


def run(n: int, connections: int, timeout: float, reverse: bool = False) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.deploy import RAY_SYSTEM_CONFIG, deploy

    spool = tempfile.mkdtemp(prefix="raymta-hotsite-")
    recv = c.make_receiver("auto")
    dns = cluster = None
    saved = RAY_ADDRESS_FILE.read_bytes() if RAY_ADDRESS_FILE.exists() else None
    try:
        recv.start()
        domains = ["d0.bench.test", "d1.bench.test"]
        dns = c.start_dns(domains, recv.host)
        base = c.raymta_config(spool, dns.port, recv.port)
        limits = {"max_connections": connections, "rate": "100000/s"}
        extra = parse_config({
            "egress": [{"name": s, "bind_address": a, "ehlo_name": f"{s}.bench.raymta.test",
                        "node_label": lab} for s, a, lab in SOURCES],
            "site": [{"domain": "d0.bench.test", "relays": 1, **limits},
                     {"domain": "d1.bench.test", "relays": NODES, **limits}],
            "delivery": {"hot_site_ready": 0}})
        from dataclasses import replace
        cfg = replace(base, egress=extra.egress, sites=extra.sites,
                      delivery=replace(base.delivery, hot_site_ready=0))
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": False, "labels": {"egress": SOURCES[0][2]},
            "_system_config": RAY_SYSTEM_CONFIG})
        for _, _, lab in SOURCES[1:]:
            cluster.add_node(num_cpus=2, labels={"egress": lab})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=cfg.cluster.namespace, log_to_driver=False)
        handles = deploy(cfg)
        mc = MailCluster(cfg, [handles[f"coordinator:{s}"] for s in range(cfg.queue.shards)],
                         handles=handles)
        relays = sorted(h for h in handles if h.startswith("relay:"))
        res: dict[str, Any] = {"machine": c.machine_info(), "messages": n,
                               "connections": connections, "relays": relays,
                               "receiver": recv.kind}
        phases = [("1 relay", domains[0]), ("3 relays", domains[1])]
        for label, dom in (phases[::-1] if reverse else phases):
            before = {r: ray.get(handles[r].stats.remote()) for r in relays}
            ph = _phase(mc, recv, n, dom, timeout)
            after = {r: ray.get(handles[r].stats.remote()) for r in relays}
            ph["per_relay"] = {r: after[r]["delivered"] - before[r]["delivered"]
                               for r in relays}
            ph["connections_per_relay"] = {r: after[r]["connections"] -
                                           before[r]["connections"] for r in relays}
            res[label] = ph
            print(f"{label:9s}: {ph['delivered']}/{n} delivered in {ph['seconds']} s = "
                  f"{ph['delivered_per_s']} msgs/s (10-90 %: "
                  f"{ph.get('delivered_per_s_10_90')}), per relay "
                  f"{list(ph['per_relay'].values())}, connections opened per relay "
                  f"{list(ph['connections_per_relay'].values())}", flush=True)
        return res
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            RAY_ADDRESS_FILE.unlink(missing_ok=True)
        else:
            RAY_ADDRESS_FILE.write_bytes(saved)
        if dns is not None:
            dns.stop()
        recv.stop()
        shutil.rmtree(spool, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--connections", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--reverse", action="store_true", help="run the 3-relay phase first")
    a = ap.parse_args(argv)
    if not 0 < a.messages <= 200_000:
        ap.error("--messages must be between 1 and 200000")
    res = run(a.messages, a.connections, a.timeout, a.reverse)
    path = c.write_result("hotsite", res)
    print(f"wrote {path}")
    ok = all(res[k]["delivered"] >= a.messages for k in ("1 relay", "3 relays"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
