"""Group commit (cluster/submit_batcher.py): which messages share a submit call, and that each
handler gets its own message's answer. The submit function is a plain one that blocks until
the test lets a call return, so what is in flight at each moment is the test's to choose."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from cluster.submit_batcher import SubmitBatcher


class Leader:
    """Answers each message with ("ok", its number); a call blocks until released."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[list[int]] = []
        self.gates: list[threading.Event] = []
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, msgs: list[dict[str, Any]]) -> list[Any]:
        gate = threading.Event()
        with self._lock:
            self.calls.append([m["n"] for m in msgs])
            self.gates.append(gate)
        assert gate.wait(10), "the test never released this call"
        if self.fail is not None:
            raise self.fail
        return [("ok", m["n"]) for m in msgs]

    def release(self, k: int) -> None:
        self.gates[k].set()


async def _until(cond: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_each_handler_gets_its_own_answer_from_one_shared_call() -> None:
    async def main() -> None:
        leader = Leader()
        b = SubmitBatcher(leader, window=0.01)
        futs = [asyncio.ensure_future(b.submit({"n": n, "raw": b"x"})) for n in range(5)]
        await _until(lambda: len(leader.calls) == 1)
        leader.release(0)
        assert await asyncio.gather(*futs) == [("ok", n) for n in range(5)]
        assert leader.calls == [[0, 1, 2, 3, 4]]
        assert b.stats == {"calls": 1, "messages": 5, "largest": 5}
        b.close()
    _run(main())


def test_arrivals_wait_for_the_call_in_flight_until_as_many_wait() -> None:
    """While 3 messages are in flight, 2 arrivals wait (past their window) for it to return;
    a third makes them as many as are in flight, and they go as a second call at once."""
    async def main() -> None:
        leader = Leader()
        b = SubmitBatcher(leader, window=0.001, concurrency=4)
        first = [asyncio.ensure_future(b.submit({"n": n})) for n in range(3)]
        await _until(lambda: len(leader.calls) == 1)
        second = [asyncio.ensure_future(b.submit({"n": n})) for n in (10, 11)]
        await asyncio.sleep(0.05)               # well past the window: held, not sent
        assert len(leader.calls) == 1
        second.append(asyncio.ensure_future(b.submit({"n": 12})))
        await _until(lambda: len(leader.calls) == 2)
        assert leader.calls[1] == [10, 11, 12]
        leader.release(1)
        assert await asyncio.gather(*second) == [("ok", n) for n in (10, 11, 12)]
        assert not any(f.done() for f in first)  # the first call is still in flight
        leader.release(0)
        assert await asyncio.gather(*first) == [("ok", n) for n in range(3)]
        b.close()
    _run(main())


def test_what_waited_goes_when_the_call_in_flight_returns() -> None:
    async def main() -> None:
        leader = Leader()
        b = SubmitBatcher(leader, window=0.001)
        first = [asyncio.ensure_future(b.submit({"n": n})) for n in range(4)]
        await _until(lambda: len(leader.calls) == 1)
        late = asyncio.ensure_future(b.submit({"n": 9}))
        await asyncio.sleep(0.03)
        assert len(leader.calls) == 1           # 1 waiting < 4 in flight: held
        leader.release(0)
        await asyncio.gather(*first)
        await _until(lambda: len(leader.calls) == 2)
        assert leader.calls[1] == [9]
        leader.release(1)
        assert await late == ("ok", 9)
        b.close()
    _run(main())


def test_max_items_splits_and_concurrency_caps_the_calls_in_flight() -> None:
    async def main() -> None:
        leader = Leader()
        b = SubmitBatcher(leader, window=0.001, max_items=2, concurrency=2)
        futs = [asyncio.ensure_future(b.submit({"n": n})) for n in range(7)]
        await _until(lambda: len(leader.calls) == 2)
        await asyncio.sleep(0.03)
        assert leader.calls == [[0, 1], [2, 3]]   # two in flight, the rest wait
        leader.release(0)                          # a slot: [4, 5] go (2 >= 2 in flight)
        await _until(lambda: len(leader.calls) == 3)
        leader.release(1)                          # [6] alone < [4, 5] in flight: held
        await asyncio.sleep(0.03)
        assert len(leader.calls) == 3
        leader.release(2)                          # nothing in flight: [6] goes
        await _until(lambda: len(leader.calls) == 4)
        leader.release(3)
        assert leader.calls == [[0, 1], [2, 3], [4, 5], [6]]
        assert await asyncio.gather(*futs) == [("ok", n) for n in range(7)]
        assert b.stats["largest"] == 2
        b.close()
    _run(main())


def test_a_failed_call_fails_each_of_its_messages_and_only_those() -> None:
    async def main() -> None:
        leader = Leader(fail=ConnectionError("cluster unreachable"))
        b = SubmitBatcher(leader, window=0.001)
        futs = [asyncio.ensure_future(b.submit({"n": n})) for n in range(3)]
        await _until(lambda: len(leader.calls) == 1)
        leader.release(0)
        for f in futs:
            with pytest.raises(ConnectionError, match="cluster unreachable"):
                await f
        leader.fail = None
        again = asyncio.ensure_future(b.submit({"n": 7}))
        await _until(lambda: len(leader.calls) == 2)
        leader.release(1)
        assert await again == ("ok", 7)
        b.close()
    _run(main())


def test_a_short_answer_fails_the_unanswered_message_with_a_clear_error() -> None:
    async def main() -> None:
        b = SubmitBatcher(lambda msgs: [("ok", msgs[0]["n"])], window=0.001)
        f1, f2 = b.submit({"n": 1}), b.submit({"n": 2})
        r1, r2 = await asyncio.gather(f1, f2, return_exceptions=True)
        assert r1 == ("ok", 1)
        assert isinstance(r2, RuntimeError) and "no answer for this message" in str(r2)
        b.close()
    _run(main())


class LoopLeader:
    """Leader's answers from a coroutine function (``MailCluster.submit_prepared_async``):
    each call awaits its gate on the loop; which thread ran it is noted."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.threads: set[int] = set()
        self.fail = fail

    async def __call__(self, msgs: list[dict[str, Any]]) -> list[Any]:
        gate = asyncio.Event()
        self.calls.append([m["n"] for m in msgs])
        self.gates.append(gate)
        self.threads.add(threading.get_ident())
        await asyncio.wait_for(gate.wait(), 10)
        if self.fail is not None:
            raise self.fail
        return [("ok", m["n"]) for m in msgs]


@pytest.mark.parametrize("fail", [None, ConnectionError("cluster unreachable")])
def test_a_coroutine_submit_runs_on_the_loop_with_the_same_group_commit(fail) -> None:
    """A coroutine function is awaited on the handlers' own loop (no thread pool, no thread
    hand-off); arrivals while it is in flight wait for it as with a blocking one, and each
    handler gets its answer, or the call's exception."""
    async def main() -> None:
        leader = LoopLeader(fail)
        b = SubmitBatcher(leader, window=0.001, concurrency=4)
        assert b._pool is None
        first = [asyncio.ensure_future(b.submit({"n": n})) for n in range(3)]
        await _until(lambda: len(leader.calls) == 1)
        late = [asyncio.ensure_future(b.submit({"n": n})) for n in (10, 11)]
        await asyncio.sleep(0.03)
        assert len(leader.calls) == 1           # 2 waiting < 3 in flight: held
        leader.gates[0].set()
        await _until(lambda: len(leader.calls) == 2)
        assert leader.calls == [[0, 1, 2], [10, 11]]
        leader.gates[1].set()
        for futs, ns in ((first, range(3)), (late, (10, 11))):
            got = await asyncio.gather(*futs, return_exceptions=True)
            assert got == [("ok", n) for n in ns] if fail is None else \
                all(g is fail for g in got), got
        assert leader.threads == {threading.get_ident()}
        assert b.stats == {"calls": 2, "messages": 5, "largest": 3}
        b.close()
    _run(main())
