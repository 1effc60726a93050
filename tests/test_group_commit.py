"""Group commit in a shard leader (actors/coordinator.py): submit calls that arrive while a
commit is in flight share the next one (one log append, one fsync, one replication round),
bounded in records and bytes (cluster.core.replication.group_take); a commit that cannot
reach a quorum fails every call it carried with a retryable answer. Real Ray, 1 shard x 3
copies with fsync, real submit streams; the bounds are tables."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import replace
from typing import Any

import pytest

from cluster.core import queue as q
from cluster.core.replication import group_take
from tests.conftest import pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(240)


# ---------------------------------------------------------------------------- group_take
@pytest.mark.parametrize("waiting,max_records,max_bytes,take", [
    ([], 10, 100, 0),                                   # nothing waits
    ([(1, 10)], 10, 100, 1),
    ([(3, 10), (3, 10), (3, 10)], 10, 100, 3),          # all fit
    ([(3, 10), (3, 10), (3, 10), (3, 10)], 10, 100, 3),  # the 4th would pass 10 records
    ([(3, 40), (3, 40), (3, 40)], 10, 100, 2),          # the 3rd would pass 100 bytes
    ([(3, 10), (7, 90)], 10, 100, 2),                   # exactly at both bounds
    ([(50, 10), (1, 1)], 10, 100, 1),                   # a call over the bound goes alone
    ([(1, 500), (1, 1)], 10, 100, 1),
    ([(1, 1), (50, 10)], 10, 100, 1),                   # ... but never joins another
])
def test_group_take_keeps_a_commit_within_its_bounds(waiting, max_records, max_bytes, take):
    assert group_take(iter(waiting), max_records, max_bytes) == take


def test_group_take_reads_the_waiting_calls_only_as_far_as_it_takes():
    seen = []

    def waiting():
        for k in range(100):
            seen.append(k)
            yield 1, 1
    assert group_take(waiting(), 5, 1000) == 5
    assert seen == list(range(6))   # the 6th is looked at (it does not fit), no further


@pytest.mark.parametrize("bound", [(0, 100), (10, 0), (-1, -1)])
def test_group_take_refuses_bounds_below_one(bound):
    with pytest.raises(ValueError, match="group_take: max_records"):
        group_take([(1, 1)], *bound)


def test_records_bytes_counts_the_bodies_records_carry():
    body = b"x" * 1000
    recs = [q.message_record("m1", body, "s@a.test", "r@b.test", "b.test", 1.0, None, 2.0,
                             None, None, None, False),
            q.body_record("b1", body),
            q.accept_record("m2", "b1", "s@a.test", "r@b.test", "b.test", 1.0, None, 2.0,
                            None, None, None, False),
            q.delivered_record("m3", 1, 250, "ok", "site", 1.0) if hasattr(q, "delivered_record")
            else q.body_record("b2", b"")]
    assert q.records_bytes(recs) == 2000 + 4 * q.RECORD_OVERHEAD
    assert q.records_bytes([]) == 0


# ---------------------------------------------------------------------------- a real shard
@pytest.fixture(scope="module")
def shard(tmp_path_factory, dns_server):
    from cluster.client import MailCluster
    # nothing is delivered (held.test's MX does not listen): deferrals, never bounces
    dns_server.add_a("mx.held.test", "127.0.0.2")
    dns_server.add_mx("held.test", [(10, "mx.held.test")])
    base = pipeline_config(str(tmp_path_factory.mktemp("group")), dns_server.port, 9)
    cfg = replace(base, queue=replace(base.queue, shards=1),
                  replication=replace(base.replication, ack_timeout=1.5))
    with MailCluster.connect(config=cfg, num_cpus=2) as mc:
        yield mc, cfg


def _stats(mc: Any) -> dict[str, Any]:
    import ray
    return ray.get(mc.coordinators[0].stats.remote(), timeout=30)


def _msgs(tag: str, n: int) -> list[dict[str, Any]]:
    return [{"sender": "s@origin.test", "recipients": [f"{tag}-{i}@held.test"],
             "raw": raw_message(i, f"{tag}-{i}@held.test", size=400)} for i in range(n)]


def _in_threads(n: int, fn: Any) -> list[Any]:
    out: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            out[k] = fn(k)
        except BaseException as e:   # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)
    ts = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    if errors:
        raise errors[0]
    return out


def test_concurrent_submit_calls_share_commits(shard):
    mc, _cfg = shard
    before = _stats(mc)["group_commit"]
    threads, calls_each = 12, 8

    def sender(k: int) -> list[Any]:
        res = []
        for c in range(calls_each):
            res.extend(mc.submit(_msgs(f"t{k}c{c}", 3), retry_for=0))
        return res
    results = [r for rs in _in_threads(threads, sender) for r in rs]
    assert len(results) == threads * calls_each * 3
    assert all(r.accepted for r in results), [r.error for r in results if r.error][:3]
    after = _stats(mc)["group_commit"]
    calls = after["calls"] - before["calls"]
    commits = after["call_commits"] - before["call_commits"]
    print(f"\n{calls} concurrent calls in {commits} commits; largest {after['largest_calls']}")
    assert calls == threads * calls_each
    assert commits < calls                     # calls shared commits ...
    assert after["grouped_commits"] > before["grouped_commits"]
    assert after["largest_calls"] >= 2


def test_a_grouped_commit_without_quorum_fails_every_call_it_carried_retryably(shard):
    import ray
    mc, cfg = shard
    ns = cfg.cluster.namespace
    # six open connections to the leader's submit stream, one for each caller below (a new
    # one would need the leader to answer its hello, one after the other)
    from cluster.client import _drive
    stream = mc._streams[0]
    conns = [_drive(stream._connect(None, 10.0)) for _ in range(6)]   # blocking connections
    assert all(c is not None for c in conns)
    stream._idle[None].extend(conns)
    leader = _stats(mc)["pid"]
    replicas = [ray.get(ray.get_actor(f"replica:0:{s}", namespace=ns).ping.remote())
                for s in (1, 2)]
    before = _stats(mc)["group_commit"]
    stopped: list[int] = []
    try:
        for pid in replicas:          # no copy answers: no commit reaches a quorum
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        os.kill(leader, signal.SIGSTOP)   # the calls gather at the leader's door ...
        stopped.append(leader)
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.extend(_in_threads(
            6, lambda k: mc.submit(_msgs(f"nq{k}", 2), retry_for=0))))
        t.start()
        time.sleep(2.0)                   # (their requests wait in the leader's sockets)
        os.kill(leader, signal.SIGCONT)   # ... and are admitted together
        stopped.remove(leader)
        t.join(60)
        results = [r for rs in out for r in rs]
        assert len(results) == 12
        assert not any(r.accepted for r in results)
        assert all(r.retryable for r in results), [(r.error, r.reason) for r in results]
        assert all(r.reason == "no_quorum" for r in results), [r.reason for r in results]
        after = _stats(mc)["group_commit"]
        failed = after["failed_calls"] - before["failed_calls"]
        print(f"\nno quorum: {failed} calls failed with their commit, largest "
              f"{after['largest_failed_calls']}; {6 - failed} refused while waiting")
        assert after["failed_commits"] > before["failed_commits"]
        assert after["largest_failed_calls"] >= 2      # a grouped commit failed ...
        # ... and each of its calls was told its outcome is unknown (it may still commit)
        assert sum(r.outcome_unknown for r in results) >= 2 * after["largest_failed_calls"]
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    # the copies answer again: the same messages, sent again, are queued once each
    wait_for(lambda: _stats(mc)["serving"], 30, "the shard serving again")
    again = [r for k in range(6) for r in mc.submit(_msgs(f"nq{k}", 2), retry_for=15)]
    assert all(r.accepted for r in again), [r.error for r in again if r.error][:3]
