"""Hot sites over several relays and egress sources tied to nodes, on a real 3-node Ray cluster.

``ray.cluster_utils.Cluster`` starts three raylets on this machine, labelled ``egress =
egress-a / egress-b / egress-c``; each egress source binds its own 127.0.0.x and names its
node's label, so its relay runs on that node only. The sink records the peer address of every
session, so the address a message came from says which node's relay sent it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray

from cluster.deploy import NODE_HEALTH, RAY_SYSTEM_CONFIG
from tests.conftest import pipeline_config, raw_message, wait_for

# own_ray: a ray.cluster_utils.Cluster of its own
pytestmark = [pytest.mark.timeout(300), pytest.mark.own_ray]

RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")
SINK = "127.0.0.61"
#: source name -> (bind address, node label)
SOURCES = {"a": ("127.0.0.11", "egress-a"), "b": ("127.0.0.12", "egress-b"),
           "c": ("127.0.0.13", "egress-c")}
ADDR_SOURCE = {addr: name for name, (addr, _) in SOURCES.items()}
HOT_LIMIT = 6


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory, dns_server):
    from ray.cluster_utils import Cluster

    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.deploy import deploy
    from cluster.devservers import SmtpSink
    saved = RAY_ADDRESS_FILE.read_bytes() if RAY_ADDRESS_FILE.exists() else None
    sink = SmtpSink(SINK, 0).start()
    cluster = None
    try:
        dns_server.add_a("mx.hot.test", SINK)
        for d in ("hot.test", "only-a.test", "only-b.test", "only-c.test", "pooled.test"):
            dns_server.add_mx(d, [(10, "mx.hot.test")])
        base = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port, sink.port)
        raw = {"egress": [{"name": n, "bind_address": a, "ehlo_name": f"{n}.relay.test",
                           "node_label": lab} for n, (a, lab) in SOURCES.items()],
               # one site per source: only that source's relay may carry it
               "site": [{"domain": "hot.test", "max_connections": HOT_LIMIT, "rate": "5000/s",
                         "deliveries_per_connection": 50}] +
                       [{"domain": f"only-{n}.test", "sources": [n]} for n in SOURCES],
               # mail from pool.example leaves from a and b, 3:1
               "egress_pool": [{"name": "ab", "sources": ["a:3", "b"],
                                "sender_domains": ["pool.example"]}]}
        cfg = parse_config(raw)
        cfg = replace(base, egress=cfg.egress, sites=cfg.sites, egress_pools=cfg.egress_pools,
                      queue=replace(base.queue, shards=1),
                      cluster=replace(base.cluster, replicas=1),
                      delivery=replace(base.delivery, hot_site_ready=40, hot_site_relays=3,
                                       lease_ttl=3.0))
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "labels": {"egress": "egress-a"},
            "_system_config": {**RAY_SYSTEM_CONFIG, **NODE_HEALTH}})
        for lab in ("egress-b", "egress-c"):
            cluster.add_node(num_cpus=1, labels={"egress": lab})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=cfg.cluster.namespace, log_to_driver=False)
        handles = deploy(cfg)
        mc = MailCluster(cfg, [handles["coordinator:0"]], handles=handles)
        yield {"mc": mc, "cfg": cfg, "sink": sink, "handles": handles}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            RAY_ADDRESS_FILE.unlink(missing_ok=True)
        else:
            RAY_ADDRESS_FILE.write_bytes(saved)
        sink.stop()


def _submit(mc: Any, rcpts: list[str], sender: str = "s@origin.test") -> None:
    msgs = [{"sender": sender, "recipients": [r], "raw": raw_message(i, r, size=300)}
            for i, r in enumerate(rcpts)]
    for k in range(0, len(msgs), 500):
        assert all(r.accepted for r in mc.submit(msgs[k:k + 500]))


def _delivered(sink: Any, want: set[str]) -> list[Any]:
    return [r for r in sink.received if r.rcpt_to in want]


def test_each_source_has_a_relay_on_its_own_node_only(three_nodes):
    from actors.remote import list_relays
    label_of = {n["NodeID"][:12]: (n.get("Labels") or {}).get("egress")
                for n in ray.nodes() if n.get("Alive")}
    relays = list_relays(three_nodes["cfg"].cluster.namespace)
    assert len(relays) == 3, relays
    for r in relays:
        _, node, src = r.split(":")
        assert label_of[node] == SOURCES[src][1], (r, label_of)


def test_sink_sees_each_sources_address_only_for_its_sites(three_nodes):
    mc, sink = three_nodes["mc"], three_nodes["sink"]
    rcpts = [f"e{i}@only-{n}.test" for n in SOURCES for i in range(20)]
    _submit(mc, rcpts)
    want = set(rcpts)
    wait_for(lambda: len({r.rcpt_to for r in _delivered(sink, want)}) == len(want), 60,
             "every source-bound message delivered")
    for r in _delivered(sink, want):
        src = r.rcpt_to.split("@only-")[1].removesuffix(".test")
        assert r.peer[0] == SOURCES[src][0], (r.rcpt_to, r.peer)


def test_hot_site_spreads_over_nodes_within_its_connection_limit(three_nodes):
    mc, sink = three_nodes["mc"], three_nodes["sink"]
    # the other sites' idle connections close first: the sink's peak is then the hot site's
    wait_for(lambda: sink.current_sessions == 0, 30, "idle connections closed")
    sink.reset()
    rcpts = [f"h{i}@hot.test" for i in range(1500)]
    _submit(mc, rcpts)
    want = set(rcpts)
    wait_for(lambda: len({r.rcpt_to for r in _delivered(sink, want)}) == len(want), 120,
             "every hot-site message delivered")
    got = _delivered(sink, want)
    by_source = Counter(ADDR_SOURCE.get(r.peer[0], r.peer[0]) for r in got)
    # from relays on more than one node (each source's address is on one node only) ...
    assert len(by_source) >= 2, by_source
    assert all(n >= 50 for n in by_source.values()), by_source
    # ... and never more sessions at once than the site's limit, cluster-wide
    print("hot site: deliveries by source", dict(by_source), "peak sessions",
          sink.max_concurrent_sessions)
    assert 2 <= sink.max_concurrent_sessions <= HOT_LIMIT, sink.max_concurrent_sessions


def test_a_sender_domains_pool_sends_from_its_sources_by_weight(three_nodes):
    mc, sink = three_nodes["mc"], three_nodes["sink"]
    rcpts = [f"p{i}@pooled.test" for i in range(400)]
    _submit(mc, rcpts, sender="news@mail.pool.example")
    want = set(rcpts)
    wait_for(lambda: len({r.rcpt_to for r in _delivered(sink, want)}) == len(want), 60,
             "every pooled message delivered")
    by_source = Counter(ADDR_SOURCE.get(r.peer[0], r.peer[0]) for r in _delivered(sink, want))
    print("pool a:3 b:1 ->", dict(by_source))
    assert set(by_source) == {"a", "b"}, by_source
    assert 0.65 <= by_source["a"] / sum(by_source.values()) <= 0.85, by_source
