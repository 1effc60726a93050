"""Shards share a site's in-flight room through its throttle: when one shard's messages for a
site are done, another shard may send at once (not when the first shard's last report expires).

A shard that has nothing more ready for a site used to stop telling the throttle anything about
it, so the throttle kept counting that shard's last in-flight figure for ``report_ttl`` (5 s) and
the other shards could not send: 2-3 s stalls in the middle of benchmark runs."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from tests.conftest import MAIN_SINKS, pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(300)


def test_a_shard_gets_the_room_another_shard_has_finished_with(tmp_path, dns_server):
    from cluster.client import MailCluster, shard_of
    from cluster.config import parse_config
    from cluster.core.throttle import max_inflight
    from cluster.devservers import SinkGroup
    with SinkGroup(MAIN_SINKS[:1]) as sinks:
        dns_server.add_a("mx.shared.test", MAIN_SINKS[0])
        dns_server.add_mx("shared.test", [(10, "mx.shared.test")])
        base = pipeline_config(str(tmp_path), dns_server.port, sinks.port)
        # room for 20 messages in flight at once, over all shards
        one = parse_config({"site": [{"domain": "shared.test", "max_connections": 1,
                                      "deliveries_per_connection": 20}]}).sites
        cfg = replace(base, sites=one + base.sites)
        assert cfg.queue.shards == 2 and max_inflight(one[0].limits) == 20
        with MailCluster.connect(config=cfg, num_cpus=2) as mc:
            def batch(tag: str) -> list[dict]:
                return [{"sender": "s@origin.test", "recipients": [f"{tag}{i}@shared.test"],
                         "raw": raw_message(i, f"{tag}{i}@shared.test")} for i in range(20)]
            # warm up (routes, relay, lease) so that the timing below is only the handover
            warm = mc.submit(batch("warm"))
            wait_for(lambda: all(s["state"] == "delivered" for s in mc.status(
                [r.ids[0] for r in warm])), 60, "the warm-up batch")
            # two calls: one per shard (calls take turns), each filling the site's whole room
            first = mc.submit(batch("a"))
            second = mc.submit(batch("b"))
            t0 = time.time()
            assert {shard_of(r.ids[0], 2) for r in first} != \
                {shard_of(r.ids[0], 2) for r in second}
            ids = [r.ids[0] for r in first + second]
            wait_for(lambda: all(s["state"] == "delivered" for s in mc.status(ids)), 60,
                     "both batches delivered")
            took = time.time() - t0
            got = [r.rcpt_to for r in sinks.received if r.rcpt_to[0] in "ab"]
            print(f"\n40 messages over one connection slot, two shards: {took:.2f}s")
            assert sorted(got) == sorted(f"{t}{i}@shared.test" for t in "ab" for i in range(20))
            # without the falling in-flight reports the second shard waited for report_ttl (5 s)
            assert took < 3.5, took
