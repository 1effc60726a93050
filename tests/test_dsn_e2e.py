"""DSNs to the envelope sender, end to end (issue 12, "DSN to the sender").

Real parts: a local Ray with one shard of three copies, the SMTP ingress (plain, loopback)
taking mail with smtplib, the loopback DNS, and two SMTP sinks on one port: 127.0.0.21 is the
recipients' MX (550 for ``unknown*``, 451 for ``slow*``), 127.0.0.22 the envelope senders'
(where DSNs arrive). Every DSN that arrives is read with raymta's own parser and with the
email package, and tied to the message it reports on by its queue id.
"""

from __future__ import annotations

import email
import os
import signal
import smtplib
import time
from dataclasses import replace
from email import policy

import pytest
import ray

from cluster.core.dsn import parse_message
from tests.conftest import pipeline_config, wait_for

pytestmark = pytest.mark.timeout(300)

RCPT_MX = "127.0.0.21"
SENDER_MX = "127.0.0.22"
HELD = {"on": True}   # the sender MX answers 451 to held@ while this is on


def _rcpt_faults(rcpt: str, attempt: int):
    local = rcpt.split("@", 1)[0].lower()
    if local.startswith("unknown"):
        return (550, f"5.1.1 <{rcpt}>: Recipient address rejected: User unknown")
    if local.startswith("slow"):
        return (451, "4.3.0 mailbox temporarily unavailable, try again")
    return None


def _sender_faults(rcpt: str, attempt: int):
    if rcpt.lower().startswith("held@") and HELD["on"]:
        return (451, "4.2.0 try again later")
    return None


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.devservers import SinkGroup
    from cluster.ingress_smtp import SmtpIngress

    sinks = SinkGroup([RCPT_MX, SENDER_MX]).start()
    sinks.by_address(RCPT_MX).rcpt_reply = _rcpt_faults
    sinks.by_address(SENDER_MX).rcpt_reply = _sender_faults
    dns_server.add_a("mx.fail.dsn.test", RCPT_MX)
    dns_server.add_mx("fail.dsn.test", [(10, "mx.fail.dsn.test")])
    dns_server.add_a("mx.origin.dsn.test", SENDER_MX)
    dns_server.add_mx("origin.dsn.test", [(10, "mx.origin.dsn.test")])
    base = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port, sinks.port,
                           max_age="60s")
    cfg = replace(base, queue=replace(base.queue, shards=1),
                  dsn=parse_config({"dsn": {"hostname": "mx.raymta.test"}}).dsn)
    mc = MailCluster.connect(config=cfg, num_cpus=2)
    try:
        with SmtpIngress(mc, "127.0.0.1", 0) as ing:
            yield {"mc": mc, "sinks": sinks, "port": ing.addresses[0].port, "cfg": cfg}
    finally:
        mc.close()
        sinks.stop()


def smtp_send(env, sender: str, rcpt: str | list[str], subject: str) -> str:
    """Submit over the SMTP ingress (one message, one or several recipients); returns the
    queue id from the 250 reply."""
    rcpts = [rcpt] if isinstance(rcpt, str) else rcpt
    data = (f"From: <{sender or 'nobody@origin.dsn.test'}>\r\nTo: <{rcpts[0]}>\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{subject}@origin.dsn.test>\r\n\r\n"
            "a body that a DSN never returns\r\n").encode()
    with smtplib.SMTP("127.0.0.1", env["port"], timeout=30) as c:
        c.ehlo("client.test")
        code, text = c.mail(sender)
        assert code == 250, text
        for r in rcpts:
            code, text = c.rcpt(r)
            assert code == 250, text
        code, text = c.data(data)
    assert code == 250, text
    return text.decode().split("queued as ")[1].split()[0]


def dsns_to(env, sender: str) -> list:
    return [r for r in env["sinks"].by_address(SENDER_MX).received if r.rcpt_to == sender]


def check_dsn(got, *, orig_id: str, rcpt: str | list[str], status: str, subject: str) -> None:
    assert got.mail_from == "<>"          # a DSN goes out from the null sender
    rep = parse_message(got.data)
    assert rep.kind == "dsn" and rep.reason == "rfc3464", rep
    assert rep.raymta_id == orig_id and rep.reporting_mta == "mx.raymta.test"
    assert rep.original_message_id == f"<{subject}@origin.dsn.test>"
    rcpts = [rcpt] if isinstance(rcpt, str) else rcpt
    assert sorted((r.recipient, r.action, r.status) for r in rep.recipients) == \
        sorted((x, "failed", status) for x in rcpts)
    msg = email.message_from_bytes(got.data, policy=policy.SMTP)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert str(msg["From"]).endswith("<MAILER-DAEMON@mx.raymta.test>")
    assert [p.get_content_type() for p in msg.iter_parts()] == \
        ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert b"a body that a DSN never returns" not in got.data


def test_a_550_sends_one_dsn_to_the_envelope_sender(env):
    mid = smtp_send(env, "alice@origin.dsn.test", "unknown1@fail.dsn.test", "s550")
    [got] = wait_for(lambda: dsns_to(env, "alice@origin.dsn.test"), 60, "the DSN")
    check_dsn(got, orig_id=mid, rcpt="unknown1@fail.dsn.test", status="5.1.1", subject="s550")
    diag = parse_message(got.data).recipients[0].diagnostic
    assert diag.startswith("550 5.1.1 <unknown1@fail.dsn.test>"), diag
    assert env["mc"].status(mid)["state"] == "bounced"


def test_expiry_sends_a_dsn_when_an_api_submitter_asks(env):
    mc = env["mc"]
    sub = {"sender": "carol@origin.dsn.test", "recipients": ["slow1@fail.dsn.test"],
           "raw": b"From: <carol@origin.dsn.test>\r\nTo: <slow1@fail.dsn.test>\r\n"
                  b"Subject: exp\r\nMessage-ID: <exp@origin.dsn.test>\r\n\r\nbody\r\n",
           "max_age": 3, "dsn": True}
    [res] = mc.submit(sub)
    assert res.accepted, res.error
    [got] = wait_for(lambda: dsns_to(env, "carol@origin.dsn.test"), 60, "the expiry DSN")
    check_dsn(got, orig_id=res.ids[0], rcpt="slow1@fail.dsn.test", status="4.3.0",
              subject="exp")
    assert b"Subject: Undelivered Mail: delivery time expired" in got.data
    assert mc.status(res.ids[0])["state"] == "expired"


def test_no_dsn_to_the_null_sender_nor_by_default_for_the_api(env):
    mc = env["mc"]
    mid = smtp_send(env, "", "unknown2@fail.dsn.test", "null")
    [res] = mc.submit({"sender": "dave@origin.dsn.test", "recipients": ["unknown3@fail.dsn.test"],
                       "raw": b"From: <dave@origin.dsn.test>\r\nSubject: api\r\n\r\nx\r\n"})
    assert res.accepted
    wait_for(lambda: all(s and s["state"] == "bounced" for s in mc.status([mid, res.ids[0]])),
             60, "both bounced")
    time.sleep(2)   # a DSN would be queued in the same commit round
    bounced = {mid, res.ids[0]}
    evs = mc.events(0)
    assert {e["id"] for e in evs if e["type"] == "Bounce"} >= bounced
    # no message from <> was queued about either, and none reached dave
    dsn_rcpts = {e["recipient"] for e in evs if e["type"] == "Reception" and e["sender"] == ""}
    assert "dave@origin.dsn.test" not in dsn_rcpts and "" not in dsn_rcpts
    assert not dsns_to(env, "dave@origin.dsn.test")


def test_a_leader_sigkill_after_the_bounce_neither_loses_nor_doubles_the_dsn(env):
    mc = env["mc"]
    h = mc.handles["coordinator:0"]
    # two recipients that fail together: one DSN about both, once, across the kill
    both = ["unknown4@fail.dsn.test", "unknown4b@fail.dsn.test"]
    mid = smtp_send(env, "held@origin.dsn.test", both, "kill")

    def dsn_receptions():
        return [e for e in mc.events(0) if e["type"] == "Reception" and e["sender"] == ""
                and e["recipient"] == "held@origin.dsn.test"]
    # the bounce is applied and its DSN queued (the sender's MX answers 451 to it for now)
    wait_for(lambda: dsn_receptions(), 60, "the DSN queued")
    wait_for(lambda: [e for e in mc.events(0) if e["type"] == "TransientFailure"
                      and e["recipient"] == "held@origin.dsn.test"], 60, "a 451 for the DSN")
    old = ray.get(h.ping.remote(), timeout=60)
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: ray.get(h.ping.remote(), timeout=10), 120, "the leader's restart")
    assert new != old
    wait_for(lambda: mc.stats()["serving"], 120, "the shard serving again")
    HELD["on"] = False
    [got] = wait_for(lambda: dsns_to(env, "held@origin.dsn.test"), 60, "the DSN delivered")
    check_dsn(got, orig_id=mid, rcpt=both, status="5.1.1", subject="kill")
    time.sleep(3)   # a second DSN, if one were made, would arrive within a retry or two
    assert len(dsns_to(env, "held@origin.dsn.test")) == 1
    assert len(dsn_receptions()) == 1
    assert mc.stats()["shards"][0]["recovered"]["epoch"] > 1


def test_recipients_of_one_message_that_fail_together_get_one_dsn(env):
    """Three recipients of one SMTP message are refused (550): the sender gets one DSN with
    a per-recipient group for each, not three DSNs."""
    rcpts = [f"unknown{k}@fail.dsn.test" for k in (5, 6, 7)]
    mid = smtp_send(env, "erin@origin.dsn.test", rcpts, "three")
    [got] = wait_for(lambda: dsns_to(env, "erin@origin.dsn.test"), 60, "the DSN")
    check_dsn(got, orig_id=mid, rcpt=rcpts, status="5.1.1", subject="three")
    assert b"could not be delivered to 3 of its recipients" in got.data
    time.sleep(2)   # a second DSN would be queued in the same commit round
    assert len(dsns_to(env, "erin@origin.dsn.test")) == 1
    [ev] = [e for e in env["mc"].events(0) if e["type"] == "Delivery"
            and e["recipient"] == "erin@origin.dsn.test"]
    assert len(set(ev["dsn_of"])) == 3 and mid in ev["dsn_of"]
    assert {mc_state["state"] for mc_state in env["mc"].status(ev["dsn_of"])} == {"bounced"}


def test_a_suppressed_sender_gets_no_dsn_and_a_suppressed_event(env):
    mc = env["mc"]
    assert mc.suppress("frank@origin.dsn.test", reason="complaint")["added"] == 1
    mid = smtp_send(env, "frank@origin.dsn.test", "unknown8@fail.dsn.test", "supp")
    [ev] = wait_for(lambda: [e for e in mc.events(0) if e["type"] == "Suppressed"
                             and e.get("dsn_of") == [mid]], 60, "the DSN's Suppressed event")
    assert ev["recipient"] == "frank@origin.dsn.test" and ev["sender"] == ""
    assert ev["text"].startswith("DSN not sent: frank@origin.dsn.test is suppressed: "
                                 "complaint since ")
    assert mc.status(mid)["state"] == "bounced"
    time.sleep(2)
    assert not dsns_to(env, "frank@origin.dsn.test")
