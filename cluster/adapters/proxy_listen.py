"""Listeners behind a TCP load balancer: accept a connection, read the PROXY protocol header
the balancer sends first, then hand the socket to the real protocol (SMTP or HTTP).

One path for every listener that takes the header — SMTP with STARTTLS (587), SMTP over
implicit TLS (465) and the HTTP API — so the rules live in one place:

- only a connection whose own peer is in ``proxy_networks`` may send a header
  (:class:`ProxyGate`); anyone else could claim any client address;
- the header is read from the raw socket with :func:`cluster.core.proxy_protocol.bytes_needed`,
  never a byte past it, so nothing of the session that follows is consumed. TLS (implicit TLS,
  HTTPS) starts only after it: the header precedes the handshake, as HAProxy sends it;
- a connection from outside, with a malformed header, or silent for ``timeout`` is logged
  (``PROXY listener <host>:<port>: connection from <peer> refused: <why>``), counted and
  closed before the protocol sees it;
- the protocol factory gets the client address: the header's, or the connection's own for a
  v2 LOCAL (the balancer's health check) or v1 UNKNOWN header;
- bounded: at most ``max_pending`` connections wait for their header at once (each for at
  most ``timeout``); past that a new connection is closed at once.

:meth:`ProxyGate.client` is the rule for an HTTP-mode balancer (``X-Forwarded-For``): the
header is believed only from a trusted peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl as _ssl
from collections.abc import Callable, Iterable, Sequence

from cluster.core.proxy_protocol import (
    ProxyHeader,
    ProxyProtocolError,
    bytes_needed,
    forwarded_client,
    trusted,
)
from cluster.core.proxy_protocol import parse as parse_proxy_header

__all__ = ["ProxyGate", "ProxyListener", "read_proxy_header"]

log = logging.getLogger("raymta.ingress")

#: connections that may wait for their PROXY header at once, per listener
MAX_PENDING = 1024


class ProxyGate:
    """Who may send a PROXY header (or an ``X-Forwarded-For``): the balancers' networks."""

    def __init__(self, networks: Iterable[str], timeout: float,
                 on_refused: Callable[[], None] | None = None) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.timeout = timeout
        self.on_refused = on_refused or (lambda: None)

    def trusted(self, ip: str) -> bool:
        """Whether ``ip`` (a connection's own peer) is one of the balancers."""
        return trusted(ip, self.networks)

    def client(self, peer: str | None, forwarded_for: Sequence[str]) -> str | None:
        """An HTTP request's client (:func:`cluster.core.proxy_protocol.forwarded_client`)."""
        return forwarded_client(peer, forwarded_for, self.networks)


async def read_proxy_header(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                            timeout: float) -> ProxyHeader:
    """The PROXY header at the start of ``sock`` (non-blocking), read to its last byte and no
    further. Raises :class:`ProxyProtocolError` saying why there is none."""
    buf = b""
    try:
        async with asyncio.timeout(timeout):
            while (n := bytes_needed(buf)) > 0:
                chunk = await loop.sock_recv(sock, n)
                if not chunk:
                    raise ProxyProtocolError(f"closed after {len(buf)} bytes of a PROXY header")
                buf += chunk
    except TimeoutError:
        raise ProxyProtocolError((f"PROXY header incomplete after {len(buf)} bytes" if buf
                                  else "no PROXY header") + f" within {timeout:g} s") from None
    except ConnectionError:
        raise ProxyProtocolError(f"closed after {len(buf)} bytes of a PROXY header") from None
    return parse_proxy_header(buf)


class ProxyListener:
    """A listening socket on ``host:port`` whose connections start with a PROXY header.

    ``factory(client)`` makes the protocol of a connection, ``client`` being the (address,
    port) the header names (or the connection's own peer). ``ssl``: TLS begins after the
    header. Looks like an :class:`asyncio.Server` to its owner: ``sockets``, ``close()``."""

    def __init__(self, gate: ProxyGate, host: str, port: int,
                 factory: Callable[[tuple[str, int]], asyncio.BaseProtocol], *,
                 ssl: _ssl.SSLContext | None = None, max_pending: int = MAX_PENDING) -> None:
        self.gate, self.host, self.port = gate, host, port
        self.factory = factory
        self.ssl = ssl
        self.max_pending = max_pending
        self.sockets: list[socket.socket] = []
        self._accepting: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> ProxyListener:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sockets = [sock]
        self.port = sock.getsockname()[1]
        self._accepting = loop.create_task(self._accept(sock))
        return self

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for t in list(self._pending):
            t.cancel()
        for s in self.sockets:
            s.close()

    async def _accept(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as e:   # EMFILE and the like: do not spin
                log.warning("PROXY listener %s:%d: accept failed: %s", self.host, self.port, e)
                await asyncio.sleep(0.1)
                continue
            if len(self._pending) >= self.max_pending:
                self._refuse(conn, str(addr[0]), f"{self.max_pending} connections already "
                             "waiting for their PROXY header")
                continue
            conn.setblocking(False)
            t = loop.create_task(self._admit(conn, (str(addr[0]), int(addr[1]))))
            self._pending.add(t)
            t.add_done_callback(self._pending.discard)

    def _refuse(self, conn: socket.socket, peer: str, problem: str) -> None:
        self.gate.on_refused()
        log.warning("PROXY listener %s:%d: connection from %s refused: %s", self.host,
                    self.port, peer, problem)
        # FIN, not RST: a close with unread bytes would reset the connection, and the client
        # would see an error instead of the end of the stream; the socket goes shortly after
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.recv(65536)
            conn.shutdown(socket.SHUT_WR)
        asyncio.get_running_loop().call_later(0.5, conn.close)

    async def _admit(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        if not self.gate.trusted(peer[0]):
            self._refuse(conn, peer[0], "not in ingress.proxy_networks")
            return
        loop = asyncio.get_running_loop()
        try:
            header = await read_proxy_header(loop, conn, self.gate.timeout)
        except ProxyProtocolError as e:
            self._refuse(conn, peer[0], str(e))
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        client = (header.address, header.port or 0) if header.address is not None else peer
        try:
            await loop.connect_accepted_socket(lambda: self.factory(client), conn, ssl=self.ssl)
        except (OSError, _ssl.SSLError, TimeoutError) as e:   # a failed TLS handshake
            log.info("PROXY listener %s:%d: client %s (via %s): %s", self.host, self.port,
                     client[0], peer[0], e)
            with contextlib.suppress(OSError):
                conn.close()
