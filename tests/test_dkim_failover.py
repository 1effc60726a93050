"""DKIM across a leader failover and a restored backup (issue 11: "exactly the bytes delivered
are the bytes signed, on every attempt: retries, MX failover and a restored backup still carry
a valid signature").

Keys: RSA-2048 and Ed25519 for dkf.test (a dual signature), published in the loopback DNS.
Cluster A queues signed messages (one with three recipients) for a site that answers 451, so
they stay queued; a backup is taken; the shard leader is SIGKILLed; once its successor serves
the site takes mail, and every copy delivered must verify with dkimpy (both signatures, keys
from the loopback DNS) and, where installed, Perl's Mail::DKIM. Cluster A goes away; a fresh
cluster B (same keys, new spool) restores the backup and delivers the same messages again:
those copies verify too.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
from collections import Counter

import pytest
import ray
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from cluster.adapters.dkim_keys import dns_record
from cluster.config import parse_config
from tests.conftest import pipeline_config, wait_for
from tests.dkim_helpers import (
    dkimpy_verify_all,
    have_perl_dkim,
    loopback_dnsfunc,
    perl_verify,
    publish,
    write_key,
)

pytestmark = pytest.mark.timeout(400)

DOMAIN = "dkf.test"
SINK = "127.0.0.23"
HOLD = {"on": True}


def _hold(rcpt: str, attempt: int):
    return (451, "4.3.0 try again later") if HOLD["on"] else None


def _msg(i: int, to: str) -> bytes:
    return (f"From: News <news@{DOMAIN}>\r\nTo: {to}\r\nSubject: failover {i}\r\n"
            f"Date: Sat, 28 Nov 2026 05:00:00 +0000\r\nMessage-ID: <f{i}@{DOMAIN}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"Hello {to},  message {i}.\t\r\nGrüße\r\n.dot line\r\n\r\n").encode()


def _verify_all(copies, dns_port: int) -> None:
    dnsfunc = loopback_dnsfunc(dns_port)
    for rcpt, data in copies:
        assert data.count(b"DKIM-Signature:") == 2, rcpt
        assert dkimpy_verify_all(data, dnsfunc) == [True, True], rcpt
    if have_perl_dkim():
        for rcpt, data in copies[:3]:
            assert ("rsa-sha256", "pass") in perl_verify(data, dns_port), rcpt


def test_signed_mail_verifies_after_a_leader_sigkill_and_after_a_restored_backup(
        tmp_path, dns_server):
    from cluster.client import MailCluster
    from cluster.devservers import SmtpSink

    sink = SmtpSink(SINK).start()
    try:
        sink.rcpt_reply = _hold
        dns_server.add_a("mx.held.dkf.test", SINK)
        dns_server.add_mx("held.dkf.test", [(10, "mx.held.dkf.test")])
        rk = rsa.generate_private_key(65537, 2048)
        ek = ed25519.Ed25519PrivateKey.generate()
        rfile = write_key(tmp_path / "r1.rsa.pem", rk)
        efile = write_key(tmp_path / "e1.ed25519.pem", ek)
        publish(dns_server, "r1", DOMAIN, dns_record(rk))
        publish(dns_server, "e1", DOMAIN, dns_record(ek))
        dk = parse_config({"dkim": {"key": [
            {"domain": DOMAIN, "selector": "r1", "algorithm": "rsa", "key_file": str(rfile)},
            {"domain": DOMAIN, "selector": "e1", "algorithm": "ed25519",
             "key_file": str(efile)}]}}).dkim
        base = pipeline_config(str(tmp_path / "spool-a"), dns_server.port, sink.port)
        cfg = dataclasses.replace(base, dkim=dk, queue=dataclasses.replace(base.queue,
                                                                            shards=1))
        group = [f"g{k}@held.dkf.test" for k in range(3)]
        msgs = [{"sender": f"bounces@{DOMAIN}", "recipients": [f"r{i}@held.dkf.test"],
                 "raw": _msg(i, f"r{i}@held.dkf.test")} for i in range(12)]
        msgs.append({"sender": f"bounces@{DOMAIN}", "recipients": group,
                     "raw": _msg(99, "Undisclosed recipients:;")})
        want = {f"r{i}@held.dkf.test" for i in range(12)} | set(group)

        # ---- cluster A: queued, backed up, leader SIGKILLed, then delivered
        mc = MailCluster.connect(config=cfg, num_cpus=2)
        try:
            res = mc.submit(msgs)
            assert all(r.accepted for r in res), [r.error for r in res]
            ids = [i for r in res for i in r.ids]
            wait_for(lambda: all(s["state"] == "deferred" and s["attempts"] >= 1
                                 for s in mc.status(ids)), 60, "every message tried, deferred")
            backup = mc.backup(tmp_path / "backups")
            assert backup["messages"] == len(want)
            h = mc.handles["coordinator:0"]
            old = ray.get(h.ping.remote(), timeout=60)
            os.kill(old, signal.SIGKILL)
            assert wait_for(lambda: ray.get(h.ping.remote(), timeout=10), 120,
                            "the leader's restart") != old
            wait_for(lambda: mc.stats()["serving"], 120, "the shard serving again")
            assert mc.stats()["shards"][0]["recovered"]["epoch"] > 1
            HOLD["on"] = False
            wait_for(lambda: Counter(s["state"] for s in mc.status(ids)) ==
                     {"delivered": len(ids)}, 90, "every message delivered after the kill")
        finally:
            mc.close()
        after_kill = [(r.rcpt_to, r.data) for r in sink.received if r.rcpt_to in want]
        assert Counter(r for r, _ in after_kill) == Counter(want)   # each once
        _verify_all(after_kill, dns_server.port)
        # one body for the three recipients: the same body hashes in their signatures (their
        # t= may differ: the recipients can leave in different dispatch rounds after a kill)
        assert len({tuple(re.sub(rb"\s+", b"", bh) for bh in re.findall(rb"bh=([^;]+);", d))
                    for r, d in after_kill if r in group}) == 1

        # ---- cluster B: a fresh spool, the backup restored, delivered again
        before = len(sink.received)
        cfg_b = cfg.with_spool(str(tmp_path / "spool-b"))
        mc = MailCluster.connect(config=cfg_b, num_cpus=2)
        try:
            out = mc.restore(backup["directory"])
            assert out["restored"] == len(want), out
            wait_for(lambda: Counter(s["state"] for s in mc.status(ids)) ==
                     {"delivered": len(ids)}, 90, "every restored message delivered")
        finally:
            mc.close()
        restored = [(r.rcpt_to, r.data) for r in sink.received[before:] if r.rcpt_to in want]
        assert Counter(r for r, _ in restored) == Counter(want)
        _verify_all(restored, dns_server.port)
    finally:
        HOLD["on"] = True
        sink.stop()
