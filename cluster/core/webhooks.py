"""Webhooks, the pure part: which events an endpoint gets, how a batch is signed, when a failed
batch is tried again, and which cursor an endpoint may durably claim to have.

Owns:

- :class:`WebhookEndpoint` — one ``[[webhooks]]`` entry (parsed by :mod:`cluster.config`);
- event selection: the types an endpoint asked for (:data:`EVENT_GROUPS` names groups such as
  ``delivered`` or ``bounced``, or an event's own type such as ``Delivery``);
- the signature ``X-Raymta-Signature: t=<unix>,v1=<hex>``: HMAC-SHA256 over
  ``"<t>." + body`` with the endpoint's secret (:func:`sign`, :func:`verify`; the Stripe
  scheme, so receivers know it) — the secret never appears in a value this module returns
  except the MAC;
- the retry schedule: exponential backoff with jitter, capped, given up after
  ``retry_for`` (at least 8 hours by default) — :func:`backoff_delay`;
- cursor bookkeeping per endpoint and shard (:class:`CursorBook`): events are read in seq
  order, cut into batches that cover contiguous seq ranges (events of types the endpoint did
  not ask for fall inside a range and are skipped), several batches may be out at once, and the
  cursor that may be committed is the end of the longest prefix of acknowledged batches. So a
  committed cursor never passes an event that has not been acknowledged: at-least-once, nothing
  skipped; an event's ``event_id`` (``<shard>:<seq>``) lets the receiver drop repeats.

Pure: no I/O, no clock (``now`` and random numbers are arguments), no Ray.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["EVENT_GROUPS", "EVENT_TYPES", "SIGNATURE_HEADER", "CursorBook", "OutBatch",
           "WebhookEndpoint", "backoff_delay", "batch_body", "event_id", "resolve_event_names",
           "sign", "verify"]

SIGNATURE_HEADER = "X-Raymta-Signature"

#: every event type the queue produces (cluster/core/queue.py)
EVENT_TYPES = frozenset({
    "Reception", "TransientFailure", "Delivery", "Bounce", "Expiration", "AdminBounce",
    "Suppressed", "OOBBounce", "Complaint", "Suppression", "Unsuppression", "SiteSuspended",
    "SiteResumed", "SiteShaped", "SiteShapingEnded", "WarmupCapReached", "WarmupOverflow",
    "WarmupHold"})

#: names an operator may use for groups of event types
EVENT_GROUPS: dict[str, frozenset[str]] = {
    "accepted": frozenset({"Reception"}),
    "delivered": frozenset({"Delivery"}),
    "deferred": frozenset({"TransientFailure"}),
    "transient": frozenset({"TransientFailure"}),
    "bounced": frozenset({"Bounce", "OOBBounce"}),
    "expired": frozenset({"Expiration"}),
    "cancelled": frozenset({"AdminBounce"}),
    "complaint": frozenset({"Complaint"}),
    # a recipient left out at submission, and entries added to the suppression list
    # (an unsubscribe is a suppression with reason "unsubscribe")
    "suppressed": frozenset({"Suppressed", "Suppression"}),
    "unsubscribed": frozenset({"Suppression"}),
    "unsuppressed": frozenset({"Unsuppression"}),
    "site": frozenset({"SiteSuspended", "SiteResumed", "SiteShaped", "SiteShapingEnded"}),
    "warmup": frozenset({"WarmupCapReached", "WarmupOverflow", "WarmupHold"}),
}


def resolve_event_names(names: Iterable[str]) -> frozenset[str]:
    """Event types for the names in a config (groups or types); ``ValueError`` naming the
    first unknown one. An empty list means every type."""
    out: set[str] = set()
    for n in names:
        if n in EVENT_GROUPS:
            out |= EVENT_GROUPS[n]
        elif n in EVENT_TYPES:
            out.add(n)
        else:
            raise ValueError(f"unknown event {n!r} (groups: {', '.join(sorted(EVENT_GROUPS))}; "
                             f"or a type: {', '.join(sorted(EVENT_TYPES))})")
    return frozenset(out) if out else EVENT_TYPES


@dataclass(frozen=True)
class WebhookEndpoint:
    """One ``[[webhooks]]`` endpoint. ``secret`` is kept out of ``repr``."""

    name: str
    url: str
    secret: bytes = field(repr=False)
    events: frozenset[str] = EVENT_TYPES
    batch_size: int = 100          # events per POST
    concurrency: int = 4           # POSTs in flight to this endpoint, all shards together
    timeout: float = 10.0          # per POST
    retry_initial: float = 10.0    # first retry after a failure
    retry_max_delay: float = 1800.0
    retry_for: float = 8 * 3600.0  # a batch is given up after failing this long
    jitter: float = 0.2            # each delay is spread by +- this fraction

    def wants(self, ev: dict[str, Any]) -> bool:
        return ev.get("type") in self.events

    def __post_init__(self) -> None:
        if not (self.url.startswith("http://") or self.url.startswith("https://")):
            raise ValueError(f"webhook {self.name}: url must be http:// or https://")
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError(f"webhook {self.name}: batch_size and concurrency must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"webhook {self.name}: jitter must be in [0, 1)")
        if not 0 < self.retry_initial <= self.retry_max_delay:
            raise ValueError(f"webhook {self.name}: need 0 < retry_initial <= retry_max_delay")


def event_id(shard: int, seq: int) -> str:
    """The event's unique id: the same event read again (after any restart) has the same id,
    because a seq is the lsn of a record committed on a quorum of the shard's copies."""
    return f"{shard}:{seq}"


def sign(secret: bytes, body: bytes, ts: int) -> str:
    """The signature header value for ``body`` sent at unix time ``ts``."""
    mac = hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify(secrets: Iterable[bytes], header: str, body: bytes, now: float,
           tolerance: float = 300.0) -> bool:
    """Does ``header`` sign ``body`` with one of ``secrets``, with a timestamp within
    ``tolerance`` seconds of ``now`` (a replayed old request fails)? For receivers and tests."""
    ts: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        k, _, v = part.strip().partition("=")
        if k == "t" and v.isdigit():
            ts = int(v)
        elif k == "v1":
            macs.append(v)
    if ts is None or not macs or abs(now - ts) > tolerance:
        return False
    for s in secrets:
        want = hmac.new(s, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
        if any(hmac.compare_digest(want, m) for m in macs):
            return True
    return False


def backoff_delay(attempt: int, initial: float, max_delay: float, rand: float,
                  jitter: float = 0.2) -> float:
    """Seconds to wait before try ``attempt + 1`` after ``attempt`` failed tries (1-based):
    ``initial * 2**(attempt-1)``, capped at ``max_delay``, spread by ``+-jitter`` with
    ``rand`` in [0, 1) so that many endpoints recovering together do not retry in step."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    base = min(max_delay, initial * 2.0 ** min(attempt - 1, 60))
    return min(max_delay, base * (1.0 + jitter * (2.0 * rand - 1.0)))


def batch_body(endpoint: str, shard: int, events: list[dict[str, Any]]) -> bytes:
    """The JSON a batch is POSTed as: ``{"webhook", "shard", "events": [...]}``, each event
    as the events API gives it (its ``id`` is the message's) plus ``event_id`` (unique)."""
    evs = [{"event_id": event_id(shard, ev["seq"]), **ev, "shard": shard} for ev in events]
    return json.dumps({"webhook": endpoint, "shard": shard, "events": evs},
                      separators=(",", ":"), default=str).encode()


@dataclass
class OutBatch:
    """A batch handed out: it covers seqs ``(lo, hi]``; ``events`` are the ones to send."""

    lo: int
    hi: int
    events: list[dict[str, Any]]
    done: bool = False
    attempts: int = 0
    first_failure: float | None = None


class CursorBook:
    """What one endpoint has of one shard's events: the durable cursor (``acked``), what has
    been read (``read``), the selected events not yet in a batch, and the batches out."""

    def __init__(self, acked: int, wants: Any, max_pending: int = 10_000) -> None:
        self.acked = acked
        self.read = acked
        self.wants = wants
        self.max_pending = max_pending
        self.pending: deque[dict[str, Any]] = deque()
        self.out: list[OutBatch] = []
        self.given_up = 0     # events of batches given up after retry_for

    def room(self) -> int:
        """How many more events may be read now (bounded buffer)."""
        return max(0, self.max_pending - len(self.pending))

    def feed(self, events: list[dict[str, Any]]) -> int:
        """Events read after :attr:`read` (seq ascending); returns how many were selected.
        Events at or below :attr:`read` (a repeated read) are ignored."""
        n = 0
        for ev in events:
            seq = ev["seq"]
            if seq <= self.read:
                continue
            self.read = seq
            if self.wants(ev):
                self.pending.append(ev)
                n += 1
        return n

    def _edge(self) -> int:
        """Where the next batch starts: the end of the last batch out, else the cursor."""
        return self.out[-1].hi if self.out else self.acked

    def take(self, n: int) -> OutBatch | None:
        """The next batch of up to ``n`` events, or — when nothing selected is pending but
        events were read past the last batch — an empty batch (already done) that moves the
        cursor over them. None when there is nothing to do."""
        lo = self._edge()
        if not self.pending:
            if self.read > lo:
                b = OutBatch(lo, self.read, [], done=True)
                self.out.append(b)
                return b
            return None
        evs = [self.pending.popleft() for _ in range(min(n, len(self.pending)))]
        hi = self.pending[0]["seq"] - 1 if self.pending else self.read
        b = OutBatch(lo, hi, evs)
        self.out.append(b)
        return b

    def acknowledge(self, b: OutBatch) -> None:
        b.done = True

    def give_up(self, b: OutBatch) -> None:
        self.given_up += len(b.events)
        b.done = True

    def committable(self) -> int:
        """The cursor that may be made durable: the end of the acknowledged prefix."""
        c = self.acked
        for b in self.out:
            if not b.done:
                break
            c = b.hi
        return c

    def committed(self, cursor: int) -> None:
        """``cursor`` is durable now: drop the batches it covers."""
        if cursor > self.acked:
            self.acked = cursor
        while self.out and self.out[0].done and self.out[0].hi <= self.acked:
            self.out.pop(0)

    def reset(self) -> None:
        """Forget what was read and not acknowledged (read again from :attr:`acked`)."""
        self.read = self.acked
        self.pending.clear()
        self.out = []

    def backlog(self) -> int:
        """Selected events read and not yet acknowledged (pending or in batches out)."""
        return len(self.pending) + sum(len(b.events) for b in self.out if not b.done)

    def oldest_ts(self) -> float | None:
        """Time of the oldest selected event not yet acknowledged."""
        for b in self.out:
            if not b.done and b.events:
                return float(b.events[0].get("ts") or 0) or None
        if self.pending:
            return float(self.pending[0].get("ts") or 0) or None
        return None
