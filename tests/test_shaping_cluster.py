"""Adaptive shaping end to end: a Yahoo-like site answering ``421 4.7.0 [TSS04]`` is suspended
by the shipped rule (duration shortened by an operator's rules file), nothing connects to it
while the rule lasts (counted at the sink), an event says so, ``raymta status`` (the shards'
records) and the throttle show the rule, and once it runs out every message is delivered. The
suspension survives a SIGKILL of the site's throttle actor.

Real parts: one local Ray, the loopback DNS publishing MX records under yahoodns.net names, an
aiosmtpd sink on 127.0.0.61."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import pytest
import ray

from cluster.core.sites import throttle_actor_name
from tests.conftest import pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(240)

SINK = "127.0.0.61"
MX = "mta5.am0.yahoodns.net"
SITE = MX          # one MX host: the site key is its name
DOMAIN = "yahoo-like.test"
RULE_SECONDS = 6.0
TSS04 = (421, "4.7.0 [TSS04] Messages from 127.0.0.42 temporarily deferred due to user "
              "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes")


@pytest.fixture(scope="module")
def shaped(tmp_path_factory, dns_server):
    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.devservers import SmtpSink
    state = {"defer": True, "deferred": 0}

    def rcpt_reply(rcpt: str, attempt: int):
        if state["defer"]:
            state["deferred"] += 1
            return TSS04
        return None

    sink = SmtpSink(SINK, 0)
    sink.rcpt_reply = rcpt_reply
    sink.start()
    try:
        dns_server.add_a(MX, SINK)
        dns_server.add_mx(DOMAIN, [(10, MX)])
        tmp = tmp_path_factory.mktemp("shaping")
        # the operator's file: the shipped rule with a short duration (same name: replaces it)
        (tmp / "rules.toml").write_text(
            '[[rule]]\nname = "yahoo-tss04"\nprovider = "yahoo"\ncode = "4xx"\n'
            "text = '\\[TSS04\\]'\naction = \"suspend\"\n"
            f'duration = "{RULE_SECONDS:g}s"\n')
        shaping = parse_config({"shaping": {"rules_file": "rules.toml"}}, tmp).shaping
        base = pipeline_config(str(tmp / "spool"), dns_server.port, sink.port)
        # one connection to the site, so "no connection during the suspension" is sharp
        cfg = replace(base, shaping=shaping,
                      site_defaults=replace(base.site_defaults, max_connections=1))
        mc = MailCluster.connect(config=cfg, num_cpus=2)
        try:
            yield {"mc": mc, "sink": sink, "state": state, "cfg": cfg}
        finally:
            mc.close()
    finally:
        sink.stop()


def _rule_events(mc, since: int = 0) -> list[dict]:
    return [e for e in mc.events(0, limit=1_000_000)
            if e.get("rule") == "yahoo-tss04" and e["seq"] > since]


def _submit(mc, tag: str, n: int) -> set[str]:
    rcpts = [f"{tag}{i}@{DOMAIN}" for i in range(n)]
    res = mc.submit([{"sender": "s@origin.test", "recipients": [r],
                      "raw": raw_message(i, r, size=300)} for i, r in enumerate(rcpts)])
    assert all(r.accepted for r in res), [r.error for r in res]
    return set(rcpts)


def _throttle(mc, cfg):
    name = throttle_actor_name(SITE, False, cfg.delivery.fixed_throttles or 1)
    return name, ray.get_actor(name, namespace=cfg.cluster.namespace)


def _check_quiet(sink, fired_at: float, until: float) -> int:
    """Sessions the sink saw start while the rule was in force (after a short grace for the
    connection that got the 421). The log has closed sessions: wait for the open ones."""
    wait_for(lambda: sink.current_sessions == 0, 30, "the sink's sessions to close")
    return sum(1 for start, _end in sink.session_log if fired_at + 0.5 < start < until - 0.2)


def _suspension(mc, since: int) -> dict:
    evs = wait_for(lambda: [e for e in _rule_events(mc, since) if e["type"] == "SiteSuspended"],
                   60, "the yahoo-tss04 rule to fire")
    return evs[0]


def test_tss04_suspends_the_site_then_delivery_resumes(shaped):
    mc, sink, state, cfg = shaped["mc"], shaped["sink"], shaped["state"], shaped["cfg"]
    t0 = time.time()
    want = _submit(mc, "a", 30)
    ev = _suspension(mc, 0)
    fired_at = ev["ts"]
    assert ev["site"] == SITE and ev["until"] == pytest.approx(fired_at + RULE_SECONDS, abs=0.5)
    assert "[TSS04]" in ev["text"]
    # every shard recorded it (durable), which is what `raymta status` prints
    rows = mc.shaping()
    assert [(r["rule"], r["action"], r["key"]) for r in rows] == \
        [("yahoo-tss04", "suspend", SITE)]
    _name, th = _throttle(mc, cfg)
    st = ray.get(th.shaping_state.remote())
    assert [(a["rule"], a["key"]) for a in st["active"]] == [("yahoo-tss04", SITE)]
    assert st["fired"] == {"yahoo-tss04|yahoo": 1}
    stats = ray.get(th.stats.remote())
    assert stats["shaping_active"][0]["rule"] == "yahoo-tss04"
    state["defer"] = False         # the site would accept now: only the rule holds mail back
    deferred_at_fire = state["deferred"]
    wait_for(lambda: any(e["type"] == "SiteResumed" for e in _rule_events(mc)),
             RULE_SECONDS + 30, "the rule to expire")
    wait_for(lambda: want <= {r.rcpt_to for r in sink.received}, 60, "all mail delivered")
    quiet = _check_quiet(sink, fired_at, ev["until"])
    first_after = min(s for s, _ in sink.session_log if s > fired_at + 0.5)
    print(f"\nTSS04: fired {fired_at - t0:.2f}s after submit, {deferred_at_fire} replies "
          f"deferred; sessions started during the {RULE_SECONDS:g}s suspension: {quiet}; "
          f"first session {first_after - fired_at:.2f}s after firing; all {len(want)} "
          f"delivered {time.time() - t0:.1f}s after submit")
    assert quiet == 0
    assert first_after >= ev["until"] - 0.2
    assert mc.shaping() == []
    assert ray.get(th.shaping_state.remote())["active"] == []


def test_suspension_survives_sigkill_of_the_throttle(shaped):
    mc, sink, state, cfg = shaped["mc"], shaped["sink"], shaped["state"], shaped["cfg"]
    last = max(e["seq"] for e in _rule_events(mc))
    state["defer"] = True
    want = _submit(mc, "b", 20)
    ev = _suspension(mc, last)
    fired_at = ev["ts"]
    name, th = _throttle(mc, cfg)
    old_pid = ray.get(th.ping.remote())
    os.kill(old_pid, signal.SIGKILL)
    killed = time.time()
    state["defer"] = False
    new_pid = wait_for(lambda: ray.get(th.ping.remote(), timeout=10), 60, f"{name} restart")
    assert new_pid != old_pid
    st = ray.get(th.shaping_state.remote())
    # the restarted throttle took the rule back from the shards' records
    assert [(a["rule"], a["key"]) for a in st["active"]] == [("yahoo-tss04", SITE)]
    assert any(e["type"] == "recovered" for e in st["events"])
    restarted = time.time() - killed
    wait_for(lambda: len([e for e in _rule_events(mc, last) if e["type"] == "SiteResumed"])
             >= 1, RULE_SECONDS + 30, "the rule to expire after the restart")
    wait_for(lambda: want <= {r.rcpt_to for r in sink.received}, 60, "all mail delivered")
    quiet = _check_quiet(sink, fired_at, ev["until"])
    print(f"\nSIGKILL {name}: restarted and recovered in {restarted:.2f}s; sessions started "
          f"during the suspension: {quiet}; all {len(want)} delivered")
    assert quiet == 0
