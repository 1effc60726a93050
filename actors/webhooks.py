"""WebhookDispatcher actor: follows every shard's events by cursor and POSTs them, signed, in
batches, to the ``[[webhooks]]`` endpoints; keeps each endpoint's cursor in the shard's
replicated state.

One per cluster (``webhooks:dispatcher``), restarted by Ray for ever. For each endpoint and
shard a worker long-polls the shard leader (``webhook_events``), keeps what the endpoint asked
for (:class:`cluster.core.webhooks.CursorBook`), hands batches to senders (at most
``concurrency`` POSTs in flight per endpoint, over all shards), retries a failed batch with
exponential backoff and jitter for ``retry_for`` (then gives it up, counted and logged), and
commits "endpoint E has everything of this shard up to seq C" as a ``w`` record on the shard
(``webhook_ack``) once every batch up to C was answered 2xx. A restarted dispatcher or a new
shard leader resumes from that committed cursor: events are delivered at least once, never
skipped; receivers drop repeats by the events' ``event_id`` (``<shard>:<seq>``). The shard
leader holds back event files an endpoint has not acknowledged (up to
``spool.event_retain_bytes``, :mod:`cluster.core.event_retention`). The one exception is
bounded and reported: an endpoint so far behind that the events after its cursor were rotated
out even so gets what follows, and ``stats()`` counts the events it lost (``skipped_events``,
``skipped``), with an error in the log.

An endpoint seen for the first time starts at the shard's end of log (committed at once, before
anything is sent). Owns no state that matters beyond those records. Must not: log or show a
secret (the signature is all that leaves), follow redirects, or call a shard once per event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Any

import orjson
import ray

from actors.loop import spawn
from cluster.config import Config
from cluster.core.webhooks import (
    SIGNATURE_HEADER,
    CursorBook,
    OutBatch,
    WebhookEndpoint,
    backoff_delay,
    batch_body,
    sign,
)

__all__ = ["WEBHOOKS_NAME", "WebhookDispatcher", "ensure_webhooks", "snapshot_events_tail"]

log = logging.getLogger("raymta.webhooks")

WEBHOOKS_NAME = "webhooks:dispatcher"

#: how long a worker long-polls a shard when it has nothing out; with batches out, shorter, so
#: that their acknowledgements are committed soon
_POLL_IDLE = 5.0
_POLL_BUSY = 0.5
#: a shard call that takes longer than this (plus the poll) is given up and made again
_CALL_TIMEOUT = 30.0


def snapshot_events_tail(events: Any, default_bytes: int, held_bytes: int,
                         cursors: list[int]) -> tuple[bytes, list[dict[str, Any]]]:
    """The events a shard snapshot carries (JSON lines, the newest ``default_bytes``; the
    newest ``held_bytes`` when a webhook endpoint's cursor is older than those), and the holes
    it leaves (:meth:`EventLog.hole_before`): the older events, counted at each cursor, that a
    leader rebuilt elsewhere from it will report as skipped instead of passing them silently."""
    tail = events.tail_bytes(default_bytes)
    if cursors and held_bytes > default_bytes and _first_seq(tail, events) > min(cursors) + 1:
        tail = events.tail_bytes(held_bytes)
    return tail, events.hole_before(_first_seq(tail, events), cursors)


def _first_seq(tail: bytes, events: Any) -> int:
    if not tail:
        return int(events.last_seq) + 1
    return int(orjson.loads(tail[:tail.find(b"\n")])["seq"])


class _Worker:
    """One endpoint's view of one shard."""

    def __init__(self, ep: WebhookEndpoint, shard: int) -> None:
        self.ep = ep
        self.shard = shard
        self.book: CursorBook | None = None
        self.sending = 0
        self.wake = asyncio.Event()


class WebhookDispatcher:
    def __init__(self, config: Config) -> None:
        self.cfg = config
        self.ns = config.cluster.namespace
        self.endpoints = list(config.webhooks)
        self._workers = [_Worker(ep, s) for ep in self.endpoints
                         for s in range(config.queue.shards)]
        self._sem: dict[str, asyncio.Semaphore] = {}
        self._handles: dict[int, Any] = {}
        self._session: Any = None
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._rng = random.Random()
        self.started_at = time.time()
        self.counters: dict[str, dict[str, Any]] = {
            ep.name: {"batches": 0, "events": 0, "failures": 0, "given_up": 0, "commits": 0,
                      "skipped_events": 0, "skipped": {}, "last_error": "",
                      "last_status": None} for ep in self.endpoints}

    # ------------------------------------------------------------------ plumbing
    def _spawn(self, coro: Any) -> asyncio.Task:
        return spawn(self._tasks, coro)

    def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        import aiohttp
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
            headers={"User-Agent": "raymta-webhooks/1", "Content-Type": "application/json"})
        for ep in self.endpoints:
            self._sem[ep.name] = asyncio.Semaphore(ep.concurrency)
        for w in self._workers:
            self._spawn(self._run(w))

    def _coordinator(self, shard: int) -> Any:
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = ray.get_actor(f"coordinator:{shard}", namespace=self.ns)
        return h

    async def _call(self, shard: int, method: str, *args: Any, timeout: float = _CALL_TIMEOUT
                    ) -> Any:
        try:
            return await asyncio.wait_for(
                getattr(self._coordinator(shard), method).remote(*args), timeout)
        except (ray.exceptions.RayError, ValueError, asyncio.TimeoutError):
            self._handles.pop(shard, None)
            raise

    # ------------------------------------------------------------------ calls
    async def start(self) -> dict[str, Any]:
        self._ensure_started()
        return await self.stats()

    async def ping(self) -> int:
        self._ensure_started()
        return os.getpid()

    async def stats(self) -> dict[str, Any]:
        """Per endpoint: backlog (selected events read and not yet acknowledged), the age of
        the oldest of them, the committed cursor per shard, and counters."""
        self._ensure_started()
        now = time.time()
        out: dict[str, Any] = {}
        for ep in self.endpoints:
            ws = [w for w in self._workers if w.ep is ep]
            oldest = [t for w in ws if w.book is not None
                      for t in [w.book.oldest_ts()] if t is not None]
            out[ep.name] = {
                "backlog": sum(w.book.backlog() for w in ws if w.book is not None),
                "oldest_seconds": round(now - min(oldest), 3) if oldest else 0.0,
                "cursors": {w.shard: (w.book.acked if w.book is not None else None)
                            for w in ws},
                "behind_records": sum(max(0, w.book.read - w.book.acked)
                                      for w in ws if w.book is not None),
                **self.counters[ep.name]}
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "started": self.started_at, "endpoints": out}

    # ------------------------------------------------------------------ workers
    async def _open(self, w: _Worker) -> CursorBook:
        """The book of ``w`` from the shard's committed cursor (the end of the log for an
        endpoint the shard has never heard of, committed before anything is sent)."""
        cursors = await self._call(w.shard, "webhook_cursors")
        cur = cursors.get(w.ep.name)
        if cur is None:
            st = await self._call(w.shard, "stats")
            cur = await self._call(w.shard, "webhook_ack", w.ep.name, int(st["lsn"]))
            log.info("webhook %s: starts at seq %d of shard %d", w.ep.name, cur, w.shard)
        pending = max(w.ep.batch_size * w.ep.concurrency * 4, 1000)
        return CursorBook(int(cur), w.ep.wants, max_pending=pending)

    async def _run(self, w: _Worker) -> None:
        pause = 0.2
        while True:
            try:
                if w.book is None:
                    w.book = await self._open(w)
                await self._step(w)
                pause = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as e:   # noqa: BLE001 - a leader restarting or moving: again
                log.warning("webhook %s, shard %d: %s: %s", w.ep.name, w.shard,
                            type(e).__name__, str(e)[:300])
                await asyncio.sleep(pause)
                pause = min(5.0, pause * 2)

    async def _step(self, w: _Worker) -> None:
        book = w.book
        assert book is not None
        c = book.committable()
        if c > book.acked:
            await self._call(w.shard, "webhook_ack", w.ep.name, c)
            book.committed(c)
            self.counters[w.ep.name]["commits"] += 1
        while w.sending < w.ep.concurrency:
            b = book.take(w.ep.batch_size)
            if b is None:
                break
            if b.events:
                w.sending += 1
                self._spawn(self._send(w, b))
        if book.room() > 0:
            wait = _POLL_IDLE if not book.out and not book.pending else _POLL_BUSY
            if book.pending and w.sending >= w.ep.concurrency:
                wait = _POLL_BUSY
            got = await self._call(w.shard, "webhook_events", book.read,
                                   min(book.room(), 1000), wait, timeout=_CALL_TIMEOUT + wait)
            evs = got["events"]
            if got["skipped"] is not None:
                self._skipped(w, got["skipped"])
            book.feed(evs)
            if evs:
                return
        w.wake.clear()
        if book.committable() == book.acked:
            try:
                await asyncio.wait_for(w.wake.wait(), _POLL_BUSY)
            except asyncio.TimeoutError:
                pass

    def _skipped(self, w: _Worker, gap: dict[str, Any]) -> None:
        """Events that left the shard's event files before this endpoint read them (rotated
        away, or not carried by the snapshot a leader was rebuilt from): never a silent skip —
        counted per endpoint (``skipped_events``, and the last gap per shard in ``skipped``:
        seqs, count, whether exact; the same gap asked about again is not counted twice) and
        logged as an error."""
        c = self.counters[w.ep.name]
        if c["skipped"].get(w.shard) == gap:
            return      # the same loss asked about again (no event after it yet): counted
        c["skipped_events"] += gap["events"]
        c["skipped"][w.shard] = dict(gap)
        log.error("webhook %s: %s%d events of shard %d (seq %d-%d) left the event files "
                  "before it read them (rotated away, or older than the snapshot a leader was "
                  "rebuilt from); they are skipped (raise spool.event_retain_bytes / "
                  "spool.snapshot_held_events_bytes, or fix the endpoint sooner)",
                  w.ep.name, "" if gap["exact"] else "at least ", gap["events"], w.shard,
                  gap["first_seq"], gap["last_seq"])

    async def _send(self, w: _Worker, b: OutBatch) -> None:
        ep = w.ep
        c = self.counters[ep.name]
        body = batch_body(ep.name, w.shard, b.events)
        try:
            while True:
                async with self._sem[ep.name]:
                    ok, why = await self._post(ep, w.shard, b, body)
                if ok:
                    assert w.book is not None
                    w.book.acknowledge(b)
                    c["batches"] += 1
                    c["events"] += len(b.events)
                    return
                now = time.time()
                b.attempts += 1
                c["failures"] += 1
                c["last_error"] = why
                if b.first_failure is None:
                    b.first_failure = now
                if now - b.first_failure >= ep.retry_for:
                    assert w.book is not None
                    w.book.give_up(b)
                    c["given_up"] += len(b.events)
                    log.error("webhook %s: gave up %d events of shard %d (seq %d-%d) after "
                              "%d tries over %.0fs: %s", ep.name, len(b.events), w.shard,
                              b.lo + 1, b.hi, b.attempts, now - b.first_failure, why)
                    return
                delay = backoff_delay(b.attempts, ep.retry_initial, ep.retry_max_delay,
                                      self._rng.random(), ep.jitter)
                if b.attempts == 1 or b.attempts % 10 == 0:
                    log.warning("webhook %s: batch of shard %d failed (%s); try %d in %.1fs",
                                ep.name, w.shard, why, b.attempts + 1, delay)
                await asyncio.sleep(delay)
        finally:
            w.sending -= 1
            w.wake.set()

    async def _post(self, ep: WebhookEndpoint, shard: int, b: OutBatch, body: bytes
                    ) -> tuple[bool, str]:
        import aiohttp
        headers = {SIGNATURE_HEADER: sign(ep.secret, body, int(time.time())),
                   "X-Raymta-Webhook": ep.name, "X-Raymta-Batch": f"{shard}:{b.lo + 1}-{b.hi}"}
        try:
            async with self._session.post(ep.url, data=body, headers=headers,
                                          allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=ep.timeout)) as r:
                await r.read()
                self.counters[ep.name]["last_status"] = r.status
                if 200 <= r.status < 300:
                    return True, ""
                return False, f"HTTP {r.status}"
        except asyncio.TimeoutError:
            return False, f"no answer within {ep.timeout:g}s"
        except aiohttp.ClientError as e:
            # (the URL is not in the text: it may carry a token)
            return False, f"{type(e).__name__}"

    def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()


# restarted by Ray for ever (it resumes from the cursors committed in the shards)
_OPTIONS: dict[str, Any] = dict(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                                max_concurrency=1000)
RemoteWebhookDispatcher = ray.remote(**_OPTIONS)(WebhookDispatcher)


def ensure_webhooks(cfg: Config, *, detached: bool = False) -> Any:
    """The cluster's webhook dispatcher (created if missing, found by name otherwise)."""
    opts: dict[str, Any] = dict(name=WEBHOOKS_NAME, namespace=cfg.cluster.namespace,
                                get_if_exists=True)
    if detached:
        opts["lifetime"] = "detached"
    return RemoteWebhookDispatcher.options(**opts).remote(cfg)
