"""Loopback servers for tests, the demo and benchmarks: an authoritative DNS server and SMTP sinks.

Role: stand-ins for "the Internet" that raymta delivers to, each running on an event loop in a
background thread so that synchronous test code, Ray actors and the ``raymta demo`` command can
all drive them.

- :class:`LoopbackDNS`: a tiny authoritative DNS server (UDP and TCP on one port) answering
  from records added at run time, with per-name SERVFAIL and delay faults and a count of every
  query asked (so a test can prove that a lookup was, or was not, made).
- :class:`SmtpSink`: an aiosmtpd SMTP server that records every accepted recipient's message
  bytes, counts sessions (connect to disconnect) and injects per-recipient, per-attempt faults.
- :class:`SinkGroup`: several sinks on distinct loopback addresses sharing one port, the shape
  of a destination site with several MX hosts (raymta contacts every MX on one port).

Owns: its sockets, threads and in-memory records, and their clean shutdown (``stop()`` closes
every socket and joins every thread it started).
Must not: listen on anything but the address it is given (callers give loopback addresses:
127.0.0.0/8 or ::1), send traffic anywhere, or be imported by the delivery path: it is dev
tooling shipped in the package only because the demo uses it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["self_signed_tls_context", "LoopbackDNS", "Received", "ReplyFault", "SinkGroup", "SmtpSink"]

#: a fault hook: (recipient, attempt number for it, from 1) -> (code, text) to send, or None
ReplyFault = Callable[[str, int], tuple[int, str] | None]

_DEFAULT_SINK_ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


# ====================================================================== shared plumbing
class _LoopThread:
    """An asyncio event loop running in a daemon thread, with async setup and teardown."""

    def __init__(self, name: str, setup: Callable[[], Awaitable[None]],
                 teardown: Callable[[], Awaitable[None]], *, use_uvloop: bool = False) -> None:
        self.name = name
        self._setup = setup
        self._teardown = teardown
        self._use_uvloop = use_uvloop
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> None:
        if self._use_uvloop:
            try:
                import uvloop
                self.loop = uvloop.new_event_loop()
            except ImportError:  # pragma: no cover - uvloop is a dependency
                self.loop = asyncio.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"{self.name}: did not start within {timeout}s")
        if self._error is not None:
            self._thread.join(timeout)
            raise RuntimeError(f"{self.name}: failed to start") from self._error

    def _run(self) -> None:
        loop = self.loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._setup())
            except BaseException as e:  # noqa: BLE001 - re-raised by start()
                self._error = e
                return
            finally:
                self._ready.set()
            loop.run_forever()
            loop.run_until_complete(self._teardown())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        t = self._thread
        if t is None:
            return
        loop = self.loop
        if t.is_alive() and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # loop closed between the check and the call
                pass
        t.join(timeout)
        if t.is_alive():
            raise RuntimeError(f"{self.name}: thread did not stop within {timeout}s")
        self._thread = None


async def _cancel_other_tasks() -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _tcp_listener(host: str, port: int) -> socket.socket:
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR lets a restarted server take the port back while old connections sit in
        # TIME_WAIT; on Linux it does not let two live listeners share a port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(512)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def _bind_same_port(hosts: list[str], port: int, make: Callable[[str, int], list[socket.socket]],
                    tries: int = 100) -> tuple[int, list[socket.socket]]:
    """Bind ``make(host, port)`` for every host on one port; port 0 = find one free on all."""
    last: OSError | None = None
    for _ in range(tries if port == 0 else 1):
        socks: list[socket.socket] = []
        try:
            first = make(hosts[0], port)
            socks.extend(first)
            chosen = first[0].getsockname()[1]
            for h in hosts[1:]:
                socks.extend(make(h, chosen))
            return chosen, socks
        except OSError as e:
            for s in socks:
                s.close()
            if e.errno != errno.EADDRINUSE or port != 0:
                raise
            last = e
    raise OSError(errno.EADDRINUSE, f"no port free on all of {hosts} after {tries} tries"
                  ) from last


# ====================================================================== DNS
def _name_key(name: str | dns.name.Name) -> str:
    if isinstance(name, dns.name.Name):
        text = name.to_text(omit_final_dot=True)
    else:
        text = name.strip()
        if text != ".":
            text = text.rstrip(".")
        if not text.isascii():
            text = dns.name.from_text(text).to_text(omit_final_dot=True)
    return text.lower()


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name if name != "" else ".")


class LoopbackDNS:
    """A small authoritative DNS server for one machine's tests (UDP and TCP, same port).

    Every name it knows is answered authoritatively from the records added to it: a name with
    records of the asked type gets them (NOERROR, AA); a name that exists (it has some record,
    was declared with :meth:`add_name`, or has a descendant with records) but has none of that
    type gets NOERROR with no answer and an SOA in authority (NODATA, RFC 2308); any other name
    gets NXDOMAIN with an SOA. Names are case-insensitive. Mutations are thread-safe and take
    effect for the next query.

    ``queries`` counts every question asked, keyed ``(name, type)`` with the name lowercased
    without trailing dot and the type as text: ``dns.queries[("example.com", "A")]``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ttl: int = 300, *,
                 negative_ttl: int | None = None, shuffle: bool = False) -> None:
        self.host = host
        #: rotate records in every answer like a round-robin server (default: the order added,
        #: so tests are deterministic; dnspython itself shuffles unless told not to)
        self.shuffle = shuffle
        self.port = port
        self.ttl = int(ttl)
        self.negative_ttl = int(ttl if negative_ttl is None else negative_ttl)
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        #: questions per transport, "udp" / "tcp" (a truncated UDP answer is retried on TCP)
        self.transports: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        # name -> rdtype -> (ttl, [rdata])
        self._zone: dict[str, dict[int, tuple[int, list[dns.rdata.Rdata]]]] = {}
        self._declared: set[str] = set()
        # names that have a descendant in the zone (empty non-terminals exist: RFC 8020),
        # refcounted so that lookups of unknown names stay O(labels)
        self._ancestors: collections.Counter[str] = collections.Counter()
        self._servfail: set[str] = set()
        self._delay: dict[str, float] = {}
        self._runner: _LoopThread | None = None
        self._socks: list[socket.socket] = []
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.AbstractServer | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        if self._runner is not None:
            raise RuntimeError("LoopbackDNS already started")

        def pair(host: str, port: int) -> list[socket.socket]:
            udp = socket.socket(_family(host), socket.SOCK_DGRAM)
            try:
                udp.bind((host, port))
                udp.setblocking(False)
                tcp = _tcp_listener(host, udp.getsockname()[1])
            except BaseException:
                udp.close()
                raise
            return [udp, tcp]

        self.port, self._socks = _bind_same_port([self.host], self.port, pair)
        self._runner = _LoopThread(f"LoopbackDNS-{self.host}:{self.port}", self._setup,
                                   self._teardown)
        try:
            self._runner.start()
        except BaseException:
            self._runner = None
            for s in self._socks:
                s.close()
            raise
        return self

    def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop()
        for s in self._socks:  # already closed by their transports; closing twice is harmless
            s.close()
        self._socks = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _setup(self) -> None:
        loop = asyncio.get_running_loop()
        udp_sock, tcp_sock = self._socks
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: asyncio.DatagramTransport = transport  # type: ignore

            def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
                reply, delay = server._answer(data, tcp=False)
                if reply is None:
                    return
                if delay > 0:
                    loop.call_later(delay, self._send, reply, addr)
                else:
                    self._send(reply, addr)

            def _send(self, reply: bytes, addr: tuple[Any, ...]) -> None:
                if not self.transport.is_closing():
                    self.transport.sendto(reply, addr)

            def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
                pass

        transport, _ = await loop.create_datagram_endpoint(Udp, sock=udp_sock)
        self._udp_transport = transport
        self._tcp_server = await asyncio.start_server(self._serve_tcp, sock=tcp_sock)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tcp_writers.add(writer)
        try:
            while True:
                try:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    wire = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                reply, delay = self._answer(wire, tcp=True)
                if reply is None:
                    return
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self._tcp_writers.discard(writer)
            writer.close()

    async def _teardown(self) -> None:
        if self._udp_transport is not None:
            self._udp_transport.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        for w in list(self._tcp_writers):
            w.close()
        await _cancel_other_tasks()
        if self._tcp_server is not None:
            await self._tcp_server.wait_closed()
        await asyncio.sleep(0)

    # ------------------------------------------------------------------ zone data
    def add_record(self, name: str, rdtype: str, *rdata_text: str, ttl: int | None = None) -> None:
        """Add records in zone-file text form, e.g. ``add_record("x.test", "TXT", '"v=spf1 -all"')``.

        Relative names inside the rdata are made absolute (``"10 mx1.sinks.test"`` is fine).
        """
        t = dns.rdatatype.from_text(rdtype)
        rds = [dns.rdata.from_text(dns.rdataclass.IN, t, text, origin=dns.name.root,
                                  relativize=False) for text in rdata_text]
        key = _name_key(name)
        with self._lock:
            self._track(key)
            node = self._zone.setdefault(key, {})
            old_ttl, old = node.get(t, (self.ttl, []))
            merged = list(old) + [rd for rd in rds if rd not in old]
            node[t] = (int(ttl) if ttl is not None else old_ttl, merged)

    def add_mx(self, domain: str, mx: list[tuple[int, str]], *, ttl: int | None = None) -> None:
        """Add MX records, kept in the order given (so a resolver's sorting is exercised)."""
        self.add_record(domain, "MX", *(f"{int(p)} {_exchange(n)}" for p, n in mx), ttl=ttl)

    def add_a(self, name: str, *ips: str, ttl: int | None = None) -> None:
        self.add_record(name, "A", *ips, ttl=ttl)

    def add_aaaa(self, name: str, *ips: str, ttl: int | None = None) -> None:
        self.add_record(name, "AAAA", *ips, ttl=ttl)

    def add_null_mx(self, domain: str, *, ttl: int | None = None) -> None:
        """Publish RFC 7505 null MX ("0 .") for ``domain``, replacing any other MX records."""
        self.remove(domain, "MX")
        self.add_record(domain, "MX", "0 .", ttl=ttl)

    def add_name(self, name: str) -> None:
        """Make ``name`` exist without records: NOERROR/NODATA for every type."""
        key = _name_key(name)
        with self._lock:
            self._track(key)
            self._declared.add(key)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Delete ``name``'s records of one type, or the whole name.

        A name left without records (and not declared with :meth:`add_name`) stops existing.
        """
        key = _name_key(name)
        with self._lock:
            if rdtype is None:
                if key in self._zone or key in self._declared:
                    self._track(key, -1)
                self._zone.pop(key, None)
                self._declared.discard(key)
            else:
                node = self._zone.get(key)
                if node is not None:
                    node.pop(dns.rdatatype.from_text(rdtype), None)
                    if not node and key not in self._declared:
                        # no records left: the name no longer exists (nor do its ENTs)
                        self._track(key, -1)
                        del self._zone[key]

    def set_servfail(self, name: str, on: bool = True) -> None:
        """Answer every query for ``name`` with SERVFAIL (or stop doing so)."""
        key = _name_key(name)
        with self._lock:
            if on:
                self._servfail.add(key)
            else:
                self._servfail.discard(key)

    def set_delay(self, name: str, seconds: float) -> None:
        """Answer queries for ``name`` ``seconds`` late (0 = on time); others are not held up."""
        key = _name_key(name)
        with self._lock:
            if seconds > 0:
                self._delay[key] = float(seconds)
            else:
                self._delay.pop(key, None)

    def query_count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """How many questions were asked, optionally only for ``name`` and/or ``rdtype``."""
        key = None if name is None else _name_key(name)
        t = None if rdtype is None else rdtype.upper()
        with self._lock:
            return sum(n for (qn, qt), n in self.queries.items()
                       if (key is None or qn == key) and (t is None or qt == t))

    def reset_queries(self) -> None:
        with self._lock:
            self.queries.clear()
            self.transports.clear()

    # ------------------------------------------------------------------ answering
    def _track(self, key: str, delta: int = 1) -> None:
        """Count ``key``'s ancestors when it enters (+1) or leaves (-1) the zone (lock held)."""
        if delta > 0 and (key in self._zone or key in self._declared):
            return  # already counted
        labels = key.split(".")
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            self._ancestors[parent] += delta
            if self._ancestors[parent] <= 0:
                del self._ancestors[parent]

    def _exists(self, key: str) -> bool:
        if key in self._zone and any(rds for _, rds in self._zone[key].values()):
            return True
        # a declared name, or an empty non-terminal (RFC 8020): NODATA, not NXDOMAIN
        return key in self._declared or key in self._ancestors

    def _soa(self, key: str) -> dns.rrset.RRset:
        labels = [] if key in (".", "") else key.split(".")
        zone = ".".join(labels[-2:]) + "." if labels else "."
        rrset = dns.rrset.from_text(
            zone, self.negative_ttl, "IN", "SOA",
            f"ns.loopback.invalid. hostmaster.loopback.invalid. 1 3600 600 86400 "
            f"{self.negative_ttl}")
        return rrset

    def _answer(self, wire: bytes, *, tcp: bool) -> tuple[bytes | None, float]:
        """(reply wire or None to stay silent, seconds to wait before sending it)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - not DNS: ignore it, like most servers do
            return None, 0.0
        try:
            return self._respond(query, tcp=tcp)
        except Exception:  # noqa: BLE001 - a bug must show as SERVFAIL, not as a timeout
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire(), 0.0

    def _respond(self, query: dns.message.Message, *, tcp: bool) -> tuple[bytes | None, float]:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != 0 or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if query.opcode() != 0 else dns.rcode.FORMERR)
            return response.to_wire(), 0.0
        q = query.question[0]
        key = _name_key(q.name)
        rdtype = q.rdtype
        with self._lock:
            self.queries[(key, dns.rdatatype.to_text(rdtype))] += 1
            self.transports["tcp" if tcp else "udp"] += 1
            delay = self._delay.get(key, 0.0)
            if key in self._servfail:
                response.flags &= ~dns.flags.AA
                response.set_rcode(dns.rcode.SERVFAIL)
            elif not self._exists(key):
                response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(self._soa(key))
            else:
                node = self._zone.get(key, {})
                types = list(node) if rdtype == dns.rdatatype.ANY else [rdtype]
                for t in types:
                    ttl, rds = node.get(t, (0, []))
                    if rds:
                        rrset = dns.rrset.RRset(q.name, dns.rdataclass.IN, dns.rdatatype.RdataType.make(t))
                        for rd in rds:
                            rrset.add(rd)
                        rrset.ttl = ttl
                        response.answer.append(rrset)
                if not response.answer:
                    response.authority.append(self._soa(key))
        if tcp:
            limit = 65535
        else:
            limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            out = response.to_wire(max_size=limit, want_shuffle=self.shuffle)
        except dns.exception.TooBig:
            # RFC 1035 §4.2.1 / RFC 7766: too big for UDP → TC=1, the client retries over TCP
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            out = response.to_wire(max_size=limit)
        return out, delay


def _exchange(name: str) -> str:
    name = name.strip()
    return name if name.endswith(".") else name + "."


# ====================================================================== SMTP
@dataclass(slots=True)
class Received:
    """One accepted recipient of one message (a multi-recipient transaction gives several)."""

    mail_from: str
    rcpt_to: str
    #: the message exactly as received: CRLF line endings, dot-unstuffed, no final "."
    data: bytes
    session_id: int
    peer: tuple[Any, ...]
    sink: str
    #: time.time() at the end of DATA
    at: float
    #: the session had switched to TLS with STARTTLS before this transaction
    tls: bool = False


class _Stats:
    """Session counters, shared by the sinks of a group (guarded by a lock: several loops)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current = 0
        self.max = 0
        self.total = 0
        self.rcpt_attempts: collections.Counter[str] = collections.Counter()
        self.data_attempts: collections.Counter[str] = collections.Counter()

    def opened(self) -> None:
        with self.lock:
            self.current += 1
            self.total += 1
            self.max = max(self.max, self.current)

    def closed(self) -> None:
        with self.lock:
            self.current -= 1

    def next_rcpt_attempt(self, rcpt: str) -> int:
        with self.lock:
            self.rcpt_attempts[rcpt] += 1
            return self.rcpt_attempts[rcpt]

    def next_data_attempt(self, rcpt: str) -> int:
        with self.lock:
            self.data_attempts[rcpt] += 1
            return self.data_attempts[rcpt]

    def reset(self) -> None:
        with self.lock:
            self.max = self.current
            self.total = 0
            self.rcpt_attempts.clear()
            self.data_attempts.clear()


def _format_reply(code: int, text: str) -> str:
    """``(451, "4.3.0 try later")`` → the reply line(s); a text with newlines goes multi-line."""
    lines = text.split("\n") or [""]
    out = [f"{code}-{line}" for line in lines[:-1]]
    out.append(f"{code} {lines[-1]}")
    return "\r\n".join(out)


class _SinkHandler:
    """aiosmtpd hooks: faults per recipient/attempt, and recording of accepted messages."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: _SinkSMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.sink.pipelining:
            # aiosmtpd reads commands one line at a time, so it takes pipelined ones as they
            # come (RFC 2920); it just does not say so
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server: _SinkSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        sink = self.sink
        attempt = sink._stats.next_rcpt_attempt(address)
        fault = sink.rcpt_reply
        if fault is not None:
            reply = fault(address, attempt)
            if reply is not None:
                code, text = reply
                if code == 421:
                    server._close_after_reply()
                return _format_reply(code, text)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: _SinkSMTP, session: Session,
                          envelope: Envelope) -> str:
        sink = self.sink
        first = envelope.rcpt_tos[0]
        fault = sink.data_reply
        if fault is not None:
            reply = fault(first, sink._stats.next_data_attempt(first))
            if reply is not None:
                code, text = reply
                if code == 421:
                    server._close_after_reply()
                return _format_reply(code, text)
        data = envelope.original_content
        assert isinstance(data, bytes)
        mail_from = envelope.mail_from or ""
        at = time.time()
        sid = server.sink_session_id
        peer: tuple[Any, ...] = session.peer  # type: ignore[assignment]  # str|None in stubs
        name = sink.name
        append = sink.received.append  # list.append is atomic under the GIL
        tls = session.ssl is not None
        for rcpt in envelope.rcpt_tos:
            append(Received(mail_from, rcpt, data, sid, peer, name, at, tls))
        return f"250 2.0.0 OK {sid}"


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP with session accounting and a configurable greeting."""

    def __init__(self, sink: SmtpSink, handler: _SinkHandler, session_id: int,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        # aiosmtpd 1.4.6 keeps command_size_limits on the *class* and adds 26 (SIZE) + 10
        # (SMTPUTF8) to MAIL's limit on every EHLO, so it grows for the whole process: keep a
        # private copy per session.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self._sink = sink
        self.sink_session_id = session_id
        self._started = 0.0
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counted:
            self._counted = True
            self._started = time.time()
            self._sink._session_opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            if self._counted:
                self._counted = False
                self._sink._session_closed(self, self._started, time.time())

    async def _handle_client(self) -> None:
        code = self._sink.greeting_code
        if code != 220:
            # RFC 5321 §3.1: a server may refuse service with 554 (or 421) in the greeting
            cls = "4" if code < 500 else "5"
            await self.push(f"{code} {cls}.3.2 {self.hostname} service not available")
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    def _close_after_reply(self) -> None:
        # 421 means "closing the channel" (RFC 5321 §3.8): close once the reply is flushed
        # (transport.close() sends what is buffered first)
        def close() -> None:
            if self.transport is not None:
                self.transport.close()
        self.loop.call_soon(close)


def self_signed_tls_context(hostname: str = "sink.test") -> Any:
    """A server-side SSLContext with a throwaway self-signed certificate (for STARTTLS tests)."""
    import datetime
    import ssl
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as d:
        cp, kp = f"{d}/cert.pem", f"{d}/key.pem"
        with open(cp, "wb") as fh:
            fh.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(kp, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        ctx.load_cert_chain(cp, kp)
    return ctx


class SmtpSink:
    """An SMTP server on a loopback address that records what it accepts.

    Faults are plain attributes, settable at any time from any thread:
    ``rcpt_reply(rcpt, attempt)`` and ``data_reply(first_rcpt, attempt)`` return ``(code,
    text)`` to send instead of the 250 (``None``: accept); ``attempt`` counts, from 1, the
    RCPT commands for that recipient (resp. the DATA commands whose first recipient it is) this
    sink (or its :class:`SinkGroup`) has seen. ``greeting_code`` other than 220 greets with
    that code and closes. A 421 reply to RCPT or DATA also closes the connection.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, name: str | None = None,
                 hostname: str = "sink.test", use_uvloop: bool = True,
                 data_size_limit: int = 40 * 1024 * 1024, _stats: _Stats | None = None,
                 tls_context: Any = None) -> None:
        self.host = host
        self.port = port
        self.name = name if name is not None else host
        self.hostname = hostname
        self.data_size_limit = data_size_limit
        #: an ssl.SSLContext (server side) to offer STARTTLS with; None: not offered
        self.tls_context = tls_context
        self.received: list[Received] = []
        self.session_log: list[tuple[float, float]] = []
        self.rcpt_reply: ReplyFault | None = None
        self.data_reply: ReplyFault | None = None
        self.greeting_code: int = 220
        #: offer PIPELINING in the EHLO reply (RFC 2920), as real MTAs do
        self.pipelining: bool = True
        self._use_uvloop = use_uvloop
        self._owns_stats = _stats is None
        self._stats = _stats if _stats is not None else _Stats()
        self._own_current = 0
        self._own_max = 0
        self._own_total = 0
        self._next_session = 0
        self._protocols: set[_SinkSMTP] = set()
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._runner: _LoopThread | None = None
        self._handler = _SinkHandler(self)

    # ------------------------------------------------------------------ counters
    @property
    def sessions_total(self) -> int:
        return self._own_total

    @property
    def current_sessions(self) -> int:
        return self._own_current

    @property
    def max_concurrent_sessions(self) -> int:
        return self._own_max

    def counts_by_rcpt(self) -> collections.Counter[str]:
        """Accepted deliveries per recipient address."""
        return collections.Counter(r.rcpt_to for r in list(self.received))

    def reset(self) -> None:
        """Forget what was received and counted (faults stay as set)."""
        self.received.clear()
        self.session_log.clear()
        self._own_total = 0
        self._own_max = self._own_current
        if self._owns_stats:
            self._stats.reset()

    def _session_opened(self, proto: _SinkSMTP) -> None:
        self._protocols.add(proto)
        self._own_current += 1
        self._own_total += 1
        self._own_max = max(self._own_max, self._own_current)
        self._stats.opened()

    def _session_closed(self, proto: _SinkSMTP, started: float, ended: float) -> None:
        self._protocols.discard(proto)
        self._own_current -= 1
        self._stats.closed()
        self.session_log.append((started, ended))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        if self._runner is not None:
            raise RuntimeError(f"SmtpSink {self.name} already started")
        self.port, socks = _bind_same_port([self.host], self.port,
                                           lambda h, p: [_tcp_listener(h, p)])
        self._start_on(socks[0])
        return self

    def _start_on(self, sock: socket.socket) -> None:
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._runner = _LoopThread(f"SmtpSink-{self.name}:{self.port}", self._setup,
                                   self._teardown, use_uvloop=self._use_uvloop)
        try:
            self._runner.start()
        except BaseException:
            self._runner = None
            sock.close()
            self._sock = None
            raise

    def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _setup(self) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> _SinkSMTP:
            self._next_session += 1
            return _SinkSMTP(self, self._handler, self._next_session, loop=loop,
                             hostname=self.hostname, data_size_limit=self.data_size_limit,
                             enable_SMTPUTF8=True, decode_data=False,
                             tls_context=self.tls_context)

        assert self._sock is not None
        self._server = await loop.create_server(factory, sock=self._sock, backlog=512)

    async def _teardown(self) -> None:
        if self._server is not None:
            self._server.close()
        for proto in list(self._protocols):
            if isinstance(proto.transport, asyncio.Transport):
                proto.transport.abort()
        # let connection_lost() run for every session so the counters and log are complete
        for _ in range(5):
            if not self._protocols:
                break
            await asyncio.sleep(0)
        await _cancel_other_tasks()
        if self._server is not None:
            await self._server.wait_closed()


class SinkGroup:
    """Sinks on several loopback addresses sharing one port: one destination site's MX hosts.

    Fault attributes set on the group apply to every sink; attempt numbers count across the
    group (the second RCPT for a recipient is attempt 2 whichever MX host it reaches), and
    ``max_concurrent_sessions`` is the group-wide peak (what a per-site connection limit caps).
    """

    def __init__(self, addresses: list[str] | None = None, port: int = 0, *,
                 hostname: str = "sink.test", use_uvloop: bool = True) -> None:
        addrs = list(addresses) if addresses is not None else list(_DEFAULT_SINK_ADDRESSES)
        if not addrs or len(set(addrs)) != len(addrs):
            raise ValueError(f"need distinct addresses, got {addrs}")
        self.port = port
        self._stats = _Stats()
        self.sinks: list[SmtpSink] = [
            SmtpSink(a, port, name=a, hostname=hostname, use_uvloop=use_uvloop,
                     _stats=self._stats) for a in addrs]
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        if self._started:
            raise RuntimeError("SinkGroup already started")
        self.port, socks = _bind_same_port([s.host for s in self.sinks], self.port,
                                           lambda h, p: [_tcp_listener(h, p)])
        started: list[SmtpSink] = []
        try:
            for sink, sock in zip(self.sinks, socks):
                sink._start_on(sock)
                started.append(sink)
        except BaseException:
            for s in started:
                s.stop()
            for sock in socks[len(started):]:
                sock.close()
            raise
        self._started = True
        return self

    def stop(self) -> None:
        errors = []
        for s in self.sinks:
            try:
                s.stop()
            except Exception as e:  # noqa: BLE001 - stop the others anyway, then raise
                errors.append(e)
        self._started = False
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ observations
    @property
    def addresses(self) -> list[str]:
        return [s.host for s in self.sinks]

    @property
    def received(self) -> list[Received]:
        """Everything accepted by every sink, in order of arrival."""
        out = [r for s in self.sinks for r in list(s.received)]
        out.sort(key=lambda r: r.at)
        return out

    def counts_by_rcpt(self) -> collections.Counter[str]:
        c: collections.Counter[str] = collections.Counter()
        for s in self.sinks:
            c.update(s.counts_by_rcpt())
        return c

    def by_address(self, addr: str) -> SmtpSink:
        for s in self.sinks:
            if s.host == addr:
                return s
        raise KeyError(addr)

    @property
    def sessions_total(self) -> int:
        return self._stats.total

    @property
    def current_sessions(self) -> int:
        return self._stats.current

    @property
    def max_concurrent_sessions(self) -> int:
        return self._stats.max

    def reset(self) -> None:
        for s in self.sinks:
            s.reset()
        self._stats.reset()

    # ------------------------------------------------------------------ faults (all sinks)
    def _set_all(self, attr: str, value: Any) -> None:
        for s in self.sinks:
            setattr(s, attr, value)

    @property
    def rcpt_reply(self) -> ReplyFault | None:
        return self.sinks[0].rcpt_reply

    @rcpt_reply.setter
    def rcpt_reply(self, fn: ReplyFault | None) -> None:
        self._set_all("rcpt_reply", fn)

    @property
    def data_reply(self) -> ReplyFault | None:
        return self.sinks[0].data_reply

    @data_reply.setter
    def data_reply(self, fn: ReplyFault | None) -> None:
        self._set_all("data_reply", fn)

    @property
    def greeting_code(self) -> int:
        return self.sinks[0].greeting_code

    @greeting_code.setter
    def greeting_code(self, code: int) -> None:
        self._set_all("greeting_code", code)

    @property
    def pipelining(self) -> bool:
        return self.sinks[0].pipelining

    @pipelining.setter
    def pipelining(self, on: bool) -> None:
        self._set_all("pipelining", on)
