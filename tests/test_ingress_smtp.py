"""Authenticated SMTP submission, tried as a sender and as an outsider would.

Real parts: a local Ray with one shard of three copies and the ingress actor that ``deploy``
starts on the head node for an ``[ingress]`` config (STARTTLS and implicit-TLS listeners on
127.0.0.1), certificates from a CA made at test time, smtplib and Debian's swaks as clients,
the loopback DNS and an SMTP sink on 127.0.0.2 receiving what is delivered. Every refusal is
asserted by its reply code, and at the end the sink holds exactly the messages that were
answered 250.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import replace

import pytest

from tests.conftest import pipeline_config, wait_for
from tests.ingress_certs import make_ca

pytestmark = pytest.mark.timeout(300)

SINK = "127.0.0.2"
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2"}


def message(frm: str, to: str, subject: str, extra: bytes = b"") -> bytes:
    return (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@a.test>\r\n").encode() + extra + b"\r\nbody line\r\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    import ray

    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.core.submission import hash_password
    from cluster.devservers import SmtpSink

    tmp = tmp_path_factory.mktemp("ingress")
    ca = make_ca(tmp / "ca")
    cert, key = ca.server_cert("mx.raymta.test", ["127.0.0.1"])
    users_file = tmp / "users.toml"
    users_file.write_text(
        f'[[user]]\nname = "bob"\npassword_hash = "{hash_password(PASSWORDS["bob"], ln=8)}"\n'
        'domains = ["b.test"]\n')
    sink = SmtpSink(SINK).start()
    dns_server.add_a("mx.ok.test", SINK)
    dns_server.add_mx("ok.test", [(10, "mx.ok.test")])
    base = pipeline_config(str(tmp / "spool"), dns_server.port, sink.port)
    ingress = parse_config({"ingress": {
        "hostname": "mx.raymta.test",
        "submission": ["127.0.0.1:0"], "submissions": ["127.0.0.1:0"],
        "cert_file": str(cert), "key_file": str(key), "users_file": str(users_file),
        "user": [{"name": "alice", "domains": ["a.test"],
                  "password_hash": hash_password(PASSWORDS["alice"], ln=8)}],
        "max_recipients": 5, "max_message_size": "200KB", "max_connections_per_ip": 30,
    }}).ingress
    cfg = replace(base, queue=replace(base.queue, shards=1),
                  replication=replace(base.replication, ack_timeout=2.0), ingress=ingress)
    mc = MailCluster.connect(config=cfg, num_cpus=2)
    try:
        actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("ingress:")]
        assert len(actors) == 1, actors     # one node, no ingress label: the head runs it
        actor = ray.get_actor(actors[0], namespace=cfg.cluster.namespace)
        ports = {mode: port for _, port, mode in ray.get(actor.addresses.remote())}
        ctx = ssl.create_default_context(cafile=str(ca.ca_file))
        yield {"mc": mc, "cfg": cfg, "sink": sink, "actor": actor, "ca": ca, "ctx": ctx,
               "starttls": ports["starttls"], "implicit": ports["implicit"],
               "users_file": users_file, "tmp": tmp, "accepted": set()}
    finally:
        mc.close()
        sink.stop()


def session(env, *, tls: bool = True, user: str | None = None) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", env["starttls"], timeout=30)
    c.ehlo("client.test")
    if tls:
        c.starttls(context=env["ctx"])
        c.ehlo("client.test")
    if user:
        c.login(user, PASSWORDS[user])
    return c


def send(c: smtplib.SMTP, frm: str, to: list[str], data: bytes) -> tuple[int, bytes]:
    """(code, text) of the first refusal in the transaction, or of the final dot."""
    for cmd, arg in (("mail", frm), *(("rcpt", t) for t in to)):
        code, text = getattr(c, cmd)(arg)
        if code >= 300:
            c.rset()
            return code, text
    return c.data(data)


def test_a_good_message_is_delivered_with_a_received_header(env):
    sink = env["sink"]
    with session(env, user="alice") as c:
        code, text = send(c, "news@a.test", ["r1@ok.test"], message("news@a.test",
                                                                    "r1@ok.test", "good1"))
    assert code == 250 and text.startswith(b"2.0.0 queued as "), (code, text)
    env["accepted"].add("r1@ok.test")
    # implicit TLS (465-style) with AUTH PLAIN, and bob from the users file
    with smtplib.SMTP_SSL("127.0.0.1", env["implicit"], context=env["ctx"], timeout=30) as c:
        c.ehlo("client2.test")
        c.login("bob", PASSWORDS["bob"])
        code, text = send(c, "b@b.test", ["r2@ok.test", "r3@ok.test"],
                          message("b@b.test", "r2@ok.test", "good2"))
    assert code == 250 and b"+1 more" in text, (code, text)
    env["accepted"] |= {"r2@ok.test", "r3@ok.test"}
    got = wait_for(lambda: {r.rcpt_to: r for r in sink.received} if
                   {"r1@ok.test", "r2@ok.test", "r3@ok.test"} <= {r.rcpt_to for r in
                                                                 sink.received} else None,
                   60, "delivery to the sink")
    first = got["r1@ok.test"].data.decode()
    assert first.startswith("Received: from client.test ([127.0.0.1])\r\n")
    assert "by mx.raymta.test (raymta) with ESMTPSA id " in first
    assert "(version=TLSv1.3 cipher=" in first and "(authenticated user alice)" in first
    assert "for <r1@ok.test>; " in first and "Subject: good1" in first
    second = got["r2@ok.test"].data.decode()
    assert "(authenticated user bob)" in second and "for <" not in second.split("\r\n\r\n")[0]


def test_outsiders_are_refused(env):
    big = (b"y" * 70 + b"\r\n") * 4300
    loop = b"".join(b"Received: from hop%d.test by x; Fri, 4 Dec 2026 00:00:00 +0000\r\n" % i
                    for i in range(50))
    # (what is tried, how, the reply code expected, a word of the reply)
    with smtplib.SMTP("127.0.0.1", env["starttls"], timeout=30) as c:
        c.ehlo("outsider.test")
        assert "auth" not in c.esmtp_features          # not offered before TLS
        code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(
            b"\0alice\0" + PASSWORDS["alice"].encode()).decode())
        assert code == 530                             # AUTH before TLS: no
        assert send(c, "x@a.test", ["v@ok.test"], b"")[0] == 530
    with session(env) as c:                            # TLS, no AUTH
        assert "auth" in c.esmtp_features
        code, text = c.mail("x@a.test")
        assert (code, text[:5]) == (530, b"5.7.0"), (code, text)
        assert c.rcpt("v@ok.test")[0] == 530
        assert c.docmd("DATA")[0] == 530
    with session(env) as c:                            # wrong passwords, then closed
        wrong = "PLAIN " + base64.b64encode(b"\0alice\0wrong-password").decode()
        assert [c.docmd("AUTH", wrong)[0] for _ in range(3)] == [535, 535, 421]
        with pytest.raises(smtplib.SMTPServerDisconnected):
            c.mail("x@a.test")
    with session(env) as c:                            # a user that does not exist
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("mallory", PASSWORDS["alice"])
    with session(env, user="alice") as c:
        cases = [
            # another user's domain, in the envelope and in the header
            ("b@b.test", ["v@ok.test"], message("b@b.test", "v@ok.test", "s1"), 550, b"5.7.1"),
            ("news@a.test", ["v@ok.test"], message("b@b.test", "v@ok.test", "s2"), 550,
             b"5.7.1 From: domain 'b.test'"),
            ("news@a.test", ["v@ok.test"], message("news@a.test", "v@ok.test", "s3",
                                                   b"From: <ceo@b.test>\r\n"), 550,
             b"2 From header fields"),
            ("news@a.test", ["v@ok.test"], message("news@a.test", "v@ok.test", "s4",
                                                   b"Sender: <ceo@b.test>\r\n"), 550,
             b"Sender: domain 'b.test'"),
            ("<>", ["v@ok.test"], message("news@a.test", "v@ok.test", "s5"), 550, b"5.7.1"),
            # a loop
            ("news@a.test", ["v@ok.test"], loop + message("news@a.test", "v@ok.test", "s6"),
             554, b"5.4.6"),
            # too many recipients: the sixth is deferred to another transaction
            ("news@a.test", [f"v{i}@ok.test" for i in range(6)], b"", 452, b"4.5.3"),
            # too big
            ("news@a.test", ["v@ok.test"], message("news@a.test", "v@ok.test", "s7", big),
             552, b""),
        ]
        for frm, to, data, want, words in cases:
            code, text = send(c, frm, to, data)
            assert code == want and words in text, (frm, to, code, text)
        # header injection: a CR in the envelope, a SIZE larger than allowed
        c.send(b"MAIL FROM:<news@a.test>\rRCPT TO:<v@ok.test>\r\n")
        code, text = c.getreply()
        assert code >= 500, (code, text)
        c.rset()
        assert c.mail("news@a.test", ["SIZE=900000"])[0] == 552
        # a SIZE that is not a number, a RCPT parameter we do not know
        code, text = c.mail("news@a.test", ["SIZE=big"])
        assert code == 501 and b"MAIL FROM: <address>" in text, (code, text)
        assert c.mail("news@a.test")[0] == 250
        code, text = c.rcpt("v@ok.test", ["NOTIFY=NEVER"])
        assert code == 555 and b"RCPT TO" in text, (code, text)
        c.rset()
    # none of it reached anyone
    time.sleep(1.0)
    assert {r.rcpt_to for r in env["sink"].received} <= env["accepted"]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (.ci/run does)")
def test_swaks_as_an_outsider(env):
    port, tls_port = str(env["starttls"]), str(env["implicit"])

    def swaks(*args: str) -> str:
        p = subprocess.run(["swaks", "--server", "127.0.0.1", "--helo", "swaks.test",
                            "--timeout", "20", "--to", "s@ok.test", *args],
                           capture_output=True, text=True, timeout=60)
        return p.stdout + p.stderr

    out = swaks("--port", port, "--from", "x@a.test")
    assert "530 Must issue a STARTTLS command first" in out, out
    out = swaks("--port", port, "--from", "x@a.test", "--pipeline")
    assert "530" in out and "250 2.0.0" not in out, out
    out = swaks("--port", port, "--auth", "PLAIN", "--auth-user", "alice",
                "--auth-password", PASSWORDS["alice"], "--from", "x@a.test")
    assert "Host did not advertise authentication" in out or "530" in out, out
    out = swaks("--port", port, "--tls", "--from", "x@a.test")
    assert "530 5.7.0 Authentication required" in out, out
    out = swaks("--port", port, "--tls", "--auth", "LOGIN", "--auth-user", "alice",
                "--auth-password", "wrong", "--from", "x@a.test")
    assert "535 5.7.8" in out, out
    out = swaks("--port", port, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                "--auth-password", PASSWORDS["alice"], "--from", "x@b.test")
    assert "550 5.7.1" in out, out
    out = swaks("--port", tls_port, "--tls-on-connect", "--auth", "PLAIN", "--auth-user",
                "alice", "--auth-password", PASSWORDS["alice"], "--from", "x@a.test",
                "--header", "From: <x@a.test>", "--header", "Subject: via swaks")
    assert "250 2.0.0 queued as" in out, out
    # a password never appears in what the server says
    assert PASSWORDS["alice"] not in out.replace(f"--auth-password {PASSWORDS['alice']}", "")
    env["accepted"].add("s@ok.test")
    wait_for(lambda: "s@ok.test" in {r.rcpt_to for r in env["sink"].received}, 60,
             "the swaks message delivered")


def test_a_flood_of_connections_from_one_address_gets_421(env):
    socks = []
    try:
        codes = []
        for _ in range(35):   # the limit is 30 per IP
            s = socket.create_connection(("127.0.0.1", env["starttls"]), timeout=10)
            socks.append(s)
            codes.append(int(s.recv(512)[:3]))
        assert codes[:30] == [220] * 30 and codes[30:] == [421] * 5, codes
    finally:
        for s in socks:
            s.close()
    # closed connections free their slots
    wait_for(lambda: _greets(env), 10, "a new connection to be greeted again")


def _greets(env) -> bool:
    with socket.create_connection(("127.0.0.1", env["starttls"]), timeout=10) as s:
        return s.recv(512).startswith(b"220")


def test_concurrent_sessions_share_commits(env):
    import ray
    before = ray.get(env["actor"].stats.remote())["batches"]
    n = 16
    codes: list[int] = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        with session(env, user="alice") as c:
            barrier.wait(30)
            codes.append(send(c, "news@a.test", [f"c{i}@ok.test"],
                              message("news@a.test", f"c{i}@ok.test", f"c{i}"))[0])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert codes == [250] * n, codes
    env["accepted"] |= {f"c{i}@ok.test" for i in range(n)}
    after = ray.get(env["actor"].stats.remote())["batches"]
    calls, msgs = after["calls"] - before["calls"], after["messages"] - before["messages"]
    assert msgs == n and calls < n, (calls, msgs)


def test_certificate_and_users_file_reload(env):
    import ray

    from cluster.core.submission import hash_password
    ca = env["ca"]
    old = _peer_serial(env)
    ca.server_cert("mx.raymta.test", ["127.0.0.1"])          # overwrite the same files
    env["users_file"].write_text(
        f'[[user]]\nname = "carol"\npassword_hash = "{hash_password("carol-pw", ln=8)}"\n'
        'domains = ["c.test"]\n')
    with session(env) as c:                                  # not yet
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("carol", "carol-pw")
    assert ray.get(env["actor"].reload.remote())["users"] == 2   # alice (config), carol
    assert _peer_serial(env) != old
    with session(env) as c:
        c.login("carol", "carol-pw")
    with session(env) as c:                                  # bob left the users file
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("bob", PASSWORDS["bob"])


def _peer_serial(env) -> int:
    from cryptography import x509
    with socket.create_connection(("127.0.0.1", env["implicit"]), timeout=10) as raw:
        with env["ctx"].wrap_socket(raw, server_hostname="127.0.0.1") as s:
            der = s.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_rate_limits_per_user_answer_450(env):
    from cluster.ingress_smtp import SmtpIngress
    from cluster.core.ratespec import RateSpec
    settings = replace(env["cfg"].ingress, submission=("127.0.0.1:0",), submissions=(),
                       message_rate_per_user=RateSpec.parse("2/m"))
    with SmtpIngress.from_config(env["mc"], settings) as ing:
        port = ing.addresses[0].port
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("client.test")
            c.starttls(context=env["ctx"])
            c.ehlo("client.test")
            c.login("alice", PASSWORDS["alice"])
            assert c.mail("news@a.test")[0] == 250
            c.rset()
            assert c.mail("news@a.test")[0] == 250
            c.rset()
            code, text = c.mail("news@a.test")
            assert code == 450 and b"4.7.1" in text and b"alice" in text, (code, text)


def test_a_listener_on_all_addresses_without_auth_refuses_to_start(env):
    from cluster.cli import main
    from cluster.ingress_smtp import IngressError, SmtpIngress
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        with pytest.raises(IngressError) as e:
            SmtpIngress(env["mc"], host, 0)
        assert "open relay" in str(e.value) and host in str(e.value)
    # raymta listen says so before it touches the cluster
    assert main(["listen", "--host", "0.0.0.0", "--address", "ray://127.0.0.1:1"]) == 2


def test_a_loopback_listener_without_auth_takes_mail(env):
    """``raymta listen`` without [ingress]: plain SMTP on loopback, no AUTH offered."""
    from cluster.ingress_smtp import SmtpIngress
    with SmtpIngress(env["mc"], "127.0.0.1", 0) as ing:
        with smtplib.SMTP("127.0.0.1", ing.addresses[0].port, timeout=30) as c:
            c.ehlo("local.test")
            assert "auth" not in c.esmtp_features and "starttls" not in c.esmtp_features
            code, text = send(c, "app@anywhere.test", ["plain@ok.test"],
                              message("app@anywhere.test", "plain@ok.test", "plain"))
    assert code == 250, (code, text)
    # the submit-stream connections its loop opened went with it (only the blocking pool,
    # under None, is left)
    assert all(list(st._idle) == [None] for st in env["mc"]._streams)
    env["accepted"].add("plain@ok.test")
    got = wait_for(lambda: [r for r in env["sink"].received if r.rcpt_to == "plain@ok.test"],
                   60, "the loopback message delivered")
    assert b"by raymta (raymta) with ESMTP id " in got[0].data.split(b"\r\n\r\n")[0]


def test_a_shard_without_quorum_gives_451_and_recovers(env):
    """Runs last: it stops both replicas (SIGSTOP), then lets them go on."""
    import ray
    ns = env["cfg"].cluster.namespace
    stopped: list[int] = []
    try:
        for k in (1, 2):
            pid = ray.get(ray.get_actor(f"replica:0:{k}", namespace=ns).ping.remote())
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        with session(env, user="alice") as c:
            t = time.time()
            code, text = send(c, "news@a.test", ["nq@ok.test"],
                              message("news@a.test", "nq@ok.test", "noquorum"))
            assert code == 451 and text.startswith(b"4.3.0"), (code, text)
            assert time.time() - t < 60
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    # the outcome was unknown (its frames may be on the leader's disk): it may yet be
    # delivered; what must hold is that the shard serves again and a new message is taken
    def again() -> bool:
        with session(env, user="alice") as c:
            return send(c, "news@a.test", ["after@ok.test"],
                        message("news@a.test", "after@ok.test", "after"))[0] == 250
    wait_for(again, 90, "the shard to take mail again", poll=1.0)
    env["accepted"] |= {"after@ok.test", "nq@ok.test"}
    wait_for(lambda: "after@ok.test" in {r.rcpt_to for r in env["sink"].received}, 60,
             "delivery after recovery")
    # every message the sink got was one the ingress answered 250 (or 451 outcome-unknown)
    assert {r.rcpt_to for r in env["sink"].received} <= env["accepted"]


def test_no_raymta_process_holds_thousands_of_threads(env):
    """Threads count against pid_max (32,768 by default): an actor process with thousands of
    them (a threaded actor gets max_concurrency threads at once) starves every process
    started after it — four ingress actors of 10,000 threads each could not all start."""
    import ray
    ns = env["cfg"].cluster.namespace
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == ns]
    assert any(n.startswith("ingress:") for n in names) and any(
        n.startswith("coordinator:") for n in names), names
    threads = {}
    for n in names:
        pid = ray.get(ray.get_actor(n, namespace=ns).ping.remote(), timeout=30)
        if isinstance(pid, int):
            threads[n] = len(os.listdir(f"/proc/{pid}/task"))
    assert threads and max(threads.values()) < 500, threads


def test_a_silent_session_is_closed_after_the_command_timeout(env):
    """Slowloris: a client that connects (or stops mid-line) and says nothing holds a
    connection slot until ``command_timeout``, then gets 421 and is closed."""
    from cluster.ingress_smtp import SmtpIngress
    settings = replace(env["cfg"].ingress, submission=("127.0.0.1:0",), submissions=(),
                       command_timeout=1.0)
    with SmtpIngress.from_config(env["mc"], settings) as ing:
        with socket.create_connection(("127.0.0.1", ing.addresses[0].port), timeout=30) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"220 ")
            s.sendall(b"EHLO slow.test\r\n")
            _replies(f, 1)
            t = time.monotonic()
            s.sendall(b"MAIL FRO")                       # and nothing more
            assert f.readline().startswith(b"421 4.4.2 "), "closed with a reason"
            assert f.readline() == b"", "then closed"
            assert 0.9 < time.monotonic() - t < 10
        wait_for(lambda: not ing.sessions and not ing.stats()["open_connections"], 10,
                 "its connection slot freed")


def _replies(f, n: int) -> list[bytes]:
    """The next ``n`` replies (a multi-line reply as one, its lines joined)."""
    out = []
    for _ in range(n):
        lines = [f.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(f.readline())
        out.append(b"".join(lines))
    return out


def test_the_session_reads_what_arrives_however_it_is_cut(env):
    """Pipelined commands in one write, a line and the end dot split across writes, a bare LF,
    an overlong command line, a body over the size limit, and a client gone mid-DATA: each
    gets its reply, and only the one whole message is committed."""
    from cluster.ingress_smtp import SmtpIngress
    sink = env["sink"]
    with SmtpIngress(env["mc"], "127.0.0.1", 0, max_size=2000) as ing:
        with socket.create_connection(("127.0.0.1", ing.addresses[0].port), timeout=30) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"220 raymta ")
            s.sendall(b"EHLO c.test\r\nMAIL FROM:<app@x.test>\r\nRCPT TO:<cut@ok.test>\r\n"
                      b"DATA\r\n")                                  # RFC 2920: one write
            ehlo, *rest = _replies(f, 4)
            assert b"250-PIPELINING" in ehlo and b"250-SIZE 2000" in ehlo, ehlo
            assert [r[:4] for r in rest] == [b"250 ", b"250 ", b"354 "], rest
            for part in (b"From: <app@x.test>\r\nSubj", b"ect: cut\r\n\r\n..dot\r\nend\r",
                         b"\n.", b"\r", b"\n"):
                s.sendall(part)
                time.sleep(0.05)
            assert _replies(f, 1)[0].startswith(b"250 2.0.0 queued as "), "the cut message"
            s.sendall(b"NOOP\n")                                     # a bare LF
            s.sendall(b"NOOP " + b"x" * 600 + b"\r\n")                # > 512 octets
            assert [r[:4] for r in _replies(f, 2)] == [b"250 ", b"500 "]
            s.sendall(b"MAIL FROM:<app@x.test>\r\nRCPT TO:<big@ok.test>\r\nDATA\r\n")
            assert [r[:4] for r in _replies(f, 3)] == [b"250 ", b"250 ", b"354 "]
            s.sendall(b"Subject: big\r\n\r\n" + b"y" * 70 * 40 + b"\r\n.\r\n")
            assert _replies(f, 1)[0].startswith(b"552 "), "too big: refused at the end"
            s.sendall(b"MAIL FROM:<app@x.test>\r\nRCPT TO:<gone@ok.test>\r\nDATA\r\n")
            assert [r[:4] for r in _replies(f, 3)] == [b"250 ", b"250 ", b"354 "]
            s.sendall(b"Subject: gone\r\n\r\nhalf a mess")          # then the client is gone
            f.close()                  # (the socket closes once its file is closed too)
        wait_for(lambda: not ing.sessions, 10, "the session closed")
        stats = ing.stats()
    assert stats["accepted"] == 1 and stats["batches"]["messages"] == 1, stats
    env["accepted"].add("cut@ok.test")
    got = wait_for(lambda: [r for r in sink.received if r.rcpt_to == "cut@ok.test"], 60,
                   "the whole message delivered")
    assert b"Subject: cut\r\n\r\n.dot\r\nend\r\n" in got[0].data      # dot-unstuffed
