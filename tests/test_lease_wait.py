"""A relay that cannot get a connection slot hands its messages back instead of holding them
past the coordinator's in-flight timeout (which would send them twice)."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest
import ray

from cluster.core.sites import limits_to_wire, throttle_actor_name
from tests.conftest import MAIN_SINKS, pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(300)


def test_relay_gives_messages_back_when_no_connection_slot_comes(tmp_path, dns_server):
    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.devservers import SinkGroup
    with SinkGroup(MAIN_SINKS[:1]) as sinks:
        dns_server.add_a("mx.busy.test", MAIN_SINKS[0])
        dns_server.add_mx("busy.test", [(10, "mx.busy.test")])
        base = pipeline_config(str(tmp_path), dns_server.port, sinks.port,
                               inflight_timeout="4s")
        one = parse_config({"site": [{"domain": "busy.test", "max_connections": 1}]}).sites
        cfg = replace(base, sites=one + base.sites,
                      delivery=replace(base.delivery, lease_ttl=60.0))
        with MailCluster.connect(config=cfg, num_cpus=2) as mc:
            limits = one[0].limits
            name = throttle_actor_name("domain:busy.test", False, cfg.delivery.fixed_throttles or 1)
            throttle = ray.get_actor(name, namespace="raymta")
            # someone else (another relay, say) holds the site's only connection
            req = msgpack.packb({"domain:busy.test": [limits_to_wire(limits), 1]})
            held = ray.get(throttle.acquire.remote("other-relay", "x", req))["domain:busy.test"]
            assert len(held) == 1
            res = mc.submit([{"sender": "s@origin.test", "recipients": [f"w{i}@busy.test"],
                              "raw": raw_message(i, f"w{i}@busy.test")} for i in range(3)])
            ids = [r.ids[0] for r in res]

            def deferred_with_reason():
                evs = [e for e in mc.events(0) if e["id"] in ids
                       and e["type"] == "TransientFailure"]
                return evs if len({e["id"] for e in evs}) == 3 else None
            evs = wait_for(deferred_with_reason, 30, "the relay to hand the messages back")
            assert all("no connection slot" in e["text"] for e in evs), evs
            assert mc.stats()["requeued_after_relay_loss"] == 0
            assert not [r for r in sinks.received if r.rcpt_to.endswith("@busy.test")]
            ray.get(throttle.release.remote({"domain:busy.test": held}))
            wait_for(lambda: all(s["state"] == "delivered" for s in mc.status(ids)), 60,
                     "delivery once the slot is free")
            assert sorted(r.rcpt_to for r in sinks.received) == sorted(
                f"w{i}@busy.test" for i in range(3))
