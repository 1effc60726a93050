"""The relay's TLS policy against real servers on loopback (cluster.adapters.smtp):

- required: the chain and the host name are verified with a CA file (a test CA made here);
  a hostname mismatch or an unknown CA is a classified TLS failure and nothing is sent;
- opportunistic: a host whose STARTTLS handshake breaks (it answers 220, then garbage) is
  retried at once in plaintext on the same host, and remembered: the next connection does
  not try TLS; required TLS never falls back to plaintext there."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.adapters.smtp import ConnectFailure, connect_site
from cluster.core.tls_policy import BrokenTls
from cluster.devservers import SmtpSink
from tests.ingress_certs import make_ca

pytestmark = pytest.mark.timeout(120)

TLS_HOST = "127.0.0.11"
BROKEN_HOST = "127.0.0.12"
BODY = b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: tls\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def ca(tmp_path_factory):  # a tests.ingress_certs.TestCA
    return make_ca(tmp_path_factory.mktemp("tlsca"))


@pytest.fixture(scope="module")
def tls_sink(ca) -> Iterator[SmtpSink]:
    cert, key = ca.server_cert("mx.tls.test", [TLS_HOST], stem="mx")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    s = SmtpSink(TLS_HOST, name="tls", tls_context=ctx).start()
    try:
        yield s
    finally:
        s.stop()


async def _connect(host: str, name: str, port: int, tls: str, ca_file: str = "",
                   broken: BrokenTls | None = None):
    return await connect_site([(10, name, [host])], port, ehlo_name="relay.test", tls=tls,
                              connect_timeout=5, command_timeout=10, tls_ca_file=ca_file,
                              broken_tls=broken)


def test_required_tls_with_the_right_ca_and_name_delivers_encrypted(tls_sink, ca) -> None:
    tls_sink.reset()

    async def run():
        conn = await _connect(TLS_HOST, "mx.tls.test", tls_sink.port, "required",
                              str(ca.ca_file))
        assert conn.tls and not conn.tls_fallback and conn.tls_failures == 0
        a = await conn.send("s@src.test", "r@tls.test", BODY)
        await conn.close()
        return a

    a = asyncio.run(run())
    assert (a.phase, a.code) == ("data", 250)
    assert [(r.rcpt_to, r.tls) for r in tls_sink.received] == [("r@tls.test", True)]


@pytest.mark.parametrize("name,ca_file,why", [
    ("mx.wrong.test", "ca", "(hostname mismatch)"),       # the certificate names mx.tls.test
    ("mx.tls.test", "", "(unknown CA)"),                  # the system CAs do not know ours
])
def test_required_tls_refuses_an_unverified_certificate(tls_sink, ca, name, ca_file,
                                                        why) -> None:
    tls_sink.reset()
    with pytest.raises(ConnectFailure) as e:
        asyncio.run(_connect(TLS_HOST, name, tls_sink.port, "required",
                             str(ca.ca_file) if ca_file else ""))
    f = e.value
    assert f.tls is not None and f.tls.verify and f.tls_failures == 1 and not f.all_421
    assert f.tls.text.startswith("TLS required: certificate verify failed: ")
    assert f.tls.text.endswith(f"for {name} [{TLS_HOST}] {why}"), f.tls.text
    assert tls_sink.received == []


def test_opportunistic_tls_to_a_verified_capable_host_still_encrypts(tls_sink) -> None:
    tls_sink.reset()

    async def run():
        conn = await _connect(TLS_HOST, "mx.wrong.test", tls_sink.port, "opportunistic")
        ok = conn.tls
        await conn.close()
        return ok

    assert asyncio.run(run())          # unverified but encrypted (RFC 7435)


class BrokenTlsServer:
    """An SMTP server that offers STARTTLS, answers 220 to it and then sends garbage and
    closes; in a session without STARTTLS it takes mail. Counts what it saw."""

    def __init__(self) -> None:
        self.sessions = 0
        self.starttls = 0
        self.messages: list[tuple[str, bytes]] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._session, BROKEN_HOST, 0)
        return self.server.sockets[0].getsockname()[1]

    async def _session(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.sessions += 1
        w.write(b"220 mx.broken.test ESMTP\r\n")
        rcpt, data = "", b""
        try:
            while line := await r.readline():
                cmd = line.strip().upper()
                if cmd.startswith(b"EHLO"):
                    w.write(b"250-mx.broken.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
                elif cmd == b"STARTTLS":
                    self.starttls += 1
                    w.write(b"220 2.0.0 go ahead\r\n")
                    await w.drain()
                    w.write(b"this is not a TLS server hello\r\n" * 4)
                    await w.drain()
                    w.close()
                    return
                elif cmd.startswith(b"MAIL"):
                    w.write(b"250 ok\r\n")
                elif cmd.startswith(b"RCPT"):
                    rcpt = line.decode().split("<", 1)[1].split(">", 1)[0]
                    w.write(b"250 ok\r\n")
                elif cmd == b"DATA":
                    w.write(b"354 go\r\n")
                    await w.drain()
                    data = b""
                    while (chunk := await r.readline()) != b".\r\n":
                        data += chunk
                    self.messages.append((rcpt, data))
                    w.write(b"250 2.0.0 queued\r\n")
                elif cmd == b"QUIT":
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    break
                else:
                    w.write(b"250 ok\r\n")
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])   # the relay runs on uvloop
def test_a_broken_handshake_falls_back_to_plaintext_on_the_same_host_and_is_remembered(
        loop: str) -> None:
    async def run():
        srv = BrokenTlsServer()
        port = await srv.start()
        broken = BrokenTls(ttl=60)
        try:
            conn = await _connect(BROKEN_HOST, "mx.broken.test", port, "opportunistic",
                                  broken=broken)
            assert not conn.tls and conn.tls_fallback
            assert conn.address == BROKEN_HOST                  # the same host, again
            a = await conn.send("s@src.test", "one@broken.test", BODY)
            await conn.close()
            assert (a.phase, a.code) == ("data", 250)
            assert (srv.sessions, srv.starttls) == (2, 1)        # TLS tried once, then plain
            assert broken.is_broken("mx.broken.test", __import__("time").monotonic())
            # remembered: the next connection goes straight to plaintext
            conn = await _connect(BROKEN_HOST, "mx.broken.test", port, "opportunistic",
                                  broken=broken)
            assert not conn.tls and conn.tls_fallback
            await conn.send("s@src.test", "two@broken.test", BODY)
            await conn.close()
            assert (srv.sessions, srv.starttls) == (3, 1)
            # required TLS: a classified failure, and never plaintext
            with pytest.raises(ConnectFailure) as e:
                await _connect(BROKEN_HOST, "mx.broken.test", port, "required", broken=broken)
            assert srv.starttls == 2 and e.value.tls is not None and not e.value.tls.verify
            assert e.value.tls.text.startswith(
                f"TLS required: STARTTLS with mx.broken.test [{BROKEN_HOST}] failed: ")
            return [r for r, _ in srv.messages]
        finally:
            assert srv.server is not None
            srv.server.close()
            await srv.server.wait_closed()

    factory = None
    if loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        # (uvloop closes the transport of a failed handshake and raises on closing it again)
        assert runner.run(run()) == ["one@broken.test", "two@broken.test"]


def test_required_tls_without_starttls_says_so(tmp_path: Path) -> None:
    sink = SmtpSink(TLS_HOST, name="plain").start()
    try:
        with pytest.raises(ConnectFailure) as e:
            asyncio.run(_connect(TLS_HOST, "mx.plain.test", sink.port, "required"))
        assert e.value.tls is not None and e.value.tls.no_starttls
        assert e.value.tls.text == f"TLS required: mx.plain.test [{TLS_HOST}] does not offer " \
                                   "STARTTLS"
        assert sink.received == []
    finally:
        sink.stop()
