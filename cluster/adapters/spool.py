"""Durable local spool: an append-only, segmented, checksummed record log plus snapshots.

Owns: the on-disk format of a queue shard and the guarantee behind "accepted means durable":
:meth:`SpoolLog.write` returns only after the frames are written and fsync'd (one fsync per
batch: group commit). It does not interpret records (that is ``cluster.core.queue``).

Layout of a shard directory::

    seg-<first lsn, 20 digits>.log   frames, in lsn order, across segments
    snap-<lsn, 20 digits>.msgpack    the queue state as of that lsn (written atomically)

Frame: ``<u32 payload length><u32 crc32(epoch, lsn, payload)><u64 epoch><u64 lsn><payload>``,
payload a msgpack record. The epoch field is the fencing token a replicated shard writes with.

Failure behaviour: a torn or corrupt frame at the *end of the last segment* (a crash during a
write) is cut off on open: it was never acknowledged, because acknowledgement follows fsync.
A bad frame anywhere else is corruption of acknowledged data and raises :class:`SpoolCorrupt`
rather than silently dropping mail.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import msgpack

__all__ = ["SpoolLog", "SpoolCorrupt", "encode_frame", "iter_frames", "numbered_files"]

_HDR = struct.Struct("<IIQQ")
_MAX_FRAME = 64 * 1024 * 1024


class SpoolCorrupt(RuntimeError):
    """Acknowledged data on disk failed its checksum or is out of order."""


def _crc(epoch: int, lsn: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<QQ", epoch, lsn)))


def encode_frame(epoch: int, lsn: int, record: Any) -> bytes:
    payload = msgpack.packb(record, use_bin_type=True)
    return _HDR.pack(len(payload), _crc(epoch, lsn, payload), epoch, lsn) + payload


def iter_frames(data: bytes) -> Iterator[tuple[int, int, Any, int]]:
    """Yield (epoch, lsn, record, end offset) for each valid frame; stop at the first bad one."""
    off = 0
    n = len(data)
    while off + _HDR.size <= n:
        length, crc, epoch, lsn = _HDR.unpack_from(data, off)
        end = off + _HDR.size + length
        if length > _MAX_FRAME or end > n:
            return
        payload = data[off + _HDR.size:end]
        if _crc(epoch, lsn, payload) != crc:
            return
        yield epoch, lsn, msgpack.unpackb(payload, raw=False, strict_map_key=False), end
        off = end


def numbered_files(directory: Path, prefix: str, suffix: str) -> list[tuple[int, Path]]:
    """``<prefix><number><suffix>`` files in a directory, sorted by number; others ignored."""
    out = []
    for p in directory.glob(f"{prefix}*{suffix}"):
        try:
            out.append((int(p.name[len(prefix):len(p.name) - len(suffix)]), p))
        except ValueError:
            continue
    return sorted(out)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolLog:
    """One shard's log. Not thread-safe: one writer (the shard leader's commit loop) at a time."""

    def __init__(self, directory: str | os.PathLike[str], *, segment_bytes: int = 64 << 20,
                 fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fh: Any = None
        self._seg_size = 0
        self.next_lsn = 1
        self.bytes_since_snapshot = 0

    # ------------------------------------------------------------------ recovery
    def _segments(self) -> list[tuple[int, Path]]:
        return numbered_files(self.dir, "seg-", ".log")

    def _snapshots(self) -> list[tuple[int, Path]]:
        return numbered_files(self.dir, "snap-", ".msgpack")

    def recover(self) -> tuple[dict[str, Any] | None, list[tuple[int, int, Any]]]:
        """Read the newest snapshot and every record after it; repair a torn tail.

        Returns ``(snapshot or None, [(epoch, lsn, record), ...])`` and leaves the log open for
        appending after the last valid record."""
        for p in self.dir.glob("*.tmp"):
            p.unlink()
        snap = None
        snap_lsn = 0
        snaps = self._snapshots()
        if snaps:
            snap_lsn, sp = snaps[-1]
            snap = msgpack.unpackb(sp.read_bytes(), raw=False, strict_map_key=False)
            if snap.get("lsn") != snap_lsn:
                raise SpoolCorrupt(f"{sp}: snapshot says lsn {snap.get('lsn')}")
        records: list[tuple[int, int, Any]] = []
        segs = self._segments()
        last_lsn = snap_lsn
        for i, (first, path) in enumerate(segs):
            data = path.read_bytes()
            good_end = 0
            for epoch, lsn, rec, end in iter_frames(data):
                good_end = end
                if lsn <= snap_lsn:
                    continue
                if lsn != last_lsn + 1:
                    raise SpoolCorrupt(f"{path}: lsn {lsn} follows {last_lsn}")
                records.append((epoch, lsn, rec))
                last_lsn = lsn
            if good_end != len(data):
                if i != len(segs) - 1:
                    raise SpoolCorrupt(f"{path}: bad frame at offset {good_end} of {len(data)} "
                                       "in a closed segment")
                with open(path, "r+b") as fh:  # torn tail of an unacknowledged write
                    fh.truncate(good_end)
                    os.fsync(fh.fileno())
        self.next_lsn = last_lsn + 1
        if segs:
            self._open_segment(segs[-1][1])
        else:
            self._open_segment(self.dir / f"seg-{self.next_lsn:020d}.log")
        self.bytes_since_snapshot = sum(p.stat().st_size for _, p in segs)
        return snap, records

    def _open_segment(self, path: Path) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = open(path, "ab")
        self._seg_size = self._fh.tell()
        _fsync_dir(self.dir)

    # ------------------------------------------------------------------ appending
    def assign(self, records: list[Any], epoch: int) -> tuple[bytes, int]:
        """Encode records with consecutive lsns; returns (frames, first lsn). Cheap, in memory."""
        first = self.next_lsn
        frames = b"".join(encode_frame(epoch, first + i, r) for i, r in enumerate(records))
        self.next_lsn = first + len(records)
        return frames, first

    def write(self, frames: bytes, first_lsn: int) -> None:
        """Append encoded frames and make them durable (one fsync). Blocking: run in a thread."""
        if self._seg_size >= self.segment_bytes:
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
            self._open_segment(self.dir / f"seg-{first_lsn:020d}.log")
        start = self._seg_size
        try:
            self._fh.write(frames)
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
        except BaseException:
            # never leave a partial frame behind: later frames would sit after garbage and be
            # cut off as a torn tail on recovery. The caller reuses these lsns.
            try:
                self._fh.truncate(start)
                self._fh.seek(start)
            except OSError:
                pass
            self.next_lsn = first_lsn
            raise
        self._seg_size += len(frames)
        self.bytes_since_snapshot += len(frames)

    # ------------------------------------------------------------------ compaction
    def write_snapshot(self, state: dict[str, Any]) -> int:
        """Write a snapshot of the state as of ``state['lsn']`` and drop what it covers.

        Order: start a new segment (so older segments hold only lsns ≤ snapshot lsn... or
        fewer), write snap-N.tmp, fsync, rename, fsync the directory, then delete older
        segments and snapshots. A crash at any step leaves either the old snapshot with all
        its segments or the new one: never a gap. Blocking: run in a thread."""
        lsn = state["lsn"]
        if lsn != self.next_lsn - 1:
            raise ValueError(f"snapshot lsn {lsn} is not the log end {self.next_lsn - 1}")
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        self._open_segment(self.dir / f"seg-{self.next_lsn:020d}.log")
        tmp = self.dir / f"snap-{lsn:020d}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(msgpack.packb(state, use_bin_type=True))
            fh.flush()
            os.fsync(fh.fileno())
        final = self.dir / f"snap-{lsn:020d}.msgpack"
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        for first, p in self._segments():
            if first <= lsn:
                p.unlink()
        for s_lsn, p in self._snapshots():
            if s_lsn < lsn:
                p.unlink()
        self.bytes_since_snapshot = 0
        return final.stat().st_size

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
