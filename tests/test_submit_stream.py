"""Submitting over a shard leader's own stream (cluster/client.py ``_SubmitStream``) rather
than by Ray calls, and what happens when that stream fails: real leaders on a local Ray, real
sockets, the sinks counting what is delivered.

The hard case is a request that reached the leader but whose answer never came back: the
client cannot know whether the batch was committed, so it asks again by a Ray call with the
same ids, and must end with every message accepted exactly once."""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter
from typing import Any

import pytest

from tests.conftest import MAIN_SINKS, pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(300)

_LEN = struct.Struct(">I")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _relay_message(src: socket.socket, dst: socket.socket | None) -> None:
    """Read one length-prefixed message from ``src``; send it on to ``dst`` unless None."""
    head = _recv_exactly(src, 4)
    body = _recv_exactly(src, _LEN.unpack(head)[0])
    if dst is not None:
        dst.sendall(head + body)


class AnswerDropper:
    """A TCP relay in front of a leader's submit stream: it passes the hello and its answer,
    then each request; the leader's answer to a request is swallowed and the client's
    connection closed, so the client sees the request sent and no answer."""

    def __init__(self, target: tuple[str, int], *, wait_for_answer: bool = True) -> None:
        self.target = target
        self.wait_for_answer = wait_for_answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answers_dropped = 0
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, socket.create_connection(self.target) as up:
                _relay_message(conn, up)      # hello
                _relay_message(up, conn)      # ["ok"]
                _relay_message(conn, up)      # the submit request
                self.answers_dropped += 1
                if self.wait_for_answer:
                    _relay_message(up, None)  # its answer: committed, and dropped
                # else the client hears nothing more while the leader is still committing:
                # its Ray call may find the ids still pending and has to ask again
        except (OSError, ConnectionError):
            pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def _batch(tag: str, n: int) -> list[dict[str, Any]]:
    return [{"sender": "s@origin.test", "recipients": [f"{tag}{i}@stream.test"],
             "raw": raw_message(i, f"{tag}{i}@stream.test")} for i in range(n)]


def _stream_calls(mc: Any) -> int:
    return mc.stats()["submit_stream_calls"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    from cluster.client import MailCluster
    from cluster.devservers import SinkGroup
    with SinkGroup(MAIN_SINKS[:1]) as sinks:
        dns_server.add_a("mx.stream.test", MAIN_SINKS[0])
        dns_server.add_mx("stream.test", [(10, "mx.stream.test")])
        cfg = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port,
                              sinks.port)
        with MailCluster.connect(config=cfg, num_cpus=2) as mc:
            yield {"mc": mc, "sinks": sinks, "cfg": cfg}


def _delivered_once(env: dict[str, Any], tag: str, n: int) -> None:
    want = {f"{tag}{i}@stream.test" for i in range(n)}
    wait_for(lambda: want <= {r.rcpt_to for r in env["sinks"].received}, 60,
             f"the {tag!r} batch delivered")
    env["mc"].wait_until_idle(timeout=30)
    got = Counter(r.rcpt_to for r in env["sinks"].received if r.rcpt_to in want)
    assert got == Counter({w: 1 for w in want}), got


def test_submits_go_over_the_leaders_stream_and_not_without_it(env):
    from cluster.client import MailCluster
    mc = env["mc"]
    before = _stream_calls(mc)
    res = mc.submit(_batch("a", 30)) + mc.submit(_batch("b", 30))   # one call per shard
    assert all(r.accepted and not r.duplicate for r in res), res
    assert _stream_calls(mc) == before + 2
    # a client told not to (as through the Ray client) makes Ray calls: the streams see nothing
    by_ray = MailCluster(env["cfg"], mc.coordinators, direct=False)
    res2 = by_ray.submit(_batch("c", 30))
    assert all(r.accepted for r in res2)
    assert _stream_calls(mc) == before + 2
    for tag in "abc":
        _delivered_once(env, tag, 30)


def _submit_on_a_loop(mc: Any, msgs: list[dict[str, Any]], **kw: Any) -> list[Any]:
    """``msgs`` through ``MailCluster.submit_prepared_async`` (the SMTP listener's path) on
    a uvloop loop of its own, as the listener runs it."""
    import time

    import uvloop

    from cluster.core.message import validate_batch
    prepared = validate_batch(msgs, now=time.time())
    return uvloop.run(mc.submit_prepared_async(prepared, **kw))


@pytest.mark.parametrize("path", ["blocking", "async"])
@pytest.mark.parametrize("wait_for_answer", [True, False], ids=["after-commit", "mid-commit"])
def test_an_answer_lost_after_the_request_is_recovered_by_asking_again(env, wait_for_answer,
                                                                       path):
    """The stream request reaches the leader but its answer never arrives (cut after the commit,
    or while it is still committing): the client falls back to a Ray call with the same ids,
    learns they are queued (duplicate; "still being committed" is asked again), and each
    message is queued and delivered once — on a sender's thread and on an event loop alike."""
    import ray

    from cluster.client import shard_of
    mc = env["mc"]
    accepted0 = mc.stats()["accepted"]
    droppers = []
    try:
        for st in mc._streams:
            st.close()                              # no pooled connection bypasses the relay
            host, port, token = ray.get(st._handle.submit_endpoint.remote())
            d = AnswerDropper((host, port), wait_for_answer=wait_for_answer)
            droppers.append(d)
            st._endpoint = ["127.0.0.1", d.port, token]
        tag = ("d" if wait_for_answer else "f") + ("a" if path == "async" else "")
        res = mc.submit(_batch(tag, 40)) if path == "blocking" else \
            _submit_on_a_loop(mc, _batch(tag, 40))
        assert all(r.accepted for r in res), res
        assert all(r.duplicate for r in res), "the Ray call should have found them queued"
        assert sum(d.answers_dropped for d in droppers) == 1
        assert mc.stats()["accepted"] == accepted0 + 40      # queued once, not twice
        assert len({shard_of(r.ids[0], 2) for r in res}) == 1
    finally:
        for d in droppers:
            d.close()
        for st in mc._streams:
            st._endpoint = None                     # back to the leaders' real streams
    _delivered_once(env, tag, 40)


def test_a_stale_endpoint_is_replaced_by_asking_the_leader(env):
    """A leader that moved has a new port: the client's old one refuses, it asks the leader
    for the current one and submits over it."""
    mc = env["mc"]
    for st in mc._streams:
        st.close()
        with socket.create_server(("127.0.0.1", 0)) as s:   # a port with nothing behind it
            dead = s.getsockname()[1]
        st._endpoint = ["127.0.0.1", dead, "x" * 32]
    before = _stream_calls(mc)
    res = mc.submit(_batch("e", 20))
    assert all(r.accepted and not r.duplicate for r in res), res
    assert _stream_calls(mc) == before + 1
    _delivered_once(env, "e", 20)


# ---------------------------------------------------------------------------- call size
def test_a_batch_is_cut_into_calls_by_count_and_by_body_bytes():
    from cluster.client import _chunked

    def items(*sizes: int) -> list:
        return [(i, ["id", b"x" * n]) for i, n in enumerate(sizes)]

    def shape(runs: list) -> list:
        return [[i for i, _ in run] for run in runs]

    assert shape(_chunked(items(*[10] * 5), 2, 1000)) == [[0, 1], [2, 3], [4]]
    assert shape(_chunked(items(40, 40, 40, 40), 100, 100)) == [[0, 1], [2, 3]]
    # one item over the byte limit is a call of its own; order is kept
    assert shape(_chunked(items(10, 500, 10, 10), 100, 100)) == [[0], [1], [2, 3]]
    assert _chunked([], 10, 10) == []


def test_big_messages_go_in_several_calls_and_all_arrive(env, monkeypatch):
    """Six ~3 MB messages with a 7 MB limit per call: three calls (by Ray, in parallel), every
    message accepted and delivered once."""
    import cluster.client as client
    monkeypatch.setattr(client, "CHUNK_BYTES", 7_000_000)
    mc = env["mc"]
    msgs = [{"sender": "s@origin.test", "recipients": [f"g{i}@stream.test"],
             "raw": raw_message(i, f"g{i}@stream.test", size=3_000_000)} for i in range(6)]
    before = _stream_calls(mc)
    assert len(client._chunked([(i, [None, b"x" * 3_000_000]) for i in range(6)], 1000,
                               client.CHUNK_BYTES)) == 3
    res = mc.submit(msgs)
    assert all(r.accepted for r in res), [r.error for r in res]
    assert _stream_calls(mc) == before        # several calls: sent by Ray, all at once
    _delivered_once(env, "g", 6)


def test_shard_leaders_collect_cycles_rarely_and_not_through_their_replayed_queue(env):
    """Leaders run with actors.loop.tune_gc's thresholds (Python's default of 700 cost a
    leader a fifth of its CPU), and freeze what their startup replay rebuilt."""
    from actors.loop import GC_THRESHOLDS
    shards = env["mc"].stats()["shards"]
    assert len(shards) == 2
    for st in shards:
        assert st["gc"]["thresholds"] == list(GC_THRESHOLDS), st["gc"]
        assert st["gc"]["frozen"] > 0, st["gc"]


def test_a_mixed_batch_gets_ids_that_route_to_the_shard_that_queued_them(env):
    """One call: plain messages, a message to three recipients, and messages whose
    idempotency keys belong to either shard. Every id is unique and hashes to the shard that
    holds it (status finds each one by its hash alone), and each recipient gets one copy."""
    from cluster.client import shard_of
    mc = env["mc"]
    msgs = _batch("mx", 20)
    keys = [f"mixed-{k}" for k in range(40)]
    keyed = [next(k for k in keys if shard_of(k, 2) == s) for s in (0, 1)]
    keyed += [next(k for k in keys if k not in keyed and shard_of(k, 2) == s) for s in (0, 1)]
    for k, key in zip((5, 9, 13, 17), keyed):
        msgs[k]["idempotency_key"] = key
    three = [f"mxthree{k}@stream.test" for k in range(3)]
    msgs.append({"sender": "s@origin.test", "recipients": three,
                 "raw": raw_message(99, three[0])})
    res = mc.submit(msgs)
    assert all(r.accepted and not r.duplicate for r in res), res
    ids = [i for r in res for i in r.ids]
    assert len(ids) == len(set(ids)) == 23 and len(res[20].ids) == 3
    for k, key in zip((5, 9, 13, 17), keyed):
        assert shard_of(res[k].ids[0], 2) == shard_of(key, 2)
    assert {shard_of(i, 2) for i in ids} == {0, 1}
    states = mc.status(ids)
    assert all(s is not None for s in states), [i for i, s in zip(ids, states) if s is None]
    _delivered_once(env, "mx", 20)
    wait_for(lambda: set(three) <= {r.rcpt_to for r in env["sinks"].received}, 60,
             "the three-recipient message delivered")


def test_live_appends_reach_every_copy_checked_whole(env):
    """A leader's commits go to its copies with their shape and are checked by one checksum
    (SpoolLog.append_batch), not frame by frame: each copy counts them."""
    import ray
    mc = env["mc"]
    res = mc.submit(_batch("w", 10)) + mc.submit(_batch("x", 10))
    assert all(r.accepted for r in res)
    for s in range(2):
        for k in (1, 2):
            st = ray.get(mc.handles[f"replica:{s}:{k}"].stats.remote())
            assert st["appends_checked_whole"] > 0, st
    for tag in "wx":
        _delivered_once(env, tag, 10)


def test_a_stalled_leader_is_retryable_on_the_async_path_and_the_retry_queues_once(env):
    """Runs last: it stops shard 0's leader (SIGSTOP) for a while. A batch sent from an event
    loop (the SMTP listener's path) while the leader cannot answer comes back retryable —
    outcome unknown, never a permanent refusal, within the submit timeout; sent again with the
    same idempotency keys once the leader runs again, it is accepted, and each message is
    queued and delivered once."""
    import os
    import signal
    import time

    import ray

    from cluster.client import shard_of
    mc = env["mc"]
    msgs = _batch("st", 8)
    keys = (f"stalled-{k}" for k in range(1000))
    for m in msgs:    # every message to shard 0, whose leader is stopped
        m["idempotency_key"] = next(k for k in keys if shard_of(k, 2) == 0)
    pid = ray.get(mc.coordinators[0].ping.remote())

    async def stalled() -> tuple[list[Any], float]:
        from cluster.core.message import validate_batch
        warm = await mc.submit_prepared_async(validate_batch(_batch("warm", 2), now=time.time()))
        assert all(r.accepted for r in warm)      # this loop's stream connections are open
        os.kill(pid, signal.SIGSTOP)
        try:
            t = time.monotonic()
            res = await mc.submit_prepared_async(validate_batch(msgs, now=time.time()),
                                                 timeout=2.0, retry_for=0)
            return res, time.monotonic() - t
        finally:
            os.kill(pid, signal.SIGCONT)

    import uvloop
    first, took = uvloop.run(stalled())
    assert took < 6, took     # the submit timeout, not the leader's recovery
    assert all(not r.accepted and r.retryable and r.reason in ("timeout", "not_serving")
               for r in first), first
    again = _submit_on_a_loop(mc, msgs, timeout=60.0, retry_for=30.0)
    assert all(r.accepted for r in again), again
    assert all(shard_of(r.ids[0], 2) == 0 for r in again)
    _delivered_once(env, "st", 8)
