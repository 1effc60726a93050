"""actors.loop: LoopLag (how late an actor's event loop runs, shown in relay and leader stats) and
unwrap_private (an actor's own helpers called without Ray's tracing shim)."""

from __future__ import annotations

import asyncio
import time

from actors.loop import LoopLag


def test_loop_lag_sees_a_blocked_loop_and_keeps_a_bounded_window() -> None:
    async def main() -> tuple[dict[str, float], dict[str, float], int]:
        lag = LoopLag(period=0.01, window=5)
        task = asyncio.create_task(lag.run())
        await asyncio.sleep(0.05)
        quiet = lag.snapshot()
        time.sleep(0.06)            # a callback that holds the loop for 60 ms
        await asyncio.sleep(0.03)
        busy = lag.snapshot()
        assert lag.snapshot() == busy or lag.snapshot()["max_ms"] >= 50   # reading resets nothing
        await asyncio.sleep(0.1)
        task.cancel()
        return quiet, busy, len(lag.samples)

    quiet, busy, kept = asyncio.run(main())
    assert quiet["max_ms"] < 30
    assert busy["max_ms"] >= 50 and busy["latest_ms"] < busy["max_ms"]
    assert kept == 5


def test_loop_lag_reports_the_window_max_about_once_a_second() -> None:
    got: list[float] = []

    async def main() -> None:
        lag = LoopLag(period=0.05, report=got.append)
        task = asyncio.create_task(lag.run())
        await asyncio.sleep(0.2)
        time.sleep(0.08)
        await asyncio.sleep(1.0)
        task.cancel()

    asyncio.run(main())
    assert len(got) == 1 and got[0] >= 0.07


def test_tune_gc_sets_the_actor_thresholds() -> None:
    import gc

    from actors.loop import GC_THRESHOLDS, tune_gc
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > 10 * before[0] or before == GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)


def test_gc_pauses_are_timed_per_generation():
    """tune_gc installs a gc.callbacks hook: each collection's count, total and longest
    pause per generation (what a shard leader's stats()["gc"]["pauses"] reports)."""
    import gc

    from actors.loop import GC_PAUSES, tune_gc
    tune_gc()
    tune_gc()                                   # installed once, however often it is called
    from actors.loop import _gc_timer
    assert gc.callbacks.count(_gc_timer) == 1
    before = list(GC_PAUSES[2])
    keep = [[i] for i in range(100_000)]        # something for the collector to walk
    gc.collect()
    n, total, longest = GC_PAUSES[2]
    assert n == before[0] + 1 and total > before[1] and 0 < longest <= total
    del keep


def test_unwrap_private_binds_the_classs_own_private_methods_past_a_wrapping_subclass():
    from actors.loop import unwrap_private

    calls: list[str] = []

    class Actor:
        def __init__(self) -> None:
            unwrap_private(self, Actor)

        def _helper(self, x: int) -> int:
            return x + 1

        async def _loop(self) -> str:
            return "ran"

        def public(self) -> int:
            return self._helper(1)

        def __repr__(self) -> str:
            return "actor"

    # what ray.remote does: a generated subclass whose methods wrap the class's own
    class Wrapped(Actor):
        pass

    for name in ("_helper", "_loop", "public", "__repr__"):
        def shim(self, *a, _f=getattr(Actor, name), _n=name, **kw):
            calls.append(_n)
            return _f(self, *a, **kw)
        setattr(Wrapped, name, shim)

    a = Wrapped()
    assert a.public() == 2
    assert calls == ["public"]               # the private helper bypassed the shim
    assert a._helper.__func__ is Actor._helper
    assert asyncio.run(a._loop()) == "ran" and calls == ["public"]
    assert repr(a) == "actor" and calls == ["public", "__repr__"]   # dunders keep the shim
