"""The loopback dev servers: LoopbackDNS answered with dnspython's query functions, and the SMTP
sinks driven by aiosmtplib. Real sockets on 127.0.0.x only; every server is stopped."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiosmtplib
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from cluster.devservers import LoopbackDNS, Received, SinkGroup, SmtpSink

pytestmark = pytest.mark.timeout(120)

GROUP_ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


# ====================================================================== fixtures and helpers
@pytest.fixture
def dns_server() -> Iterator[LoopbackDNS]:
    server = LoopbackDNS().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def group() -> Iterator[SinkGroup]:
    g = SinkGroup(GROUP_ADDRESSES)
    g.start()
    try:
        yield g
    finally:
        g.stop()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    s = SmtpSink("127.0.0.5", name="solo").start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()
                  and t.name.startswith(("LoopbackDNS", "SmtpSink"))]
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"threads left running: {leaked}")


def ask(server: LoopbackDNS, name: str, rdtype: str, *, tcp: bool = False,
        timeout: float = 2.0) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    query = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
    return asyncio.run(query(q, server.host, timeout=timeout, port=server.port))


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


MESSAGE = (
    b"From: Sender <sender@src.test>\r\n"
    b"To: rcpt@dst.test\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"Message-ID: <1@src.test>\r\n"
    b"\r\n"
    b"A body line.\r\n"
    b".a line that starts with a dot (dot-stuffed on the wire)\r\n"
    b"..two dots\r\n"
    b"8-bit: caf\xc3\xa9 \xe2\x9c\x89\r\n"
    b".\r\n"
    b"\r\n"
    b"last line\r\n"
)


async def send(host: str, port: int, rcpts: list[str], data: bytes = MESSAGE,
               sender: str = "sender@src.test") -> tuple[dict[str, Any], str]:
    async with aiosmtplib.SMTP(hostname=host, port=port, timeout=10) as c:
        return await c.sendmail(sender, rcpts, data)


# ====================================================================== LoopbackDNS
def test_dns_answers_records_nodata_and_nxdomain(dns_server: LoopbackDNS) -> None:
    dns_server.add_mx("Example.TEST", [(20, "mx2.sinks.test"), (10, "mx1.sinks.test")])
    dns_server.add_a("mx1.sinks.test", "127.0.0.2", "127.0.0.3")
    dns_server.add_aaaa("mx1.sinks.test", "::1")

    mx = ask(dns_server, "example.test", "MX")
    assert mx.rcode() == dns.rcode.NOERROR and mx.flags & dns.flags.AA
    assert [rd.to_text() for rd in mx.answer[0]] == ["20 mx2.sinks.test.", "10 mx1.sinks.test."]

    a = ask(dns_server, "MX1.sinks.test.", "A")  # names are case-insensitive
    assert sorted(rd.address for rd in a.answer[0]) == ["127.0.0.2", "127.0.0.3"]
    assert a.answer[0].ttl == 300

    nodata = ask(dns_server, "example.test", "A")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority and nodata.authority[0].rdtype == dns.rdatatype.SOA

    nx = ask(dns_server, "nope.example.test", "MX")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nx.authority and nx.authority[0].rdtype == dns.rdatatype.SOA

    ent = ask(dns_server, "sinks.test", "A")  # empty non-terminal: exists, no records
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer

    assert dns_server.queries[("example.test", "MX")] == 1
    assert dns_server.queries[("mx1.sinks.test", "A")] == 1
    assert dns_server.query_count("example.test") == 2


def test_dns_null_mx_servfail_and_tcp(dns_server: LoopbackDNS) -> None:
    dns_server.add_mx("null.test", [(10, "mx.null.test")])
    dns_server.add_null_mx("null.test")  # replaces the MX set
    r = ask(dns_server, "null.test", "MX", tcp=True)
    assert [rd.to_text() for rd in r.answer[0]] == ["0 ."]

    dns_server.add_a("broken.test", "127.0.0.9")
    dns_server.set_servfail("BROKEN.test")
    assert ask(dns_server, "broken.test", "A").rcode() == dns.rcode.SERVFAIL
    assert ask(dns_server, "broken.test", "A", tcp=True).rcode() == dns.rcode.SERVFAIL
    dns_server.set_servfail("broken.test", False)
    assert ask(dns_server, "broken.test", "A").answer[0][0].address == "127.0.0.9"
    assert dns_server.transports["tcp"] == 2


def test_dns_delay_holds_only_that_name(dns_server: LoopbackDNS) -> None:
    dns_server.add_a("slow.test", "127.0.0.10")
    dns_server.add_a("fast.test", "127.0.0.11")
    dns_server.set_delay("slow.test", 1.0)

    async def both() -> tuple[float, float]:
        async def timed(name: str) -> float:
            t0 = time.monotonic()
            q = dns.message.make_query(name, "A")
            await dns.asyncquery.udp(q, dns_server.host, timeout=5, port=dns_server.port)
            return time.monotonic() - t0
        slow, fast = await asyncio.gather(timed("slow.test"), timed("fast.test"))
        return slow, fast

    slow, fast = asyncio.run(both())
    assert slow >= 0.9 and fast < 0.5, (slow, fast)
    with pytest.raises(dns.exception.Timeout):
        ask(dns_server, "slow.test", "A", timeout=0.3)


def test_dns_mutation_from_another_thread_while_serving(dns_server: LoopbackDNS) -> None:
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            dns_server.add_a(f"h{i % 50}.churn.test", f"127.0.1.{i % 250 + 1}")
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(100):
            assert ask(dns_server, "h1.churn.test", "A").rcode() in (dns.rcode.NOERROR,
                                                                    dns.rcode.NXDOMAIN)
    finally:
        stop.set()
        t.join()
    assert dns_server.queries[("h1.churn.test", "A")] == 100


def test_dns_stop_frees_udp_and_tcp_port() -> None:
    server = LoopbackDNS("127.0.0.1").start()
    port = server.port
    try:
        server.add_a("x.test", "127.0.0.1")
        assert ask(server, "x.test", "A", tcp=True).answer
    finally:
        server.stop()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        udp.bind(("127.0.0.1", port))
        tcp.bind(("127.0.0.1", port))
    finally:
        udp.close()
        tcp.close()
    again = LoopbackDNS("127.0.0.1", port).start()  # a fixed port can be reused at once
    try:
        assert again.port == port
    finally:
        again.stop()


# ====================================================================== SmtpSink / SinkGroup
def test_group_shares_one_port_on_distinct_addresses(group: SinkGroup) -> None:
    assert [s.host for s in group.sinks] == GROUP_ADDRESSES
    assert {s.port for s in group.sinks} == {group.port} and group.port > 0
    assert group.by_address("127.0.0.3") is group.sinks[1]
    with pytest.raises(KeyError):
        group.by_address("127.0.0.9")


def test_group_receives_exact_bytes_one_entry_per_recipient(group: SinkGroup) -> None:
    async def deliver() -> None:
        for i, addr in enumerate(GROUP_ADDRESSES):
            errors, _ = await send(addr, group.port, [f"user{i}@dst.test"])
            assert errors == {}
        errors, _ = await send("127.0.0.2", group.port, ["a@dst.test", "b@dst.test", "c@x.test"])
        assert errors == {}

    t0 = time.time()
    asyncio.run(deliver())
    got = group.received
    assert len(got) == 6
    assert all(isinstance(r, Received) and r.data == MESSAGE for r in got)
    assert all(r.mail_from == "sender@src.test" and t0 <= r.at <= time.time() for r in got)
    assert [r.sink for r in got[:3]] == GROUP_ADDRESSES
    multi = group.by_address("127.0.0.2").received[1:]
    assert [r.rcpt_to for r in multi] == ["a@dst.test", "b@dst.test", "c@x.test"]
    assert len({r.session_id for r in multi}) == 1 and multi[0].peer[0] == "127.0.0.1"
    assert group.counts_by_rcpt() == {"user0@dst.test": 1, "user1@dst.test": 1,
                                      "user2@dst.test": 1, "a@dst.test": 1, "b@dst.test": 1,
                                      "c@x.test": 1}
    wait_for(lambda: group.current_sessions == 0)
    assert group.sessions_total == 4
    assert len(group.by_address("127.0.0.2").session_log) == 2


def test_large_message_and_smtputf8(sink: SmtpSink) -> None:
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 5000  # ~5 MB, max-length lines

    async def deliver() -> None:
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port, timeout=30) as c:
            assert c.supports_extension("smtputf8") and c.supports_extension("8bitmime")
            errors, _ = await c.sendmail("sender@src.test", ["big@dst.test"], big)
            assert errors == {}
            errors, _ = await c.sendmail("séndér@src.test", ["rcpt@dst.test"], MESSAGE,
                                         mail_options=["SMTPUTF8", "BODY=8BITMIME"])
            assert errors == {}

    asyncio.run(deliver())
    assert sink.received[0].data == big
    assert sink.received[1].mail_from == "séndér@src.test"
    assert sink.received[1].data == MESSAGE


def test_concurrent_sessions_are_counted_from_connect_to_disconnect(sink: SmtpSink) -> None:
    async def hold_three() -> None:
        clients = [aiosmtplib.SMTP(hostname=sink.host, port=sink.port, timeout=10)
                   for _ in range(3)]
        await asyncio.gather(*(c.connect() for c in clients))
        assert sink.current_sessions == 3
        await asyncio.gather(*(c.quit() for c in clients))

    asyncio.run(hold_three())
    wait_for(lambda: sink.current_sessions == 0)
    assert sink.max_concurrent_sessions == 3
    assert sink.sessions_total == 3
    assert len(sink.session_log) == 3
    assert all(start <= end for start, end in sink.session_log)


def test_group_counts_concurrency_across_its_sinks(group: SinkGroup) -> None:
    async def one_each() -> None:
        clients = [aiosmtplib.SMTP(hostname=a, port=group.port, timeout=10)
                   for a in GROUP_ADDRESSES]
        await asyncio.gather(*(c.connect() for c in clients))
        await asyncio.gather(*(c.quit() for c in clients))

    asyncio.run(one_each())
    wait_for(lambda: group.current_sessions == 0)
    assert group.max_concurrent_sessions == 3
    assert [s.max_concurrent_sessions for s in group.sinks] == [1, 1, 1]


def test_recipient_faults_by_attempt(group: SinkGroup) -> None:
    seen: list[tuple[str, int]] = []

    def rcpt_reply(rcpt: str, attempt: int) -> tuple[int, str] | None:
        seen.append((rcpt, attempt))
        if rcpt.startswith("hard"):
            return 550, "5.1.1 user unknown"
        if rcpt.startswith("soft") and attempt == 1:
            return 451, "4.3.0 try later"
        return None

    group.rcpt_reply = rcpt_reply

    async def deliver() -> None:
        errors, _ = await send("127.0.0.2", group.port, ["soft@dst.test", "hard@dst.test",
                                                          "ok@dst.test"])
        assert {r: (e.code, e.message) for r, e in errors.items()} == {
            "soft@dst.test": (451, "4.3.0 try later"),
            "hard@dst.test": (550, "5.1.1 user unknown")}
        # the retry reaches another MX host of the site: attempt numbers count group-wide
        errors, _ = await send("127.0.0.3", group.port, ["soft@dst.test"])
        assert errors == {}
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as info:
            await send("127.0.0.4", group.port, ["hard@dst.test"])
        assert info.value.recipients[0].code == 550

    asyncio.run(deliver())
    assert seen == [("soft@dst.test", 1), ("hard@dst.test", 1), ("ok@dst.test", 1),
                    ("soft@dst.test", 2), ("hard@dst.test", 2)]
    assert group.counts_by_rcpt() == {"ok@dst.test": 1, "soft@dst.test": 1}
    assert group.by_address("127.0.0.3").received[0].rcpt_to == "soft@dst.test"


def test_data_fault_keyed_by_first_recipient(sink: SmtpSink) -> None:
    sink.data_reply = lambda rcpt, attempt: (452, "4.3.1 insufficient storage") \
        if attempt == 1 else None

    async def deliver() -> None:
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await send(sink.host, sink.port, ["first@dst.test", "second@dst.test"])
        assert info.value.code == 452
        errors, _ = await send(sink.host, sink.port, ["first@dst.test", "second@dst.test"])
        assert errors == {}

    asyncio.run(deliver())
    assert [r.rcpt_to for r in sink.received] == ["first@dst.test", "second@dst.test"]


def test_421_on_rcpt_closes_the_connection(sink: SmtpSink) -> None:
    sink.rcpt_reply = lambda rcpt, attempt: (421, "4.7.0 too many connections")

    async def deliver() -> None:
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port, timeout=10) as c:
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
                await c.sendmail("s@src.test", ["r@dst.test"], MESSAGE)
            with pytest.raises(aiosmtplib.SMTPServerDisconnected):
                await c.noop()

    asyncio.run(deliver())
    wait_for(lambda: sink.current_sessions == 0)
    assert sink.received == []


def test_421_greeting(sink: SmtpSink) -> None:
    sink.greeting_code = 421

    async def connect() -> None:
        c = aiosmtplib.SMTP(hostname=sink.host, port=sink.port, timeout=10)
        with pytest.raises(aiosmtplib.SMTPConnectError) as info:
            await c.connect()
        assert isinstance(info.value, aiosmtplib.SMTPResponseException)
        assert info.value.code == 421
        assert "4.3.2" in info.value.message

    asyncio.run(connect())
    wait_for(lambda: sink.current_sessions == 0)
    assert sink.sessions_total == 1 and sink.received == []
    sink.greeting_code = 220  # back to normal at once
    errors, _ = asyncio.run(send(sink.host, sink.port, ["r@dst.test"]))
    assert errors == {} and len(sink.received) == 1


def test_stop_frees_the_port_and_closes_open_sessions() -> None:
    s = SmtpSink("127.0.0.6").start()
    port = s.port
    held = socket.create_connection(("127.0.0.6", port), timeout=5)
    try:
        assert held.recv(1024).startswith(b"220 ")
        wait_for(lambda: s.current_sessions == 1)
    finally:
        s.stop()
    try:
        held.settimeout(5)
        assert held.recv(1024) == b""  # the server closed the session on stop()
    except ConnectionResetError:
        pass
    finally:
        held.close()
    assert s.current_sessions == 0 and len(s.session_log) == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.6", port), timeout=5).close()
    again = SmtpSink("127.0.0.6", port).start()
    try:
        assert again.port == port
        errors, _ = asyncio.run(send("127.0.0.6", port, ["r@dst.test"]))
        assert errors == {} and len(again.received) == 1
    finally:
        again.stop()


def test_group_stop_frees_the_shared_port() -> None:
    g = SinkGroup(["127.0.0.7", "127.0.0.8"]).start()
    port = g.port
    g.stop()
    for addr in ("127.0.0.7", "127.0.0.8"):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((addr, port), timeout=5).close()
    again = SinkGroup(["127.0.0.7", "127.0.0.8"], port=port).start()
    try:
        assert again.port == port
    finally:
        again.stop()


def test_reset_forgets_received_and_attempts(sink: SmtpSink) -> None:
    attempts: list[int] = []
    sink.rcpt_reply = lambda rcpt, n: attempts.append(n)  # type: ignore[func-returns-value]
    asyncio.run(send(sink.host, sink.port, ["r@dst.test"]))
    wait_for(lambda: sink.current_sessions == 0)
    sink.reset()
    assert sink.received == [] and sink.sessions_total == 0
    asyncio.run(send(sink.host, sink.port, ["r@dst.test"]))
    assert attempts == [1, 1]


def test_dns_remove_makes_names_and_their_parents_vanish(dns_server: LoopbackDNS) -> None:
    dns_server.add_a("a.b.gone.test", "127.0.0.12")
    dns_server.add_record("a.b.gone.test", "TXT", '"still here"')
    assert ask(dns_server, "b.gone.test", "A").rcode() == dns.rcode.NOERROR
    dns_server.remove("a.b.gone.test", "A")  # the name stays: it still has a TXT record
    nodata = ask(dns_server, "a.b.gone.test", "A")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    dns_server.remove("a.b.gone.test", "TXT")  # its last records: the name is gone
    for name in ("a.b.gone.test", "b.gone.test", "gone.test"):
        assert ask(dns_server, name, "A").rcode() == dns.rcode.NXDOMAIN, name
