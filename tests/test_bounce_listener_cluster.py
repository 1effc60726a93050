"""The bounce/FBL listener on a real local Ray with two shards, fed real reports over SMTP.

raymta sends each message with its VERP return path (the sink sees it and it decodes to the
message id); real DSNs and ARF reports from the shared corpora, rewritten to name those
messages, go to the listener (smtplib and Debian's swaks) on 127.0.0.61: a hard DSN gives an
OOBBounce event and suppresses the recipient on every shard; an ARF complaint to the FBL address
gives a Complaint and suppresses; a forged return path is refused at RCPT; a soft bounce is
recorded without suppression; an auto-reply, garbage, a truncated report, a bounce of a bounce,
a report for an unknown message and an enormous one record nothing; the listener SIGKILLed is
restarted by Ray and works again.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import corpus, pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(400)

HOST = "127.0.0.61"          # the listener (the return-path domain's MX)
SINK = "127.0.0.2"
DOMAIN = "bounce.raymta.test"
FBL = "fbl@bounce.raymta.test"
SECRET = "verp-secret-for-tests-0123456789"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.devservers import SinkGroup
    port, http_port = _free_port(HOST), _free_port(HOST)
    parsed = parse_config({"bounce": {
        "domain": DOMAIN, "keys": [{"id": "k1", "secret": SECRET}], "fbl_address": FBL,
        "listen_host": HOST, "listen_port": port, "max_message_size": "2MB",
        "report_timeout": "20s", "http_port": http_port},
        "unsubscribe": [{"domain": "news.example", "url_base": "https://news.example/u/",
                         "keys": [{"id": "u1", "secret": "unsubscribe-secret-0123456789"}]}]})
    with SinkGroup([SINK]) as sinks:
        dns_server.add_a("mx.bnc.test", SINK)
        dns_server.add_mx("bnc.test", [(10, "mx.bnc.test")])
        cfg = replace(pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port,
                                      sinks.port), bounce=parsed.bounce,
                      unsubscribe=parsed.unsubscribe)
        with MailCluster.connect(config=cfg, num_cpus=2) as mc:
            yield {"mc": mc, "sinks": sinks, "cfg": cfg, "port": port, "http_port": http_port}


def _deliver(env: dict[str, Any], rcpt: str, sender: str = "news@origin.test",
             i: int = 0, received: list[Any] | None = None) -> tuple[str, str]:
    """Send one message through raymta; (its id, the MAIL FROM the sink saw)."""
    mc, sinks = env["mc"], env["sinks"]
    r = mc.submit([{"sender": sender, "recipients": [rcpt], "raw": raw_message(i, rcpt)}])[0]
    assert r.accepted, r.error
    mid = r.ids[0]
    wait_for(lambda: (mc.status(mid) or {}).get("state") == "delivered", 60, f"{rcpt} sent")
    got = [x for x in sinks.received if x.rcpt_to == rcpt]
    assert len(got) == 1
    if received is not None:
        received.append(got[0])
    return mid, got[0].mail_from


def _send(env: dict[str, Any], rcpt: str, data: bytes, *, sender: str = "",
          size: int | None = None) -> tuple[str, int, str]:
    with smtplib.SMTP(HOST, env["port"], timeout=60) as s:
        s.ehlo("mx.remote.test")
        code, msg = s.mail(sender, [f"SIZE={size}"] if size else [])
        if code != 250:
            return "mail", code, msg.decode()
        code, msg = s.rcpt(rcpt)
        if code != 250:
            return "rcpt", code, msg.decode()
        try:
            code, msg = s.data(data)
        except smtplib.SMTPDataError as e:
            return "data", e.smtp_code, e.smtp_error.decode()
        return "data", code, msg.decode()


def _suppressed_everywhere(mc: Any, address: str) -> list[list[dict]]:
    import ray
    return [ray.get(c.suppressions.remote("", 10, address), timeout=60)
            for c in mc.coordinators]


def _events(mc: Any, kind: str, mid: str) -> list[dict[str, Any]]:
    return [e for e in mc.events(0) if e["type"] == kind and e.get("id") == mid]


def _rewrite(path: Path, pairs: dict[str, str]) -> bytes:
    """A corpus file with its addresses replaced, in CRLF lines as SMTP carries them."""
    data = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    for old, new in pairs.items():
        data = data.replace(old.encode(), new.encode())
    return data


def _listener(mc: Any) -> Any:
    return next(h for n, h in mc.handles.items() if n.startswith("bounce:"))


# ------------------------------------------------------------------------------------ tests

def test_relay_sends_with_the_verp_return_path_and_keeps_the_sender(env):
    from cluster.core.verp import decode
    mc = env["mc"]
    mid, mail_from = _deliver(env, "verp1@bnc.test")
    keys = env["cfg"].bounce.keys
    r = decode(mail_from, keys, prefix="b", domain=DOMAIN)
    assert r.ok and r.message_id == mid, (mail_from, r)
    assert mail_from.startswith("b-k1") and mail_from.endswith("@" + DOMAIN)
    recv = [e for e in mc.events(0) if e["type"] == "Reception" and e["id"] == mid]
    assert recv and recv[0]["sender"] == "news@origin.test"     # events keep the submitted one
    # a batch to one site goes over pipelined connections (each next envelope written behind
    # the previous body): every message still carries its own return path
    rcpts = [f"batch{k}@bnc.test" for k in range(30)]
    res = mc.submit([{"sender": "news@origin.test", "recipients": [r],
                      "raw": raw_message(100 + k, r)} for k, r in enumerate(rcpts)])
    assert all(x.accepted for x in res)
    ids = {r: x.ids[0] for r, x in zip(rcpts, res)}
    assert mc.wait_until_idle(timeout=60)
    seen = {x.rcpt_to: x.mail_from for x in env["sinks"].received if x.rcpt_to in ids}
    assert len(seen) == 30
    sessions = {x.session_id for x in env["sinks"].received if x.rcpt_to in ids}
    assert len(sessions) < 30            # several messages per connection: the carry path ran
    for r, rp in seen.items():
        assert decode(rp, keys, prefix="b", domain=DOMAIN).message_id == ids[r], (r, rp)
    # the null sender stays null
    _nid, null_from = _deliver(env, "verp2@bnc.test", sender="", i=1)
    assert null_from in ("", "<>")     # aiosmtpd shows the null sender as "<>"


def test_hard_dsn_records_an_oobbounce_and_suppresses_on_every_shard(env):
    mc = env["mc"]
    rcpt = "hard1@bnc.test"
    mid, rp = _deliver(env, rcpt, i=2)
    # Exim's notice for kijitora@example.jp (550 5.1.1 user unknown), about our message
    dsn = _rewrite(corpus("bounces", "sisimai", "lhost-exim-02.eml"),
                   {"kijitora@example.jp": rcpt})
    step, code, text = _send(env, rp, dsn)
    assert (step, code) == ("data", 250) and "recorded" in text, text
    ev = _events(mc, "OOBBounce", mid)
    assert ev and ev[-1]["recipient"] == rcpt and ev[-1]["category"] == "invalid-recipient"
    assert ev[-1]["class"] == "hard" and ev[-1]["status"] == "5.1.1"
    wait_for(lambda: all(_suppressed_everywhere(mc, rcpt)), 30, "suppressed on both shards")
    entry = _suppressed_everywhere(mc, rcpt)[0][0]
    assert entry["reason"] == "hard-bounce" and mid in entry["cause"]
    again = mc.submit([{"sender": "news@origin.test", "recipients": [rcpt],
                        "raw": raw_message(3, rcpt)}])[0]
    assert not again.accepted and "suppressed" in again.error


def test_arf_complaint_to_the_fbl_address_via_swaks_suppresses(env, tmp_path):
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed (apt-get install -y swaks; .ci/run does)")
    mc = env["mc"]
    rcpt = "complainer@bnc.test"
    mid, rp = _deliver(env, rcpt, i=4)
    # KumoMTA's ARF sample: Original-Mail-From is our return path, the recipient ours
    arf = _rewrite(corpus("arf", "kumomta", "2.eml"),
                   {"somespammer@example.net": rp, "user@example.com": rcpt})
    f = tmp_path / "arf.eml"
    f.write_bytes(arf)
    out = subprocess.run(["swaks", "--server", f"{HOST}:{env['port']}", "--from", "<>",
                          "--to", FBL, "--helo", "fbl.isp.test", "--data", f"@{f}",
                          "--timeout", "60"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "250 2.0.0 recorded" in out.stdout and "complaint" in out.stdout
    ev = _events(mc, "Complaint", mid)
    assert ev and ev[-1]["recipient"] == rcpt and ev[-1]["feedback_type"] == "abuse"
    wait_for(lambda: all(_suppressed_everywhere(mc, rcpt)), 30, "complaint on both shards")
    assert _suppressed_everywhere(mc, rcpt)[1][0]["reason"] == "complaint"


def test_forged_return_path_is_refused_at_rcpt_and_suppresses_nothing(env):
    mc = env["mc"]
    rcpt = "forged@bnc.test"
    mid, rp = _deliver(env, rcpt, i=5)
    local = rp.partition("@")[0]
    tag = local.split("-")[1]
    forged = [rp.replace(tag, tag[:-1] + ("a" if tag[-1] != "a" else "b")),      # altered tag
              f"b-k1aaaaaaaaaa-{mid.lower()}@{DOMAIN}",                           # guessed tag
              f"b-k9{tag[2:]}-{mid.lower()}@{DOMAIN}",                            # unknown key
              f"postmaster@{DOMAIN}", f"{local}@elsewhere.test"]
    dsn = _rewrite(corpus("bounces", "sisimai", "lhost-exim-02.eml"),
                   {"kijitora@example.jp": rcpt})
    for addr in forged:
        step, code, _ = _send(env, addr, dsn)
        assert (step, code) == ("rcpt", 550), addr
    assert not _events(mc, "OOBBounce", mid)
    assert not any(_suppressed_everywhere(mc, rcpt))


def test_soft_bounce_is_recorded_and_never_suppresses(env):
    mc = env["mc"]
    rcpt = "full@bnc.test"
    mid, rp = _deliver(env, rcpt, i=6)
    # Exchange 2007: 550 5.2.2 mailbox full (quota: soft)
    dsn = _rewrite(corpus("bounces", "sisimai", "lhost-exchange2007-02.eml"),
                   {"kijitora@example.edu": rcpt})
    step, code, text = _send(env, rp, dsn)
    assert (step, code) == ("data", 250) and "soft bounce" in text, text
    ev = _events(mc, "OOBBounce", mid)
    assert ev and ev[-1]["class"] == "soft" and ev[-1]["category"] == "quota"
    assert not any(_suppressed_everywhere(mc, rcpt))


def test_autoreply_garbage_truncated_loops_unknown_and_huge_record_nothing(env):
    from cluster.core.verp import encode
    mc = env["mc"]
    rcpt = "quiet@bnc.test"
    mid, rp = _deliver(env, rcpt, i=7)
    hard = _rewrite(corpus("bounces", "sisimai", "lhost-exim-02.eml"),
                    {"kijitora@example.jp": rcpt})
    auto = _rewrite(corpus("bounces", "sisimai", "rfc3834-02.eml"), {})
    garbage = b"Subject: =?utf-8?q?broken\r\nContent-Type: multipart/mixed\r\n\r\n\xff\xfe\x00"
    cut = hard.index(b"This message was created automatically")
    truncated = hard[:cut]
    # a bounce of a bounce: our DSN returned inside another DSN
    loop = (b"From: MAILER-DAEMON@mx.remote.test\r\nSubject: Undelivered Mail Returned to "
            b"Sender\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; "
            b'report-type=delivery-status; boundary="L"\r\n\r\n--L\r\nContent-Type: '
            b"text/plain\r\n\r\nundeliverable\r\n--L\r\nContent-Type: message/delivery-status"
            b"\r\n\r\nReporting-MTA: dns; mx.remote.test\r\n\r\nFinal-Recipient: rfc822; "
            + rcpt.encode() + b"\r\nAction: failed\r\nStatus: 5.1.1\r\n--L\r\nContent-Type: "
            b"message/rfc822\r\n\r\n" + hard + b"\r\n--L--\r\n")
    cases = {"auto-reply": auto, "garbage": garbage, "bounce of a bounce": loop}
    for name, data in cases.items():
        step, code, text = _send(env, rp, data)
        assert (step, code) == ("data", 250) and "nothing recorded" in text, (name, text)
    # cut before its reason: Exim's X-Failed-Recipients still names the recipient, but
    # nothing says why, so it is a soft bounce of category "other" (an event, no suppression)
    step, code, text = _send(env, rp, truncated)
    assert (step, code) == ("data", 250) and "soft bounce (other)" in text, text
    # a real return path of a message raymta does not know (never sent, or long forgotten)
    stranger = encode("01JDXK5Q7Z8YB6V3N2M1P0QRST", env["cfg"].bounce.keys, prefix="b",
                      domain=DOMAIN)
    step, code, text = _send(env, stranger, hard)
    assert code == 250 and "unknown message id" in text, text
    # enormous: refused by SIZE at MAIL, and at the end of DATA when undeclared
    assert _send(env, rp, hard, size=50_000_000)[:2] == ("mail", 552)
    huge = hard + (b"A" * 998 + b"\r\n") * 3000          # 3 MB
    assert _send(env, rp, huge)[:2] == ("data", 552)
    got = [e for e in mc.events(0) if e.get("id") == mid and e["type"] in ("OOBBounce",
                                                                           "Complaint")]
    assert [(e["type"], e["id"], e["class"]) for e in got] == [("OOBBounce", mid, "soft")]
    assert not any(_suppressed_everywhere(mc, rcpt))
    import ray
    st = ray.get(_listener(mc).stats.remote())
    # the garbage is unknown; the bounce of a bounce is read as a report, counted as a loop
    assert st["kind_autoreply"] >= 1 and st["kind_unknown"] >= 1 and st["loops"] >= 1, st


def test_listener_sigkilled_is_restarted_by_ray_and_works(env):
    import ray
    mc = env["mc"]
    h = _listener(mc)
    pid = ray.get(h.ping.remote(), timeout=60)
    os.kill(pid, signal.SIGKILL)

    def new_pid() -> int | None:
        try:
            p = ray.get(h.ping.remote(), timeout=10)
        except Exception:   # noqa: BLE001 - restarting
            return None
        return p if p != pid else None
    wait_for(new_pid, 120, "the listener to be restarted")
    rcpt = "afterkill@bnc.test"
    mid, rp = _deliver(env, rcpt, i=8)
    dsn = _rewrite(corpus("bounces", "sisimai", "lhost-exim-02.eml"),
                   {"kijitora@example.jp": rcpt})
    # the new process may take a moment to bind: a refused connection is retried, as an MTA does
    res = wait_for(lambda: _try_send(env, rp, dsn), 60, "the restarted listener to answer")
    assert res[:2] == ("data", 250), res
    assert _events(mc, "OOBBounce", mid)
    wait_for(lambda: all(_suppressed_everywhere(mc, rcpt)), 30, "suppressed after restart")


def _try_send(env: dict[str, Any], rcpt: str, data: bytes) -> tuple[str, int, str] | None:
    try:
        return _send(env, rcpt, data)
    except (ConnectionError, smtplib.SMTPException, OSError):
        return None


# ----------------------------------------------------------------- one-click unsubscribe

def _post(env: dict[str, Any], path: str, method: str = "POST") -> int:
    import http.client
    c = http.client.HTTPConnection(HOST, env["http_port"], timeout=60)
    try:
        body = "List-Unsubscribe=One-Click" if method == "POST" else None
        c.request(method, path, body=body,
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
        return c.getresponse().status
    finally:
        c.close()


def _list_unsubscribe(data: bytes) -> tuple[str, str, str | None]:
    """(url token, mailto address, List-Unsubscribe-Post) of a received message."""
    import re
    from email.parser import BytesHeaderParser
    h = BytesHeaderParser().parsebytes(data)
    value = " ".join(str(h["List-Unsubscribe"]).split())
    url = re.search(r"<https://news\.example/u/([^>]+)>", value)
    mailto = re.search(r"<mailto:([^>]+)>", value)
    assert url and mailto, value
    return url[1], mailto[1], h["List-Unsubscribe-Post"]


def test_one_click_unsubscribe_by_post_and_by_mail_scoped_to_the_sender_domain(env):
    mc = env["mc"]
    got: list[Any] = []
    _deliver(env, "reader1@bnc.test", sender="letters@news.example", i=20, received=got)
    _deliver(env, "reader2@bnc.test", sender="letters@news.example", i=21, received=got)
    _deliver(env, "reader3@bnc.test", sender="letters@mail.news.example", i=22, received=got)
    _deliver(env, "reader4@bnc.test", sender="news@origin.test", i=23, received=got)
    (tok1, _m1, post1), (_t2, mail2, _p2), (tok3, _m3, _p3) = (
        _list_unsubscribe(g.data) for g in got[:3])
    assert post1 == "List-Unsubscribe=One-Click"
    assert b"List-Unsubscribe" not in got[3].data.split(b"\r\n\r\n")[0]   # no config there
    # the address is over 64 octets with this token (RFC 5321 §4.5.3.1.1): the Subject form
    assert mail2.startswith(f"unsub@{DOMAIN}?subject=unsub-"), mail2
    subject2 = mail2.split("subject=", 1)[1]

    # forged or altered tokens: 400 and nothing suppressed
    flip = tok1[:5] + ("a" if tok1[5] != "a" else "b") + tok1[6:]
    for bad in (flip, tok1 + "aa", tok1.replace(tok1.split("-")[1], tok3.split("-")[1]),
                "u1aaaaaaaaaaaaaaaa-mfrgg"):
        assert _post(env, f"/u/{bad}") == 400, bad
    # a GET shows a confirmation page and changes nothing (RFC 8058 §3.2)
    assert _post(env, f"/u/{tok1}", "GET") == 200
    assert not any(_suppressed_everywhere(mc, "reader1@bnc.test"))

    assert _post(env, f"/u/{tok1}") == 200
    wait_for(lambda: all(_suppressed_everywhere(mc, "reader1@bnc.test")), 30,
             "the unsubscribe on both shards")
    e = _suppressed_everywhere(mc, "reader1@bnc.test")[1][0]
    assert (e["reason"], e["scope"]) == ("unsubscribe", "news.example")
    refused = mc.submit([{"sender": "letters@news.example", "recipients": ["reader1@bnc.test"],
                          "raw": raw_message(24, "reader1@bnc.test")}])[0]
    assert not refused.accepted and "unsubscribe" in refused.error
    other = mc.submit([{"sender": "news@origin.test", "recipients": ["reader1@bnc.test"],
                        "raw": raw_message(25, "reader1@bnc.test")}])[0]
    assert other.accepted, other.error

    # by mail, Subject form: an altered token is refused at DATA, the real one unsubscribes
    flip2 = subject2[:10] + ("a" if subject2[10] != "a" else "b") + subject2[11:]
    assert _send(env, f"unsub@{DOMAIN}", f"Subject: {flip2}\r\n\r\nx\r\n".encode())[:2] == (
        "data", 550)
    assert not any(_suppressed_everywhere(mc, "reader2@bnc.test"))
    step, code, text = _send(env, f"unsub@{DOMAIN}", f"Subject: {subject2}\r\n\r\nx\r\n"
                             .encode(), sender="reader2@bnc.test")
    assert (step, code) == ("data", 250) and "unsubscribed" in text, text
    wait_for(lambda: all(_suppressed_everywhere(mc, "reader2@bnc.test")), 30,
             "the mailed unsubscribe on both shards")
    assert _suppressed_everywhere(mc, "reader2@bnc.test")[0][0]["scope"] == "news.example"
    # by mail, a short address: the token in the local part; altered -> 550 at RCPT
    from cluster.core.unsubscribe import header_fields
    u = env["cfg"].unsubscribe[0]
    fields = dict(header_fields("r@bnc.test", "news.example", u.keys, url_base="",
                                mail_domain=DOMAIN))
    local = fields["List-Unsubscribe"].strip("<>").removeprefix("mailto:")
    assert local.startswith("unsub-") and "?" not in local and len(local.split("@")[0]) <= 64
    bad = local[:9] + ("a" if local[9] != "a" else "b") + local[10:]
    assert _send(env, bad, b"Subject: x\r\n\r\nx\r\n")[:2] == ("rcpt", 550)
    assert _send(env, local, b"Subject: x\r\n\r\nx\r\n")[:2] == ("data", 250)
    wait_for(lambda: all(_suppressed_everywhere(mc, "r@bnc.test")), 30, "r@ unsubscribed")
    assert not any(_suppressed_everywhere(mc, "reader3@bnc.test"))


def test_a_report_the_shard_cannot_make_durable_gets_451_and_is_taken_later(env):
    """The listener never loses a report: while the owning shard has no quorum (two of its
    three copies SIGSTOPped: a real shard, not a stand-in), the sending MTA is told 451 and
    keeps the report; sent again once the copies run, it is recorded."""
    import contextlib

    import ray

    from cluster.client import shard_of
    mc, cfg = env["mc"], env["cfg"]
    rcpt = "later1@bnc.test"
    mid, rp = _deliver(env, rcpt, i=40)
    shard = shard_of(mid, len(mc.coordinators))
    dsn = _rewrite(corpus("bounces", "sisimai", "lhost-exim-02.eml"),
                   {"kijitora@example.jp": rcpt})
    stopped: list[int] = []
    try:
        for k in (1, 2):
            pid = ray.get(ray.get_actor(f"replica:{shard}:{k}",
                                        namespace=cfg.cluster.namespace).ping.remote())
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        step, code, text = _send(env, rp, dsn)
        assert (step, code) == ("data", 451), (step, code, text)
        assert not _events(mc, "OOBBounce", mid)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def taken() -> bool:
        step, code, _ = _send(env, rp, dsn)
        return (step, code) == ("data", 250)
    wait_for(taken, 90, "the report taken once the shard has its quorum again", poll=2.0)
    ev = _events(mc, "OOBBounce", mid)
    assert ev and ev[-1]["recipient"] == rcpt
    wait_for(lambda: all(_suppressed_everywhere(mc, rcpt)), 30, "suppressed on both shards")
