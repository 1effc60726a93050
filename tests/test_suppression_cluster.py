"""Suppression on a real local Ray with two shards: a hard bounce at the sink suppresses the
address on every shard, a complaint reported to a shard does too, an unsubscribe is scoped to
its sender domain, and all of it survives a SIGKILL of every leader."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from tests.conftest import faults_reply, pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    from cluster.client import MailCluster
    from cluster.devservers import SinkGroup
    with SinkGroup(["127.0.0.2"]) as sinks:
        sinks.rcpt_reply = faults_reply     # unknown*@ → 550 5.1.1 user unknown
        dns_server.add_a("mx.supp.test", "127.0.0.2")
        dns_server.add_mx("supp.test", [(10, "mx.supp.test")])
        cfg = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port,
                              sinks.port)
        with MailCluster.connect(config=cfg, num_cpus=2) as mc:
            yield {"mc": mc, "sinks": sinks, "cfg": cfg}


def _msg(rcpt: str, sender: str = "s@origin.test", i: int = 0) -> dict[str, Any]:
    return {"sender": sender, "recipients": [rcpt], "raw": raw_message(i, rcpt)}


def _on_every_shard(mc: Any, address: str) -> list[list[dict]]:
    import ray
    return [ray.get(c.suppressions.remote("", 10, address), timeout=60)
            for c in mc.coordinators]


def test_suppression_from_bounces_complaints_and_by_hand_survives_leader_kills(env):
    import ray
    mc, sinks = env["mc"], env["sinks"]
    # a hard bounce at the sink: the address is suppressed on both shards
    r = mc.submit([_msg("unknown7@supp.test")])[0]
    assert r.accepted
    wait_for(lambda: (mc.status(r.ids[0]) or {}).get("state") == "bounced", 60, "the bounce")
    wait_for(lambda: all(_on_every_shard(mc, "unknown7@supp.test")), 30,
             "the suppression on every shard")
    e = _on_every_shard(mc, "unknown7@supp.test")[1][0]
    assert e["reason"] == "hard-bounce" and e["expires_at"] and r.ids[0] in e["cause"]
    again = mc.submit([_msg("unknown7@supp.test"), _msg("unknown7@supp.test")])
    assert all(not x.accepted and "suppressed" in x.error and "hard-bounce" in x.error
               for x in again), again
    # a transient failure (tempfail*: 451 twice, then delivered) suppresses nothing
    t = mc.submit([_msg("tempfail1@supp.test")])[0]
    wait_for(lambda: (mc.status(t.ids[0]) or {}).get("state") == "delivered", 60, "delivered")
    assert not any(_on_every_shard(mc, "tempfail1@supp.test"))

    # by hand: an unsubscribe from origin.test only
    out = mc.suppress(["ann@supp.test"], reason="unsubscribe", scope="origin.test")
    assert out["added"] == 1 and out["refused"] == 0
    refused = mc.submit([_msg("ann@supp.test", "news@bounces.origin.test")])[0]
    assert not refused.accepted and "unsubscribe" in refused.error
    other = mc.submit([_msg("ann@supp.test", "s@elsewhere.test", 1)])[0]
    assert other.accepted
    bad = mc.suppress(["not an address", "ok@supp.test"], reason="manual")
    assert bad["added"] == 1 and bad["refused"] == 1 and "rows[0]" in bad["errors"][0]

    # a complaint reported to the shard that sent the message
    d = mc.submit([_msg("bob@supp.test", i=2)])[0]
    wait_for(lambda: (mc.status(d.ids[0]) or {}).get("state") == "delivered", 60, "bob")
    from cluster.client import shard_of
    home = mc.coordinators[shard_of(d.ids[0], 2)]
    rep = ray.get(home.outside_reports.remote([{"kind": "complaint", "id": d.ids[0],
                                       "recipient": "bob@supp.test",
                                       "feedback_type": "abuse"}]))
    assert rep == {"shard": shard_of(d.ids[0], 2), "recorded": 1, "suppressed": 1,
                   "refused": 0}
    wait_for(lambda: all(_on_every_shard(mc, "bob@supp.test")), 30, "complaint everywhere")
    evs = [e for e in mc.events(0) if e["type"] == "Complaint"]
    assert evs and evs[-1]["id"] == d.ids[0] and evs[-1]["feedback_type"] == "abuse"

    # every leader SIGKILLed: the list comes back from the log
    pids = [s["pid"] for s in mc.stats()["shards"]]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _serving_again(mc, pids), 120, "the leaders to serve again")
    for a in ("unknown7@supp.test", "ann@supp.test", "bob@supp.test", "ok@supp.test"):
        assert all(_on_every_shard(mc, a)), a
    assert not mc.submit([_msg("bob@supp.test", i=3)])[0].accepted
    # lifted: mail goes again
    assert mc.unsuppress(["bob@supp.test"])["removed"] == 1
    back = mc.submit([_msg("bob@supp.test", i=4)])[0]
    assert back.accepted, back.error
    assert mc.wait_until_idle(timeout=60)
    assert sum(1 for x in sinks.received if x.rcpt_to == "bob@supp.test") == 2


def _serving_again(mc: Any, old: list[int]) -> bool:
    try:
        st = mc.stats()
    except Exception:   # noqa: BLE001 - restarting
        return False
    return st["serving"] and all(s["pid"] not in old for s in st["shards"])
