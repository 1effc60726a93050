"""Shared throttles scale out with the cluster, on a real 3-node Ray cluster.

With ``delivery.throttle_actors = "auto"`` (the default) the deploy starts one pool throttle
per node, each on a node of its own. A node joins and the deploy runs again: a fourth throttle
starts on the new node and the sites that now hash to it are handed over while their mail is
being delivered; the sink's peak of concurrent sessions shows the site's connection limit held
through the move.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import ray

from cluster.core.throttle_pool import pool_owner
from tests.conftest import multinode, pipeline_config, raw_message, wait_for

# own_ray: a ray.cluster_utils.Cluster of its own
pytestmark = [pytest.mark.timeout(300), pytest.mark.own_ray]

SINK, SINK_STAYS = "127.0.0.62", "127.0.0.63"
LIMIT = 3
#: a domain whose site moves to the fourth throttle when the pool grows from 3 to 4
MOVED = next(d for d in (f"moved{i}.test" for i in range(1000))
             if pool_owner(f"domain:{d}", 3) != pool_owner(f"domain:{d}", 4))
#: and one that stays where it is
STAYS = next(d for d in (f"stays{i}.test" for i in range(1000))
             if pool_owner(f"domain:{d}", 3) == pool_owner(f"domain:{d}", 4))


def _nodes_of(names: list[str], ns: str) -> dict[str, str]:
    hs = {n: ray.get_actor(n, namespace=ns) for n in names}
    return dict(zip(hs, ray.get([h.node.remote() for h in hs.values()], timeout=60)))


def test_throttles_spread_over_nodes_and_a_new_node_adds_one_without_breaking_limits(
        tmp_path, dns_server):
    import time

    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.deploy import deploy
    from cluster.devservers import SmtpSink
    t0 = time.monotonic()
    stack = contextlib.ExitStack()
    sink = SmtpSink(SINK, 0).start()     # the moved site's MX
    other = SmtpSink(SINK_STAYS, sink.port).start()   # the other site's
    try:
        dns_server.add_a("mx.moved.test", SINK)
        dns_server.add_a("mx.stays.test", SINK_STAYS)
        dns_server.add_mx(MOVED, [(10, "mx.moved.test")])
        dns_server.add_mx(STAYS, [(10, "mx.stays.test")])
        base = pipeline_config(str(tmp_path / "spool"), dns_server.port, sink.port)
        sites = parse_config({"site": [
            {"domain": d, "max_connections": LIMIT, "rate": "60/s,burst=5",
             "deliveries_per_connection": 20} for d in (MOVED, STAYS)]}).sites
        cfg = replace(base, sites=sites, queue=replace(base.queue, shards=1),
                      cluster=replace(base.cluster, replicas=1),
                      delivery=replace(base.delivery, lease_ttl=3.0))
        assert cfg.delivery.throttle_actors == "auto"
        cluster = stack.enter_context(multinode(cfg.cluster.namespace, workers=2))
        ns = cfg.cluster.namespace
        print(f"cluster up {time.monotonic() - t0:.1f}s")
        handles = deploy(cfg)
        print(f"deployed {time.monotonic() - t0:.1f}s")
        pool = sorted(n for n in handles if n.startswith("throttle:pool:"))
        assert pool == [f"throttle:pool:{k}" for k in range(3)]
        where = _nodes_of(pool, ns)
        assert len(set(where.values())) == 3, where          # one per node

        mc = MailCluster(cfg, [handles["coordinator:0"]], handles=handles)
        rcpts = [f"m{i}@{MOVED}" for i in range(600)] + [f"s{i}@{STAYS}" for i in range(60)]
        msgs = [{"sender": "s@origin.test", "recipients": [r], "raw": raw_message(i, r, size=300)}
                for i, r in enumerate(rcpts)]
        for k in range(0, len(msgs), 400):
            assert all(r.accepted for r in mc.submit(msgs[k:k + 400]))
        # mail is flowing at 60/s: a node joins and the deploy runs again mid-stream
        wait_for(lambda: len(sink.received) >= 30, 60, "delivery under way")
        print(f"flowing {time.monotonic() - t0:.1f}s")
        new = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        handles = deploy(cfg)
        print(f"redeployed {time.monotonic() - t0:.1f}s")
        pool = sorted(n for n in handles if n.startswith("throttle:pool:"))
        assert pool == [f"throttle:pool:{k}" for k in range(4)]
        after = _nodes_of(pool, ns)
        assert {k: after[k] for k in where} == where          # the running ones stayed
        assert after["throttle:pool:3"] == new.node_id        # the new one on the new node
        moved_at = len({r.rcpt_to for r in sink.received})
        assert moved_at < 600 - 200, moved_at          # the move came mid-stream

        want = set(rcpts)
        wait_for(lambda: want <= {r.rcpt_to for r in sink.received + other.received}, 120,
                 "every message delivered")
        print(f"all delivered {time.monotonic() - t0:.1f}s")
        owner = ray.get_actor(pool_owner(f"domain:{MOVED}", 4), namespace=ns)
        old = ray.get_actor(pool_owner(f"domain:{MOVED}", 3), namespace=ns)
        new_stats, old_stats = ray.get([owner.stats.remote(), old.stats.remote()])
        print("moved site", MOVED, "delivered before the redeploy:", moved_at,
              "peak sessions", sink.max_concurrent_sessions, other.max_concurrent_sessions,
              "new owner calls",
              new_stats["calls"], "old owner calls", old_stats["calls"])
        # the new throttle granted the moved site's mail; the old one handed it over
        assert f"domain:{MOVED}" in new_stats["sites"], new_stats["sites"].keys()
        assert new_stats["granted"] > 0 and old_stats["calls"]["hand_over"] >= 1
        # each site at LIMIT connections at most, through the move
        assert 2 <= sink.max_concurrent_sessions <= LIMIT, sink.max_concurrent_sessions
        assert 1 <= other.max_concurrent_sessions <= LIMIT, other.max_concurrent_sessions
    finally:
        stack.close()      # Ray and every node
        sink.stop()
        other.stop()
