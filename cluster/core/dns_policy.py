"""DNS policy: how long a lookup outcome is cached, and when a lookup that timed out is asked again.

Role: the pure rules behind raymta's MX resolution under load. The resolver adapter
(``cluster.adapters.dns``) asks :meth:`DnsPolicy.cache_ttl` how long to keep an outcome; the
queue coordinator asks :meth:`DnsPolicy.needs_lookup` which domains to resolve (ahead of their
route's expiry, so dispatch never waits on a refresh) and :meth:`DnsPolicy.timeout_retry_at`
when to ask again after a timeout.
Owns: the cache-time table (answer → record TTL clamped; permanent failure → negative TTL, RFC
2308 §5; SERVFAIL → a short transient time; timeout → shorter still) and the timeout retry
schedule (seconds, doubling, within a budget).
Must not: do I/O, import ray, or decide what a failure means for a message (that is
``cluster.core.replies.dns_failure`` and the retry policy).

Why timeouts are retried here rather than by the message retry schedule: a timeout says the
resolver was slow, not that the domain is broken. A healthy resolver that is busy (a burst of new
domains) answers a few seconds later; charging the message an attempt and a retry delay of
minutes for that is raymta's fault, not the domain's. Only when timeouts go on past ``budget``
does the failure reach the messages (as a transient DNS deferral, as before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["DnsPolicy", "Outcome", "TimeoutRetry"]

#: what a lookup ended with, for the cache-time table
Outcome = Literal["answer", "permanent", "servfail", "timeout"]


def _finite(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"dns {name} must be a finite number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class TimeoutRetry:
    """A domain whose lookups have timed out: since ``first_at``, ``tries`` times; ask again
    at ``next_at``."""

    first_at: float
    tries: int
    next_at: float


@dataclass(frozen=True)
class DnsPolicy:
    #: cache bounds for answers (record TTLs are clamped into [min_ttl, max_ttl])
    min_ttl: float = 5.0
    max_ttl: float = 3600.0
    #: a SERVFAIL (or MX hosts without an address) is cached this long: long enough to stop a
    #: storm of repeats, short enough to notice a recovered zone
    transient_ttl: float = 10.0
    #: a timeout is cached only this long: the next try is seconds away (retry_initial)
    timeout_ttl: float = 1.0
    #: first re-ask after a timeout; doubles per timeout in a row, capped at retry_max_delay
    retry_initial: float = 1.0
    retry_max_delay: float = 15.0
    #: timeouts in a row for this long count against the messages (deferral) after all
    retry_budget: float = 120.0
    #: a route is refreshed this long before it expires (never more than half its lifetime)
    refresh_ahead: float = 30.0

    def __post_init__(self) -> None:
        for name in ("min_ttl", "max_ttl", "transient_ttl", "timeout_ttl", "retry_initial",
                     "retry_max_delay", "retry_budget", "refresh_ahead"):
            if _finite(name, getattr(self, name)) < 0:
                raise ValueError(f"dns {name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_ttl < self.min_ttl:
            raise ValueError(f"dns max_ttl ({self.max_ttl}) must be >= min_ttl ({self.min_ttl})")
        if self.retry_initial <= 0:
            raise ValueError(f"dns retry_initial must be > 0, got {self.retry_initial!r}")
        if self.retry_max_delay < self.retry_initial:
            raise ValueError(f"dns retry_max_delay ({self.retry_max_delay}) must be >= "
                             f"retry_initial ({self.retry_initial})")

    # ------------------------------------------------------------------ caching
    def cache_ttl(self, outcome: Outcome, record_ttl: float = 0.0) -> float:
        """Seconds to keep an outcome. ``record_ttl``: the answer's smallest TTL, or for a
        permanent failure the negative TTL from the SOA (RFC 2308 §5)."""
        if outcome in ("answer", "permanent"):
            return min(max(record_ttl, self.min_ttl), self.max_ttl)
        if outcome == "servfail":
            return min(self.transient_ttl, self.max_ttl)
        if outcome == "timeout":
            return min(self.timeout_ttl, self.transient_ttl, self.max_ttl)
        raise ValueError(f"unknown DNS outcome {outcome!r}")

    # ------------------------------------------------------------------ resolving ahead
    def needs_lookup(self, resolved_at: float | None, expires_at: float | None,
                     now: float) -> bool:
        """Whether a domain with queued mail should be (re)resolved now: it has no route, or
        its route expires within ``refresh_ahead`` (at most half the route's lifetime, so a
        short-TTL route is not asked for on every round)."""
        return now >= self.refresh_at(resolved_at, expires_at)

    def refresh_at(self, resolved_at: float | None, expires_at: float | None) -> float:
        """From when :meth:`needs_lookup` says yes for this route (-inf: it has none). A
        leader keeps it with the route: it looks at every domain with queued mail once a
        second, and at 10,000 domains thousands of them are waiting."""
        if expires_at is None:
            return -math.inf
        life = expires_at - (resolved_at if resolved_at is not None else expires_at)
        ahead = min(self.refresh_ahead, max(0.0, life) / 2)
        return expires_at - ahead

    # ------------------------------------------------------------------ timeouts
    def timeout_retry_at(self, prev: TimeoutRetry | None, now: float) -> TimeoutRetry | None:
        """After a lookup timed out at ``now``: when to ask again, or None when timeouts have
        gone on for ``retry_budget`` (the failure then counts against the messages)."""
        first = now if prev is None else prev.first_at
        tries = 1 if prev is None else prev.tries + 1
        delay = min(self.retry_initial * 2.0 ** min(tries - 1, 60), self.retry_max_delay)
        if now + delay - first > self.retry_budget:
            return None
        return TimeoutRetry(first, tries, now + delay)
