"""A relay never sends a message it is still holding: a batch repeated by a restarted shard
leader (which hands out again what its predecessor had sent) is skipped, not sent twice."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(300)


def test_a_repeated_id_is_skipped_while_held_and_sent_again_once_finished(tmp_path, dns_server):
    import ray
    from actors.remote import list_relays
    from cluster.client import MailCluster
    from cluster.core.sites import SiteLimits, limits_to_wire
    from cluster.devservers import SmtpSink

    sink = SmtpSink("127.0.0.2").start()
    try:
        cfg = pipeline_config(str(tmp_path), dns_server.port, sink.port)
        # every DATA waits 1 s: the first batch is still at the relay when the second comes
        sink.data_reply = lambda rcpt, attempt: time.sleep(1.0)
        with MailCluster.connect(config=cfg, num_cpus=2) as mc:
            relay = ray.get_actor(list_relays(cfg.cluster.namespace)[0],
                                  namespace=cfg.cluster.namespace)
            mid = uuid.uuid4().hex
            rcpt = "dup@dedup.test"
            import msgpack
            batch = msgpack.packb({"domain:dedup.test": {
                "hosts": [[10, "mx.dedup.test", ["127.0.0.2"]]], "port": sink.port,
                "limits": limits_to_wire(SiteLimits()), "throttle": "throttle:pool:0",
                "items": [[mid, 1, "s@origin.test", rcpt, raw_message(1, rcpt), False]]}},
                use_bin_type=True)
            # reply_to: a real coordinator; it ignores results for ids it does not hold
            first = relay.deliver.remote(batch, "coordinator:0")
            wait_for(lambda: sink.sessions_total >= 1, 30, "the first batch's session")
            second = relay.deliver.remote(batch, "coordinator:0")
            assert ray.get(second, timeout=30) == 0          # skipped: still held
            assert ray.get(first, timeout=30) == 1
            st = ray.get(relay.stats.remote())
            assert st["duplicates_skipped"] == 1, st
            assert [r.rcpt_to for r in sink.received] == [rcpt]
            # finished: the id is no longer held, so a later batch sends it again
            sink.data_reply = None
            assert ray.get(relay.deliver.remote(batch, "coordinator:0"), timeout=30) == 1
            assert [r.rcpt_to for r in sink.received] == [rcpt, rcpt]
            assert mc.stats()["live"] == 0
    finally:
        sink.stop()
