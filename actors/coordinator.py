"""QueueCoordinator actor: owns one queue shard — accepted messages, retries, expiry, events.

It never opens a socket. Submissions become log records, written and fsync'd as one group
commit per batch — on this leader's own copy and on enough ReplicaLog copies that a majority
of the shard's R copies hold it — before the submitter hears "accepted"; the same records,
applied to
:class:`cluster.core.queue.QueueState`, drive the scheduling indexes and the event files.
A dispatch loop asks SiteThrottle actors how many messages each site may take now and hands
those to RelayPool actors in batches (one streaming call per relay per round); results come
back on the same stream and become records in turn.

Start and restart (here or on another node): the leader claims a new epoch from a majority of
the copies, adopts the log that is furthest ahead among them, replays it and commits an epoch
record before it serves (docs/replication.md). Until then calls wait, and after
``replication.claim_timeout`` they are answered with the reason it cannot serve. Messages that
were in flight on the old instance come back as ready and are sent again (at-least-once, the
duplicates bounded by what was in flight). Callers retry: every mutating call is idempotent
(submissions carry client-made message ids; a repeated id is answered, not queued again).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Iterable

import msgpack
import ray

from actors.loop import GC_PAUSES, LoopLag, preload, spawn, tune_gc, use_uvloop
from actors.metrics import spool_disk
from cluster.adapters.copystore import CopyStore
from cluster.adapters.eventlog import EventLog
from cluster.adapters.replicator import Fenced, NoQuorum, Replicator
from cluster.adapters.spool import pack_nested
from cluster.adapters.stream import StreamServer
from cluster.config import Config
from cluster.core import queue as q
from cluster.core.dns_policy import TimeoutRetry
from cluster.core.dsn_due import plan_dsns, ready_groups
from cluster.core.event_retention import RotationPlan
from cluster.core.message import new_message_ids
from cluster.core.replication import compaction_due, group_take
from cluster.core.queue_shape import queue_shape as sampled_shape
from cluster.core.intake import Intake, Limits, dkim_required_check, retryable_error
from cluster.core.suppression import HARD_CATEGORIES, check_rows, entry_key, normalize_address
from cluster.core.replies import EXPIRED_CATEGORY, PACE_CATEGORIES, dns_failure
from cluster.core.shaping import Action, apply_limits
from cluster.core.relay_choice import (choose_relays, pool_for, split_counts, spread_count,
                                       weighted_pick)
from cluster.core.warmup import (DEFAULT, WarmupLedger, grant, home_shard, next_day_start,
                                 shard_status, utc_day)
from cluster.core.ready_sites import ReadySites
from cluster.core.throttle import max_inflight, round_interval
from cluster.core.sites import (SiteInfo, SiteLimits, limits_to_wire, site_for, stable_hash,
                                throttle_actor_name)
from cluster.core.throttle_pool import pool_name

__all__ = ["QueueCoordinator"]

log = logging.getLogger("raymta.coordinator")


class NotWritten(RuntimeError):
    """A call's records were dropped before anything of them was written (no quorum): the
    caller may retry; nothing of the call can commit later."""


class _Route:
    __slots__ = ("ok", "site", "hosts", "port", "expires_at", "fail_kind", "permanent", "text",
                 "timed_out", "resolved_at", "sts", "refresh_at")

    def __init__(self, raw: list[Any], domain: str, cfg: Config, now: float = 0.0) -> None:
        self.expires_at = 0.0
        self.resolved_at = now
        #: from when it is looked up again (DnsPolicy.refresh_at; set by _apply_routes)
        self.refresh_at = -math.inf
        self.timed_out = False
        self.site: SiteInfo | None = None
        self.hosts: list[Any] = []
        self.port = 0
        self.fail_kind = ""
        self.permanent = False
        self.text = ""
        #: the domain's MTA-STS TXT answer, for the relays (SiteThrottle.resolve), or None
        self.sts: list[Any] | None = None
        if raw[0] == "ok":
            self.ok = True
            _, self.hosts, self.port, self.expires_at, static, *rest = raw
            self.sts = rest[0] if rest else None
            self.site = site_for(domain, [h[1] for h in self.hosts], cfg.site_defaults, cfg.sites,
                                 cfg.route_for(domain) if static else None)
        else:
            self.ok = False
            _, self.fail_kind, self.permanent, self.text, self.expires_at, *rest = raw
            self.timed_out = bool(rest and rest[0])


class QueueCoordinator:
    #: messages (and bodies) a compaction snapshot copies per slice before it lets the
    #: event loop run again (~10 ms a slice)
    SNAPSHOT_SLICE = 5000
    #: most records one group commit carries (its bytes are bounded by
    #: ``replication.batch_bytes``, the most one append to a replica carries): applying them
    #: holds the event loop ~25 µs each
    GROUP_MAX_RECORDS = 4096

    def __init__(self, config: Config, shard: int = 0) -> None:
        use_uvloop()
        tune_gc()
        preload("actors.remote", "actors.relay_pool", "actors.site_throttle",
                "actors.replica_log")
        from actors.replica_log import copy_directory
        self.cfg = config
        self.shard = shard
        self.ns = config.cluster.namespace
        sc = config.spool
        copy_dir = copy_directory(config, shard, 0)
        # this leader's own copy of the shard's log (slot 0); the others are ReplicaLog actors
        self.copy = CopyStore(copy_dir, 0, segment_bytes=sc.segment_bytes, fsync=sc.fsync)
        self.copy.recover(decode=False)
        self.log = self.copy.log
        # files a configured webhook endpoint has not acknowledged are held back, up to
        # spool.event_retain_bytes (cluster/core/event_retention.py)
        self.events = EventLog(copy_dir.parent / "events", file_bytes=sc.event_file_bytes,
                               files_kept=sc.event_files_kept,
                               retain_bytes=sc.event_retain_bytes if config.webhooks else 0,
                               holds=self._webhook_holds, on_capped=self._retention_capped)
        qc = config.queue
        self.state = q.QueueState(status_cache=qc.status_cache,
                                  idempotency_window=qc.idempotency_window)
        self.epoch = 0
        self.recovered: dict[str, Any] = {}
        self._serving: asyncio.Event | None = None
        self._not_serving = "starting: claiming the shard from its copies"
        self._submit_stream: StreamServer | None = None
        self._stalled = ""
        self._fatal = ""
        self._last_backup = time.time()
        self._snapshot_size = 0
        #: objects the startup replay froze out of the cycle collector (stats())
        self._frozen = 0
        self.last_snapshot: dict[str, Any] = {}
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")
        rc = config.replication
        self.repl = Replicator(shard, config.cluster.replicas, self.copy, self._io,
                               self._replica_handle, tail_bytes=rc.tail_bytes,
                               batch_bytes=rc.batch_bytes, transport=rc.transport)
        self._pending: list[tuple[list[Any], asyncio.Future | None]] = []
        self._group_max_bytes = rc.batch_bytes
        #: group commits: calls (with a waiter) and records they carried, the commits that
        #: carried calls and those that carried more than one, the biggest, commits that left
        #: calls for the next by the bounds, failed commits and the calls they failed
        #: (stats()["group_commit"]; "commits" counts every commit, relay results included)
        self.group_stats = {"calls": 0, "call_commits": 0, "records": 0, "bytes": 0,
                            "grouped_commits": 0, "largest_calls": 0, "largest_records": 0,
                            "held_over": 0, "failed_commits": 0, "failed_calls": 0, "largest_failed_calls": 0}
        self.intake = Intake(shard, config.queue.shards, dkim_required_check(config))
        self._snapshot_waiters: list[asyncio.Future] = []
        self._snapshotting = False
        self._commit_wake: asyncio.Event | None = None
        self._dispatch_wake: asyncio.Event | None = None
        self._routes: dict[str, _Route] = {}
        self._resolving: set[str] = set()
        #: domains whose lookups timed out, asked again in seconds (never defers their mail
        #: unless timeouts go on past [dns] retry_budget): cluster.core.dns_policy
        self._dns_policy = config.dns.policy()
        self._dns_retry: dict[str, TimeoutRetry] = {}
        #: lookups that timed out and were asked again, and those that ran out of budget
        self.dns_counters = {"timeouts_retried": 0, "timeouts_deferred": 0,
                             "deferred_msgs": 0, "bounced_msgs": 0}
        self._site_inflight: dict[str, int] = {}
        self._inflight_site: dict[str, str] = {}   # id → site, for messages out at relays
        self._site_retry: dict[str, float] = {}
        #: ready mail by site, kept as it changes (cluster/core/ready_sites.py): a round
        #: looks at what changed since the last one, not at every ready domain and site
        self._ready_sites: ReadySites[SiteInfo] = ReadySites()
        #: domains whose route changed (or whose lookup ended) since the last round
        self._route_changed: set[str] = set()
        #: sites whose in-flight count went down since the last round (a report is owed)
        self._settled_sites: set[str] = set()
        #: when a round last walked every ready domain for routes to refresh ahead
        self._routes_walked = 0.0
        from actors.metrics import loop_lag_reporter
        self.loop_lag = LoopLag(report=loop_lag_reporter(f"coordinator:{shard}",
                                                         config.metrics.enabled))
        #: per site: the in-flight count last told to its throttle, and what the throttle needs
        #: to hear it again ([throttle name, limits]). A shard with nothing more ready for a
        #: site still reports its count going down, or the throttle would hold the site's room
        #: for it until the report expires (seconds in which the other shards may not send)
        self._site_reported: dict[str, tuple[int, str, SiteLimits]] = {}
        self._results_seen = 0              # results from relays since _rate_at
        self._result_rate = 0.0             # results/s, smoothed
        self._rate_at = time.monotonic()
        self._relays: list[str] = []
        #: the candidate relays of _relays_for, per (sources allowed, sources asked for), for
        #: the relay list _cands_of (every site of every round asks)
        self._cands_of: list[str] | None = None
        self._cands: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[str, ...]] = {}
        self._relays_checked = 0.0
        #: the shared throttle pool's size (actors/throttle_pool.py), read every few seconds
        self._pool_size, self._pool_read = 1, -1e9
        #: hot sites spread over several relays: which relay gets the odd message next
        self._spread_turn: dict[str, int] = {}
        self._handles: dict[str, Any] = {}
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._rng = random.Random()
        self._last_housekeeping = 0.0
        self._propagating = False
        #: originals whose DSN record this instance has enqueued (soft: a new leader finds
        #: what is still owed in the replayed QueueState.dsn_due)
        self._dsn_queued: set[str] = set()
        self._dsn_owed_seen = 0   # QueueState.dsn_owed when this instance last looked
        from actors.metrics import CoordinatorMetrics
        self.metrics = CoordinatorMetrics(shard, config.metrics.enabled,
                                          config.metrics.top_sites)
        self.counters = {"dispatched": 0, "requeued_after_relay_loss": 0, "commits": 0,
                         "snapshots": 0, "warmup_held": 0}
        plans = config.warmup_plans()
        #: this shard's warm-up counts (None: no source warms up)
        self._warmup = WarmupLedger(plans, config.queue.shards, shard) if plans else None
        #: as the home shard of warm-up sources: counts granted, committed or on their way
        self._warmup_promised: dict[str, int] = {}

    def _drop_orphan_bodies(self) -> None:
        # A body whose accept records were cut off with a torn tail belongs to no message.
        for bid in [b for b, body in self.state.bodies.items() if body.refs <= 0]:
            self.state.body_bytes -= len(self.state.bodies.pop(bid).data)

    # ------------------------------------------------------------------ plumbing
    def _spawn(self, coro: Any) -> asyncio.Task:
        return spawn(self._tasks, coro)

    def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        self._commit_wake = asyncio.Event()
        self._dispatch_wake = asyncio.Event()
        self._serving = asyncio.Event()
        self._spawn(self._startup())
        self._spawn(self.loop_lag.run())

    def _replica_handle(self, slot: int) -> Any:
        return ray.get_actor(f"replica:{self.shard}:{slot}", namespace=self.ns)

    async def _startup(self) -> None:
        """Claim the shard, adopt and replay the log, commit an epoch record, then serve."""
        t0 = time.time()
        attempt = 0
        while True:
            try:
                claim = await self.repl.establish()
                break
            except NoQuorum as e:
                attempt += 1
                self._not_serving = f"no quorum: {e}"
                if attempt == 1 or attempt % 20 == 0:
                    log.warning("shard %d cannot serve yet: %s", self.shard, e)
                await asyncio.sleep(min(0.25 * attempt, 2.0))
        self.epoch = claim["epoch"]
        loop = asyncio.get_running_loop()
        snap, records = await loop.run_in_executor(self._io, self._replay)
        # the queue just rebuilt lives on: keep the cycle collector from going through it
        # again and again (a million messages are several million objects)
        gc.freeze()
        # (counted once here: gc.get_freeze_count() walks the whole permanent generation, a
        # quarter of a stats() call's CPU when it was asked at every metrics gathering)
        self._frozen = gc.get_freeze_count()
        self.recovered = {**claim, "records": len(records),
                          "snapshot_lsn": snap["lsn"] if snap else 0,
                          "live": len(self.state.messages), "seconds": time.time() - t0}
        self.repl.start()
        self._spawn(self._commit_loop())
        # the epoch record: committing it on a quorum commits everything adopted before it
        fut = loop.create_future()
        self._enqueue([[q.REC_EPOCH, self.epoch, time.time()]], fut)
        try:
            await fut
        except Exception as e:
            self._not_serving = f"could not commit the epoch record: {e}"
            log.error("shard %d: %s", self.shard, self._not_serving)
            return
        self.recovered["seconds"] = round(time.time() - t0, 3)
        log.info("shard %d serving: %s", self.shard, self.recovered)
        self._not_serving = ""
        assert self._serving is not None
        self._serving.set()
        if self.state.messages and claim["epoch"] > 1:
            # results the old instance was sent but had not committed: relays keep them until
            # a leader confirms them; take them before handing messages out again
            await self._take_unacked_results()
        self._queue_dsns()   # owed before the restart and not yet queued
        self._spawn(self._dispatch_loop())
        if self.cfg.replication.rebalance_interval > 0 and self.cfg.cluster.replicas > 1:
            self._spawn(self._rebalance_loop())

    def _replay(self) -> tuple[Any, list[Any]]:
        """Rebuild the queue and the events from the local copy (blocking, I/O thread)."""
        self.log.close()
        snap, records = self.log.recover(decode=True)
        self.state = q.QueueState(status_cache=self.cfg.queue.status_cache,
                                  idempotency_window=self.cfg.queue.idempotency_window)
        if snap is not None:
            self.state.restore(snap)
            # the events just before the snapshot: this copy of the log starts after them
            # (a leader rebuilt on another node has no event files of its own)
            tail = snap.get("events_tail")
            local_last = self.events.last_seq
            if tail:
                n = self.events.write_lines(tail)
                if n:
                    log.info("shard %d: %d events restored from the snapshot", self.shard, n)
            # the older events it could not carry: reported to readers, never passed silently
            holes = snap.get("events_holes") or []
            if self.events.install_holes(holes, local_last):
                log.warning("shard %d: events before the snapshot's are not on this node: "
                            "%s (readers behind them are told: skipped)", self.shard,
                            [(h["through"], h["points"][:1]) for h in holes])
        replay_events = []
        for _epoch, lsn, rec in records:
            ev = self.state.apply_or_quarantine(rec, lsn)
            if ev is not None and ev["seq"] > self.events.last_seq:
                replay_events.append(ev)
        self.events.write(replay_events)
        if self.state.counters_quarantined:
            log.error("shard %d: %d log records could not be applied and were set aside "
                      "(newest: %s)", self.shard, self.state.counters_quarantined,
                      list(self.state.quarantine)[-3:])
        self._drop_orphan_bodies()
        self._snapshot_size = self.log.snapshot_bytes
        return snap, records

    async def _until_serving(self) -> None:
        """Wait until the shard serves; raise with the reason if it does not in time."""
        self._ensure_started()
        assert self._serving is not None
        if self._fatal:
            raise RuntimeError(f"shard {self.shard}: {self._fatal}")
        if self._serving.is_set():
            return
        try:
            await asyncio.wait_for(self._serving.wait(), self.cfg.replication.claim_timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"shard {self.shard} is not serving: "
                               f"{self._not_serving}") from None

    def _handle(self, name: str) -> Any:
        h = self._handles.get(name)
        if h is None:
            h = ray.get_actor(name, namespace=self.ns)
            self._handles[name] = h
        return h

    async def start(self) -> dict[str, Any]:
        """Start (also done lazily by every call) and wait until the shard serves; returns what
        the start found (epoch, adopted copy, records replayed)."""
        await self._until_serving()
        return self.recovered

    # ------------------------------------------------------------------ group commit
    def _enqueue(self, records: list[Any], fut: asyncio.Future | None = None) -> None:
        if fut is None and self.cfg.suppression.from_bounces:
            self._suppress_hard_bounces(records)   # (DNS failures, expiries)
        if fut is not None and self._stalled:
            # a caller waits for this: say now that it cannot be made durable, write nothing
            self._clear_pending_marks([(records, fut)])
            fut.set_exception(NotWritten(self._stalled))
            return
        self._pending.append((records, fut))
        assert self._commit_wake is not None
        self._commit_wake.set()

    def _suppress_hard_bounces(self, records: list[Any]) -> None:
        """A permanent failure that says the address does not exist (an invalid recipient, a
        domain without mail) suppresses the address, on every shard (the outbox)."""
        rows = []
        now = time.time()
        ttl = self.cfg.suppression.hard_bounce_ttl
        for r in records:
            if r[0] == q.REC_FINAL and r[3] == "bounce" and r[8] in HARD_CATEGORIES:
                m = self.state.messages.get(r[1])
                if m is not None:
                    rows.append([normalize_address(m.rcpt), "", "hard-bounce", now, now + ttl,
                                 f"{r[1]}: {r[4]} {str(r[6])[:150]}"])
        if rows:
            records.append(q.suppress_record("add", rows, now, propagate=True))

    async def _commit_loop(self) -> None:
        assert self._commit_wake is not None
        ack_timeout = self.cfg.replication.ack_timeout
        while True:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            if not self._pending:
                if self._snapshot_waiters:
                    self._maybe_snapshot()
                continue
            # group commit: everything that came while the last commit was in flight, up to
            # the bounds (what is left goes next, at once); nothing waits when nothing is
            # in flight
            n = group_take(((len(recs), q.records_bytes(recs)) for recs, _ in self._pending),
                           self.GROUP_MAX_RECORDS, self._group_max_bytes)
            batch = self._pending[:n]
            del self._pending[:n]
            if self._pending:
                self._commit_wake.set()
                self.group_stats["held_over"] += 1
            records = [r for recs, _ in batch for r in recs]
            frames, first = self.log.assign(records, self.epoch)
            last = first + len(records) - 1
            calls = sum(1 for _, fut in batch if fut is not None)
            t_commit = time.time()
            commit = self.repl.commit(frames, first, last)
            try:
                done, _ = await asyncio.wait((commit,), timeout=ack_timeout)
                if not done:
                    # no quorum in time: tell the submitters (their batch may still commit:
                    # they retry with the same ids), refuse new submissions fast, and wait
                    self._stalled = (f"shard {self.shard}: batch at lsn {first} not durable on "
                                     f"a quorum after {ack_timeout:g}s; copies: " +
                                     ", ".join(f"{c['name']} {c['state']}"
                                               for c in self.repl.lag()[1:]))
                    log.error("%s", self._stalled)
                    # every call this commit carried hears it (retryable, outcome unknown)
                    self.group_stats["failed_commits"] += 1
                    self.group_stats["failed_calls"] += calls
                    self.group_stats["largest_failed_calls"] = max(
                        self.group_stats["largest_failed_calls"], calls)
                    for _, fut in batch:
                        if fut is not None and not fut.done():
                            fut.set_exception(RuntimeError(self._stalled))
                    self._refuse_waiting_calls()
                await commit
                if not done:
                    log.warning("shard %d: quorum is back after %.1fs", self.shard,
                                time.time() - t_commit)
                    self._stalled = ""
            except Fenced as e:
                self._die(f"superseded by a newer leader: {e}", batch)
                return
            except Exception as e:  # the leader's own disk failed: step down, Ray restarts us
                self._die(f"spool write failed: {e}", batch)
                return
            self.counters["commits"] += 1
            gs = self.group_stats
            gs["calls"] += calls
            if calls:
                gs["call_commits"] += 1
            gs["records"] += len(records)
            gs["bytes"] += len(frames)
            if calls > 1:
                gs["grouped_commits"] += 1
            gs["largest_calls"] = max(gs["largest_calls"], calls)
            gs["largest_records"] = max(gs["largest_records"], len(records))
            self.metrics.commit_seconds.set(time.time() - t_commit, self.metrics.tags)
            evs = []
            for i, rec in enumerate(records):
                ev = self.state.apply_or_quarantine(rec, first + i)
                if ev is not None:
                    evs.append(ev)
            self._clear_pending_marks(batch)
            if self.state.dsn_owed != self._dsn_owed_seen:
                # new DSN debts: queue what is ready now (debts held for a sibling are looked
                # at again by housekeeping, once a second, not after every commit)
                self._dsn_owed_seen = self.state.dsn_owed
                self._queue_dsns()
            self.metrics.count_events(evs)
            try:
                self.events.write(evs)
            except OSError as e:
                log.error("event file write failed (events will be rewritten on restart): %s", e)
            for _, fut in batch:
                if fut is not None and not fut.done():
                    fut.set_result(None)
            assert self._dispatch_wake is not None
            self._dispatch_wake.set()
            self._maybe_snapshot()

    def _queue_dsns(self, now: float | None = None) -> None:
        """Queue the DSNs the queue owes that are ready (cluster/core/dsn_due.py: the failed
        recipients of one submission together, one message record of this shard each, whose
        metadata names the originals it settles; a suppressed sender's DSN is finished as
        suppressed at once). Until the record applies this instance does not queue the same
        originals twice; an instance that dies first leaves the debt to its successor."""
        due = self.state.dsn_due
        self._dsn_queued.intersection_update(due)
        if len(self._dsn_queued) == len(due):
            return
        now = time.time() if now is None else now
        bodies = self.state.bodies
        groups = ready_groups(due, queued=self._dsn_queued, body_live=bodies.__contains__,
                              now=now, window=self.cfg.dsn.coalesce)
        if not groups:
            return
        plan = plan_dsns(groups, due,
                         new_message_ids(now, len(groups), self.shard, self.cfg.queue.shards),
                         suppression=self.state.suppression,
                         reporting_mta=self.cfg.dsn_hostname, now=now,
                         max_age=self.cfg.queue.retry.max_age)
        for orig, why in plan.bad:
            log.error("shard %d: no DSN: %s", self.shard, why)
            due.pop(orig, None)
        if plan.suppressed:
            log.info("shard %d: DSN about %d recipient(s) not sent: the sender is suppressed",
                     self.shard, len(plan.suppressed))
        self._dsn_queued.update(plan.queued)
        if plan.records:
            self._enqueue(plan.records)

    async def restore_dsns(self, rows: list[list[Any]]) -> dict[str, Any]:
        """Owe again the DSNs of a backup (rows ``[original id, *dsn_due entry]`` of its
        snapshot), as one durable record; originals already owed here, or whose DSN this
        shard already queued, are skipped. Returns counts."""
        bad = q.bad_dsn_owed_row(rows)
        if bad is not None:
            raise ValueError(f"restore_dsns on shard {self.shard}: {bad}")
        await self._until_serving()
        st = self.state
        new = [r for r in rows if r[0] not in st.dsn_due and r[0] not in st.dsn_settled]
        if new:
            fut = asyncio.get_running_loop().create_future()
            self._enqueue([q.dsn_owed_record(new, time.time())], fut)
            await fut
        return {"shard": self.shard, "dsns": len(new), "skipped": len(rows) - len(new)}

    def _refuse_waiting_calls(self) -> None:
        """No quorum: calls whose records wait behind the stuck batch (submissions, cancels,
        restores) are answered with the reason now, and their records are dropped (never
        written: the error is final). Results from relays stay queued."""
        keep = []
        for recs, fut in self._pending:
            if fut is None:
                keep.append((recs, fut))
                continue
            self._clear_pending_marks([(recs, fut)])
            if not fut.done():
                fut.set_exception(NotWritten(self._stalled))
        self._pending = keep

    def _die(self, why: str, batch: list[tuple[list[Any], Any]]) -> None:
        """Stop serving for good: fail everything waiting, and end the process so that Ray
        starts a fresh instance (which claims a new epoch) if this one is still wanted."""
        self._fatal = why
        log.critical("shard %d leader stops: %s", self.shard, why)
        pending = batch + self._pending
        self._pending = []
        for _, fut in pending:
            if fut is not None and not fut.done():
                fut.set_exception(RuntimeError(f"shard {self.shard}: {why}"))
        self.repl.stop()
        asyncio.get_running_loop().call_later(0.2, os._exit, 1)

    def _maybe_snapshot(self) -> None:
        """Start a compaction snapshot in the background when one is due (or asked for):
        the commit loop goes on while it is built and written (docs/replication.md,
        "Compaction")."""
        if self._snapshotting:
            return
        want = self._snapshot_waiters
        due = compaction_due(self.log.bytes_since_snapshot, self.cfg.spool.compact_bytes,
                             self._snapshot_size, self.state.body_bytes)
        if want or due:
            self._snapshot_waiters = []
            self._snapshotting = True
            self._spawn(self._snapshot_task(want))

    async def _snapshot_task(self, want: list[asyncio.Future]) -> None:
        try:
            await self._snapshot()
        except Exception as e:
            # the log is intact without it; compaction is tried again after a later commit
            log.exception("shard %d: snapshot failed", self.shard)
            for fut in want:
                if not fut.done():
                    fut.set_exception(e)
        else:
            for fut in want:
                if not fut.done():
                    fut.set_result(None)
        finally:
            self._snapshotting = False

    def _clear_pending_marks(self, batch: list[tuple[list[Any], Any]]) -> None:
        for recs, _ in batch:
            self.intake.settle(recs)

    def _write_snapshot_file(self, snap: dict[str, Any], epoch: int,
                             webhook_cursors: list[int]) -> bytes:
        # (blocking, in a thread of its own: the log goes on being appended meanwhile.
        # The event files may already hold events after the snapshot's lsn: their records
        # are committed, so a leader that restores them skips those events in its replay)
        from actors.webhooks import snapshot_events_tail
        # (webhook endpoints still behind: from their cursor, so a leader rebuilt elsewhere
        # has every event they have not acknowledged)
        sc = self.cfg.spool
        snap["events_tail"], snap["events_holes"] = snapshot_events_tail(
            self.events, sc.snapshot_events_bytes, sc.snapshot_held_events_bytes,
            webhook_cursors)
        return self.log.write_snapshot_file(snap, epoch)

    async def _snapshot(self) -> None:
        # Built a slice at a time between which commits go on (QueueState.snapshot_begin),
        # so a big queue never holds the event loop for the whole of it. Bodies whose frames
        # sit in well-filled segments stay in the log (the snapshot names their lsns): a
        # snapshot is the queue's metadata plus the few bodies of sparse segments, not every
        # queued body again.
        t0 = time.perf_counter()
        build = self.state.snapshot_begin(self.log.segment_ranges())
        slice_max = 0.0
        try:
            while True:
                ts = time.perf_counter()
                done = build.step(self.SNAPSHOT_SLICE)
                slice_max = max(slice_max, time.perf_counter() - ts)
                if done:
                    break
                await asyncio.sleep(0)
            ts = time.perf_counter()
            snap = build.finish()
            bytes_at = self.log.bytes_written   # (frames in flight now are after the lsn)
        except BaseException:
            build.abandon()
            raise
        t1 = time.perf_counter()
        finish_s = t1 - ts
        epoch = self.log.epoch_at(snap["lsn"])
        cursors = list(self._webhook_holds().values())
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, self._write_snapshot_file, snap, epoch,
                                          cursors)
        t2 = time.perf_counter()
        await loop.run_in_executor(
            self._io, functools.partial(self.log.install_snapshot, data, written=True,
                                        bytes_at=bytes_at))
        t3 = time.perf_counter()
        self._snapshot_size = len(data)
        self.counters["snapshots"] += 1
        self.last_snapshot = {
            "lsn": snap["lsn"], "bytes": len(data), "messages": len(snap["messages"]),
            "bodies_referenced": len(snap["keep"]),
            "bodies_copied": len(snap["bodies"]) - len(snap["keep"]),
            # what held the event loop: the longest slice and the final catch-up
            "loop_slice_max_ms": round(slice_max * 1000, 1),
            "loop_finish_ms": round(finish_s * 1000, 1),
            "build_ms": round((t1 - t0) * 1000, 1), "write_ms": round((t2 - t1) * 1000, 1),
            "install_ms": round((t3 - t2) * 1000, 1),
            "log_segments": len(self.log.segment_ranges())}
        log.info("shard %d snapshot: %s", self.shard, self.last_snapshot)
        self._spawn(self.repl.compact(data))

    async def compact(self) -> dict[str, Any]:
        """Write a snapshot now and drop the log it covers (operators, tests)."""
        await self._until_serving()
        fut = asyncio.get_running_loop().create_future()
        self._snapshot_waiters.append(fut)
        assert self._commit_wake is not None
        self._commit_wake.set()
        await fut
        return {"disk_bytes": self.log.disk_bytes(), "lsn": self.state.last_lsn}

    # ------------------------------------------------------------------ submission
    async def submit(self, payload: Any) -> list[dict[str, Any]]:
        """Queue prepared messages; returns one answer per item after they are durable.

        payload: msgpack list of ``[body_id, body, sender, [[id, rcpt, domain], ...], tags,
        metadata, idempotency_key, not_before, max_age, smtputf8]`` (built by the client).
        Every item is checked again here (:mod:`cluster.core.intake`): the answers and the
        ``retryable`` / ``unknown`` flags are described there."""
        t_arrived = time.monotonic()
        try:
            items = msgpack.unpackb(payload, raw=False) if type(payload) is bytes else payload
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            self.intake.counters["refused"] += 1
            return [{"error": f"payload: not a msgpack list of items: {e}",
                     "retryable": False}]
        if type(items) is not list:
            self.intake.counters["refused"] += 1
            return [{"error": f"payload: must be a list of items, not {type(items).__name__}",
                     "retryable": False}]
        try:
            await self._until_serving()
        except RuntimeError as e:
            return [retryable_error(str(e), reason="not_serving") for _ in items]
        if self._stalled:   # no quorum right now: say so at once rather than after a timeout
            return [retryable_error(self._stalled, reason="no_quorum") for _ in items]
        qc = self.cfg.queue
        limits = Limits(qc.max_messages, qc.max_bytes, qc.max_message_size, qc.retry.max_age,
                        self.cfg.suppression.on_submit)
        results, records = self.intake.admit(
            items, self.state, limits, time.time(),
            lambda live: f"queue full on shard {self.shard} ({live} messages, "
                         f"{self.state.body_bytes} body bytes): retry later")
        if records:
            fut = asyncio.get_running_loop().create_future()
            self._enqueue(records, fut)
            try:
                await fut
            except NotWritten as e:
                return [r if "error" in r or r.get("duplicate") else
                        retryable_error(str(e), reason="no_quorum")
                        for r in results]
            except RuntimeError as e:
                # not durable in time: the batch may still commit (its frames may be on
                # copies already); a retry with the same ids is answered as a duplicate then
                return [r if "error" in r or r.get("duplicate") else
                        retryable_error(f"outcome unknown: {e}", unknown=True,
                                        reason="not_serving" if self._fatal else "no_quorum")
                        for r in results]
            self.metrics.observe_submit(time.monotonic() - t_arrived)
        return results

    async def submit_endpoint(self) -> list[Any]:
        """``[host, port, token]`` of this leader's submit stream (started on first call): a
        sender's :meth:`submit` calls go over it rather than as Ray calls, which cost each
        side ~1.5-2.5 ms of CPU (cluster/adapters/stream.py; the token is handed out only here,
        to callers Ray lets call this actor). Answered at once, serving or not: a submit that
        comes over it waits for the shard to serve, as one made by a Ray call does."""
        self._ensure_started()
        if self._submit_stream is None:
            self._submit_stream = StreamServer({"submit": self.submit},
                                               host=ray.util.get_node_ip_address())
        return list(await self._submit_stream.start())

    # ------------------------------------------------------------------ dispatch
    async def _dispatch_loop(self) -> None:
        assert self._dispatch_wake is not None
        while True:
            if not self._dispatch_wake.is_set():
                try:
                    await asyncio.wait_for(self._dispatch_wake.wait(), timeout=self._idle_wait())
                except asyncio.TimeoutError:
                    pass
            self._dispatch_wake.clear()
            started = time.monotonic()
            try:
                await self._dispatch_round()
            except Exception:
                log.exception("dispatch round failed")
                await asyncio.sleep(0.5)
            # commits (which wake us) come far more often than rounds are worth: every round
            # costs a grant call per throttle and a deliver call per relay
            await asyncio.sleep(max(0.0, self._round_interval() - (time.monotonic() - started)))

    def _idle_wait(self) -> float:
        """How long a round may wait for a wake-up (a commit, a result, a route): not past the
        next deferred message's time, and at most 1 s (housekeeping: expiry, stale in-flight,
        metrics). With ready messages, the dispatch interval (site retry times pass)."""
        st = self.state
        if st.ready:
            return self.cfg.queue.dispatch_interval
        due = st.next_due()
        wait = 1.0 if due is None else due - time.time()
        return min(1.0, max(self.cfg.queue.dispatch_interval, wait))

    def _round_interval(self) -> float:
        """Time to the next dispatch round (:func:`cluster.core.throttle.round_interval`)."""
        now = time.monotonic()
        dt = now - self._rate_at
        if dt >= 0.2:
            self._result_rate = 0.5 * self._result_rate + 0.5 * self._results_seen / dt
            self._results_seen = 0
            self._rate_at = now
        return round_interval(self.cfg.queue.dispatch_interval, len(self._inflight_site),
                              self._result_rate)

    async def _dispatch_round(self) -> None:
        now = time.time()
        st = self.state
        st.promote_due(now)
        if now - self._last_housekeeping > 1.0:
            self._last_housekeeping = now
            self._housekeeping(now)
        stale = self._stale_reports()
        changed = st.take_ready_changed()
        if self._route_changed:
            changed |= self._route_changed
            self._route_changed = set()
        # 1. routes for domains we have none for (or whose TTL ran out): those that changed,
        # the timed-out lookups due again, and once a second every ready domain (refreshed
        # ahead of expiry, so dispatch never waits on it). Before 2, which takes the mail of
        # domains whose lookup failed out of the ready queues
        if now - self._routes_walked >= 1.0:
            self._routes_walked = now
            need = self._routes_needed(now, st.ready, prune=True)
        else:
            need = self._routes_needed(now, changed)
        if need:
            self._resolving.update(need)
            self._spawn(self._resolve(need))
        # 2. domains whose ready count or route changed: placed under their sites (a domain
        # whose lookup failed has its ready mail bounced or deferred)
        recs = self._sync_ready(changed, now)
        if not st.ready and not stale:
            if recs:
                self._enqueue(recs)
            return
        # 3. the sites to consider: those with ready mail that are neither waiting for their
        # throttle's retry time nor full by our own count, in round-robin order
        idx = self._ready_sites
        demand: dict[str, list[Any]] = {}   # site → [ready, domains, info(, wire limits)]
        for site in idx.due(now):
            domains = list(idx.domains[site])
            ready = idx.ready[site]
            if st.suspended:   # an operator's `raymta suspend`: the mail waits, ready
                domains = [d for d in domains if not st.is_suspended(d, site, now)]
                if not domains:
                    continue
                ready = sum(st.ready_live[d] for d in domains)
            demand[site] = [ready, domains, idx.info[site]]
        if recs:
            self._enqueue(recs)
        if st.shaping:   # shaping rules' set_limits in force lower their sites' limits
            self._shaped_limits(demand, now)
        # 4. grants, one call per throttle actor; with them, in-flight counts that went down
        # for sites with nothing ready here (ready 0: a report only)
        shared = self._throttle_pool()
        by_throttle: dict[str, list[list[Any]]] = {}
        for site, d in demand.items():
            ready, _domains, info = d
            wire = limits_to_wire(info.limits)
            d.append(wire)   # for the relay batches below: one lookup a site a round
            inflight = self._site_inflight.get(site, 0)
            retry = self._site_retry.get(site, 0.0)
            if retry > now or inflight >= max_inflight(info.limits):
                # not asking (paused, or full by our own count alone: the throttle could
                # only say no); still say so when the count has gone down. Not considered
                # again until the retry time, or until a message of it finishes
                if retry > now:
                    idx.hold(site, retry)
                else:
                    idx.park(site)
                ready = 0
                if inflight == self._site_reported.get(site, (0,))[0]:
                    continue
            tname = throttle_actor_name(site, info.limits.dedicated, shared)
            by_throttle.setdefault(tname, []).append(
                [site, ready, inflight, wire])
            self._site_reported[site] = (inflight, tname, info.limits)
        for site, tname, limits, inflight in stale:
            if site not in demand:
                by_throttle.setdefault(tname, []).append(
                    [site, 0, inflight, limits_to_wire(limits)])
                self._site_reported[site] = (inflight, tname, limits)
            if inflight == 0:   # nothing out there any more: the throttle knows it now
                self._site_reported.pop(site, None)
        if not by_throttle:
            return
        names = list(by_throttle)
        replies = await asyncio.gather(*(self._grant(n, by_throttle[n]) for n in names))
        # 5. take messages and batch them per relay
        budget = self.cfg.queue.dispatch_batch
        per_relay: dict[str, dict[str, Any]] = {}
        taken_ids: dict[str, list[str]] = {}
        bodies_sent: dict[str, set[str]] = {}
        now = time.time()
        for tname, grants in zip(names, replies):
            for site, (n, retry_after) in grants.items():
                if n <= 0 and not retry_after:
                    # full (in flight at its cap, the other shards' share included): results
                    # take a while to free room; asking every round only costs Ray calls
                    retry_after = now + 4 * self.cfg.queue.dispatch_interval
                self._site_retry[site] = retry_after
                if retry_after > now:
                    idx.hold(site, retry_after)
                if site not in demand:
                    continue   # a report only
                n = min(n, budget)
                if n <= 0:
                    continue
                ready, domains, info, wire = demand[site]
                msgs = self._take(domains, n, now)
                if not msgs:
                    continue
                idx.served(site)
                budget -= len(msgs)
                placed, unplaced, held = self._place(site, info.limits, ready, msgs)
                if unplaced:
                    st.requeue([m.id for m in unplaced])
                if held:   # a cold source at its cap: tomorrow (not an attempt, no record)
                    st.hold_until([m.id for m in held], next_day_start(now))
                    self.counters["warmup_held"] += len(held)
                if not placed:
                    continue
                route = self._routes[msgs[0].domain]
                n_placed = 0
                for relay, part in placed:
                    n_placed += len(part)
                    for m in part:
                        m.site = site
                        self._inflight_site[m.id] = site
                    # a body goes once per relay batch; the recipients of one message carry
                    # its body id (the relay fills the body in, and may send them in one
                    # transaction)
                    sent = bodies_sent.setdefault(relay, set())
                    items = []
                    for m in part:
                        b = m.body_id
                        items.append([m.id, m.attempts + 1, m.sender, m.rcpt,
                                      None if b in sent else st.body(b), bool(m.smtputf8), b])
                        sent.add(b)
                    spec = per_relay.setdefault(relay, {}).get(site)
                    if spec is None:
                        spec = per_relay[relay][site] = {
                            "hosts": route.hosts, "port": route.port,
                            "limits": wire, "throttle": tname,
                            "items": items, "sts": {}}
                    else:   # the same relay for two egress pools' shares of the site
                        spec["items"].extend(items)
                    self._sts_hints(spec["sts"], part)
                    taken_ids.setdefault(relay, []).extend(m.id for m in part)
                self._site_inflight[site] = self._site_inflight.get(site, 0) + n_placed
                self._site_reported[site] = (self._site_inflight[site], tname, info.limits)
        if self._warmup is not None:
            self._warmup_records(now)
        for relay, batch in per_relay.items():
            self.counters["dispatched"] += len(taken_ids[relay])
            self._spawn(self._deliver(relay, batch, taken_ids[relay]))

    def _sts_hints(self, hints: dict[str, Any], msgs: list[Any]) -> None:
        """The MTA-STS TXT answers the throttles found beside the MX records, for the
        recipient domains of ``msgs``: the relay needs no lookup of its own for them."""
        for m in msgs:
            if m.domain not in hints:
                r = self._routes.get(m.domain)
                if r is not None and r.sts is not None:
                    hints[m.domain] = r.sts

    def _warmup_records(self, now: float) -> None:
        """Warm-up bookkeeping after a round: blocks of counts to ask the sources' home shards
        for (a cold source sends only counts its home granted and wrote down, so no restart
        anywhere lets it send past its cap), and first-of-the-day events as ``u`` records."""
        w = self._warmup
        assert w is not None
        for src, prov, day, n in w.requests(now):
            self._spawn(self._warmup_ask(src, prov, day, n))
        recs = [q.warmup_record(s, p, d, self.state.warmup.get(w.key(s, p, d), 0), now, note)
                for s, p, d, note in w.take_notes(self.state.warmup_notes)]
        if recs:
            self._enqueue(recs)

    async def _warmup_ask(self, source: str, provider: str, day: int, n: int) -> None:
        assert self._warmup is not None
        home = home_shard(source, self.cfg.queue.shards)
        got: int | None = None
        try:
            if home == self.shard:
                got = await self.warmup_reserve(source, provider, day, n)
            else:
                got = await asyncio.wait_for(self._handle(f"coordinator:{home}").warmup_reserve
                                             .remote(source, provider, day, n), timeout=10)
        except (ray.exceptions.RayError, asyncio.TimeoutError, ValueError, RuntimeError,
                NotWritten) as e:
            log.warning("warm-up counts for %s/%s from coordinator:%d failed: %s", source,
                        provider, home, e)
            self._handles.pop(f"coordinator:{home}", None)
        self._warmup.answered(source, provider, day, n, got)
        assert self._dispatch_wake is not None
        self._dispatch_wake.set()

    async def warmup_reserve(self, source: str, provider: str, day: int, n: int) -> int:
        """Grant up to ``n`` of egress ``source``'s cap for ``provider`` on UTC ``day`` to a
        shard (this shard is the source's home): written down before it answers, so the
        total granted, which never passes the cap, survives any restart."""
        await self._until_serving()
        if type(source) is not str or type(provider) is not str or type(day) is not int \
                or type(n) is not int or not 0 < n <= 1_000_000:
            raise ValueError("warmup_reserve(source: str, provider: str, day: int, n: int "
                             "in 1..1,000,000)")
        plan = self.cfg.warmup_plans().get(source)
        if plan is None or home_shard(source, self.cfg.queue.shards) != self.shard:
            raise ValueError(f"coordinator:{self.shard} keeps no warm-up counts of {source!r}")
        now = time.time()
        if day < utc_day(now) - 1:
            return 0
        cap = plan.cap(provider, day * 86400.0)
        if cap is None:
            return n
        k = WarmupLedger.key(source, provider, day)
        total = max(self.state.warmup.get(k, 0), self._warmup_promised.get(k, 0))
        g = grant(total, cap, n)
        if g > 0:
            # promised at once (calls interleave while the record commits); a commit that
            # fails leaves the promise standing: fewer sent, never more
            self._warmup_promised[k] = total + g
            for old in [x for x in self._warmup_promised if int(x.rsplit("|", 1)[1]) < day - 1]:
                del self._warmup_promised[old]
            await self._commit([q.warmup_record(source, provider, day, total + g, now,
                                                "capped" if total + g >= cap else "")])
        return g

    def _stale_reports(self) -> list[tuple[str, str, SiteLimits, int]]:
        """Sites whose in-flight count went down since the throttle last heard it (of those
        with a message finished since the last round)."""
        out = []
        for site in self._settled_sites:
            e = self._site_reported.get(site)
            n = self._site_inflight.get(site, 0)
            if e is not None and n < e[0]:
                out.append((site, e[1], e[2], n))
        self._settled_sites.clear()
        return out

    def _sync_ready(self, changed: set[str], now: float) -> list[Any]:
        """Place each domain of ``changed`` under its site with its ready count now; the
        records that bounce or defer the ready mail of domains whose lookup failed."""
        st, routes, idx = self.state, self._routes, self._ready_sites
        recs: list[Any] = []
        for domain in changed:
            n = st.ready_live.get(domain, 0)
            r = routes.get(domain) if n else None
            if r is None:   # nothing ready, or the first lookup is under way
                idx.place(domain, None, 0)
            elif not r.ok:
                idx.place(domain, None, 0)
                recs.extend(self._dns_fail_records(domain, r, now))
            else:
                assert r.site is not None
                idx.place(domain, r.site.key, n, r.site)
        return recs

    def _take(self, domains: list[str], n: int, now: float) -> list[q.QueuedMessage]:
        """Up to n ready messages over the site's domains, round robin so none starves."""
        out: list[q.QueuedMessage] = []
        active = list(domains)
        while len(out) < n and active:
            share = max(1, (n - len(out)) // len(active))
            nxt = []
            for d in active:
                got = self.state.take_ready(d, min(share, n - len(out)), now)
                out.extend(got)
                if got and d in self.state.ready:
                    nxt.append(d)
                if len(out) >= n:
                    break
            active = nxt
        return out

    async def _grant(self, tname: str, demand: list[list[Any]]) -> dict[str, tuple[int, float]]:
        try:
            if tname.startswith("throttle:") and not tname.startswith("throttle:pool:"):
                await self._ensure_dedicated(tname)
            h = self._handle(tname)
            return await asyncio.wait_for(
                h.grant.remote(self.shard, msgpack.packb(demand, use_bin_type=True)), timeout=10)
        except (ray.exceptions.RayError, asyncio.TimeoutError, ValueError) as e:
            log.warning("grant from %s failed: %s", tname, e)
            self._handles.pop(tname, None)
            return {}

    async def _ensure_dedicated(self, tname: str) -> None:
        if tname in self._handles:
            return
        from actors.remote import ensure_throttle
        self._handles[tname] = await asyncio.get_running_loop().run_in_executor(
            None, ensure_throttle, self.cfg, tname)

    def _throttle_pool(self) -> int:
        """Shared throttles in the pool now (as the last deploy published it)."""
        from actors.throttle_pool import REFRESH, read_view
        now = time.time()
        if now - self._pool_read > REFRESH:
            self._pool_read = now
            try:
                self._pool_size = read_view(self.cfg).count
            except (ray.exceptions.RayError, RuntimeError, OSError) as e:
                # the GCS is away for a moment: keep the last size
                log.warning("reading the throttle pool's size failed: %s", e)
        return self._pool_size

    def _relay_names(self) -> list[str]:
        """The live relays (looked up again every 10 s, or after a relay was lost)."""
        now = time.time()
        if not self._relays or now - self._relays_checked > 10:
            self._relays_checked = now
            from actors.remote import list_relays
            self._relays = list_relays(self.ns)
        return self._relays

    def _place(self, site: str, limits: SiteLimits, ready: int, msgs: list[q.QueuedMessage]
               ) -> tuple[list[tuple[str, list[q.QueuedMessage]]], list[q.QueuedMessage],
                          list[q.QueuedMessage]]:
        """Which relay sends each of ``msgs`` (taken for ``site``): ``([(relay, messages)],
        messages no relay can send now, messages held for a warm-up cap)``. A message whose
        sender domain has an egress pool goes out from one of the pool's sources, picked by
        weight on its id; the others from any source the site allows. A source still warming
        up (:mod:`cluster.core.warmup`) sends only its share of today's cap: past it, the
        message overflows to another source with room or is held. Over the relays of the
        allowed sources, the site's rendezvous choice (:meth:`_relays_for`) and, for a hot
        site, an even split."""
        unplaced: list[q.QueuedMessage] = []
        held: list[q.QueuedMessage] = []
        pools = self.cfg.egress_pools
        warm = self._warmup
        if not pools and warm is None:
            # the usual case, every site of every round: no egress pool nor warm-up to weigh
            return self._split(site, limits, ready, (), msgs, [], unplaced), unplaced, held
        groups: dict[tuple[str, ...], list[q.QueuedMessage]] = {}
        now = time.time()
        prov = (self.cfg.shaping.rules.provider_of(site) or DEFAULT) if warm else ""
        natural: dict[str, float] = {}
        allowed: dict[str, float] = {}
        if warm is not None:
            have = {r.rsplit(":", 1)[-1] for r in self._relay_names()}
            allowed = {src: 1.0 for src in sorted(have)
                       if not limits.sources or src in limits.sources}
            natural = {r.rsplit(":", 1)[-1]: 1.0
                       for r in self._relays_for(site, limits, ready)}
            if not any(warm.cold(src, now) for src in natural):
                natural = {}   # the site's own relays are warm: placed as before
        if not pools and not natural:
            groups[()] = msgs
        else:
            have = {r.rsplit(":", 1)[-1] for r in self._relay_names()}
            for m in msgs:
                pool = pool_for(m.sender, pools) if pools else None
                if pool is None and not natural:
                    groups.setdefault((), []).append(m)
                    continue
                if pool is None:
                    w, fallback = natural, allowed
                else:
                    w = {src: x for src, x in pool.weights if src in have and
                         (not limits.sources or src in limits.sources)}
                    fallback = {}
                if not w:
                    unplaced.append(m)
                    continue
                if warm is None:
                    groups.setdefault((weighted_pick(m.id, w),), []).append(m)
                    continue
                src, outcome = warm.choose(m.id, w, prov, now, fallback)
                if src is not None:
                    groups.setdefault((src,), []).append(m)
                elif outcome == "hold":
                    held.append(m)
                else:   # a reservation is on its way: next round
                    unplaced.append(m)
            if unplaced and not warm:
                log.error("no relay for egress pool of %d messages to site %s", len(unplaced),
                          site)
        out: list[tuple[str, list[q.QueuedMessage]]] = []
        for only, part in groups.items():
            self._split(site, limits, ready, only, part, out, unplaced)
        return out, unplaced, held

    def _split(self, site: str, limits: SiteLimits, ready: int, only: tuple[str, ...],
               part: list[q.QueuedMessage], out: list[tuple[str, list[q.QueuedMessage]]],
               unplaced: list[q.QueuedMessage]) -> list[tuple[str, list[q.QueuedMessage]]]:
        """``part`` (of the sources ``only``, or any) over the site's relays, appended to
        ``out`` as (relay, messages); to ``unplaced`` when no relay can take them."""
        relays = self._relays_for(site, limits, ready, only)
        if not relays:
            unplaced.extend(part)
            return out
        key = site if not only else f"{site}|{only[0]}"
        if len(relays) == 1:   # one relay a site (not hot): no turn to keep
            out.append((relays[0], part))
            if self._spread_turn:
                self._spread_turn.pop(key, None)
            return out
        turn = self._spread_turn.get(key, 0)
        at = 0
        for relay, k in zip(relays, split_counts(len(part), len(relays), turn)):
            if k > 0:
                out.append((relay, part[at:at + k]))
                at += k
        if key not in self._spread_turn and len(self._spread_turn) >= 10_000:
            self._spread_turn.clear()   # bounded: a turn is only a tie-breaker
        self._spread_turn[key] = (turn + len(part)) % len(relays)
        return out

    def _relays_for(self, site: str, limits: SiteLimits, ready: int,
                    only: tuple[str, ...] = ()) -> list[str]:
        """The relays that carry ``site`` this round (of the sources ``only``, when given): its
        top relay by rendezvous weight, or its top k on distinct nodes while it is hot
        (:mod:`cluster.core.relay_choice`)."""
        names = self._relay_names()
        if self._cands_of is not names:   # the relays were looked up again
            self._cands_of, self._cands = names, {}
        # per (sources allowed, sources asked for): bounded by the config's combinations
        cands = self._cands.get((limits.sources, only))
        if cands is None:
            cands = self._cands[(limits.sources, only)] = tuple(
                r for r in names
                if (not limits.sources or r.rsplit(":", 1)[-1] in limits.sources)
                and (not only or r.rsplit(":", 1)[-1] in only))
        if not cands:
            log.error("no relay pool for site %s (sources %s)", site, only or limits.sources)
            return []
        d = self.cfg.delivery
        k = spread_count(ready=ready, configured=limits.relays, hot_ready=d.hot_site_ready,
                         hot_relays=d.hot_site_relays, max_connections=limits.max_connections,
                         available=len(cands))
        return choose_relays(site, cands, k)

    def _settle(self, mid: str) -> str | None:
        """The message is no longer out at a relay: free its place in the site's count."""
        site = self._inflight_site.pop(mid, None)
        if site is not None:
            self._site_inflight[site] = max(0, self._site_inflight.get(site, 0) - 1)
            self._settled_sites.add(site)
            self._ready_sites.wake(site)
        return site

    def _requeue(self, ids: list[str]) -> int:
        back = [mid for mid in ids if self._settle(mid) is not None]
        n = self.state.requeue(back)
        assert self._dispatch_wake is not None
        self._dispatch_wake.set()
        return n

    async def _deliver(self, relay: str, batch: dict[str, Any], ids: list[str]) -> None:
        """Hand a batch to a relay. Results arrive through :meth:`report`; this call's end
        (or its failure, when the relay process dies) only tells that the batch is done."""
        try:
            h = self._handle(relay)
            # never retried by Ray: a re-run would resend the whole batch; we requeue instead
            await h.deliver.options(max_task_retries=0).remote(
                msgpack.packb(batch, use_bin_type=True), f"coordinator:{self.shard}")
        except (ray.exceptions.RayError, ValueError) as e:
            self._handles.pop(relay, None)
            self._relays_checked = 0.0
            # results already sent may still be on their way: those messages are requeued
            # now and settled as they arrive (report accepts results for queued messages)
            lost = [mid for mid in ids if mid in self._inflight_site]
            n = self._requeue(lost)
            self.counters["requeued_after_relay_loss"] += n
            log.warning("relay %s lost with %d messages in flight: %s", relay, n, e)

    async def report(self, payload: bytes) -> None:
        """Results from a relay: ``[[id, outcome, code, enhanced, text, category, host]]``.
        Answers once their records are committed: until then the relay keeps them, and hands
        them to this shard's next leader if this one dies first."""
        await self._until_serving()
        settled: dict[str, str] = {}
        recs = self._on_results(msgpack.unpackb(payload, raw=False), settled)
        if recs:
            if self.cfg.suppression.from_bounces:
                self._suppress_hard_bounces(recs)
            try:
                await self._commit(recs)
            except RuntimeError:
                # not written (no quorum): the messages are out at their relay again by our
                # account, so the relay's next try of these results is taken as usual
                for mid, site in settled.items():
                    m = self.state.messages.get(mid)
                    if m is not None and m.state == q.INFLIGHT and \
                            mid not in self._inflight_site:
                        self._inflight_site[mid] = site
                        self._site_inflight[site] = self._site_inflight.get(site, 0) + 1
                raise

    async def _take_unacked_results(self) -> int:
        """A starting leader asks every relay for the results its predecessor was sent but
        had not committed, and commits them before handing any message out again: a leader's
        death then costs no duplicate delivery (a relay's death still costs those on its
        wire)."""
        from actors.remote import list_relays
        loop = asyncio.get_running_loop()
        me = f"coordinator:{self.shard}"
        try:
            names = await loop.run_in_executor(None, list_relays, self.ns)
        except Exception as e:   # noqa: BLE001 - never fatal: at-least-once still holds
            log.warning("shard %d: cannot list relays for unacked results: %s", self.shard, e)
            return 0
        got = 0
        for name in names:
            try:
                data = await asyncio.wait_for(self._handle(name).unacked_results.remote(me), 5)
            except (ray.exceptions.RayError, asyncio.TimeoutError, ValueError) as e:
                log.warning("shard %d: no unacked results from %s: %s", self.shard, name, e)
                continue
            results = msgpack.unpackb(data, raw=False)
            recs = self._on_results(results)
            if recs:
                if self.cfg.suppression.from_bounces:
                    self._suppress_hard_bounces(recs)
                try:
                    await self._commit(recs)
                except RuntimeError as e:
                    log.warning("shard %d: committing unacked results failed: %s", self.shard, e)
                    continue
            got += len(results)
        self.counters["unacked_results_taken"] = got
        return got

    def _on_results(self, results: list[list[Any]], settled: dict[str, str] | None = None
                    ) -> list[Any]:
        now = time.time()
        self._results_seen += len(results)
        recs = []
        for mid, outcome, code, enhanced, text, category, _host in results:
            site = self._settle(mid)
            if site is not None and settled is not None:
                settled[mid] = site
            m = self.state.messages.get(mid)
            if m is None:
                continue   # finished already (a duplicate report)
            if site is None:
                # not out at a relay by our account: a result from before a restart or from a
                # batch we gave up on. A delivery or bounce is still the truth about the
                # message; a transient failure is not worth a retry record.
                if outcome == "transient" or m.state == q.INFLIGHT:
                    continue
                site = m.site
                self.state.hold(mid, now)   # not to be sent again while its record commits
            attempt = m.attempts + 1
            if outcome == "delivered":
                recs.append(q.delivered_record(mid, attempt, code, text, site, now))
            elif outcome == "permanent":
                recs.append(q.final_record(mid, attempt, "bounce", code, enhanced, text, site,
                                           category, now))
            else:
                recs.append(self._retry_record(m, attempt, code, enhanced, text, site, category,
                                               now, "throttle" if category in PACE_CATEGORIES
                                               else "normal"))
        return recs

    def _retry_record(self, m: q.QueuedMessage, attempt: int, code: int | None,
                      enhanced: str | None, text: str, site: str, category: str, now: float,
                      kind: str) -> list[Any]:
        if m.cancel_requested:
            return q.final_record(m.id, attempt, "cancelled", code, enhanced,
                                  f"cancelled by request; last reply: {text}", site, category,
                                  now)
        next_at = self.cfg.queue.retry.next_attempt_at(now, attempt, self._rng.random(), kind)
        if next_at >= m.expires_at:
            return q.final_record(m.id, attempt, "expired", code, enhanced,
                                  f"message expired after {attempt} attempts; last reply: {text}",
                                  site, EXPIRED_CATEGORY, now)
        return q.transient_record(m.id, attempt, next_at, code, enhanced, text, site, category,
                                  now)

    def _dns_fail_records(self, domain: str, r: _Route, now: float) -> list[Any]:
        c = dns_failure(r.fail_kind, r.text)
        recs = []
        for m in self.state.take_ready(domain, 1 << 30, now):
            attempt = m.attempts + 1
            self.dns_counters["bounced_msgs" if r.permanent else "deferred_msgs"] += 1
            if r.permanent:
                recs.append(q.final_record(m.id, attempt, "bounce", c.code, c.enhanced, c.text,
                                           "", c.category, now))
            else:
                recs.append(self._retry_record(m, attempt, c.code, c.enhanced, c.text, "",
                                               c.category, now, "dns"))
        return recs

    #: domains per resolve call: routes arrive a chunk at a time (dispatch starts on the first),
    #: and one call's work stays well inside its timeout however big the burst
    RESOLVE_CHUNK = 256

    def _routes_needed(self, now: float, domains: Iterable[str], prune: bool = False
                       ) -> list[str]:
        """Of ``domains`` and those whose timed-out lookup is due again, those with ready
        mail to resolve now: no route yet, or one that expires soon (refreshed ahead, so
        dispatch never waits on it); not those being resolved, nor those whose lookup timed
        out and whose next try is not due. ``prune``: forget the timed-out lookups of domains
        with nothing queued any more (bounded by ready domains)."""
        routes, retry = self._routes, self._dns_retry
        ready = self.state.ready
        if retry and prune:
            for d in [d for d in retry if d not in ready]:
                del retry[d]
        if retry:
            domains = set(domains)
            domains.update(d for d, t in retry.items() if t.next_at <= now)
        need = []
        for d in domains:
            if d not in ready or d in self._resolving:
                continue
            r = routes.get(d)
            if r is not None and now < r.refresh_at:   # pol.needs_lookup, kept with the route
                continue
            t = retry.get(d)
            if t is not None and t.next_at > now:
                continue
            need.append(d)
        return need

    async def _resolve(self, domains: list[str]) -> None:
        """Resolve ``domains`` through their throttles (concurrently across throttles, in
        chunks), waking dispatch as each chunk's routes arrive."""
        shared = self._throttle_pool()
        groups: dict[str, list[str]] = {}
        for d in domains:   # any pool throttle resolves any domain: spread by domain
            groups.setdefault(pool_name(stable_hash(d) % shared), []).append(d)
        # a chunk may wait behind ~max_concurrent-sized waves of lookups at the throttle
        # (MX, A, AAAA, and the MTA-STS TXT beside them)
        per_domain = 4 if self.cfg.delivery.mta_sts else 3
        waves = -(-self.RESOLVE_CHUNK * per_domain // self.cfg.dns.max_concurrent)
        call_timeout = self.cfg.dns.timeout * (3 + waves) + 5

        async def through(tname: str, ds: list[str]) -> None:
            for i in range(0, len(ds), self.RESOLVE_CHUNK):
                chunk = ds[i:i + self.RESOLVE_CHUNK]
                try:
                    res = await asyncio.wait_for(self._handle(tname).resolve.remote(chunk),
                                                 timeout=call_timeout)
                except (ray.exceptions.RayError, asyncio.TimeoutError, ValueError) as e:
                    log.warning("MX lookup via %s failed: %s", tname, e)
                    self._handles.pop(tname, None)
                    self._resolving.difference_update(ds[i:])
                    return
                self._apply_routes(res, time.time())
                self._resolving.difference_update(chunk)
                assert self._dispatch_wake is not None
                self._dispatch_wake.set()

        try:
            await asyncio.gather(*(through(t, ds) for t, ds in groups.items()))
        finally:
            self._resolving.difference_update(domains)
            # looked at again next round: placed under their sites, or asked again
            self._route_changed.update(domains)
            assert self._dispatch_wake is not None
            self._dispatch_wake.set()

    def _apply_routes(self, res: dict[str, list[Any]], now: float) -> None:
        """Keep the routes a throttle returned. A lookup that timed out is asked again in
        seconds (the domain's mail stays ready, and an old route keeps serving); only timeouts
        past the policy's budget are kept as a failure, which defers the mail."""
        self._route_changed.update(res)
        for d, raw in res.items():
            r = _Route(raw, d, self.cfg, now)
            r.refresh_at = self._dns_policy.refresh_at(r.resolved_at, r.expires_at)
            if not r.ok and r.timed_out and not r.permanent:
                nxt = self._dns_policy.timeout_retry_at(self._dns_retry.get(d), now)
                if nxt is not None:
                    self._dns_retry[d] = nxt
                    self.dns_counters["timeouts_retried"] += 1
                    old = self._routes.get(d)
                    if old is not None and not old.ok:
                        del self._routes[d]   # an older failure must not defer the mail now
                    continue
                self.dns_counters["timeouts_deferred"] += 1
            self._dns_retry.pop(d, None)
            self._routes[d] = r

    def _housekeeping(self, now: float) -> None:
        st = self.state
        recs = []
        for m in st.due_expiries(now):
            recs.append(q.final_record(m.id, m.attempts, "expired", m.last_code, None,
                                       f"message expired in queue after {m.attempts} attempts"
                                       + (f"; last reply: {m.last_text}" if m.last_text else ""),
                                       m.site, EXPIRED_CATEGORY, now))
        if recs:
            self._enqueue(recs)
        stale = st.stale_inflight(now, self.cfg.queue.inflight_timeout)
        if stale:
            n = self._requeue(stale)
            if n:
                log.warning("%d messages in flight past inflight_timeout: retrying", n)
        st.prune_idempotency(now)
        st.suppression.expire(now)
        if st.dsn_due:   # DSNs held for siblings whose coalescing window has run out
            self._queue_dsns(now)
        if st.suppress_outbox and not self._propagating:
            self._propagating = True
            self._spawn(self._propagate_suppressions())
        self.metrics.set_queue(st.counts())
        self.metrics.set_replication(self.epoch, self.repl.lag())
        bi = self.cfg.backup.interval
        if bi and now - self._last_backup > bi:
            self._last_backup = now
            self._spawn(self._periodic_backup())
        for d in [d for d, r in self._routes.items() if r.expires_at < now - 60]:
            del self._routes[d]
            self._route_changed.add(d)
        for s in [s for s, (n, _, _) in self._site_reported.items()
                  if n == 0 and s not in self._ready_sites]:
            del self._site_reported[s]   # bounded: the throttle heard the count was 0
        for s in [s for s, t in self._site_retry.items() if t < now - 60]:
            del self._site_retry[s]

    # ------------------------------------------------------------------ copies on distinct nodes
    async def _rebalance_loop(self) -> None:
        every = self.cfg.replication.rebalance_interval
        while True:
            await asyncio.sleep(every)
            try:
                await self._rebalance_once()
            except Exception:   # never fatal: the copies stay where they are and still serve
                log.exception("shard %d: rebalancing copies failed", self.shard)

    async def rebalance(self) -> str:
        """Check now that the copies sit on distinct nodes and move one if not (operators,
        tests; the leader also does this every ``replication.rebalance_interval``)."""
        await self._until_serving()
        return await self._rebalance_once()

    async def _rebalance_once(self) -> str:
        """Move one replica off a node it shares with a sibling copy, to a live node without a
        copy of this shard (:func:`cluster.core.replication.plan_move`), when every copy is a
        caught-up member (the move costs one copy until the new one has caught up). Returns
        what it did, for the log and tests."""
        from actors.remote import ensure_replica, node_regions, replica_name
        from cluster.core.replication import plan_move
        loop = asyncio.get_running_loop()
        nodes = await loop.run_in_executor(None, node_regions)
        if len(nodes) < 2:
            return "one node"
        lag = self.repl.lag()
        if any(not c["member"] or c["state"] not in ("leader", "streaming") for c in lag):
            return "not every copy is a caught-up member"
        copies = [(0, ray.get_runtime_context().get_node_id())]
        handles = {}
        for slot in range(1, self.cfg.cluster.replicas):
            h = await loop.run_in_executor(None, self._replica_handle, slot)
            st = await asyncio.wait_for(h.stats.remote(), 10)
            copies.append((slot, st["node"]))
            handles[slot] = h
        plan = plan_move(copies, nodes)
        if plan is None:
            return "nothing to move"
        slot, target = plan
        name = replica_name(self.shard, slot)
        where = dict(copies)[slot]
        log.warning("shard %d: %s shares node %s with a sibling copy; moving it to node %s",
                    self.shard, name, where[:12], target[:12])
        ray.kill(handles[slot], no_restart=True)
        for _ in range(100):   # the name is free once Ray has the actor dead
            try:
                await loop.run_in_executor(None, self._replica_handle, slot)
            except ValueError:
                break
            await asyncio.sleep(0.1)
        siblings = [n for s, n in copies if s != slot]
        # detached: owned by nobody (a replica owned by this leader would die with it)
        await loop.run_in_executor(None, lambda: ensure_replica(
            self.cfg, self.shard, slot, target, siblings, detached=True))
        self.counters["copies_moved"] = self.counters.get("copies_moved", 0) + 1
        return f"moved {name} from {where[:12]} to {target[:12]}"

    # ------------------------------------------------------------------ queries and control
    async def status(self, ids: list[str]) -> list[dict[str, Any] | None]:
        await self._until_serving()
        return [self.state.status(i) for i in ids]

    async def cancel(self, ids: list[str]) -> list[str]:
        """Cancel queued messages. In-flight ones are cancelled if that attempt fails."""
        await self._until_serving()
        now = time.time()
        out, recs = [], []
        for mid in ids:
            m = self.state.messages.get(mid)
            if m is None:
                fin = self.state.finished.get(mid)
                out.append(f"already {fin[1]}" if fin else "unknown")
            elif m.state == q.INFLIGHT:
                m.cancel_requested = True
                out.append("cancel pending (in flight)")
            else:
                recs.append(q.final_record(mid, m.attempts, "cancelled", None, None,
                                           "cancelled by request", m.site, "cancelled", now))
                out.append("cancelled")
        if recs:
            fut = asyncio.get_running_loop().create_future()
            self._enqueue(recs, fut)
            await fut
        return out

    async def events(self, since: int = 0, limit: int = 10_000) -> list[dict[str, Any]]:
        await self._until_serving()
        return self.events.read(since, limit)

    # ------------------------------------------------------------------ webhooks (actors/webhooks.py)
    async def wait_events(self, since: int = 0, limit: int = 1000, wait: float = 0.0
                          ) -> list[dict[str, Any]]:
        """:meth:`events`, but when there is none after ``since`` wait up to ``wait`` seconds
        (at most 30) for one (long-poll: ``GET /v1/events?wait=``, the webhook dispatcher)."""
        await self._until_serving()
        deadline = time.monotonic() + min(max(float(wait), 0.0), 30.0)
        while self.events.last_seq <= since and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.events.read(since, limit) if self.events.last_seq > since else []

    async def events_gap(self, since: int) -> dict[str, Any] | None:
        """The events after ``since`` that rotated out of the event files (:meth:`EventLog.gap`):
        what a reader at that cursor will never see, or None."""
        await self._until_serving()
        return self.events.gap(int(since))

    async def webhook_events(self, since: int = 0, limit: int = 1000, wait: float = 0.0
                             ) -> dict[str, Any]:
        """:meth:`wait_events` for the webhook dispatcher, with ``skipped``: the events after
        ``since`` that rotated away before it read them (:meth:`EventLog.gap`), or None."""
        evs = await self.wait_events(since, limit, wait)
        return {"events": evs, "skipped": self.events.gap(int(since))}

    def _webhook_holds(self) -> dict[str, int]:
        """The committed cursors of the configured webhook endpoints (a removed endpoint's
        cursor stays in the state but holds no event back)."""
        names = {w.name for w in self.cfg.webhooks}
        return {e: c for e, c in self.state.webhook_cursors.items() if e in names}

    def _retention_capped(self, plan: RotationPlan) -> None:
        """Event files went although endpoints had not acknowledged them: retention is full."""
        log.error("shard %d: event retention is at spool.event_retain_bytes (%d bytes held): "
                  "%d event file(s) from seq %d deleted before webhook endpoint(s) %s "
                  "acknowledged them; they will be reported skipped", self.shard,
                  plan.held_bytes, len(plan.capped), plan.capped[0], ", ".join(plan.holders))
        self.metrics.retention_capped(plan.holders, len(plan.capped))

    async def webhook_cursors(self) -> dict[str, int]:
        """Per webhook endpoint, the seq up to which it acknowledged this shard's events."""
        await self._until_serving()
        return dict(self.state.webhook_cursors)

    async def webhook_ack(self, endpoint: str, cursor: int) -> int:
        """Make "``endpoint`` has every event up to ``cursor``" durable on a quorum (a ``w``
        record); returns the endpoint's cursor. Idempotent; a cursor never goes back."""
        await self._until_serving()
        if type(endpoint) is not str or not endpoint or len(endpoint) > 100:
            raise ValueError(f"endpoint: {endpoint!r} is not a webhook name")
        if type(cursor) is not int or not 0 <= cursor <= self.state.last_lsn:
            raise ValueError(f"cursor: {cursor!r} is not a seq of shard {self.shard} "
                             f"(0..{self.state.last_lsn})")
        if cursor > self.state.webhook_cursors.get(endpoint, 0):
            await self._commit([q.webhook_record(endpoint, cursor, time.time())])
        return self.state.webhook_cursors.get(endpoint, 0)

    async def stats(self) -> dict[str, Any]:
        self._ensure_started()
        return {"shard": self.shard, "pid": os.getpid(), "epoch": self.epoch,
                "gc": {"thresholds": list(gc.get_threshold()),
                       "collections": [g["collections"] for g in gc.get_stats()],
                       "frozen": self._frozen,
                       # per generation: collections, seconds in all, longest (s)
                       "pauses": {g: list(v) for g, v in GC_PAUSES.items()}},
                "serving": not self._not_serving and not self._fatal,
                "not_serving": self._fatal or self._not_serving or self._stalled,
                "node": ray.get_runtime_context().get_node_id(),
                "replication": self.repl.lag(),
                "lsn": self.state.last_lsn, **self.state.counts(), **self.counters,
                "pending_commit": self.intake.pending_msgs,
                "group_commit": dict(self.group_stats),
                "refused_items": self.intake.counters["refused"],
                "quarantined": self.state.counters_quarantined, "recovered": self.recovered,
                "disk_bytes": self.log.disk_bytes(), "last_snapshot": self.last_snapshot,
                "site_inflight": {s: n for s, n in self._site_inflight.items() if n},
                "dns": {**self.dns_counters, "routes": len(self._routes),
                        "resolving": len(self._resolving), "retrying": len(self._dns_retry)},
                "submit_stream_calls": (self._submit_stream.counters["requests"]
                                        if self._submit_stream is not None else 0),
                "loop_lag": self.loop_lag.snapshot(),
                "event_retention": dict(self.events.retention),
                "metrics": {**self.metrics.snapshot(), "spool": spool_disk(self.copy.dir),
                            "suppressions": len(self.state.suppression)}}

    async def metrics_shape(self, top: int = 20) -> dict[str, Any]:
        """Live messages by site (the ``top`` biggest, the rest "other") and by age, sampled
        past 20,000 (the metrics exporter's; ``queue_shape`` is the exact one, by domain)."""
        await self._until_serving()
        return sampled_shape(self.state.messages.values(), time.time(), top)

    async def ping(self) -> int:
        self._ensure_started()
        return os.getpid()

    async def replication(self) -> dict[str, Any]:
        """Each copy of this shard: state, acknowledged lsn, lag in records and seconds."""
        self._ensure_started()
        return {"shard": self.shard, "epoch": self.epoch, "lsn": self.repl._end,
                "committed": self.repl.committed, "members_version": list(
                    self.repl.members.version), "copies": self.repl.lag(),
                **self.repl.counters}

    # ------------------------------------------------------------------ operators
    async def suspend(self, key: str, until: float) -> dict[str, Any]:
        """Stop dispatching to a domain or site (``key``) until ``until`` (0 = resume now);
        durable: a restarted leader keeps it. Messages in flight finish; ready ones wait."""
        await self._until_serving()
        if type(key) is not str or not key or len(key) > 255:
            raise ValueError(f"site: {key!r} is not a domain or site name")
        now = time.time()
        await self._commit([q.pause_record(key.lower(), float(until), now)])
        n = sum(1 for m in self.state.messages.values()
                if m.domain == key.lower() or m.site == key.lower())
        return {"shard": self.shard, "site": key.lower(), "until": until, "messages": n}

    def _shaped_limits(self, demand: dict[str, list[Any]], now: float) -> None:
        for a in self.state.shaping_in_force(now):
            d = demand.get(a["key"]) if a["action"] == "set_limits" else None
            if d is not None:
                d[2] = SiteInfo(d[2].key, apply_limits(d[2].limits, Action.from_wire(a)))

    async def shaping(self, key: str, until: float, action: dict[str, Any]) -> int:
        """A shaping rule's action fired (``until`` > now) or ended (``until`` 0), from the
        site's throttle: a durable pause record with the action (cluster/core/queue.py), so
        a suspend holds across restarts of the throttle and of this leader. Idempotent."""
        await self._until_serving()
        cur = self.state.shaping.get(f"{action['action']}:{key}")
        if until and cur is not None and cur.get("until") == until:
            return 0   # a retried call: already recorded
        await self._commit([q.pause_record(key, float(until), time.time(), action)])
        return 1

    async def shaping_state(self) -> list[dict[str, Any]]:
        """Shaping actions in force on this shard (a restarted throttle adopts its own)."""
        await self._until_serving()
        return self.state.shaping_in_force(time.time())

    async def warmup_state(self) -> list[dict[str, Any]]:
        """This shard's warm-up counts today per (source, provider) (``raymta status``)."""
        await self._until_serving()
        if self._warmup is None:
            return []
        return shard_status(self._warmup, time.time(), self.state.warmup)

    async def retry_now(self, key: str) -> int:
        """Deferred messages for a domain or site become ready now (``raymta retry``)."""
        await self._until_serving()
        k = key.lower()
        now = time.time()
        ids = [m.id for m in self.state.messages.values()
               if m.state == q.DEFERRED and (m.domain == k or m.site == k)]
        for mid in ids:
            m = self.state.messages[mid]
            self.state._defer(m, now)       # due now: the next round promotes it
        assert self._dispatch_wake is not None
        self._dispatch_wake.set()
        return len(ids)

    async def select(self, domain: str | None = None, tag: str | None = None,
                     limit: int = 1_000_000) -> list[str]:
        """Ids of live messages to ``domain`` and/or carrying tag ``key=value``."""
        await self._until_serving()
        d = domain.lower() if domain else None
        tk, _, tv = (tag or "").partition("=")
        out = []
        for m in self.state.messages.values():
            if d and m.domain != d:
                continue
            if tag and (not m.tags or m.tags.get(tk) != tv):
                continue
            out.append(m.id)
            if len(out) >= limit:
                break
        return out

    async def inspect(self, mid: str) -> dict[str, Any] | None:
        """One message as an operator sees it: envelope, tags, state, attempts, last reply,
        next attempt, and its header section (the body is not shown)."""
        await self._until_serving()
        st = self.state.status(mid)
        m = self.state.messages.get(mid)
        if st is None:
            return None
        out = dict(st)
        if m is not None:
            body = self.state.bodies[m.body_id].data
            end = body.find(b"\r\n\r\n")
            head = body[: end if 0 <= end < 65536 else 65536]
            out.update({"sender": m.sender, "tags": m.tags, "metadata": m.metadata,
                        "idempotency_key": m.idempotency_key, "size": len(body),
                        "headers": head.decode("utf-8", "replace")})
        return out

    async def queue_shape(self, top: int = 20) -> dict[str, Any]:
        """Every live message by recipient domain and age (exact: ``raymta queue``)."""
        await self._until_serving()
        return sampled_shape(self.state.messages.values(), time.time(), top, limit=0,
                             by="domain")

    # ------------------------------------------------------------------ suppression, reports
    async def _commit(self, records: list[Any]) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._enqueue(records, fut)
        await fut

    async def suppress(self, rows: Any, propagate: bool = False) -> dict[str, Any]:
        """Add suppressions (rows as :func:`cluster.core.suppression.check_rows` reads them),
        durable on a quorum before it answers; each shard holds the whole list, so
        ``MailCluster.suppress`` calls every shard. ``propagate``: this shard also hands them
        to every other shard (used for what it learned itself)."""
        await self._until_serving()
        now = time.time()
        good, errors = check_rows("add", rows, now, ttl=self.cfg.suppression.hard_bounce_ttl)
        for k in range(0, len(good), 10_000):
            await self._commit([q.suppress_record("add", good[k:k + 10_000], now, propagate)])
        return {"shard": self.shard, "added": len(good), "errors": errors[:100],
                "refused": len(errors)}

    async def unsuppress(self, rows: Any) -> dict[str, Any]:
        await self._until_serving()
        now = time.time()
        good, errors = check_rows("remove", rows, now)
        present = [r for r in good if self.state.suppression.get(r[0], r[1]) is not None]
        for k in range(0, len(present), 10_000):
            await self._commit([q.suppress_record("remove", present[k:k + 10_000], now)])
        return {"shard": self.shard, "removed": len(present), "errors": errors[:100],
                "refused": len(errors)}

    async def suppressions(self, prefix: str = "", limit: int = 1000,
                           address: str | None = None) -> list[dict[str, Any]]:
        """Entries whose address starts with ``prefix`` (or every entry for ``address``,
        any scope), at most ``limit``."""
        await self._until_serving()
        sl = self.state.suppression
        if address is not None:
            a = normalize_address(address)
            return [e for e in sl.entries(a, limit) if e["address"] == a]
        return list(sl.entries(normalize_address(prefix) if prefix else "", limit))

    async def outside_reports(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Asynchronous bounces and complaints about this shard's messages (from the bounce
        listener, which has checked their VERP tag): an OOBBounce or Complaint event each; a
        complaint always suppresses its recipient, a bounce whose category says the address
        does not exist suppresses it for ``suppression.hard_bounce_ttl``; both reach every
        shard through this shard's outbox."""
        await self._until_serving()
        now = time.time()
        recs: list[Any] = []
        rows: list[list[Any]] = []
        refused = 0
        for it in items if type(items) is list else []:
            kind, rcpt = it.get("kind"), it.get("recipient")
            if kind not in ("bounce", "complaint") or type(rcpt) is not str or not rcpt:
                refused += 1
                continue
            mid = it.get("id") if type(it.get("id")) is str else None
            detail = {k: str(v)[:500] for k, v in it.items()
                      if k not in ("kind", "id", "recipient") and v is not None}
            recs.append(q.report_record(kind, mid, rcpt, detail, now))
            good, _ = check_rows("add", [[rcpt, "", "complaint" if kind == "complaint"
                                          else "hard-bounce", f"{kind} about {mid or '?'}"]],
                                 now, ttl=self.cfg.suppression.hard_bounce_ttl)
            if good and (kind == "complaint" or (self.cfg.suppression.from_bounces and
                                                 it.get("category") in HARD_CATEGORIES and
                                                 it.get("class") in (None, "hard"))):
                rows.extend(good)
        if rows:
            recs.append(q.suppress_record("add", rows, now, propagate=True))
        if recs:
            await self._commit(recs)
        return {"shard": self.shard, "recorded": len(recs) - (1 if rows else 0),
                "suppressed": len(rows), "refused": refused}

    async def _propagate_suppressions(self) -> None:
        """Hand this shard's outbox to every other shard; once all have it, a "sent" record
        empties it (a leader that dies first hands it again after its restart)."""
        box = self.state.suppress_outbox
        rows = list(box.values())[:10_000]
        try:
            for s in range(self.cfg.queue.shards):
                if s == self.shard:
                    continue
                res = await asyncio.wait_for(
                    self._handle(f"coordinator:{s}").suppress.remote(
                        [[r[0], r[1], r[2], r[5], r[4]] for r in rows]), 60)
                if res.get("refused"):
                    log.warning("shard %d: shard %d refused %d suppressions: %s", self.shard,
                                s, res["refused"], res["errors"][:3])
            await self._commit([q.suppress_record(
                "sent", [entry_key(r[0], r[1]) for r in rows], time.time())])
        except (ray.exceptions.RayError, asyncio.TimeoutError, RuntimeError, ValueError) as e:
            log.warning("shard %d: handing %d suppressions to the other shards failed (will "
                        "retry): %s", self.shard, len(rows), e)
        finally:
            self._propagating = False

    # ------------------------------------------------------------------ backups
    async def backup(self, write: bool = False) -> Any:
        """A snapshot of the queue as of now, for ``raymta backup`` (returned as bytes) or,
        with ``write``, written under the configured backup directory (returns the path)."""
        await self._until_serving()
        backup = {"format": "raymta-backup-1", "shard": self.shard,
                  "shards": self.cfg.queue.shards, "epoch": self.epoch,
                  "lsn": self.state.last_lsn, "taken_at": time.time(),
                  "state": self.state.snapshot()}   # every body copied in: it stands alone
        # packed off the event loop, in slices (the same bytes as one packb of the whole)
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, pack_nested, backup)
        if not write:
            return data
        return await loop.run_in_executor(None, self._write_backup, data)

    def _backup_root(self) -> Path:
        d = self.cfg.backup.directory
        return Path(d) if d else Path(self.cfg.spool.directory) / "backups"

    def _write_backup(self, data: bytes) -> str:
        from cluster.adapters.backup import backup_stamp, prune_backups, write_shard_backup
        root = self._backup_root()
        final = write_shard_backup(root, backup_stamp(), self.shard, data)
        prune_backups(root, self.shard, self.cfg.backup.keep)
        log.info("shard %d backup: %s (%d bytes)", self.shard, final, len(data))
        return str(final)

    async def _periodic_backup(self) -> None:
        try:
            await self.backup(write=True)
        except Exception:
            log.exception("shard %d periodic backup failed", self.shard)

    async def restore(self, payload: bytes) -> dict[str, Any]:
        """Queue messages from a backup: msgpack ``[[body_id, body, [row, ...]], ...]`` with
        rows as in a snapshot. Ids already known are skipped; attempts and the next attempt
        time carry over. Returns counts."""
        await self._until_serving()
        items = msgpack.unpackb(payload, raw=False)
        recs: list[Any] = []
        added = skipped = 0
        for body_id, body, rows in items:
            new = [r for r in rows if r[0] not in self.state.messages and
                   r[0] not in self.state.finished and r[0] not in self.intake.pending_ids]
            skipped += len(rows) - len(new)
            if not new:
                continue
            recs.append(q.body_record(body_id, body))
            for (mid, bid, sender, rcpt, domain, created, not_before, expires_at, tags, meta,
                 idem, utf8, attempts, next_at, *_rest) in new:
                recs.append(q.accept_record(mid, bid, sender, rcpt, domain, created, not_before,
                                            expires_at, tags, meta, idem, utf8)
                            + [attempts, next_at])
                self.intake.mark([mid])
                added += 1
        if recs:
            fut = asyncio.get_running_loop().create_future()
            self._enqueue(recs, fut)
            await fut
        return {"shard": self.shard, "restored": added, "skipped": skipped}

    async def config(self) -> Config:
        return self.cfg
