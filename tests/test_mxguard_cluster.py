"""The MX address guard in a running cluster (real Ray, DNS and SMTP on loopback):

- a domain whose MX resolves to 10.0.0.5 bounces at once with 5.4.4, and the relay never tries
  a connection (no connect failure counted, the bounce comes before any connect timeout);
- ``user@[127.0.0.1]`` is refused when loopback is not allowed, and an address literal inside
  ``delivery.allow_networks`` (``[127.0.0.9]`` with 127.0.0.9/32 allowed) is delivered;
- a ``[routes]`` smart host on a refused address is guarded too: its mail is deferred (4.4.4,
  the configuration's fault), never sent there."""

from __future__ import annotations

import dataclasses
import time

import pytest

from tests.conftest import pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(240)

LITERAL_SINK = "127.0.0.9"


def test_private_mx_and_literals_are_refused_and_allowed_ones_delivered(tmp_path, dns_server):
    import ray

    from actors.remote import list_relays
    from cluster.client import MailCluster
    from cluster.core.sites import StaticRoute
    from cluster.devservers import SmtpSink

    sink = SmtpSink(LITERAL_SINK).start()
    dns_server.add_a("mx.private.test", "10.0.0.5")
    dns_server.add_mx("private.test", [(10, "mx.private.test")])
    try:
        cfg = pipeline_config(str(tmp_path), dns_server.port, sink.port)
        # only the literal's sink is allowed: loopback at large is refused again
        cfg = dataclasses.replace(cfg, delivery=dataclasses.replace(
            cfg.delivery, allow_networks=(f"{LITERAL_SINK}/32",), connect_timeout=20.0),
            routes=(StaticRoute("routed.test", "127.0.0.1", sink.port),))
        with MailCluster.connect(config=cfg, num_cpus=2) as mc:
            rcpts = ["a@private.test", "b@[127.0.0.1]", "c@[127.0.0.9]", "d@routed.test"]
            t0 = time.monotonic()
            res = mc.submit([{"sender": "s@origin.test", "recipients": [r],
                              "raw": raw_message(i, r)} for i, r in enumerate(rcpts)])
            assert all(r.accepted for r in res), [r.error for r in res]
            ids = [r.ids[0] for r in res]
            states = wait_for(lambda: (s := [mc.status(i)["state"] for i in ids[:3]]) and
                              all(x in ("bounced", "delivered") for x in s) and s, 60,
                              "the three messages to finish")
            routed = wait_for(lambda: next((e for e in mc.events(0, limit=1_000_000)
                                            if e["id"] == ids[3]
                                            and e["type"] == "TransientFailure"), None), 60,
                              "the routed message to be deferred")
            took = time.monotonic() - t0
            assert states == ["bounced", "bounced", "delivered"]
            evs = {e["id"]: e for e in mc.events(0, limit=1_000_000) if e["type"] == "Bounce"}
            private, literal = evs[ids[0]], evs[ids[1]]
            assert private["text"] == ("mx.private.test resolves only to 10.0.0.5, a private "
                                       "address; refused (delivery.allow_networks)"), private
            assert private["enhanced"] == "5.4.4" and private["category"] == "routing"
            assert literal["text"].startswith("address literal [127.0.0.1] is ") and \
                literal["text"].endswith("; refused (delivery.allow_networks)"), literal
            assert routed["text"].startswith("[routes] 127.0.0.1 resolves only to 127.0.0.1, ")
            assert routed["text"].endswith("; refused (delivery.allow_networks)"), routed
            assert routed["enhanced"] == "4.4.4" and routed["category"] == "routing", routed
            assert mc.status(ids[3])["state"] != "delivered"
            assert [r.rcpt_to for r in sink.received] == ["c@[127.0.0.9]"]
            # never a connection to 10.0.0.5: nothing failed to connect, and the bounce came
            # sooner than the 20 s a connect attempt there could take to time out
            relay = ray.get_actor(list_relays(cfg.cluster.namespace)[0],
                                  namespace=cfg.cluster.namespace)
            st = ray.get(relay.stats.remote(), timeout=30)
            assert st["connect_failures"] == 0 and st["guard_refused"] >= 3, st
            assert st["connections"] == 1 == sink.sessions_total
            assert took < 20, took
            print(f"guard: 2 refused, 1 literal delivered, 1 route deferred in {took:.1f} s; "
                  f"tls_sites {st['tls_sites']}")
    finally:
        sink.stop()
