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

import subprocess
import sys
import threading
import time
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

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def four_nodes(tmp_path_factory, dns_server):
    from ray.cluster_utils import Cluster

    from cluster.client import MailCluster
    from cluster.core.ratespec import RateSpec
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
        cfg = replace(
            base, queue=replace(base.queue, shards=2),
            cluster=replace(base.cluster, replicas=3),
            spool=replace(base.spool, per_node=True),
            metrics=replace(base.metrics, enabled=False),
            replication=replace(base.replication, ack_timeout=3.0, claim_timeout=60.0,
                                rebalance_interval=0),
            site_defaults=replace(base.site_defaults, rates=(RateSpec.parse("400/s"),)))
        assert cfg.cluster.namespace == "raymta"   # the CLI below runs without --config
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "labels": {"region": "us"},
            "_system_config": {**RAY_SYSTEM_CONFIG, **NODE_HEALTH}})
        for region in ("eu", "ap", "eu"):
            cluster.add_node(num_cpus=1, labels={"region": region})
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


def raymta(address: str, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    import os
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--address", address],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


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
    t0 = time.time()
    p = raymta(cluster.address, "drain", victim[:10], "--grace", "1", "--timeout", "120")
    took = time.time() - t0
    print(f"\n{p.stdout}\n{p.stderr[-2000:]}\ndrain took {took:.1f}s")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"node {victim[:12]} drained: nothing of raymta's left on it" in p.stdout
    assert "leader steps down" in p.stdout and "copy restarts on another node" in p.stdout
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
