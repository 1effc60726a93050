"""The event loop raymta's async actors run on, and what they do at start.

- :func:`use_uvloop`: uvloop where it is installed. Ray creates an async actor's event loop
  after ``__init__`` returns, from the current asyncio policy; setting uvloop's policy first
  makes the actor's loop a ``uvloop.Loop``. Measured with bench/throughput.py (10,000
  messages, session 1): relay CPU 5.2 s → 5.06 s, i.e. little.
- :class:`LoopLag`: how late the loop runs (actor stats and a metrics gauge).
- :func:`preload`: import the modules of the actors an actor will call, at start.
- :func:`tune_gc`: collect the young generation every 50,000 allocations, not 700.
- :func:`unwrap_private`: an actor's own (underscore) methods called without Ray's tracing shim.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import time
from collections import deque
from typing import Any, Callable

__all__ = ["LoopLag", "preload", "tune_gc", "unwrap_private", "use_uvloop"]

#: young-generation allocations between collections in raymta's actors (Python's default: 700)
GC_THRESHOLDS = (50_000, 20, 10)


def use_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:  # optional: the default loop works, only slower
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def unwrap_private(obj: Any, cls: type) -> None:
    """Bind ``cls``'s own private methods (``_name``, not dunders) to ``obj`` as they are.

    ``ray.remote`` replaces every method of an actor class with a tracing shim (Ray's
    ``_inject_tracing_into_class``: one more Python call, with ``*args``/``**kwargs``
    repacked, per call, and one more coroutine per await of an async method), also the ones
    only the actor itself calls. With tracing off the shim does nothing else. In the relay
    they run per message and per SMTP session (``_connection``, ``_classify``,
    ``_count_result``, ...): ~3 % of its CPU in the long-tail bench (py-spy). Remote calls
    name public methods only, so they keep Ray's shim. The methods are bound when the actor
    starts: a subclass overriding one of them, or a test patching one on the class after the
    instance exists, would not be seen by that instance (neither is done today)."""
    for name, fn in vars(cls).items():
        if name.startswith("_") and not name.startswith("__") and inspect.isfunction(fn):
            setattr(obj, name, fn.__get__(obj, type(obj)))


#: per generation: [collections, seconds in all, longest pause in seconds] (coordinator stats)
GC_PAUSES: dict[int, list[float]] = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}
_gc_t0 = [0.0]


def _gc_timer(phase: str, info: dict, _clock: Any = time.perf_counter) -> None:
    """gc.callbacks hook: how long each collection held the process, per generation (the
    clock is bound now: at interpreter shutdown nothing can be imported any more)."""
    if phase == "start":
        _gc_t0[0] = _clock()
    else:
        d = _clock() - _gc_t0[0]
        g = GC_PAUSES[info["generation"]]
        g[0] += 1
        g[1] += d
        g[2] = max(g[2], d)


def tune_gc() -> None:
    """Collect cycles rarely. An actor keeps what it holds (a shard leader: every queued
    message, several objects each) and allocates per message mostly objects that refcounting
    frees; at Python's default the cycle collector ran every 700 allocations and went through
    the survivors again and again: 0.32 s of a shard leader's 1.6 s of CPU while it accepted
    20,000 messages (228 collections). At 50,000 it ran once (0.04 s). Cycles are still
    collected, only later."""
    gc.set_threshold(*GC_THRESHOLDS)
    if _gc_timer not in gc.callbacks:
        gc.callbacks.append(_gc_timer)


class LoopLag:
    """How late the actor's event loop runs callbacks: a task asks to wake every ``period``
    seconds and records by how much it overslept (every call, SMTP reply and timer in the
    process waits about that long too). ``snapshot()``: the latest, mean and max (ms) over the
    last ``window`` samples (10 s by default); reading it changes nothing."""

    def __init__(self, period: float = 0.25, window: int = 40,
                 report: Callable[[float], None] | None = None) -> None:
        self.period = period
        self.samples: deque[float] = deque(maxlen=window)
        #: called about once a second with the window's max (seconds): a metrics gauge
        self.report = report

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        every = max(1, round(1.0 / self.period))
        n = 0
        while True:
            t = loop.time()
            await asyncio.sleep(self.period)
            self.samples.append(max(0.0, loop.time() - t - self.period))
            n += 1
            if self.report is not None and n % every == 0:
                self.report(max(self.samples))

    def snapshot(self) -> dict[str, float]:
        xs = list(self.samples)
        if not xs:
            return {"latest_ms": 0.0, "mean_ms": 0.0, "max_ms": 0.0}
        return {"latest_ms": round(xs[-1] * 1000, 2),
                "mean_ms": round(sum(xs) / len(xs) * 1000, 2),
                "max_ms": round(max(xs) * 1000, 2)}


def spawn(tasks: set[asyncio.Task], coro: Any) -> asyncio.Task:
    """Start ``coro`` as a task kept in ``tasks`` until it ends (the loop itself holds only
    weak references to tasks: an unreferenced one can be collected mid-run)."""
    t = asyncio.get_running_loop().create_task(coro)
    tasks.add(t)
    t.add_done_callback(tasks.discard)
    return t


def preload(*modules: str) -> None:
    """Import now the modules of the actor classes this actor will call. The first
    ``ray.get_actor`` of a class in a process imports its module (dnspython, aiosmtplib, ...):
    ~1 s of CPU per leader, measured with py-spy, that otherwise falls on the first messages
    (the bench counts it, a sender sees it as latency)."""
    import importlib
    for name in modules:
        importlib.import_module(name)
