""""Try again" is a flag, not a text: a shard without a quorum answers retryable (and says when
the outcome is unknown), the SMTP ingress turns that into a 4xx, never a 5xx, and
``MailCluster.submit`` retries with the same ids, so a message is queued once.

Real parts: a local Ray with one shard of three copies, two of them SIGSTOPped (a quorum of
three needs two), an SMTP sink on loopback, the SMTP ingress spoken to with smtplib.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from tests.conftest import pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("retryable,unknown,reply", [
    (True, False, "451 4.3.0"), (True, True, "451 4.3.0"), (False, False, "554 5.6.0")])
def test_the_smtp_reply_follows_the_flag_not_the_text(retryable, unknown, reply):
    from cluster.ingress_smtp import reply_for_refusal
    # the text of a permanent refusal that happens to mention a full queue stays permanent,
    # and a retryable one with a text that does not is still a 4xx
    text = "queue full: but this is a bad message" if not retryable else "shard 0: no quorum"
    res = SimpleNamespace(error=text + "\r\nX", retryable=retryable, outcome_unknown=unknown)
    out = reply_for_refusal(res)
    assert out.startswith(reply) and "\r" not in out and "\n" not in out


def test_no_quorum_is_retryable_and_a_retried_submit_queues_once(tmp_path, dns_server):
    import ray

    from cluster.client import MailCluster
    from cluster.devservers import SmtpSink
    from cluster.ingress_smtp import SmtpIngress

    sink = SmtpSink("127.0.0.2").start()
    dns_server.add_a("mx.retry.test", "127.0.0.2")
    dns_server.add_mx("retry.test", [(10, "mx.retry.test")])
    stopped: list[int] = []
    base = pipeline_config(str(tmp_path), dns_server.port, sink.port)
    cfg = replace(base, queue=replace(base.queue, shards=1),
                  replication=replace(base.replication, ack_timeout=2.0))
    ns = cfg.cluster.namespace

    def msg(i: int) -> dict:
        r = f"q{i}@retry.test"
        return {"sender": "s@origin.test", "recipients": [r], "raw": raw_message(i, r)}

    try:
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]
        with MailCluster.connect(config=cfg, num_cpus=2) as mc, \
                SmtpIngress(mc, "127.0.0.1", port):
            assert mc.submit([msg(0)])[0].accepted
            for k in (1, 2):
                pid = ray.get(ray.get_actor(f"replica:0:{k}", namespace=ns).ping.remote())
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            # the batch reaches the leader, which cannot get it onto a quorum in time: the
            # outcome is unknown (its frames are on the leader's disk), and it says so
            first = mc.submit([msg(1)], retry_for=0)[0]
            assert not first.accepted and first.retryable and first.outcome_unknown, first
            assert len(first.ids) == 1 and "outcome unknown" in first.error
            # while the shard is stalled, new calls are refused at once, retryable, and
            # known not to be queued
            t = time.time()
            second = mc.submit([msg(2)], retry_for=0)[0]
            assert time.time() - t < 1.5
            assert second.retryable and not second.outcome_unknown and second.ids == []
            # the SMTP ingress: 451, so the sending MTA keeps the message
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                c.ehlo("client.test")
                c.mail("s@origin.test")
                c.rcpt("q3@retry.test")
                code, text = c.data(raw_message(3, "q3@retry.test"))
            assert code == 451 and b"4.3.0" in text, (code, text)
            # a submit that retries by itself: the copies come back while it waits
            out: list = []
            th = threading.Thread(target=lambda: out.append(
                mc.submit([msg(4)], retry_for=60)[0]))
            th.start()
            time.sleep(3.0)
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            stopped = []
            th.join(90)
            assert out and out[0].accepted and not out[0].duplicate, out
            # the message whose outcome was unknown did commit (it was on the leader's
            # disk); its id says so
            wait_for(lambda: mc.status(first.ids[0]) is not None, 30, "the unknown one found")
            want = {"q0@retry.test", "q1@retry.test", "q4@retry.test"}
            wait_for(lambda: want <= {r.rcpt_to for r in sink.received}, 60, "delivered")
            assert mc.wait_until_idle(timeout=60)
            got = [r.rcpt_to for r in sink.received]
            assert sorted(got) == sorted(want), got     # once each; q2, q3 never queued
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        sink.stop()
