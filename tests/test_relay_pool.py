"""A RelayPool driven directly with deliver() batches, against a real SMTP sink.

- It never sends a message it is still holding: a batch repeated by a restarted shard leader
  (which hands out again what its predecessor had sent) is skipped, not sent twice.
- It opens connections as the backlog for a site needs them, not one per message.
- It never has more than ``delivery.max_connections`` connections open, all sites together:
  sites beyond the cap wait their turn and everything is delivered."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import pytest

from tests.conftest import pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(300)


def _batch(site: str, port: int, items: list[list], **limits) -> bytes:
    import msgpack
    from cluster.core.sites import SiteLimits, limits_to_wire
    return msgpack.packb({site: {
        "hosts": [[10, "mx." + site.split(":", 1)[1], ["127.0.0.2"]]], "port": port,
        "limits": limits_to_wire(SiteLimits(**limits)), "throttle": "throttle:pool:0",
        "items": items}}, use_bin_type=True)


# first: it deploys with settings of its own, before the module's shared deployment below
def test_the_relay_cap_holds_over_many_sites_and_everything_is_delivered(tmp_path, dns_server):
    import msgpack
    import ray

    from actors.remote import list_relays
    from cluster.client import MailCluster
    from cluster.core.sites import SiteLimits, limits_to_wire
    from cluster.devservers import SmtpSink

    cap, sites, per_site = 3, 12, 20
    sink = SmtpSink("127.0.0.2").start()
    try:
        cfg = pipeline_config(str(tmp_path), dns_server.port, sink.port)
        cfg = replace(cfg, delivery=replace(cfg.delivery, max_connections=cap))
        with MailCluster.connect(config=cfg, num_cpus=2):
            relay = ray.get_actor(list_relays(cfg.cluster.namespace)[0],
                                  namespace=cfg.cluster.namespace)
            # every site alone would open 4 connections (20 queued, 5 per connection)
            wire = limits_to_wire(SiteLimits(max_connections=4, deliveries_per_connection=5))
            batch = {f"domain:cap{k}.test": {
                "hosts": [[10, f"mx.cap{k}.test", ["127.0.0.2"]]], "port": sink.port,
                "limits": wire, "throttle": "throttle:pool:0",
                "items": [[uuid.uuid4().hex, 1, "s@origin.test", f"r{i}@cap{k}.test",
                           raw_message(i, f"r{i}@cap{k}.test"), False]
                          for i in range(per_site)]} for k in range(sites)}
            t0 = time.time()
            n = ray.get(relay.deliver.remote(msgpack.packb(batch, use_bin_type=True),
                                             "coordinator:0"), timeout=120)
            took = time.time() - t0
            st = ray.get(relay.stats.remote())
            print(f"\ncap {cap}: {n} messages to {sites} sites in {took:.1f}s over "
                  f"{sink.sessions_total} sessions, at most {sink.max_concurrent_sessions} at "
                  f"once; relay slots {st['connection_slots']}")
            assert n == sites * per_site
            assert len(sink.received) == sites * per_site
            assert {r.rcpt_to for r in sink.received} == \
                {f"r{i}@cap{k}.test" for k in range(sites) for i in range(per_site)}
            assert sink.max_concurrent_sessions <= cap
            assert st["connection_slots"]["peak"] == cap     # the cap was what held it
            # the last connections close after the idle timeout: then every slot is back
            wait_for(lambda: ray.get(relay.stats.remote())["connection_slots"]["used"] == 0,
                     cfg.delivery.idle_timeout + 10, "the relay's slots to come back")
            # slots a busy site kept past its connections' ends (RelaySlots.keep: at most
            # half the cap, so the line moved) are all given up with them
            assert ray.get(relay.stats.remote())["connection_slots"]["kept"] == 0
            assert st["permanent"] == 0 and st["transient"] == 0   # nothing deferred
    finally:
        sink.stop()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, dns_server):
    """One deployment with the pipeline's settings for the three tests below that drive its
    relay (not the cap test: its settings differ). Each has a sink of its own (its batches name
    the sink's port), sites of its own, and reads the relay's stats as before and after."""
    import ray

    from actors.remote import list_relays
    from cluster.client import MailCluster
    # smtp_port is only the throttles' routing, which batches given to the relay bypass
    cfg = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port, 25)
    with MailCluster.connect(config=cfg, num_cpus=2) as mc:
        relay = ray.get_actor(list_relays(cfg.cluster.namespace)[0],
                              namespace=cfg.cluster.namespace)
        yield mc, relay


def test_connections_follow_the_backlog_not_the_message_count(deployed):
    import ray
    from cluster.core.throttle import QUEUED_PER_CONNECTION
    from cluster.devservers import SmtpSink

    _mc, relay = deployed
    sink = SmtpSink("127.0.0.2").start()
    try:
        def items(tag, n):
            return [[uuid.uuid4().hex, 1, "s@origin.test", f"{tag}{i}@conn.test",
                     raw_message(i, f"{tag}{i}@conn.test"), False] for i in range(n)]
        # 10 messages: one connection carries them all
        assert ray.get(relay.deliver.remote(
            _batch("domain:small.test", sink.port, items("a", 10), max_connections=10),
            "coordinator:0"), timeout=60) == 10
        assert sink.sessions_total == 1 and len(sink.received) == 10
        # 3 × QUEUED_PER_CONNECTION at once: three connections, not ten
        n = 3 * QUEUED_PER_CONNECTION
        assert ray.get(relay.deliver.remote(
            _batch("domain:big.test", sink.port, items("b", n), max_connections=10),
            "coordinator:0"), timeout=60) == n
        assert sink.sessions_total == 1 + 3, sink.sessions_total
        assert len(sink.received) == 10 + n
    finally:
        sink.stop()


def test_a_repeated_id_is_skipped_while_held_and_sent_again_once_finished(deployed):
    import ray
    from cluster.devservers import SmtpSink

    mc, relay = deployed
    sink = SmtpSink("127.0.0.2").start()
    try:
        # every DATA waits 1 s: the first batch is still at the relay when the second comes
        sink.data_reply = lambda rcpt, attempt: time.sleep(1.0)
        mid = uuid.uuid4().hex
        rcpt = "dup@dedup.test"
        batch = _batch("domain:dedup.test", sink.port,
                       [[mid, 1, "s@origin.test", rcpt, raw_message(1, rcpt), False]])
        skipped = ray.get(relay.stats.remote()).get("duplicates_skipped", 0)
        # reply_to: a real coordinator; it ignores results for ids it does not hold
        first = relay.deliver.remote(batch, "coordinator:0")
        wait_for(lambda: sink.sessions_total >= 1, 30, "the first batch's session")
        second = relay.deliver.remote(batch, "coordinator:0")
        assert ray.get(second, timeout=30) == 0          # skipped: still held
        assert ray.get(first, timeout=30) == 1
        st = ray.get(relay.stats.remote())
        assert st["duplicates_skipped"] - skipped == 1, st
        assert [r.rcpt_to for r in sink.received] == [rcpt]
        # finished: the id is no longer held, so a later batch sends it again
        sink.data_reply = None
        assert ray.get(relay.deliver.remote(batch, "coordinator:0"), timeout=30) == 1
        assert [r.rcpt_to for r in sink.received] == [rcpt, rcpt]
        assert mc.stats()["live"] == 0
    finally:
        sink.stop()


def test_a_connection_closed_with_the_next_envelope_sent_ahead_loses_nothing(deployed):
    """With PIPELINING the relay writes the next message's envelope behind a body. When the
    server answers that body with 421 and closes, the next message was never sent: it must be
    handed back (not counted as sent, not received), and no empty message may reach the sink."""
    import ray
    from cluster.devservers import SmtpSink

    _mc, relay = deployed
    sink = SmtpSink("127.0.0.2").start()
    sink.data_reply = lambda rcpt, n: (421, "4.3.2 shutting down") \
        if rcpt.startswith("drop") else None
    try:
        names = ["x0", "x1", "x2", "drop3", "x4", "x5"]
        items = [[uuid.uuid4().hex, 1, "s@origin.test", f"{n}@ahead.test",
                  raw_message(i, f"{n}@ahead.test"), False] for i, n in enumerate(names)]
        before = ray.get(relay.stats.remote())
        assert ray.get(relay.deliver.remote(
            _batch("domain:ahead.test", sink.port, items, max_connections=1),
            "coordinator:0"), timeout=60) == 6
        after = ray.get(relay.stats.remote())
        got = [r.rcpt_to for r in sink.received]
        assert got == ["x0@ahead.test", "x1@ahead.test", "x2@ahead.test"], got
        assert all(r.data.startswith(b"From: Sender") for r in sink.received)
        done = {k: after[k] - before[k] for k in ("delivered", "transient", "permanent")}
        # the 421 and the two behind it (the site backs off) are handed back as transient
        assert done == {"delivered": 3, "transient": 3, "permanent": 0}, done
        wait_for(lambda: sink.current_sessions == 0, 10, "the session to end")
    finally:
        sink.stop()
