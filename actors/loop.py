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
