"""IP warm-up end to end: a cold egress source sends exactly its daily cap, the rest of its
pool's mail overflows to a warm source (or, with ``when_capped = "hold"``, waits without an
attempt), and a SIGKILL of the shard leaders, which hold the counts, does not reset them.

Real parts: one local Ray with three egress sources bound to their own 127.0.0.x, the loopback
DNS, an aiosmtpd sink on 127.0.0.73 that records each session's peer address (the address says
which source sent the message)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from collections import Counter
from dataclasses import replace

import pytest
import ray

from tests.conftest import pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(240)

SINK = "127.0.0.73"
SOURCES = {"cold": "127.0.0.71", "warm": "127.0.0.72", "coldhold": "127.0.0.74"}
ADDR_SOURCE = {a: n for n, a in SOURCES.items()}
CAP = 20          # cold's cap today, for sites of no listed provider
HOLD_CAP = 10     # coldhold's


@pytest.fixture(scope="module")
def warming(tmp_path_factory, dns_server):
    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.devservers import SmtpSink
    sink = SmtpSink(SINK, 0).start()
    try:
        dns_server.add_a("mx.warmup.test", SINK)
        dns_server.add_mx("warmup.test", [(10, "mx.warmup.test")])
        dns_server.add_mx("onlycold.test", [(10, "mx.onlycold.test")])
        dns_server.add_a("mx.onlycold.test", SINK)
        today = dt.datetime.now(dt.UTC).date().isoformat()
        base = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port, sink.port)
        raw = {"egress": [{"name": n, "bind_address": a, "ehlo_name": f"{n}.relay.test",
                           **({"warmup": {"cold": "new-ip", "coldhold": "slow"}[n]}
                              if n != "warm" else {})} for n, a in SOURCES.items()],
               "warmup": {"new-ip": {"start": today, "when_capped": "overflow",
                                     "days": [{"day": 1, "default": CAP, "gmail": 5},
                                              {"day": 10, "default": 500, "gmail": 100}]},
                          "slow": {"start": today, "when_capped": "hold",
                                   "days": [{"day": 1, "default": HOLD_CAP}]}},
               "egress_pool": [{"name": "news", "sources": ["cold", "warm"],
                                "sender_domains": ["news.example"]},
                               {"name": "held", "sources": ["coldhold", "warm"],
                                "sender_domains": ["hold.example"]}],
               # a site only the cold source may carry (mail of no pool)
               "site": [{"domain": "onlycold.test", "sources": ["cold"]}]}
        parsed = parse_config(raw)
        cfg = replace(base, egress=parsed.egress, egress_pools=parsed.egress_pools,
                      warmups=parsed.warmups, sites=base.sites + parsed.sites)
        mc = MailCluster.connect(config=cfg, num_cpus=2)
        try:
            yield {"mc": mc, "sink": sink, "cfg": cfg}
        finally:
            mc.close()
    finally:
        sink.stop()


def _submit(mc, sender: str, tag: str, n: int, domain: str = "warmup.test") -> list[str]:
    msgs = [{"sender": sender, "recipients": [f"{tag}{i}@{domain}"],
             "raw": raw_message(i, f"{tag}{i}@{domain}", size=300)} for i in range(n)]
    res = mc.submit(msgs)
    assert all(r.accepted for r in res)
    return [i for r in res for i in r.ids]


def _by_source(sink, tag: str) -> Counter:
    return Counter(ADDR_SOURCE.get(r.peer[0], r.peer[0]) for r in sink.received
                   if r.rcpt_to.startswith(tag))


def _pid(h) -> int:
    return ray.get(h.ping.remote(), timeout=60)


def test_cold_source_sends_its_cap_and_overflows_and_a_kill_does_not_reset_it(warming):
    mc, sink = warming["mc"], warming["sink"]
    _submit(mc, "s@news.example", "ov", 3 * CAP)
    wait_for(lambda: sum(_by_source(sink, "ov").values()) >= 3 * CAP, 60, "every message sent")
    got = _by_source(sink, "ov")
    print(f"\nbefore the kill: {dict(got)}")
    assert got["cold"] == CAP and got["warm"] == 2 * CAP, got
    rows = {(w["source"], w["provider"]): w for w in mc.warmup()}
    assert rows[("cold", "default")]["count"] == CAP and rows[("cold", "default")]["cap"] == CAP
    assert rows[("cold", "default")]["day"] == 1
    from cluster.cli import warmup_lines
    lines = warmup_lines(mc.warmup())
    assert f"warm-up cold (new-ip): day 1 of 10, today default {CAP}/{CAP}, gmail 0/5 " \
           "(at the cap: overflow)" in lines, lines
    types = Counter(e["type"] for e in mc.events(0, limit=100_000)
                    if e.get("source") == "cold")
    assert types["WarmupCapReached"] >= 1 and types["WarmupOverflow"] >= 1, types
    # the shard leaders hold the counts: SIGKILL them all; Ray restarts them from their logs
    for h in mc.coordinators:
        os.kill(_pid(h), signal.SIGKILL)
    killed = time.time()
    wait_for(lambda: mc.stats()["serving"], 90, "the shards to serve again", poll=0.5)
    print(f"shards serving again {time.time() - killed:.1f}s after the SIGKILL")
    _submit(mc, "s@news.example", "ak", 2 * CAP)
    wait_for(lambda: sum(_by_source(sink, "ak").values()) >= 2 * CAP, 60, "sent after the kill")
    after = _by_source(sink, "ak")
    print(f"after the kill: {dict(after)}")
    assert after["cold"] == 0 and after["warm"] == 2 * CAP, after
    # the durable count survived on the source's home shard
    assert {(w["source"], w["provider"]): w["count"] for w in mc.warmup()}[
        ("cold", "default")] == CAP


def test_hold_keeps_the_rest_waiting_without_an_attempt(warming):
    mc, sink = warming["mc"], warming["sink"]
    ids = _submit(mc, "s@hold.example", "hd", 6 * HOLD_CAP)

    def settled():
        st = [s for s in mc.status(ids) if s]
        held = [s for s in st if s["state"] == "deferred"]
        return len(held) + sum(_by_source(sink, "hd").values()) == len(ids) and held

    held = wait_for(settled, 60, "every message sent or held")
    got = _by_source(sink, "hd")
    print(f"\nhold: {dict(got)}, held {len(held)}")
    assert got["coldhold"] == HOLD_CAP, got
    assert got["warm"] + HOLD_CAP + len(held) == len(ids)
    # held: not an attempt, not a failure, waiting for tomorrow (UTC)
    tomorrow = (int(time.time() // 86400) + 1) * 86400
    assert all(s["attempts"] == 0 and s["next_attempt"] == tomorrow for s in held), held[:3]
    evs = [e for e in mc.events(0, limit=100_000) if e.get("id") in set(ids)]
    assert not [e for e in evs if e["type"] in ("TransientFailure", "Bounce")]
    assert any(e["type"] == "WarmupHold" and e["source"] == "coldhold"
               for e in mc.events(0, limit=100_000))


def test_mail_of_no_pool_waits_when_its_only_source_is_capped(warming):
    """After the first test, the cold source has sent its 20 today; a site that only it may
    carry gets mail of no pool: nothing else may send it, so it waits (overflow has nowhere
    to go), without an attempt."""
    mc, sink = warming["mc"], warming["sink"]

    def cold_count() -> int:
        return {(w["source"], w["provider"]): w["count"] for w in mc.warmup()}[
            ("cold", "default")]

    if cold_count() < CAP:   # run alone: use the cold source's cap up first
        _submit(mc, "s@news.example", "fill", 3 * CAP)
        wait_for(lambda: cold_count() == CAP and sum(_by_source(sink, "fill").values()) ==
                 3 * CAP, 60, "the cold source's cap to be used up")
    ids = _submit(mc, "s@plain.example", "np", 10, domain="onlycold.test")
    held = wait_for(lambda: [s for s in mc.status(ids) if s and s["state"] == "deferred"
                             and s["attempts"] == 0] if all(
        s and s["state"] == "deferred" for s in mc.status(ids)) else None, 30,
        "the site's mail to wait")
    tomorrow = (int(time.time() // 86400) + 1) * 86400
    assert len(held) == 10 and all(h["next_attempt"] == tomorrow for h in held), held[:2]
    assert not _by_source(sink, "np")


def test_warmup_reserve_checks_what_a_caller_sends(warming):
    # a Ray caller reaches the leader's method directly: it is checked there, and a bad call
    # neither grants anything nor stops the shard
    h = warming["mc"].coordinators[0]
    for args in (("cold", "default", "1", 5), ("cold", "default", 1, -5), (7, "default", 1, 5),
                 ("cold", "default", 1, 10**9)):
        with pytest.raises(ray.exceptions.RayTaskError, match="warmup_reserve"):
            ray.get(h.warmup_reserve.remote(*args), timeout=60)
    assert warming["mc"].stats()["serving"]
