"""The append stream (cluster/adapters/stream.py) over real loopback sockets, without Ray."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os

import pytest

from cluster.adapters.stream import (BlockingStreamClient, StreamClient, StreamError,
                                     StreamServer)


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def serving(**kw):
    """A started StreamServer with an ``append`` (records its calls) and a ``slow`` method;
    closed on the way out."""
    calls = []

    async def append(epoch, leader, first, frames):
        calls.append((epoch, leader, first, len(frames)))
        return ["ok", first + 9]

    async def slow():
        await asyncio.sleep(5)
        return ["ok", 0]

    async def digest(label, data):
        return [label, len(data), hashlib.sha256(data).hexdigest()]

    async def echo(data):
        return data

    async def middle(label, data, shape, more):
        return [label, hashlib.sha256(data).hexdigest(), shape, hashlib.sha256(more).hexdigest()]

    srv = StreamServer({"append": append, "slow": slow, "digest": digest, "echo": echo,
                        "middle": middle}, **kw)
    host, port, token = await srv.start()
    try:
        yield srv, host, port, token, calls
    finally:
        await srv.close()


def test_round_trip_carries_bytes_and_answers_in_order():
    async def go():
        async with serving() as (srv, host, port, token, calls):
            c = await StreamClient.connect(host, port, token)
            frames = bytes(range(256)) * 4000        # ~1 MB, over Ray's inline-argument size
            for first in (1, 11, 21):
                assert await c.call("append", 3, "leader-a", first, frames) == ["ok", first + 9]
            c.close()
            assert calls == [(3, "leader-a", f, len(frames)) for f in (1, 11, 21)]
            assert srv.counters["connections"] == 1 and srv.counters["requests"] == 3
    run(go())


def test_big_bytes_arrive_exactly_on_both_sides_of_the_unpacked_size():
    """Big bytes in a call are written unpacked, behind their own bin 32 header, wherever
    they are among its arguments; smaller ones are packed: the server gets them byte for
    byte, and the arguments after them too, on both sides of the line."""
    async def go():
        async with serving() as (srv, host, port, token, calls):
            c = await StreamClient.connect(host, port, token)
            for n in (0, 255, 256, 65535, 65536, 65537, 70_000, 1 << 20, (3 << 20) + 7):
                data = os.urandom(n)
                assert await c.call("digest", f"n={n}", data) == \
                    [f"n={n}", n, hashlib.sha256(data).hexdigest()]
                more = os.urandom(n // 3)
                assert await c.call("middle", n, data, [n, None, 7], more) == \
                    [n, hashlib.sha256(data).hexdigest(), [n, None, 7],
                     hashlib.sha256(more).hexdigest()]
            c.close()
    run(go())


def test_the_blocking_client_round_trips_and_is_refused_a_wrong_token():
    """The sender's side (a thread outside any event loop): small and big requests and answers
    arrive byte for byte over one connection; a wrong token is refused with a StreamError and
    no call."""
    def blocking(host, port, token):
        c = BlockingStreamClient.connect(host, port, token)
        try:
            out = []
            for n in (0, 100, 70_000, (2 << 20) + 3):
                data = os.urandom(n)
                out.append(c.call("digest", n, data) == [n, n, hashlib.sha256(data).hexdigest()])
                out.append(c.call("echo", data) == data)   # a big answer comes in many reads
            return out
        finally:
            c.close()

    def refused(host, port):
        with pytest.raises(StreamError, match="refused"):
            BlockingStreamClient.connect(host, port, "not-the-token")

    async def go():
        async with serving() as (srv, host, port, token, calls):
            assert await asyncio.to_thread(blocking, host, port, token) == [True] * 8
            await asyncio.to_thread(refused, host, port)
            assert srv.counters["refused"] == 1 and srv.counters["requests"] == 8
    run(go())


def test_wrong_token_is_refused_and_nothing_is_called():
    async def go():
        async with serving() as (srv, host, port, token, calls):
            with pytest.raises(StreamError, match="refused"):
                await StreamClient.connect(host, port, "0" * len(token))
            assert calls == [] and srv.counters["refused"] == 1
            assert srv.counters["connections"] == 0
    run(go())


def test_unknown_method_closes_the_connection():
    async def go():
        async with serving() as (srv, host, port, token, calls):
            c = await StreamClient.connect(host, port, token)
            with pytest.raises(StreamError, match="drop_everything"):
                await c.call("drop_everything", timeout=2)
            assert c.closed
            with pytest.raises(StreamError, match="closed"):
                await c.call("append", 1, "x", 1, b"")
            assert calls == []
    run(go())


def test_message_over_the_servers_limit_closes_it():
    async def go():
        async with serving(max_message=1000) as (srv, host, port, token, calls):
            c = await StreamClient.connect(host, port, token)
            with pytest.raises(StreamError):
                await c.call("append", 1, "x", 1, b"y" * 5000, timeout=2)
            assert calls == []
    run(go())


def test_a_timeout_closes_the_client_so_a_late_reply_cannot_answer_the_next_call():
    async def go():
        async with serving() as (srv, host, port, token, calls):
            c = await StreamClient.connect(host, port, token)
            with pytest.raises(StreamError, match="slow"):
                await c.call("slow", timeout=0.2)
            assert c.closed
            c2 = await StreamClient.connect(host, port, token)
            assert await c2.call("append", 2, "y", 5, b"z") == ["ok", 14]
            c2.close()
    run(go())


def test_server_gone_gives_a_stream_error():
    async def go():
        async with serving() as (srv, host, port, token, _):
            c = await StreamClient.connect(host, port, token)
            await srv.close()
            with pytest.raises(StreamError):
                await c.call("append", 1, "x", 1, b"", timeout=2)
            with pytest.raises(StreamError, match="cannot connect"):
                await StreamClient.connect(host, port, token, timeout=2)
    run(go())
