"""The relay's SMTP client (cluster.adapters.smtp): session set-up (greeting, EHLO, STARTTLS)
and transactions on raymta's own protocol, pipelined (RFC 2920) when the server offers it.

Real sockets on loopback: the aiosmtpd sinks (with and without PIPELINING, with per-recipient
faults and STARTTLS), and a raw asyncio server where the test needs to control every byte."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from cluster.adapters.smtp import ConnectFailure, SmtpConnection, connect_site
from cluster.devservers import SmtpSink, self_signed_tls_context
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(120)

HOST = "127.0.0.6"
BODY = (b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: dots\r\n\r\n"
        b".leading dot\r\nmiddle\r\n.\r\n..two\r\nlast line\r\n")


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink(HOST, name="client-test").start()
    try:
        yield s
    finally:
        s.stop()


async def _connect(port: int, *, tls: str = "disabled", timeout: float = 10.0
                   ) -> SmtpConnection:
    return await connect_site([(10, "mx.dst.test", [HOST])], port, ehlo_name="relay.test",
                              tls=tls, connect_timeout=5, command_timeout=timeout)


@pytest.mark.parametrize("pipelining", [True, False])
def test_transactions_deliver_exact_bytes_with_and_without_pipelining(
        sink: SmtpSink, pipelining: bool) -> None:
    sink.pipelining = pipelining

    async def run() -> list:
        conn = await _connect(sink.port)
        assert conn.pipelining is pipelining and conn.eightbit and conn.smtputf8
        out = [await conn.send("s@src.test", f"r{i}@dst.test", BODY) for i in range(5)]
        # bare LF line ends and no final line end: sent as CRLF lines all the same
        out.append(await conn.send("s@src.test", "lf@dst.test", b"Subject: lf\n\nline\n.x"))
        assert conn.usable and conn.sent == 6
        await conn.close()
        assert not conn.usable
        return out

    attempts = asyncio.run(run())
    assert [(a.phase, a.code) for a in attempts] == [("data", 250)] * 6
    got = sink.received
    assert [r.rcpt_to for r in got] == [f"r{i}@dst.test" for i in range(5)] + ["lf@dst.test"]
    assert all(r.data == BODY for r in got[:5])      # dot-stuffed on the wire, unstuffed there
    assert got[5].data == b"Subject: lf\r\n\r\nline\r\n.x\r\n"
    assert len({r.session_id for r in got}) == 1      # one session for all six


@pytest.mark.parametrize("pipelining", [True, False])
def test_rejections_are_reported_by_step_and_the_session_goes_on(
        sink: SmtpSink, pipelining: bool) -> None:
    sink.pipelining = pipelining
    sink.rcpt_reply = lambda rcpt, n: (550, "5.1.1 no such user\nsecond line") \
        if rcpt.startswith("nobody") else None
    sink.data_reply = lambda rcpt, n: (452, "4.3.1 out of storage") \
        if rcpt.startswith("full") else None

    async def run() -> list:
        conn = await _connect(sink.port)
        out = [await conn.send("s@src.test", "nobody@dst.test", BODY),
               await conn.send("s@src.test", "full@dst.test", BODY),
               await conn.send("s@src.test", "ok@dst.test", BODY)]
        assert conn.usable
        await conn.close()
        return out

    rcpt, data, ok = asyncio.run(run())
    assert (rcpt.phase, rcpt.code) == ("rcpt", 550)
    assert rcpt.text == "5.1.1 no such user\nsecond line"   # multi-line reply, joined
    assert (data.phase, data.code, data.text) == ("data", 452, "4.3.1 out of storage")
    assert (ok.phase, ok.code) == ("data", 250)
    assert [r.rcpt_to for r in sink.received] == ["ok@dst.test"]


def test_421_on_rcpt_reports_it_and_ends_the_session(sink: SmtpSink) -> None:
    sink.rcpt_reply = lambda rcpt, n: (421, "4.7.0 too busy, closing")

    async def run():
        conn = await _connect(sink.port)
        a = await conn.send("s@src.test", "x@dst.test", BODY)
        return a, conn.usable

    a, usable = asyncio.run(run())
    assert (a.phase, a.code, a.text) == ("rcpt", 421, "4.7.0 too busy, closing")
    assert not usable
    assert sink.received == []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])   # the relay runs on uvloop
def test_starttls_then_pipelined_transactions(sink: SmtpSink, loop: str) -> None:
    sink.tls_context = self_signed_tls_context()

    async def run() -> list:
        conn = await _connect(sink.port, tls="opportunistic")
        assert conn.tls and conn.pipelining
        out = [await conn.send("s@src.test", f"t{i}@dst.test", BODY,
                               then=("s@src.test", f"t{i + 1}@dst.test", False) if i < 2
                               else None) for i in range(3)]
        await conn.close()
        return out

    factory = None
    if loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        attempts = runner.run(run())
    assert [(a.phase, a.code) for a in attempts] == [("data", 250)] * 3
    assert [r.rcpt_to for r in sink.received] == [f"t{i}@dst.test" for i in range(3)]
    assert all(r.tls and r.data == BODY for r in sink.received)


async def _read_body(r: asyncio.StreamReader) -> bytes | None:
    """DATA content up to and including the CRLF.CRLF end, as sent; None if the client left."""
    body = b""
    while not body.endswith(b"\r\n.\r\n"):
        chunk = await r.readline()
        if not chunk:
            return None
        body += chunk
    return body


class _RawServer:
    """An SMTP server scripted byte by byte: greets, answers EHLO in pieces, then answers
    MAIL/RCPT/DATA per ``mode``. Records every line it got."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.lines: list[bytes] = []
        self.early: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "_RawServer":
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            w.write(b"220 raw.test ESMTP\r\n")
            await r.readline()                       # EHLO
            for piece in (b"250-raw.test\r\n250-PIPE", b"LINING\r\n250-8BITMIME\r\n",
                          b"250 SIZE 1000000\r\n"):
                w.write(piece)
                await w.drain()
                await asyncio.sleep(0.02)
            while True:
                line = await r.readline()
                if not line:
                    return
                self.lines.append(line)
                if line.startswith(b"MAIL"):
                    # the three pipelined commands, answered in one packet split mid-reply
                    rest = [await r.readline(), await r.readline()]
                    self.lines.extend(rest)
                    if self.mode == "silent":
                        await asyncio.sleep(30)
                        return
                    if self.mode == "drop":
                        w.write(b"250 2.1.0 ok\r\n")
                        await w.drain()
                        w.close()
                        return
                    w.write(b"250 2.1.0 ok\r\n250-2.1.5 recipient")
                    await w.drain()
                    await asyncio.sleep(0.02)
                    w.write(b" ok\r\n250 2.1.5 really\r\n354 go ahead\r\n")
                    body = await _read_body(r)
                    if body is None:
                        return
                    self.lines.append(body)
                    if self.mode == "ahead":
                        # before answering the body: has the next envelope come already?
                        try:
                            early = await asyncio.wait_for(r.readline(), 0.3)
                        except asyncio.TimeoutError:
                            early = b""
                        self.early.append(early)
                        w.write(b"250 2.0.0 queued as X\r\n")
                        if early.startswith(b"MAIL"):
                            self.lines.append(early)
                            rest = [await r.readline(), await r.readline()]
                            self.lines.extend(rest)
                            w.write(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
                            body = await _read_body(r)
                            if body is None:
                                return
                            self.lines.append(body)
                            w.write(b"250 2.0.0 queued as Y\r\n")
                        continue
                    if self.mode == "slowdot":     # scans the content before it answers
                        await asyncio.sleep(1.5)
                    w.write(b"250 2.0.0 queued as X\r\n")
                elif line.startswith(b"QUIT"):
                    w.write(b"221 bye\r\n")
                    await w.drain()
                    w.close()
                    return
                else:
                    w.write(b"250 ok\r\n")
        except (ConnectionError, asyncio.CancelledError):
            pass


def test_pipelined_commands_go_in_one_write_and_split_replies_are_joined() -> None:
    async def run():
        async with _RawServer("ok") as srv:
            conn = await _connect(srv.port)
            assert conn.pipelining and conn.eightbit and not conn.smtputf8
            a = await conn.send("s@src.test", "r@dst.test", b"Subject: x\r\n\r\n.hi\r\n")
            await conn.close()      # QUIT, without waiting for the 221
            for _ in range(100):
                if len(srv.lines) > 4:
                    break
                await asyncio.sleep(0.02)
            return a, srv.lines

    a, lines = asyncio.run(run())
    assert (a.phase, a.code, a.text) == ("data", 250, "2.0.0 queued as X")
    assert lines[:3] == [b"MAIL FROM:<s@src.test> BODY=8BITMIME\r\n", b"RCPT TO:<r@dst.test>\r\n",
                         b"DATA\r\n"]
    assert lines[3] == b"Subject: x\r\n\r\n..hi\r\n.\r\n"
    assert lines[4] == b"QUIT\r\n"


def test_the_last_transaction_carries_quit_in_the_body_write() -> None:
    async def run():
        async with _RawServer("ahead") as srv:
            conn = await _connect(srv.port)
            a = await conn.send("s@src.test", "r@dst.test", BODY, last=True)
            usable = conn.usable
            await conn.close()
            for _ in range(100):
                if srv.early:
                    break
                await asyncio.sleep(0.02)
            return a, usable, srv.early, srv.lines

    a, usable, early, lines = asyncio.run(run())
    assert (a.phase, a.code) == ("data", 250)
    # the server had QUIT before it answered the body: it came in the body's write
    assert early == [b"QUIT\r\n"]
    assert not usable and lines[-1].endswith(b"\r\n.\r\n")


def test_last_and_then_exclude_each_other(sink: SmtpSink) -> None:
    async def run() -> None:
        conn = await _connect(sink.port)
        try:
            await conn.send("s@src.test", "r@dst.test", BODY, last=True,
                            then=("s@src.test", "t@dst.test", False))
        finally:
            await conn.close()

    with pytest.raises(ValueError, match="last=True and a next transaction"):
        asyncio.run(run())
    assert sink.received == []


def test_a_connection_lost_mid_transaction_is_a_connection_failure() -> None:
    async def run():
        async with _RawServer("drop") as srv:
            conn = await _connect(srv.port)
            a = await conn.send("s@src.test", "r@dst.test", BODY)
            return a, conn.usable

    a, usable = asyncio.run(run())
    assert a.phase == "connection" and a.code is None
    assert "lost during RCPT" in a.text and "127.0.0.6" in a.text
    assert not usable


def test_a_server_that_stops_answering_times_out() -> None:
    async def run():
        async with _RawServer("silent") as srv:
            conn = await _connect(srv.port, timeout=0.5)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            a = await conn.send("s@src.test", "r@dst.test", BODY)
            return a, loop.time() - t0, conn.usable

    a, took, usable = asyncio.run(run())
    assert a.phase == "connection" and a.code is None and "no reply within 0.5s" in a.text
    assert 0.4 < took < 5 and not usable


@pytest.mark.parametrize("data_timeout,delivered", [(None, True), (0.5, False)])
def test_the_final_dot_waits_for_the_data_timeout_not_the_command_timeout(
        data_timeout: float | None, delivered: bool) -> None:
    """RFC 5321 §4.5.3.2.6: the reply to the final dot may take 10 minutes (a receiver
    scanning the content); the command timeout (0.5 s here) must not cut it short, or the
    message is sent again and again."""
    from cluster.config import DeliveryConfig
    assert DeliveryConfig().data_timeout == 600.0

    async def run():
        async with _RawServer("slowdot") as srv:
            extra = {} if data_timeout is None else {"data_timeout": data_timeout}
            conn = await connect_site([(10, "mx.dst.test", [HOST])], srv.port,
                                      ehlo_name="relay.test", tls="disabled",
                                      connect_timeout=5, command_timeout=0.5, **extra)
            return await conn.send("s@src.test", "r@dst.test", BODY)

    a = asyncio.run(run())
    if delivered:
        assert (a.phase, a.code) == ("data", 250), a
    else:
        assert a.phase == "connection" and "no reply within 0.5s" in a.text, a


def test_no_host_answering_raises_connect_failure() -> None:
    async def run():
        import socket
        with socket.socket() as s:   # a port nobody listens on
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        await _connect(port)

    with pytest.raises(ConnectFailure) as e:
        asyncio.run(run())
    assert e.value.tried == [f"mx.dst.test[{HOST}]"] and not e.value.all_421


def test_the_next_envelope_rides_behind_a_body() -> None:
    async def run():
        async with _RawServer("ahead") as srv:
            conn = await _connect(srv.port)
            a = await conn.send("s@src.test", "r1@dst.test", b"one\r\n",
                                then=("s@src.test", "r2@dst.test", False))
            b = await conn.send("s@src.test", "r2@dst.test", b"two\r\n")
            await conn.close()
            return a, b, srv.early, srv.lines

    a, b, early, lines = asyncio.run(run())
    assert (a.code, a.text, b.code, b.text) == (250, "2.0.0 queued as X", 250,
                                                "2.0.0 queued as Y")
    # the server had the next MAIL before it answered the first body
    assert early[0] == b"MAIL FROM:<s@src.test> BODY=8BITMIME\r\n"
    assert lines[:8] == [b"MAIL FROM:<s@src.test> BODY=8BITMIME\r\n", b"RCPT TO:<r1@dst.test>\r\n",
                         b"DATA\r\n", b"one\r\n.\r\n",
                         b"MAIL FROM:<s@src.test> BODY=8BITMIME\r\n", b"RCPT TO:<r2@dst.test>\r\n",
                         b"DATA\r\n", b"two\r\n.\r\n"]


def test_an_announced_transaction_never_sent_delivers_nothing(sink: SmtpSink) -> None:
    async def run():
        conn = await _connect(sink.port)
        a = await conn.send("s@src.test", "first@dst.test", BODY,
                            then=("s@src.test", "second@dst.test", False))
        await conn.close()         # the second is not sent: its DATA must never be ended
        return a

    assert asyncio.run(run()).code == 250
    wait_for(lambda: sink.current_sessions == 0, 10, "the session to end")
    assert [r.rcpt_to for r in sink.received] == ["first@dst.test"]


def test_send_must_follow_the_announced_transaction(sink: SmtpSink) -> None:
    async def run():
        conn = await _connect(sink.port)
        await conn.send("s@src.test", "first@dst.test", BODY,
                        then=("s@src.test", "second@dst.test", False))
        with pytest.raises(RuntimeError, match="announced"):
            await conn.send("s@src.test", "other@dst.test", BODY)
        return conn.usable

    assert asyncio.run(run()) is False
    assert [r.rcpt_to for r in sink.received] == ["first@dst.test"]
