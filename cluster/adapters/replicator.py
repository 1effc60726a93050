"""The shard leader's side of replication: claim an epoch, adopt the log, keep the copies in step.

Owns, for one shard leader instance: its epoch and leader id, the membership in force, the
leader's own copy (a :class:`CopyStore` in this process) and one *driver* task per ReplicaLog
that syncs that copy (cuts a divergent tail, or installs a snapshot) and then streams frames to
it in order. :meth:`Replicator.commit` returns once a batch is fsync'd on the leader's copy and
on enough replicas that a majority of the R copies hold it. The protocol and why it keeps
every committed record: docs/replication.md. The decisions are in
:mod:`cluster.core.replication`; this module does the calls.

A replica that answers "stale" means a newer leader exists: :attr:`fenced` is set and nothing
more is committed by this instance.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
import uuid as uuidlib
import zlib
from typing import Any, Callable

import ray

from cluster.adapters.copystore import CopyStore
from cluster.adapters.spool import Compacted, skip_frames
from cluster.adapters.stream import StreamClient, StreamError
from cluster.core.replication import (CopyInfo, Members, Refused, agreement, can_replace,
                                      majority, plan_claim)

__all__ = ["Replicator", "NoQuorum", "Fenced"]

log = logging.getLogger("raymta.replication")


class NoQuorum(RuntimeError):
    """Not enough copies reachable (or current) to claim the shard or commit a batch."""


class Fenced(RuntimeError):
    """A newer leader has claimed the shard: this instance may change nothing."""


_RAY_ERRORS = (ray.exceptions.RayError, ValueError, asyncio.TimeoutError, ConnectionError)


class _Driver:
    __slots__ = ("slot", "handle", "synced", "member", "acked", "acked_at", "wake", "error",
                 "down_since", "task", "uuid", "installs", "sending_since", "stream",
                 "stream_retry_at")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.handle: Any = None
        self.synced = False
        self.member = False
        self.acked = 0
        self.acked_at = 0.0
        self.wake = asyncio.Event()
        self.error = ""
        self.down_since = time.time()
        self.task: asyncio.Task | None = None
        self.uuid = ""
        self.installs = 0
        self.sending_since = 0.0
        self.stream: StreamClient | None = None
        self.stream_retry_at = 0.0

    def drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


class Replicator:
    def __init__(self, shard: int, r: int, local: CopyStore, io: concurrent.futures.Executor,
                 get_handle: Callable[[int], Any], *, tail_bytes: int = 64 << 20,
                 batch_bytes: int = 8 << 20, call_timeout: float = 10.0,
                 transport: str = "stream") -> None:
        self.transport = transport
        self.shard = shard
        self.r = r
        self.local = local
        self.io = io
        self.get_handle = get_handle     # slot → actor handle (blocking; raises if none)
        self.tail_bytes = tail_bytes
        self.batch_bytes = batch_bytes
        self.call_timeout = call_timeout
        self.leader_id = uuidlib.uuid4().hex
        self.epoch = 0
        self.members = Members()
        self.fenced = ""
        self.committed = 0
        self._end = 0
        # (first, last, frames, time, crc32 of the frames) of the latest commits
        self._tail: collections.deque[tuple[int, int, bytes, float, int]] = collections.deque()
        self._tail_size = 0
        self._written: collections.deque[tuple[int, float]] = collections.deque(maxlen=4096)
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self.drivers = {s: _Driver(s) for s in range(1, r)}
        self.counters = {"installs": 0, "syncs": 0, "refusals": 0, "replaced": 0, "streams": 0}

    # ------------------------------------------------------------------ helpers
    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    async def _handle(self, d: _Driver) -> Any:
        if d.handle is None:
            d.handle = await asyncio.get_running_loop().run_in_executor(
                None, self.get_handle, d.slot)
        return d.handle

    async def _call(self, d: _Driver, method: str, *args: Any, timeout: float | None = None
                    ) -> Any:
        h = await self._handle(d)
        r = await asyncio.wait_for(getattr(h, method).remote(*args),
                                   timeout or self.call_timeout)
        return self._reply(d, r)

    def _reply(self, d: _Driver, r: Any) -> Any:
        if isinstance(r, list) and r and r[0] == "refused":
            self.counters["refusals"] += 1
            _, reason, promised, text = r
            if reason == "stale" and self.epoch:
                self._fence(f"replica {self.shard}:{d.slot} has promised epoch {promised}; "
                            f"this leader holds {self.epoch}")
            raise Refused(reason, promised, text)
        return r[1] if isinstance(r, list) and r and r[0] == "ok" else r

    async def _append(self, d: _Driver, first: int, frames: bytes,
                      shape: list[int] | None = None) -> Any:
        """Append over the replica's stream when there is one (cheap), else as a Ray call.
        A broken stream raises StreamError (a ConnectionError): the driver resyncs."""
        if self.transport == "stream":
            if (d.stream is None or d.stream.closed) and time.time() >= d.stream_retry_at:
                try:
                    host, port, token = await self._call(d, "endpoint", timeout=5.0)
                    d.stream = await StreamClient.connect(host, port, token)
                    self.counters["streams"] += 1
                except (StreamError, *_RAY_ERRORS) as e:
                    d.stream = None
                    d.stream_retry_at = time.time() + 5.0
                    log.warning("replica %d:%d: no append stream (%s): using Ray calls",
                                self.shard, d.slot, e)
            if d.stream is not None and not d.stream.closed:
                r = await d.stream.call("append", self.epoch, self.leader_id, first, frames,
                                        shape, timeout=self.call_timeout)
                return self._reply(d, r)
        return await self._call(d, "append", self.epoch, self.leader_id, first, frames, shape)

    def _fence(self, why: str) -> None:
        if not self.fenced:
            self.fenced = why
            log.error("shard %d leader fenced: %s", self.shard, why)
            for _, fut in self._waiters:
                if not fut.done():
                    fut.set_exception(Fenced(why))
            self._waiters = []

    # ------------------------------------------------------------------ claiming
    async def establish(self) -> dict[str, Any]:
        """Claim a new epoch from a majority and make the local copy the shard's log.
        Raises :class:`NoQuorum` (the caller retries) or :class:`Fenced`."""
        t0 = time.time()
        epoch = self.local.fence.promised + 1
        for _round in range(5):
            replies: list[CopyInfo] = []
            higher = 0
            try:
                replies.append(await self._io(self.local.claim, epoch, self.leader_id))
            except Refused as e:
                higher = max(higher, e.promised)
            calls = {s: asyncio.ensure_future(self._call(d, "claim", epoch, self.leader_id,
                                                         timeout=5.0))
                     for s, d in self.drivers.items()}
            errors = {}
            for s, fut in calls.items():
                try:
                    replies.append(CopyInfo.from_wire(await fut))
                except Refused as e:
                    higher = max(higher, e.promised)
                    errors[s] = str(e)
                except _RAY_ERRORS as e:
                    self.drivers[s].handle = None
                    errors[s] = f"{type(e).__name__}: {e}"
            if higher >= epoch:
                epoch = higher + 1   # another instance claimed past us: go higher
                continue
            break
        else:
            raise NoQuorum(f"shard {self.shard}: epochs kept moving while claiming")
        plan = plan_claim(replies, self.r)
        if not plan.ok:
            detail = "; ".join(f"replica {self.shard}:{s}: {e}" for s, e in errors.items())
            raise NoQuorum(f"shard {self.shard}: {plan.reason}" + (f" ({detail})" if detail
                                                                     else ""))
        self.epoch = epoch
        by_slot = {c.slot: c for c in replies}
        # 1. the local copy takes the best log
        best = by_slot[plan.best]
        adopted = 0
        if plan.best != 0:
            adopted = await self._adopt_from(plan.best, best)
        # 2. membership: a new shard, or the leader's copy replaced (it moved, or lost its disk)
        members = plan.members
        if plan.bootstrap:
            members = Members((epoch, 0), members.uuids)
        elif members.uuids[0] != self.local.uuid:
            new = members.replace(0, self.local.uuid, epoch)
            persisted = []
            for s in plan.voters:
                if s == 0:
                    continue
                try:
                    await self._call(self.drivers[s], "set_members", epoch, self.leader_id,
                                     new.to_wire())
                    persisted.append(s)
                except (Refused, *_RAY_ERRORS) as e:
                    log.warning("set_members on %d:%d failed: %s", self.shard, s, e)
            if not can_replace(members, 0, persisted, self.r):
                raise NoQuorum(f"shard {self.shard}: could not record the leader's new copy on "
                               f"a majority (only on slots {persisted})")
            self.counters["replaced"] += 1
            members = new
        self.members = members
        await self._io(self.local.sync, epoch, self.leader_id, self.local.log.end, members)
        self._end = self.committed = self.local.log.end
        for d in self.drivers.values():
            d.synced = False
            d.member = False
            if d.slot in by_slot:
                d.uuid = by_slot[d.slot].uuid
        info = {"epoch": epoch, "best": plan.best, "voters": list(plan.voters),
                "adopted_frames": adopted, "bootstrap": plan.bootstrap,
                "end": self.local.log.end, "seconds": round(time.time() - t0, 3)}
        log.info("shard %d claimed %s", self.shard, info)
        return info

    async def _adopt_from(self, slot: int, best: CopyInfo) -> int:
        """Make the local log equal to copy ``slot``'s (ahead of ours, or ours is not a
        member): cut our divergent tail or install its snapshot, then fetch its frames."""
        d = self.drivers[slot]
        mine = self.local.shape()
        n = agreement(best.shape, mine)
        if n is None or (best.shape.snap_lsn > n):
            snap = await self._call(d, "snapshot_file", timeout=120.0)
            await self._io(self.local.log.install_snapshot, snap)
            n = best.shape.snap_lsn
        await self._io(self.local.log.truncate_after, n)
        got = 0
        while self.local.log.end < best.shape.end:
            frames = await self._call(d, "read", self.local.log.end + 1, self.batch_bytes,
                                      timeout=120.0)
            if not frames:
                raise NoQuorum(f"replica {self.shard}:{slot} stopped short at "
                               f"{self.local.log.end} of {best.shape.end}")
            before = self.local.log.end
            await self._io(self.local.log.append_frames, frames)
            got += self.local.log.end - before
        return got

    # ------------------------------------------------------------------ serving
    def start(self) -> None:
        for d in self.drivers.values():
            if d.task is None or d.task.done():
                d.task = asyncio.get_running_loop().create_task(self._drive(d))

    def stop(self) -> None:
        for d in self.drivers.values():
            d.drop_stream()
            if d.task is not None:
                d.task.cancel()

    def need_remote(self) -> int:
        return majority(self.r) - 1

    def commit(self, frames: bytes, first: int, last: int) -> asyncio.Future:
        """Start committing a batch (one group commit's frames, lsns ``first``..``last``);
        returns a future done once they are fsync'd on the local copy and on enough replicas
        for a quorum, or failed with :class:`Fenced` or the local write's ``OSError``.

        A plain future, not a task: the local write goes to the I/O thread and the drivers
        are woken at once, and the two halves finish it through callbacks (a commit cost a
        task and two more loop steps when this was a coroutine run as one)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if self.fenced:
            done.set_exception(Fenced(self.fenced))
            return done
        now = time.time()
        self._tail.append((first, last, frames, now, zlib.crc32(frames)))
        self._tail_size += len(frames)
        self._written.append((last, now))
        self._end = last
        for d in self.drivers.values():
            d.wake.set()
        written = loop.run_in_executor(self.io, self.local.log.write, frames, first)
        halves = [written]
        if not self._quorum_at(last):
            quorum = loop.create_future()
            self._waiters.append((last, quorum))
            halves.append(quorum)
        left = [len(halves)]

        def half_done(f: asyncio.Future) -> None:
            exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
            if done.done():
                return
            if exc is not None:
                done.set_exception(exc)
                return
            left[0] -= 1
            if not left[0]:
                self.committed = max(self.committed, last)
                self._trim_tail()
                done.set_result(None)

        for h in halves:
            h.add_done_callback(half_done)
        return done

    def _quorum_at(self, lsn: int) -> bool:
        need = self.need_remote()
        if need <= 0:
            return True
        return sum(1 for d in self.drivers.values() if d.member and d.acked >= lsn) >= need

    def _on_ack(self) -> None:
        if not self._waiters:
            return
        keep = []
        for lsn, fut in self._waiters:
            if fut.done():
                continue
            if self._quorum_at(lsn):
                fut.set_result(None)
            else:
                keep.append((lsn, fut))
        self._waiters = keep

    def _trim_tail(self) -> None:
        low = min((d.acked for d in self.drivers.values()), default=self._end)
        while self._tail and (self._tail[0][1] <= low or self._tail_size > self.tail_bytes):
            self._tail_size -= len(self._tail.popleft()[2])

    async def _frames_from(self, lsn: int) -> tuple[bytes, list[int] | None]:
        """Frames from ``lsn`` on, and their shape ``[last lsn, epoch, crc32]`` when they are
        whole commits of this leader (then the copy checks one checksum instead of each
        frame); None for frames read back from disk or cut out of a commit."""
        if self._tail and self._tail[0][0] <= lsn:
            out: list[bytes] = []
            size = 0
            whole = True
            crc = last_lsn = 0
            for first, last, frames, _ts, frames_crc in self._tail:
                if last < lsn:
                    continue
                if size and size + len(frames) > self.batch_bytes:
                    break
                part = frames if first >= lsn else skip_frames(frames, lsn - first)
                whole = whole and part is frames
                out.append(part)
                size += len(part)
                last_lsn, crc = last, frames_crc
            if not out:
                return b"", None
            if len(out) == 1:
                return out[0], ([last_lsn, self.epoch, crc] if whole else None)
            blob = b"".join(out)
            return blob, ([last_lsn, self.epoch, zlib.crc32(blob)] if whole else None)
        # fell out of memory: read it back from our own disk (raises Compacted)
        return await self._io(self.local.log.read_frames, lsn, self.batch_bytes), None

    async def _drive(self, d: _Driver) -> None:
        backoff = 0.1
        while not self.fenced:
            try:
                if not d.synced:
                    await self._sync(d)
                    backoff = 0.1
                while d.acked >= self._end and d.synced:
                    d.wake.clear()
                    if d.acked >= self._end:
                        await d.wake.wait()
                if not d.synced:
                    continue
                first = d.acked + 1
                try:
                    frames, shape = await self._frames_from(first)
                except Compacted:
                    d.synced = False
                    continue
                if not frames:
                    await asyncio.sleep(0.01)
                    continue
                d.sending_since = time.time()
                try:
                    end = await self._append(d, first, frames, shape)
                finally:
                    d.sending_since = 0.0
                d.acked = int(end)
                d.acked_at = time.time()
                d.error = ""
                if not d.member and d.acked >= self.committed:
                    await self._make_member(d)
                self._on_ack()
                self._trim_tail()
            except asyncio.CancelledError:
                raise
            except Refused as e:
                d.synced = False
                d.error = str(e)
                if e.reason == "stale":
                    return
                await asyncio.sleep(backoff)
            except (*_RAY_ERRORS, OSError) as e:
                if d.synced or not d.error:
                    log.warning("replica %d:%d unreachable: %s", self.shard, d.slot, e)
                d.synced = False
                d.handle = None
                d.drop_stream()
                d.error = f"{type(e).__name__}: {e}"[:300]
                if not d.down_since:
                    d.down_since = time.time()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception as e:   # a bug: keep the other copies going, say what happened
                log.exception("replica %d:%d driver", self.shard, d.slot)
                d.synced = False
                d.error = f"{type(e).__name__}: {e}"[:300]
                await asyncio.sleep(1.0)

    async def _sync(self, d: _Driver) -> None:
        """Claim (idempotent for us), then make the copy a prefix of our log."""
        info = CopyInfo.from_wire(await self._call(d, "claim", self.epoch, self.leader_id))
        d.uuid = info.uuid
        is_member = info.uuid == self.members.uuids[d.slot]
        mine = self.local.shape()
        try:
            n = agreement(mine, info.shape)
        except ValueError as e:
            # the copy holds a snapshot past our end: we are missing committed records. This
            # cannot happen under the protocol; refuse to serve rather than lose them.
            self._fence(f"replica {self.shard}:{d.slot}: {e}")
            raise Fenced(str(e)) from None
        if n is None:
            snap = await self._io(self.local.log.snapshot_file)
            shape = await self._call(d, "install", self.epoch, self.leader_id, snap,
                                     self.members.to_wire(), timeout=300.0)
            self.counters["installs"] += 1
            d.installs += 1
        else:
            shape = await self._call(d, "sync", self.epoch, self.leader_id, n,
                                     self.members.to_wire())
        self.counters["syncs"] += 1
        d.acked = int(shape[3])
        d.acked_at = time.time()
        d.synced = True
        d.down_since = 0.0
        d.error = ""
        d.member = is_member
        if not is_member:
            log.warning("replica %d:%d is a new copy (%s): catching up before it counts",
                        self.shard, d.slot, info.uuid[:8])
        if d.member:
            self._on_ack()

    async def _make_member(self, d: _Driver) -> None:
        """A new copy has caught up: record it as its slot's member on a majority of the
        others (see can_replace), then on itself; from then on its acks count."""
        new = self.members.replace(d.slot, d.uuid, self.epoch)
        persisted = []
        try:
            await self._io(self.local.set_members, self.epoch, self.leader_id, new)
            persisted.append(0)
        except Refused:
            return
        for o in self.drivers.values():
            if o is d or not (o.synced and o.member):
                continue
            try:
                await self._call(o, "set_members", self.epoch, self.leader_id, new.to_wire())
                persisted.append(o.slot)
            except (Refused, *_RAY_ERRORS):
                pass
        if not can_replace(self.members, d.slot, persisted, self.r):
            log.warning("replica %d:%d caught up but the new membership reached only %s",
                        self.shard, d.slot, persisted)
            return
        await self._call(d, "set_members", self.epoch, self.leader_id, new.to_wire())
        self.members = new
        d.member = True
        self.counters["replaced"] += 1
        log.info("replica %d:%d (%s) is now a member", self.shard, d.slot, d.uuid[:8])

    # ------------------------------------------------------------------ compaction, lag
    async def compact(self, snapshot: bytes) -> None:
        """The local copy has written this snapshot: replicas drop what it covers. The
        snapshot may leave bodies in the log (by lsn); a copy that does not hold those frames
        refuses it as "unresolved" and gets it again with the bodies copied in."""
        drivers = [d for d in self.drivers.values() if d.synced]
        for attempt in range(2):
            ref = ray.put(snapshot) if len(snapshot) > 100_000 else snapshot
            res = await asyncio.gather(*[
                self._call(d, "compact", self.epoch, self.leader_id, ref, timeout=300.0)
                for d in drivers], return_exceptions=True)
            again = []
            for d, r in zip(drivers, res):
                if isinstance(r, Refused) and r.reason == "unresolved" and attempt == 0:
                    again.append(d)
                elif isinstance(r, BaseException) and not isinstance(r, Refused):
                    log.warning("replica compaction failed: %s", r)
            if not again:
                return
            whole = await self._io(self.local.log.snapshot_file)
            if whole is None:
                return
            snapshot, drivers = whole, again
            log.info("shard %d: %d copies compact with the self-contained snapshot",
                     self.shard, len(again))

    def lag(self) -> list[dict[str, Any]]:
        """Per copy: how far behind the leader's log it is, in records and seconds."""
        now = time.time()
        out = [{"slot": 0, "name": f"coordinator:{self.shard}", "state": "leader",
                "member": True, "acked": self.local.log.end, "lag_records": 0,
                "lag_seconds": 0.0, "uuid": self.local.uuid[:8]}]
        for d in self.drivers.values():
            behind = max(0, self._end - d.acked)
            secs = 0.0
            if behind:
                oldest = self._written[0][1] if self._written else now
                first_unacked = next((ts for lsn, ts in self._written if lsn > d.acked), oldest)
                secs = now - first_unacked
            state = ("down" if not d.synced else
                     # an append unanswered this long: its node may be gone (Ray has not said)
                     "stalled" if d.sending_since and now - d.sending_since > 2.0 else
                     "streaming" if d.member else "catching up")
            out.append({"slot": d.slot, "name": f"replica:{self.shard}:{d.slot}",
                        "state": state, "member": d.member, "acked": d.acked,
                        "lag_records": behind, "lag_seconds": round(secs, 3),
                        "uuid": d.uuid[:8], "installs": d.installs,
                        **({"error": d.error} if d.error else {})})
        return out
