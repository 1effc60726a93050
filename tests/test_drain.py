"""`raymta drain NODE` on a real four-node Ray cluster while mail flows.

``ray.cluster_utils.Cluster`` starts a head and three workers on this machine (regions
us/eu/ap/eu), raymta with 2 shards x 3 copies, a spool per node (``per_node``: a copy that
moves starts empty on its new node). A sender submits ~200 msgs/s to aiosmtpd sinks; the
worker that holds a shard leader and a replica of the other shard is drained with the CLI as
an operator types it. Then: every acknowledged message reached a sink (duplicates within
what was in flight), no raymta actor is left on the node, every shard again has 3 caught-up
member copies on 3 other nodes, and `raymta undrain` lifts the mark.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray

from cluster.deploy import NODE_HEALTH, RAY_SYSTEM_CONFIG
from tests.conftest import MAIN_SINKS, pipeline_config, wait_for
from tests.test_replication import (
    RAY_ADDRESS_FILE,
    _delivered,
    _dup_bound,
    _messages,
    _wait_all_delivered,
)

# own_ray: a ray.cluster_utils.Cluster of its own
pytestmark = [pytest.mark.timeout(300), pytest.mark.own_ray]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def four_nodes(tmp_path_factory, dns_server):
    from ray.cluster_utils import Cluster

    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.core.ratespec import RateSpec
    from cluster.core.submission import hash_api_key
    from cluster.deploy import deploy
    from cluster.devservers import SinkGroup
    saved = RAY_ADDRESS_FILE.read_bytes() if RAY_ADDRESS_FILE.exists() else None
    sinks = SinkGroup(MAIN_SINKS).start()
    cluster = None
    try:
        for i, a in enumerate(MAIN_SINKS):
            dns_server.add_a(f"mx{i + 1}.drain.test", a)
        domains = [f"dr{i}.test" for i in range(9)]
        for i, d in enumerate(domains):
            dns_server.add_mx(d, [(10, f"mx{i % 3 + 1}.drain.test")])
        base = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port,
                               sinks.port)
        # every worker is an ingress node (SMTP and HTTP on loopback, ports picked by the OS)
        ingress = parse_config({"ingress": {
            "hostname": "mx.raymta.test", "auth": False, "submission": ["127.0.0.1:0"],
            "http": ["127.0.0.1:0"],
            "api_key": [{"name": "t", "key_hash": hash_api_key("k" * 32),
                         "domains": ["dr0.test"]}]}}).ingress
        cfg = replace(
            base, queue=replace(base.queue, shards=2),
            cluster=replace(base.cluster, replicas=3),
            spool=replace(base.spool, per_node=True),
            metrics=replace(base.metrics, enabled=False),
            replication=replace(base.replication, ack_timeout=3.0, claim_timeout=60.0,
                                rebalance_interval=0),
            site_defaults=replace(base.site_defaults, rates=(RateSpec.parse("400/s"),)),
            ingress=ingress)
        assert cfg.cluster.namespace == "raymta"   # the CLI below runs without --config
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "labels": {"region": "us"},
            "_system_config": {**RAY_SYSTEM_CONFIG, **NODE_HEALTH}})
        for region in ("eu", "ap", "eu"):
            cluster.add_node(num_cpus=1, labels={"region": region, "role": "ingress"})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=cfg.cluster.namespace, log_to_driver=False)
        handles = deploy(cfg)
        mc = MailCluster(cfg, [handles[f"coordinator:{s}"] for s in range(2)], handles=handles)
        yield {"mc": mc, "cluster": cluster, "cfg": cfg, "sinks": sinks, "domains": domains}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            RAY_ADDRESS_FILE.unlink(missing_ok=True)
        else:
            RAY_ADDRESS_FILE.write_bytes(saved)
        sinks.stop()


def _cmd(address: str, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return [sys.executable, "-m", "cluster.cli", *args, "--address", address], env


def raymta(address: str, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd, env = _cmd(address, *args)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def greeting(port: int) -> int | None:
    """The SMTP greeting's code at 127.0.0.1:port; None when nothing listens."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return int(s.recv(512)[:3])
    except (OSError, ValueError):
        return None


def readyz(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


def ports(name: str, ns: str) -> tuple[int, int]:
    addrs = ray.get(ray.get_actor(name, namespace=ns).addresses.remote(), timeout=60)
    return (next(p for _, p, m in addrs if m != "http"),
            next(p for _, p, m in addrs if m == "http"))


class _Sender(threading.Thread):
    """~200 msgs/s in batches of 20; remembers what was acknowledged."""

    def __init__(self, mc: Any, msgs: list[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.mc, self.msgs = mc, msgs
        self.acked: set[str] = set()
        self.errors = 0
        self.done = threading.Event()

    def run(self) -> None:
        k = 0
        while not self.done.is_set() and k < len(self.msgs):
            chunk = self.msgs[k:k + 20]
            try:
                res = self.mc.submit(chunk, retry_for=30)
            except Exception:   # noqa: BLE001 - a sender retries the same messages
                self.errors += 1
                time.sleep(0.2)
                continue
            self.acked.update(m["recipients"][0] for m, r in zip(chunk, res) if r.accepted)
            k += 20
            time.sleep(0.1)


def test_drain_moves_leader_copies_and_relay_off_the_node_while_mail_flows(four_nodes):
    from actors.drain_mark import drained_nodes
    from cluster.drain import raymta_actors_on
    mc, sinks, cfg, cluster = (four_nodes[k] for k in ("mc", "sinks", "cfg", "cluster"))
    ns = cfg.cluster.namespace
    workers = [n.node_id for n in cluster.worker_nodes]
    on = {w: raymta_actors_on(ns, w) for w in workers}
    victim = next((w for w in workers
                   if any(n.startswith("coordinator:") for n in on[w])
                   and any(n.startswith("replica:") for n in on[w])), None)
    assert victim is not None, f"no worker holds a leader and a replica: {on}"
    before = set(on[victim])
    assert any(n.startswith("relay:") for n in before)
    epochs = {s: ray.get(mc.handles[f"coordinator:{s}"].stats.remote())["epoch"]
              for s in range(2)}

    sender = _Sender(mc, _messages("dn", 6000, four_nodes["domains"]))
    sender.start()
    wait_for(lambda: len(sender.acked) >= 300, 60, "300 accepted before the drain")
    smtp_port, http_port = ports(f"ingress:{victim[:12]}", ns)
    other = next(w for w in workers if w != victim)
    other_smtp, other_http = ports(f"ingress:{other[:12]}", ns)
    assert greeting(smtp_port) == 220 and readyz(http_port) == 200
    t0 = time.time()
    cmd, env = _cmd(cluster.address, "drain", victim[:10], "--grace", "3", "--timeout", "120")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # while the drain runs: the node's ingress turns clients away before it stops
    seen_smtp, seen_http = set(), set()
    while proc.poll() is None and not ({421, None} <= seen_smtp and 503 in seen_http):
        seen_smtp.add(greeting(smtp_port))
        seen_http.add(readyz(http_port))
        time.sleep(0.05)
    out, err = proc.communicate(timeout=150)
    took = time.time() - t0
    print(f"\n{out}\n{err[-2000:]}\ndrain took {took:.1f}s; the node's ingress answered "
          f"{seen_smtp} (SMTP) and {seen_http} (readyz)")
    assert proc.returncode == 0, err[-3000:]
    assert f"node {victim[:12]} drained: nothing of raymta's left on it" in out
    assert 421 in seen_smtp and 503 in seen_http
    assert greeting(smtp_port) is None            # stopped after the grace period
    assert greeting(other_smtp) == 220 and readyz(other_http) == 200   # the others serve
    assert "leader steps down" in out and "copy restarts on another node" in out
    time.sleep(1.0)     # mail keeps flowing after the drain
    sender.done.set()
    sender.join(60)

    # every acknowledged message delivered; duplicates only within what was in flight
    counts = _wait_all_delivered(mc, sinks, sender.acked, 120)
    dups = sum(c - 1 for c in counts.values())
    print(f"accepted {len(sender.acked)} (submit errors {sender.errors}), duplicates {dups}")
    assert len(sender.acked) >= 300 and dups <= _dup_bound(cfg)
    assert not set(_delivered(sinks, {m for m in counts})) - sender.acked

    # nothing of raymta's on the node; each shard whole again on three other nodes
    assert raymta_actors_on(ns, victim) == {}
    for s in range(2):
        st = ray.get(mc.handles[f"coordinator:{s}"].stats.remote(), timeout=60)
        assert st["node"] != victim
        rep = ray.get(mc.handles[f"coordinator:{s}"].replication.remote(), timeout=60)
        assert len(rep["copies"]) == 3
        assert all(c["member"] and c["state"] in ("leader", "streaming")
                   for c in rep["copies"]), rep
        nodes = [st["node"]] + [
            ray.get(ray.get_actor(f"replica:{s}:{k}", namespace=ns).stats.remote(),
                    timeout=60)["node"] for k in (1, 2)]
        assert victim not in nodes and len(set(nodes)) == 3, (s, nodes)
        if f"coordinator:{s}" in before:
            assert st["epoch"] > epochs[s]    # a new leader claimed the shard
    assert victim in drained_nodes(ns)

    p = raymta(cluster.address, "undrain", victim[:10])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "drain mark removed" in p.stdout
    assert victim not in drained_nodes(ns)


def test_drain_refuses_the_head_and_an_unknown_node(four_nodes):
    cluster = four_nodes["cluster"]
    p = raymta(cluster.address, "drain", cluster.head_node.node_id[:10])
    assert p.returncode == 2 and "is the head node" in p.stderr, p.stderr[-2000:]
    p = raymta(cluster.address, "drain", "ffffzz")
    assert p.returncode == 2 and "no live Ray node has that id" in p.stderr, p.stderr[-2000:]


def test_keep_ray_node_stops_ingress_and_relays_reports_the_rest_and_the_mark_holds(
        four_nodes):
    """``--keep-ray-node``: the node stays in Ray, so leaders and copies cannot move (Ray
    would restart them there): they are reported, exit 1; the mark keeps ``deploy`` (as
    `raymta up` runs it) from placing a relay or ingress there until ``undrain``."""
    from actors.ingress import ingress_name
    from actors.remote import node_regions, relay_name
    from cluster.deploy import deploy
    from cluster.drain import raymta_actors_on
    mc, cfg, cluster, sinks = (four_nodes[k] for k in ("mc", "cfg", "cluster", "sinks"))
    ns = cfg.cluster.namespace
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    node = next(w.node_id for w in cluster.worker_nodes if w.node_id in alive
                and any(n.split(":")[0] in ("coordinator", "replica")
                        for n in raymta_actors_on(ns, w.node_id)))
    relay, ingress = relay_name(node, "default"), ingress_name(node)
    assert {relay, ingress} <= set(raymta_actors_on(ns, node))
    p = raymta(cluster.address, "drain", node[:10], "--keep-ray-node", "--grace", "0",
               "--timeout", "5")
    print(f"\n{p.stdout}\n{p.stderr[-1500:]}")
    assert p.returncode == 1, p.stderr[-3000:]
    assert f"node {node[:12]} NOT drained after" in p.stdout
    left = raymta_actors_on(ns, node)
    assert left and all(n.split(":")[0] in ("coordinator", "replica", "throttle") for n in left)
    assert all(n in p.stdout.split("still there:", 1)[1] for n in left)
    # the mark holds: no copy placed there, `up` adds no relay or ingress there
    assert node not in dict(node_regions())
    handles = deploy(cfg)
    assert relay not in handles and ingress not in handles
    assert raymta_actors_on(ns, node) == left
    p = raymta(cluster.address, "status")
    assert p.returncode == 0 and f"node {node[:12]} marked drained since" in p.stdout, p.stderr
    # mail goes on through the other nodes' relays
    msgs = _messages("kn", 200, four_nodes["domains"])
    res = mc.submit(msgs, retry_for=30)
    assert all(r.accepted for r in res)
    _wait_all_delivered(mc, sinks, {m["recipients"][0] for m in msgs}, 60)
    # undrain: `up` places them there again
    p = raymta(cluster.address, "undrain", node[:10])
    assert p.returncode == 0 and "drain mark removed" in p.stdout, p.stderr[-3000:]
    handles = deploy(cfg)
    assert relay in handles and ingress in handles
    assert {relay, ingress} <= set(raymta_actors_on(ns, node))
