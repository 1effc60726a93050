"""The event loop raymta's async actors run on: uvloop where it is installed.

Ray creates an async actor's event loop after ``__init__`` returns, from the current asyncio
policy; setting uvloop's policy first makes the actor's loop a ``uvloop.Loop``. Measured with
bench/throughput.py (10,000 messages): relay CPU 5.2 s → 5.06 s, i.e. little: the per-message
cost is in aiosmtplib's Python code, not in the loop.
"""

from __future__ import annotations

import asyncio

__all__ = ["use_uvloop"]


def use_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:  # optional: the default loop works, only slower
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


class LoopLag:
    """How late the actor's event loop runs callbacks: a task asks to wake every ``period``
    seconds and records by how much it overslept (every call, SMTP reply and timer in the
    process waits that long too). ``snapshot()`` gives the latest, the mean and the max (ms)
    since the last snapshot."""

    def __init__(self, period: float = 0.25) -> None:
        self.period = period
        self.latest = 0.0
        self._sum = 0.0
        self._n = 0
        self._max = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.period)
            lag = max(0.0, loop.time() - t - self.period)
            self.latest = lag
            self._sum += lag
            self._n += 1
            self._max = max(self._max, lag)

    def snapshot(self) -> dict[str, float]:
        out = {"latest_ms": round(self.latest * 1000, 2),
               "mean_ms": round(self._sum / self._n * 1000, 2) if self._n else 0.0,
               "max_ms": round(self._max * 1000, 2)}
        self._sum, self._n, self._max = 0.0, 0, 0.0
        return out
