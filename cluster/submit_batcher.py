"""Group commit for protocol front ends: concurrent submissions share one submit call.

Owns the queue of messages that handlers on one asyncio loop (SMTP DATA handlers, HTTP
requests) are waiting to have accepted, and the calls that carry them: whatever arrives within
``window`` seconds of the first waiting message (or ``max_items`` of them) goes to the cluster
in one call: a coroutine function (:meth:`cluster.client.MailCluster.submit_prepared_async`)
runs as a task on the loop itself, a plain one (:meth:`cluster.client.MailCluster.submit`) on
a small thread pool, so the loop never blocks either way. The coroutine saves each call two
thread hand-offs (the pool's wake-up and the way back to the loop) and the pool thread's CPU. Each handler gets its own message's :class:`SubmitResult` (a batch never fails a
message for another's fault: the client validates each message on its own), or the exception
the call raised. One submit call is one commit on a quorum, so this is what lets an SMTP
listener take thousands of messages per second instead of one commit per message.

While calls are in flight, new arrivals gather (group commit): another call starts only once
at least as many messages wait as are in flight (or ``max_items`` / ``max_bytes`` of them), up
to ``concurrency`` calls; otherwise they go when a call returns. Under load the calls grow to
about half the messages in play instead of one ``concurrency``-th of them: every call costs
the front end, the shard leader and each copy a fixed share of CPU (bench/ingress_smtp.py,
64 smtp-source sessions: ~15 messages a call with four free slots, ~30 with this rule). A
message waits at most for the calls in flight to return, as it would with no slot free.

It does not decide what a result means for the protocol (that is the front end's reply
policy), and it never retries on its own (``MailCluster.submit`` retries retryable refusals
with the same ids for ``retry_for`` seconds).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["SubmitBatcher"]


def _size(msg: Any) -> int:
    """Bytes a waiting message holds: a dict's ``raw``, or a prepared message's ``body``."""
    raw = msg.get("raw") if isinstance(msg, dict) else getattr(msg, "body", None)
    return len(raw) if isinstance(raw, (bytes, str)) else 0


class SubmitBatcher:
    """Gathers messages from coroutines on one loop into shared submit calls."""

    def __init__(self, submit: Callable[[list[Any]], list[Any] | Awaitable[list[Any]]], *,
                 window: float = 0.002, max_items: int = 1000, max_bytes: int = 32 << 20,
                 concurrency: int = 4) -> None:
        #: ``submit`` takes a list of messages: dicts for ``MailCluster.submit`` (their size
        #: is ``raw``'s), or anything with a ``body`` (``PreparedMessage`` for
        #: ``MailCluster.submit_prepared``); a coroutine function runs on the loop
        self._submit = submit
        self._on_loop = inspect.iscoroutinefunction(submit) or \
            inspect.iscoroutinefunction(type(submit).__call__)   # an object's async __call__
        self.window = window
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.concurrency = concurrency
        self._pool = None if self._on_loop else concurrent.futures.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="raymta-submit")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._waiting: list[tuple[Any, asyncio.Future[Any]]] = []
        self._waiting_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._due = False          # the window of what waits has passed
        self._in_flight = 0        # calls
        self._flying = 0           # messages in those calls
        self.stats = {"calls": 0, "messages": 0, "largest": 0}

    async def submit(self, msg: Any) -> Any:
        """``msg``'s SubmitResult once the call carrying it returned (raises what it raised)."""
        return await self.enqueue(msg, asyncio.get_running_loop())

    def enqueue(self, msg: Any, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        """Like :meth:`submit`, for a caller on ``loop`` that is not a coroutine (a protocol
        callback): the future gets ``msg``'s SubmitResult or the exception."""
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((msg, fut))
        self._waiting_bytes += _size(msg)
        if self._due or self._full():
            self._flush(loop)
        elif self._timer is None:
            self._timer = loop.call_later(self.window, self._window_over, loop)
        return fut

    def _full(self) -> bool:
        return len(self._waiting) >= self.max_items or self._waiting_bytes >= self.max_bytes

    def _window_over(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._due = True
        self._flush(loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the calls the group-commit rule allows (module docstring); what is left
        waits for more arrivals or a call to return."""
        while self._waiting and self._in_flight < self.concurrency:
            if self._in_flight and len(self._waiting) < self._flying and not self._full():
                break
            batch = self._waiting[:self.max_items]
            del self._waiting[:self.max_items]
            self._waiting_bytes = sum(_size(m) for m, _ in self._waiting) \
                if self._waiting else 0
            self._in_flight += 1
            self._flying += len(batch)
            self.stats["calls"] += 1
            self.stats["messages"] += len(batch)
            self.stats["largest"] = max(self.stats["largest"], len(batch))
            msgs = [m for m, _ in batch]
            if self._pool is None:
                task = loop.create_task(self._submit(msgs))  # type: ignore[arg-type]
                self._tasks.add(task)     # held until done (the loop keeps weak references)
                task.add_done_callback(functools.partial(self._landed, loop, batch))
                continue
            # one hop back to the loop per call (no asyncio future wrapping the pool's)
            call = self._pool.submit(self._submit, msgs)
            call.add_done_callback(functools.partial(self._returned, loop, batch))
        if not self._waiting:
            self._due = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _returned(self, loop: asyncio.AbstractEventLoop,
                  batch: list[tuple[Any, asyncio.Future[Any]]],
                  call: concurrent.futures.Future[Any]) -> None:
        """In a pool thread (or at close): hand the answers to the loop."""
        with contextlib.suppress(RuntimeError):    # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(self._done, loop, batch, call)

    def _landed(self, loop: asyncio.AbstractEventLoop,
                batch: list[tuple[Any, asyncio.Future[Any]]], task: asyncio.Task[Any]) -> None:
        """On the loop: a coroutine call returned."""
        self._tasks.discard(task)
        self._done(loop, batch, task)

    def _done(self, loop: asyncio.AbstractEventLoop,
              batch: list[tuple[Any, asyncio.Future[Any]]],
              call: concurrent.futures.Future[Any] | asyncio.Future[Any]) -> None:
        self._in_flight -= 1
        self._flying -= len(batch)
        exc = call.exception() if not call.cancelled() else asyncio.CancelledError()
        results = None if exc is not None else call.result()
        for k, (_, fut) in enumerate(batch):
            if fut.done():
                continue          # the handler gave up (its connection closed)
            if exc is not None:
                fut.set_exception(exc)
            elif results is None or k >= len(results):
                fut.set_exception(RuntimeError("internal: the submit call returned no answer "
                                               "for this message"))
            else:
                fut.set_result(results[k])
        if self._waiting:   # what waited for this call goes now (its window may not be over)
            self._due = True
            self._flush(loop)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        # calls on the loop are its owner's to cancel, from its thread (SmtpIngress.stop
        # cancels every task of its loop): Task.cancel is not thread-safe
        self._tasks.clear()
