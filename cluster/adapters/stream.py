"""A direct, authenticated request/reply stream between two actors: bulk data off Ray's calls.

A Ray actor call costs the caller 0.1–0.6 ms of CPU, and an argument over 100 KiB goes through
the object store (a put on one side, a get on the other, raylet work in between). A shard
leader sends every batch to every replica; measured with 1 shard × 3 copies, the Ray call
machinery of the appends was ~20 % of the leader's CPU and most of the replica's. Over one
TCP connection per (leader, replica), an append is a ``write`` and a ``read``.

Wire: each message is a 4-byte big-endian length then a msgpack body. The client's first
message is ``["hello", token]``; the server answers ``["ok"]`` or closes. Then each request is
``[method, *args]`` and each reply the handler's return value, one request in flight at a
time. Anything malformed closes the connection (the client reconnects or falls back).

Who may connect: the token is made by the server at start and handed out only through an
authenticated Ray call (the replica's ``endpoint()``), so a process that cannot call the
actor cannot append. The bytes are not encrypted (nor are Ray's own, by default); the server
binds the address Ray uses for this node (127.0.0.1 on a one-machine cluster).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
import struct
from typing import Any, Awaitable, Callable, TypeVar

import msgpack

__all__ = ["StreamServer", "StreamClient", "BlockingStreamClient", "StreamError",
           "MAX_MESSAGE"]

log = logging.getLogger("raymta.stream")

#: largest message either side accepts (an append carries at most replication.batch_bytes)
MAX_MESSAGE = 256 << 20
_LEN = struct.Struct(">I")


class StreamError(ConnectionError):
    """The stream broke or was refused; the caller reconnects or uses Ray calls."""


async def _read(reader: asyncio.StreamReader, limit: int) -> Any:
    head = await reader.readexactly(4)
    (n,) = _LEN.unpack(head)
    if n > limit:
        raise StreamError(f"message of {n} bytes is over the limit of {limit}")
    return msgpack.unpackb(await reader.readexactly(n), raw=False)


_BIG = 64 << 10     # bytes over this (so over 65,535: msgpack's bin 32) go out unpacked


def _write(writer: asyncio.StreamWriter, obj: Any) -> None:
    writer.writelines(_encode(obj))


def _encode(obj: Any) -> list[bytes]:
    """``obj`` as one length-prefixed msgpack message, in parts. In a call (a short list),
    big bytes (an append's frames, a batch of submissions) are written as they are behind
    their bin 32 header: packing them would copy megabytes through msgpack's growing buffer
    (6 % of a shard leader's profile samples at batches of 1,000). Long lists (a batch's
    answers) are not searched for them. The reader sees the same msgpack either way."""
    if isinstance(obj, list) and len(obj) <= 16 and \
            any(isinstance(x, (bytes, bytearray)) and len(x) > _BIG for x in obj):
        packer = msgpack.Packer(use_bin_type=True)
        parts = [packer.pack_array_header(len(obj))]
        for x in obj:
            if isinstance(x, (bytes, bytearray)) and len(x) > _BIG:
                parts.append(b"\xc6" + len(x).to_bytes(4, "big"))
                parts.append(x)
            else:
                parts.append(packer.pack(x))
    else:
        parts = [msgpack.packb(obj, use_bin_type=True)]
    size = sum(map(len, parts))
    if size > MAX_MESSAGE:
        raise StreamError(f"message of {size} bytes is over the limit of {MAX_MESSAGE}")
    return [_LEN.pack(size), *parts]


_Client = TypeVar("_Client", "StreamClient", "BlockingStreamClient")


def _greeted(client: _Client, answer: Any, host: str, port: int) -> _Client:
    """``client`` once the server answered its hello with ``["ok"]``; closed, and a
    ``StreamError`` raised, for any other answer or the error that stood for one."""
    if answer != ["ok"]:
        client.close()
        raise StreamError(f"{host}:{port} refused the stream: {answer!r}")
    return client


Handler = Callable[..., Awaitable[Any]]


class StreamServer:
    """Serves ``methods`` (name → coroutine function) to clients that present the token."""

    def __init__(self, methods: dict[str, Handler], host: str = "127.0.0.1",
                 max_message: int = MAX_MESSAGE) -> None:
        self.methods = methods
        self.host = host
        self.port = 0
        self.token = secrets.token_hex(16)
        self.max_message = max_message
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.counters = {"connections": 0, "refused": 0, "requests": 0}

    async def start(self) -> tuple[str, int, str]:
        """Listen (once); returns ``(host, port, token)``."""
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, self.host, 0)
            self.port = self._server.sockets[0].getsockname()[1]
        return self.host, self.port, self.token

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            hello = await asyncio.wait_for(_read(reader, 1024), 10.0)
            if not (isinstance(hello, list) and len(hello) == 2 and hello[0] == "hello" and
                    isinstance(hello[1], str) and
                    hmac.compare_digest(hello[1].encode(), self.token.encode())):
                self.counters["refused"] += 1
                log.warning("stream from %s refused: bad hello", peer)
                return
            _write(writer, ["ok"])
            self.counters["connections"] += 1
            self._conns.add(writer)
            while True:
                req = await _read(reader, self.max_message)
                if not (isinstance(req, list) and req and req[0] in self.methods):
                    log.warning("stream from %s: unknown request %r: closing", peer,
                                req[0] if isinstance(req, list) and req else req)
                    return
                self.counters["requests"] += 1
                _write(writer, await self.methods[req[0]](*req[1:]))
                await writer.drain()
        except (StreamError, ValueError, TypeError, msgpack.UnpackException) as e:
            log.warning("stream from %s closed: %s", peer, e)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, OSError):
            pass   # the client went away (or never said hello): nothing to answer
        finally:
            self._conns.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._conns):
                w.close()
            await self._server.wait_closed()
            self._server = None


class StreamClient:
    """One connection to a :class:`StreamServer`; :meth:`call` sends a request and returns
    the reply. Any failure (including a timeout) closes it: make a new one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self.closed = False

    @classmethod
    async def connect(cls, host: str, port: int, token: str, timeout: float = 5.0
                      ) -> "StreamClient":
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=1 << 20), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise StreamError(f"cannot connect to {host}:{port}: {e}") from None
        self = cls(reader, writer)
        try:
            _write(writer, ["hello", token])
            await writer.drain()
            ok = await asyncio.wait_for(_read(reader, 1024), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            ok = e
        return _greeted(self, ok, host, port)

    async def call(self, method: str, *args: Any, timeout: float = 10.0) -> Any:
        if self.closed:
            raise StreamError("stream is closed")
        async with self._lock:
            try:
                _write(self._writer, [method, *args])
                await self._writer.drain()
                return await asyncio.wait_for(_read(self._reader, MAX_MESSAGE), timeout)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                    msgpack.UnpackException) as e:
                # a late reply would answer the next request: never reuse this connection
                self.close()
                raise StreamError(f"stream call {method} failed: {e!r}") from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()


class BlockingStreamClient:
    """The client side for a thread that is not in an event loop (a sender's process): one
    connection, one request at a time. Any failure closes it; a ``StreamError`` from
    :meth:`call` does not say whether the server got the request."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.closed = False

    @classmethod
    def connect(cls, host: str, port: int, token: str, timeout: float = 5.0
                ) -> "BlockingStreamClient":
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise StreamError(f"cannot connect to {host}:{port}: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self = cls(sock)
        try:
            sock.sendall(b"".join(_encode(["hello", token])))
            ok = self._read(1024)
        except (OSError, ValueError, msgpack.UnpackException) as e:
            ok = e
        return _greeted(self, ok, host, port)

    def _recv_exactly(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("the stream was closed by the server")
            got += k
        return buf

    def _read(self, limit: int) -> Any:
        (n,) = _LEN.unpack(self._recv_exactly(4))
        if n > limit:
            raise StreamError(f"message of {n} bytes is over the limit of {limit}")
        return msgpack.unpackb(self._recv_exactly(n), raw=False)

    def call(self, method: str, *args: Any, timeout: float = 10.0) -> Any:
        if self.closed:
            raise StreamError("stream is closed")
        try:
            self._sock.settimeout(timeout)
            # one write: with TCP_NODELAY each part would be a packet of its own
            self._sock.sendall(b"".join(_encode([method, *args])))
            return self._read(MAX_MESSAGE)
        except (OSError, ValueError, msgpack.UnpackException) as e:
            self.close()   # a late reply would answer the next request
            raise StreamError(f"stream call {method} failed: {e!r}") from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()
