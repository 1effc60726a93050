"""DNS query slots: at most ``limit`` queries in flight, the others waiting in line.

Role: the bound behind ``[dns] max_concurrent`` in :class:`cluster.adapters.dns.MxResolver`
(a burst of new domains waits here, where waiting costs nothing, rather than in the resolver,
where it turns into timeouts). A counter and a deque instead of an ``asyncio.Semaphore``: the
resolver drives its queries with callbacks, and a semaphore needs a coroutine per waiter
(~60 µs of the ~100 µs of CPU a query cost with one; bench/README.md "Long tail").
Owns: the count of queries in flight, its peak, and the line of queries waiting (opaque items,
started by the caller). A follow-up query (the A of an MX host, once the MX answered) may go
to the head of the line, so that domains already begun finish before new ones start.
Must not: do I/O, import asyncio or ray, or start anything itself.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

__all__ = ["QuerySlots"]

_T = TypeVar("_T")


class QuerySlots(Generic[_T]):
    """``ask`` a slot for an item; ``done`` when a query ends: it names the next item to start
    (its slot handed over, so the count never exceeds ``limit``)."""

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"dns max_concurrent must be an integer >= 1, got {limit!r}")
        self.limit = limit
        #: queries holding a slot now, and the most there ever were
        self.active = 0
        self.peak = 0
        self.waiting: deque[_T] = deque()

    def ask(self, item: _T, *, first: bool = False) -> bool:
        """True: a slot is taken for ``item``, start it now. False: it waits in line (at the
        head with ``first``) until a ``done`` hands it a slot."""
        if self.active < self.limit and not self.waiting:
            self.active += 1
            self.peak = max(self.peak, self.active)
            return True
        if first:
            self.waiting.appendleft(item)
        else:
            self.waiting.append(item)
        return False

    def done(self) -> _T | None:
        """A query holding a slot ended: the waiting item that takes its slot (start it now),
        or None when nothing waits (the slot is free)."""
        if self.active <= 0:
            raise ValueError("dns query slots: done() without a slot taken")
        if self.waiting:
            return self.waiting.popleft()
        self.active -= 1
        return None

    def reset(self) -> None:
        """Forget every slot and waiter (the event loop they belonged to has ended)."""
        self.active = 0
        self.waiting.clear()
