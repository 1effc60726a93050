"""A queue split over two shards: messages spread over both, every one delivered once."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from tests.conftest import MAIN_SINKS, pipeline_config, raw_message

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("transport", ["stream", "ray"])
def test_two_shards_share_the_work(tmp_path, dns_server, transport):
    from cluster.client import MailCluster, shard_of
    from cluster.devservers import SinkGroup
    with SinkGroup(MAIN_SINKS) as sinks:
        for i, a in enumerate(MAIN_SINKS):
            dns_server.add_a(f"mx{i + 1}.shard.test", a)
        for i in range(6):
            dns_server.add_mx(f"s{i}.test", [(10, f"mx{i % 3 + 1}.shard.test")])
        base = pipeline_config(str(tmp_path), dns_server.port, sinks.port)
        cfg = replace(base, queue=replace(base.queue, shards=2),
                      replication=replace(base.replication, transport=transport))
        with MailCluster.connect(config=cfg, num_cpus=2) as mc:
            n = 1000
            rcpts = [f"u{i}@s{i % 6}.test" for i in range(n)]
            # submit calls take turns over the shards: one call is one shard's batch
            for k in range(0, n, 100):
                res = mc.submit([{"sender": "s@origin.test", "recipients": [r],
                                  "raw": raw_message(i, r)}
                                 for i, r in enumerate(rcpts[k:k + 100], start=k)])
                assert all(r.accepted for r in res)
                assert len({shard_of(r.ids[0], 2) for r in res}) == 1
            # one message with several recipients: one shard, its body stored once
            multi = mc.submit([{"sender": "s@origin.test", "from": "s@origin.test",
                                "recipients": [f"multi{k}@s1.test" for k in range(20)],
                                "text": "one body, twenty recipients\n"}])[0]
            assert multi.accepted and len(multi.ids) == 20
            assert len({shard_of(i, 2) for i in multi.ids}) == 1
            assert mc.wait_until_idle(timeout=120), mc.stats()
            st = mc.stats()
            per_shard = sorted(s["accepted"] for s in st["shards"])
            assert per_shard == [500, 520], per_shard
            assert st["delivered"] == n + 20
            counts = Counter(r.rcpt_to for r in sinks.received)
            assert all(counts[r] == 1 for r in rcpts)
            assert all(counts[f"multi{k}@s1.test"] == 1 for k in range(20))
            assert {s["state"] for s in mc.status(multi.ids)} == {"delivered"}
            evs = mc.events(0, limit=100_000)
            assert {e["shard"] for e in evs} == {0, 1}
            cursor = mc.next_cursor(evs)
            assert mc.events(cursor) == []
            # the appends went the configured way: over a stream to each replica, or Ray calls
            repl = mc.replication()
            assert [r["copies"][0]["state"] for r in repl] == ["leader", "leader"]
            streams = [r["streams"] for r in repl]
            want = cfg.cluster.replicas - 1 if transport == "stream" else 0
            assert streams == [want, want], repl
            import ray
            rs = ray.get([ray.get_actor(f"replica:{s}:{k}", namespace=cfg.cluster.namespace)
                          .stats.remote() for s in range(2) for k in range(1, cfg.cluster.replicas)])
            served = [r["stream"]["requests"] if r["stream"] else 0 for r in rs]
            assert all(n > 0 for n in served) if transport == "stream" else served == [0] * len(rs)
