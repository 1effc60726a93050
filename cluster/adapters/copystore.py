"""One copy of a replicated shard on disk: the log, plus what the copy has promised.

Owns a copy's directory (``<spool>/shard-<s>/copy-<k>/``): the :class:`SpoolLog` in ``log/``
and ``meta.msgpack`` — the copy's identity (a uuid made when the directory is first used, so a
copy that comes back empty or from an old disk is recognisably another copy), the epoch it has
promised and to which leader instance, and the shard's membership as last told by a leader.
Every request goes through :class:`cluster.core.replication.Fence` first; ``meta.msgpack`` is
replaced atomically (write, fsync, rename, fsync the directory) *before* a claim is answered.

A ``lock`` file held with ``flock`` makes sure one process at a time uses the directory (two
instances of a copy on a shared filesystem would otherwise interleave writes).

Blocking throughout: the callers (a ReplicaLog actor, a shard leader) run it in one thread.
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import msgpack

from cluster.adapters.spool import (SpoolCorrupt, SpoolLog, Unresolved, skip_frames,
                                    unpack_snapshot, write_atomic)
from cluster.core.replication import CopyInfo, Fence, LogShape, Members, Refused

__all__ = ["CopyStore", "DirectoryBusy"]


class DirectoryBusy(RuntimeError):
    """Another live process holds this copy's directory."""


class CopyStore:
    def __init__(self, directory: str | os.PathLike[str], slot: int, *,
                 segment_bytes: int = 64 << 20, fsync: bool = True,
                 lock_wait: float = 30.0) -> None:
        self.dir = Path(directory)
        self.slot = slot
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.dir / "lock", "a+b")
        deadline = time.monotonic() + lock_wait
        while True:
            try:
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock_fh.close()
                    raise DirectoryBusy(f"{self.dir}: held by another process for "
                                        f"{lock_wait:.0f}s") from None
                time.sleep(0.1)
        self.log = SpoolLog(self.dir / "log", segment_bytes=segment_bytes, fsync=fsync)
        self.fsync = fsync
        self.appends = {"whole": 0, "by_frame": 0}   # how appends were checked (stats)
        meta_path = self.dir / "meta.msgpack"
        if meta_path.exists():
            meta = msgpack.unpackb(meta_path.read_bytes(), raw=False)
            self.uuid: str = meta["uuid"]
            self.fence = Fence(meta["promised"], meta["leader"])
            self.members = Members.from_wire(meta["members"])
        else:
            self.uuid = uuidlib.uuid4().hex
            self.fence = Fence()
            self.members = Members()
            self._save_meta()

    # ------------------------------------------------------------------ meta
    def _save_meta(self) -> None:
        write_atomic(self.dir / "meta.msgpack", msgpack.packb(
            {"uuid": self.uuid, "promised": self.fence.promised, "leader": self.fence.leader,
             "members": self.members.to_wire()}, use_bin_type=True), fsync=self.fsync)

    def recover(self, *, decode: bool = False) -> tuple[Any, list[Any]]:
        return self.log.recover(decode=decode)

    def shape(self) -> LogShape:
        lg = self.log
        return LogShape(lg.snap_lsn, lg.snap_epoch, tuple((e, f) for e, f in lg.runs), lg.end)

    def info(self, granted: bool = True) -> CopyInfo:
        return CopyInfo(self.slot, self.uuid, self.fence.promised, self.members, self.shape(),
                        granted)

    # ------------------------------------------------------------------ the protocol
    def claim(self, epoch: int, leader: str) -> CopyInfo:
        """Promise ``epoch`` to ``leader`` (persisted before returning); raises Refused."""
        before = (self.fence.promised, self.fence.leader)
        self.fence.claim(epoch, leader)
        if (self.fence.promised, self.fence.leader) != before:
            self._save_meta()
        return self.info()

    def sync(self, epoch: int, leader: str, keep_to: int, members: Members) -> LogShape:
        """The leader of ``epoch`` makes this log a prefix of its own: cut back to ``keep_to``
        and remember the membership. Appends in ``epoch`` are accepted from now on."""
        self.fence.check_sync(epoch, leader)
        self.log.truncate_after(keep_to)
        self._set_members(members)
        self.fence.synced_by(epoch)
        return self.shape()

    def install(self, epoch: int, leader: str, snapshot: bytes, members: Members) -> LogShape:
        """Install the leader's snapshot (this copy was behind it, or is new)."""
        self.fence.check_sync(epoch, leader)
        lsn, _ep, _ = unpack_snapshot(snapshot)
        if self.log.end > lsn:
            self.log.truncate_after(max(lsn, self.log.snap_lsn))
        self.log.install_snapshot(snapshot)
        self._set_members(members)
        self.fence.synced_by(epoch)
        return self.shape()

    def set_members(self, epoch: int, leader: str, members: Members) -> None:
        self.fence.check_sync(epoch, leader)
        self._set_members(members)

    def _set_members(self, members: Members) -> None:
        if members.version > self.members.version or (members != self.members and
                                                     members.version == self.members.version):
            self.members = members
            self._save_meta()

    def append(self, epoch: int, leader: str, first: int, frames: bytes,
               shape: list[int] | None = None) -> int:
        """Append the leader's frames starting at lsn ``first``; returns the new end lsn.
        Frames this copy already has (a retried call) are skipped. ``shape``, ``[last lsn,
        epoch, crc32]``, says the frames are whole commits of one epoch: they are then checked
        by that one checksum rather than frame by frame. Frames that fail their check are
        refused as "corrupt" and nothing is written (the leader syncs the copy again)."""
        skip = self.fence.check_append(epoch, leader, first, self.log.end)
        if skip:
            frames = skip_frames(frames, skip)
            shape = None
        if frames:
            try:
                if shape is not None:
                    self.log.append_batch(frames, *shape)
                    self.appends["whole"] += 1
                else:
                    self.log.append_frames(frames)
                    self.appends["by_frame"] += 1
            except SpoolCorrupt as e:   # damaged on the way: nothing was written; say so
                raise Refused("corrupt", self.fence.promised, str(e)) from None
        return self.log.end

    def compact(self, epoch: int, leader: str, snapshot: bytes) -> int:
        """The leader compacted at the snapshot's lsn: do the same. Returns disk bytes."""
        self.fence.check_sync(epoch, leader)
        lsn, _ep, _ = unpack_snapshot(snapshot)
        if lsn > self.log.snap_lsn:
            if self.log.end < lsn and self.fence.synced != epoch:
                raise Refused("unsynced", self.fence.promised, "compact on an unsynced copy")
            try:
                self.log.install_snapshot(snapshot)
            except Unresolved as e:
                # it refers to bodies in frames this copy never had (it installed a snapshot
                # past them): the leader sends the snapshot with the bodies copied in
                raise Refused("unresolved", self.fence.promised, str(e)) from None
        return self.log.disk_bytes()

    def read(self, from_lsn: int, max_bytes: int) -> bytes:
        return self.log.read_frames(from_lsn, max_bytes)

    def snapshot_file(self) -> bytes | None:
        return self.log.snapshot_file()

    def stats(self) -> dict[str, Any]:
        return {"slot": self.slot, "uuid": self.uuid, "promised": self.fence.promised,
                "synced": self.fence.synced, "end": self.log.end, "snap_lsn": self.log.snap_lsn,
                "members_version": list(self.members.version),
                "member": bool(self.members.uuids) and self.slot < len(self.members.uuids)
                and self.members.uuids[self.slot] == self.uuid,
                "disk_bytes": self.log.disk_bytes(), "dir": str(self.dir),
                "appends_checked_whole": self.appends["whole"],
                "appends_checked_by_frame": self.appends["by_frame"]}

    def close(self) -> None:
        self.log.close()
        try:
            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
        finally:
            self._lock_fh.close()
