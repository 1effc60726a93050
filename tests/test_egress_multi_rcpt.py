"""Several recipients of one message at one site go in one SMTP transaction (several RCPTs),
with a result per recipient, a refused RCPT included.

The client half against a real aiosmtpd sink (with and without PIPELINING); then the whole
path on an embedded Ray: a message to 6 recipients at one domain, one of whom the sink refuses,
arrives in one transaction and every recipient gets its own outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace

import pytest

from cluster.adapters.smtp import connect_site
from cluster.devservers import SmtpSink
from tests.conftest import pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(180)

HOST = "127.0.0.7"
BODY = b"From: a@src.test\r\nTo: x@dst.test\r\nSubject: many\r\n\r\n.dot line\r\nbody\r\n"


def _refuse(rcpt: str, attempt: int) -> tuple[int, str] | None:
    local = rcpt.split("@", 1)[0]
    if local.startswith("unknown"):
        return (550, f"5.1.1 <{rcpt}>: user unknown")
    if local.startswith("full"):
        return (452, "4.2.2 mailbox full")
    return None


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink(HOST, name="multi-rcpt").start()
    s.rcpt_reply = _refuse
    try:
        yield s
    finally:
        s.stop()


def _send_many(port: int, rcpts: list[str], *, then_single: bool = False) -> list:
    async def run() -> list:
        conn = await connect_site([(10, "mx.dst.test", [HOST])], port, ehlo_name="relay.test",
                                  tls="disabled", connect_timeout=5, command_timeout=10)
        out = await conn.send_many("s@src.test", rcpts, BODY)
        assert conn.usable and conn.sent == len(rcpts)
        if then_single:      # the connection is still good for another transaction
            out.append(await conn.send("s@src.test", "after@dst.test", BODY))
        await conn.close()
        return out
    return asyncio.run(run())


@pytest.mark.parametrize("pipelining", [True, False])
def test_one_transaction_with_a_result_per_recipient(sink, pipelining):
    sink.pipelining = pipelining
    rcpts = ["a@dst.test", "unknown1@dst.test", "b@dst.test", "full1@dst.test", "c@dst.test"]
    got = _send_many(sink.port, rcpts, then_single=True)
    assert [(a.phase, a.code) for a in got] == [
        ("data", 250), ("rcpt", 550), ("data", 250), ("rcpt", 452), ("data", 250),
        ("data", 250)]
    assert "user unknown" in got[1].text
    rec = sink.received
    assert [r.rcpt_to for r in rec] == ["a@dst.test", "b@dst.test", "c@dst.test",
                                        "after@dst.test"]
    # the three accepted recipients came in one transaction (one DATA: one reply id)
    assert len({(r.session_id, r.at) for r in rec[:3]}) == 1
    assert all(r.data == BODY for r in rec)
    assert sink.sessions_total == 1


@pytest.mark.parametrize("pipelining", [True, False])
def test_every_rcpt_refused_sends_no_message_and_keeps_the_connection(sink, pipelining):
    sink.pipelining = pipelining
    got = _send_many(sink.port, ["unknown1@dst.test", "full2@dst.test"], then_single=True)
    assert [(a.phase, a.code) for a in got] == [("rcpt", 550), ("rcpt", 452), ("data", 250)]
    assert [r.rcpt_to for r in sink.received] == ["after@dst.test"]


def test_a_refused_data_answers_for_every_accepted_recipient(sink):
    sink.data_reply = lambda first, attempt: (451, "4.3.0 try later")
    got = _send_many(sink.port, ["a@dst.test", "unknown@dst.test", "b@dst.test"])
    assert [(a.phase, a.code) for a in got] == [("data", 451), ("rcpt", 550), ("data", 451)]
    assert sink.received == []


# ---------------------------------------------------------------- the whole path
@pytest.fixture(scope="module")
def embedded(tmp_path_factory, dns_server):
    from cluster.client import MailCluster
    sink = SmtpSink(HOST, name="multi-rcpt-e2e").start()
    sink.rcpt_reply = _refuse
    try:
        dns_server.add_a("mx.many.test", HOST)
        dns_server.add_mx("many.test", [(10, "mx.many.test")])
        cfg = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port, sink.port)
        cfg = replace(cfg, delivery=replace(cfg.delivery, max_rcpts_per_transaction=4))
        mc = MailCluster.connect(config=cfg, num_cpus=2)
        try:
            yield mc, sink
        finally:
            mc.close()
    finally:
        sink.stop()


def test_a_message_to_several_recipients_goes_in_few_transactions(embedded):
    mc, sink = embedded
    rcpts = ["r1@many.test", "r2@many.test", "unknown9@many.test", "r3@many.test",
             "r4@many.test", "r5@many.test"]
    res = mc.submit([{"sender": "s@origin.test", "recipients": rcpts,
                      "raw": raw_message(1, rcpts[0])}])
    assert res[0].accepted
    ids = res[0].ids
    good = {r for r in rcpts if not r.startswith("unknown")}
    wait_for(lambda: {r.rcpt_to for r in sink.received} >= good, 60, "all delivered")
    wait_for(lambda: all(s and s["state"] in ("delivered", "bounced")
                         for s in mc.status(ids)), 30, "every recipient finished")
    states = {s["recipient"]: s["state"] for s in mc.status(ids)}
    assert states == {r: ("bounced" if r.startswith("unknown") else "delivered")
                      for r in rcpts}
    # 6 recipients, at most 4 per transaction: 2 transactions (one DATA each), not 6
    transactions = {(r.session_id, r.at) for r in sink.received if r.rcpt_to in good}
    assert len(transactions) == 2, sorted(transactions)
    assert sorted(r.rcpt_to for r in sink.received) == sorted(good)   # each exactly once
