"""Retry schedule: when a deferred message is tried again, and when it is given up.

Owns the arithmetic of the schedule (exponential backoff with jitter, capped, with a maximum
message age). Attempts are counted in the log (each transient record carries its attempt), so
recovery needs no inverse of the schedule.
Defaults follow KumoMTA and Postfix: first retry after about 10 minutes, doubling, capped at
4 hours, given up (bounced as "expired") after 5 days; DNS failures retry sooner.

Pure: no clock (``now`` is an argument) and no randomness of its own (the caller draws
``rand`` in [0, 1)), so every schedule is reproducible in tests. Must not decide *whether* a
reply is worth retrying: that is :mod:`cluster.core.replies`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RETRY_KINDS", "RetryPolicy"]

#: "normal": the site answered with a transient failure; "throttle": it asked us to slow down
#: (same schedule as normal; SiteThrottle does the site-wide pausing); "dns": the route could
#: not be resolved, usually a short outage worth retrying sooner.
RETRY_KINDS = ("normal", "throttle", "dns")


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: delay(n) = min(initial * factor**(n-1), max_delay) +/- jitter.

    All times are seconds. ``jitter`` is a fraction: 0.2 spreads each delay uniformly over
    [0.8, 1.2] times its base, so messages deferred together do not return together.
    """

    initial: float = 600.0
    factor: float = 2.0
    max_delay: float = 14400.0
    jitter: float = 0.2
    max_age: float = 5 * 86400.0
    dns_initial: float = 60.0

    def __post_init__(self) -> None:
        initial = _check_number("retry initial delay", self.initial)
        factor = _check_number("retry factor", self.factor)
        max_delay = _check_number("retry max_delay", self.max_delay)
        jitter = _check_number("retry jitter", self.jitter)
        max_age = _check_number("max_age", self.max_age)
        dns_initial = _check_number("DNS retry initial delay", self.dns_initial)
        if initial <= 0:
            raise ValueError(f"retry initial delay must be greater than zero, got {initial}")
        if factor < 1:
            raise ValueError(f"retry factor must be >= 1 (delays never shrink), got {factor}")
        if max_delay < initial:
            raise ValueError(f"retry max_delay ({max_delay}) must be >= the initial delay "
                             f"({initial})")
        if not 0 <= jitter < 1:
            raise ValueError(f"retry jitter must be in [0, 1), got {jitter}")
        if max_age <= 0:
            raise ValueError(f"max_age must be greater than zero, got {max_age}")
        if dns_initial <= 0:
            raise ValueError(f"DNS retry initial delay must be greater than zero, "
                             f"got {dns_initial}")

    # ------------------------------------------------------------------ schedule
    def base_delay(self, attempt: int, kind: str = "normal") -> float:
        """The delay after ``attempt`` attempts, without jitter."""
        _check_attempt(attempt)
        _check_kind(kind)
        first = self.dns_initial if kind == "dns" else self.initial
        if self.factor == 1.0:
            return min(first, self.max_delay)
        try:
            base = first * self.factor ** (attempt - 1)
        except OverflowError:   # factor**huge: long past the cap
            return self.max_delay
        return min(base, self.max_delay)

    def delay(self, attempt: int, rand: float, kind: str = "normal") -> float:
        """Seconds to wait after ``attempt`` attempts (>= 1) before the next one.

        ``rand`` is a uniform draw in [0, 1). The result lies in
        ``[base * (1 - jitter), base * (1 + jitter))``, never negative, never more than
        ``max_delay * (1 + jitter)``.
        """
        if isinstance(rand, bool) or not isinstance(rand, (int, float)) or not 0 <= rand < 1:
            raise ValueError(f"rand must be a number in [0, 1), got {rand!r}")
        base = self.base_delay(attempt, kind)
        return base * (1.0 + self.jitter * (2.0 * rand - 1.0))

    def next_attempt_at(self, now: float, attempt: int, rand: float,
                        kind: str = "normal") -> float:
        """Absolute time of the next attempt after ``attempt`` attempts made by ``now``."""
        return now + self.delay(attempt, rand, kind)


def _check_attempt(attempt: int) -> None:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be an integer >= 1 (attempts already made), "
                         f"got {attempt!r}")


def _check_kind(kind: str) -> None:
    if kind not in RETRY_KINDS:
        raise ValueError(f"unknown retry kind {kind!r} (known: {', '.join(RETRY_KINDS)})")
