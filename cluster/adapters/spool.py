"""Durable local spool: an append-only, segmented, checksummed record log plus snapshots.

Owns: the on-disk format of a queue shard and the guarantee behind "accepted means durable":
:meth:`SpoolLog.write` returns only after the frames are written and fsync'd (one fsync per
batch: group commit). It does not interpret records (that is ``cluster.core.queue``).

Layout of a shard directory::

    seg-<first lsn, 20 digits>.log   frames, in lsn order, across segments
    snap-<lsn, 20 digits>.msgpack    the queue state as of that lsn (written atomically)

Frame: ``<u32 payload length><u32 crc32(epoch, lsn, payload)><u64 epoch><u64 lsn><payload>``,
payload a msgpack record. The epoch field is the fencing token a replicated shard writes with.
Snapshot file: ``<u64 lsn><u64 epoch of the frame at lsn><u32 crc32(payload)><payload>``,
payload the msgpack state.

Besides the records, the log knows its *shape* (snapshot lsn and epoch, the runs of equal
epoch after it, the end): what replication compares between copies. It can cut its tail back
(:meth:`truncate_after`), take a snapshot from elsewhere (:meth:`install_snapshot`) and hand
out raw frames for another copy (:meth:`read_frames`).

Failure behaviour: a torn or corrupt frame at the *end of the last segment* (a crash during a
write) is cut off on open: it was never acknowledged, because acknowledgement follows fsync.
A bad frame anywhere else is corruption of acknowledged data and raises :class:`SpoolCorrupt`
rather than silently dropping mail.
"""

from __future__ import annotations

import bisect
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import msgpack

__all__ = ["SpoolLog", "SpoolCorrupt", "Compacted", "Unresolved", "encode_frame", "iter_headers",
           "skip_frames", "numbered_files", "pack_snapshot", "unpack_snapshot", "write_atomic",
           "snapshot_keep", "packb_sliced", "pack_nested"]

_HDR = struct.Struct("<IIQQ")
_LEN_CRC = struct.Struct("<II")      # the two halves of _HDR, as assign builds it
_EPOCH_LSN = struct.Struct("<QQ")
_SNAP_HDR = struct.Struct("<QQI")
_MAX_FRAME = 64 * 1024 * 1024


class SpoolCorrupt(RuntimeError):
    """Acknowledged data on disk failed its checksum or is out of order."""


class Compacted(LookupError):
    """Frames asked for are covered by a snapshot and no longer in the log."""


class Unresolved(LookupError):
    """A snapshot refers to frames this copy of the log does not hold."""


def packb_sliced(obj: dict[str, Any], items: int = 2000) -> bytes:
    """``msgpack.packb(obj)``, byte for byte, made by many small packs: the lists among
    the map's values are packed ``items`` entries at a time. Run in a thread, the GIL
    can pass to the event loop between them (one packb of a few hundred MB holds it for
    a second)."""
    packer = msgpack.Packer(use_bin_type=True)
    pack = packer.pack
    parts = [packer.pack_map_header(len(obj))]
    for k, v in obj.items():
        parts.append(pack(k))
        if type(v) is list and len(v) > items:
            parts.append(packer.pack_array_header(len(v)))
            for i in range(0, len(v), items):
                parts.append(b"".join(map(pack, v[i:i + items])))
        else:
            parts.append(pack(v))
    return b"".join(parts)


def pack_nested(obj: dict[str, Any]) -> bytes:
    """:func:`packb_sliced` one level down: a map whose ``state`` value is a snapshot."""
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(obj))]
    for k, v in obj.items():
        parts.append(packer.pack(k))
        parts.append(packb_sliced(v) if type(v) is dict else packer.pack(v))
    return b"".join(parts)


def snapshot_keep(payload: bytes) -> list[int]:
    """The lsns a snapshot's payload refers to (its first key, ``keep``), read without
    decoding the rest of it: the frames carrying bodies the snapshot leaves in the log."""
    u = msgpack.Unpacker(io.BytesIO(payload), raw=False, strict_map_key=False,
                         max_buffer_size=_MAX_FRAME)
    try:
        n = u.read_map_header()
        if n and u.unpack() == "keep":
            keep = u.unpack()
            if type(keep) is list:
                return keep
    except (ValueError, msgpack.UnpackException):
        pass
    return []


def pack_snapshot(lsn: int, epoch: int, payload: bytes) -> bytes:
    return _SNAP_HDR.pack(lsn, epoch, zlib.crc32(payload)) + payload


def unpack_snapshot(data: bytes, where: str = "snapshot") -> tuple[int, int, bytes]:
    """(lsn, epoch, msgpack payload) of a snapshot file's bytes; raises on a bad checksum."""
    if len(data) < _SNAP_HDR.size:
        raise SpoolCorrupt(f"{where}: {len(data)} bytes is too short for a snapshot")
    lsn, epoch, crc = _SNAP_HDR.unpack_from(data)
    payload = data[_SNAP_HDR.size:]
    if zlib.crc32(payload) != crc:
        raise SpoolCorrupt(f"{where}: snapshot checksum mismatch")
    return lsn, epoch, payload


def _body_of(rec: Any, lsn: int, where: Path) -> bytes:
    """The body a body or message record carries (both keep it at index 2)."""
    if type(rec) is list and len(rec) > 2 and rec[0] in ("b", "m") and \
            type(rec[2]) is bytes:
        return rec[2]
    raise SpoolCorrupt(f"{where}: lsn {lsn} is referred to as a body but carries none")


def _crc(epoch: int, lsn: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_EPOCH_LSN.pack(epoch, lsn)))


def encode_frame(epoch: int, lsn: int, record: Any) -> bytes:
    return _frame(epoch, lsn, msgpack.packb(record, use_bin_type=True))


def _frame(epoch: int, lsn: int, payload: bytes) -> bytes:
    return _HDR.pack(len(payload), _crc(epoch, lsn, payload), epoch, lsn) + payload


def iter_headers(data: bytes, off: int = 0) -> Iterator[tuple[int, int, int, int]]:
    """Yield (epoch, lsn, start offset, end offset) of each valid frame, checking checksums
    but not decoding payloads; stop at the first bad one."""
    n = len(data)
    mv = memoryview(data)
    while off + _HDR.size <= n:
        length, crc, epoch, lsn = _HDR.unpack_from(data, off)
        end = off + _HDR.size + length
        if length > _MAX_FRAME or end > n:
            return
        if _crc(epoch, lsn, mv[off + _HDR.size:end]) != crc:
            return
        yield epoch, lsn, off, end
        off = end


def skip_frames(frames: bytes, n: int) -> bytes:
    """``frames`` without its first ``n`` frames."""
    if n <= 0:
        return frames
    i = 0
    for _e, _lsn, _start, end in iter_headers(frames):
        i += 1
        if i == n:
            return frames[end:]
    return b""


def write_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one:
    write a ``.tmp`` beside it, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path.parent)


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
    """One copy of a shard's log. Not thread-safe: one writer at a time (the commit loop of a
    shard leader, or a replica's I/O thread)."""

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
        self.snap_lsn = 0
        self.snap_epoch = 0
        self.snapshot_bytes = 0
        #: [[epoch, first lsn], ...] of the frames after the snapshot
        self.runs: list[list[int]] = []
        self._assigned_epoch = 0
        #: segments by first lsn: [last lsn held (first - 1 if empty), bytes]. Segments
        #: below the snapshot may be kept for the bodies a snapshot refers to, so the lsns
        #: held are not one range (see :meth:`install_snapshot`)
        self._segs: dict[int, list[int]] = {}
        self._cur_first = 0

    @property
    def end(self) -> int:
        return self.next_lsn - 1

    @property
    def last_epoch(self) -> int:
        return self.runs[-1][0] if self.runs else self.snap_epoch

    def _note(self, epoch: int, lsn: int) -> None:
        if not self.runs or self.runs[-1][0] != epoch:
            self.runs.append([epoch, lsn])

    # ------------------------------------------------------------------ recovery
    def _segments(self) -> list[tuple[int, Path]]:
        return numbered_files(self.dir, "seg-", ".log")

    def _snapshots(self) -> list[tuple[int, Path]]:
        return numbered_files(self.dir, "snap-", ".msgpack")

    def recover(self, *, decode: bool = True
                ) -> tuple[dict[str, Any] | None, list[tuple[int, int, Any]]]:
        """Read the newest snapshot and every record after it; repair a torn tail.

        Returns ``(snapshot or None, [(epoch, lsn, record), ...])`` and leaves the log open for
        appending after the last valid record. ``decode=False`` (a replica, which never looks
        inside records) checks every frame but returns no snapshot and no records."""
        for p in self.dir.glob("*.tmp"):
            p.unlink()
        snap = None
        snap_lsn = 0
        want: dict[int, list[Any]] = {}
        self.runs = []
        self._segs = {}
        snaps = self._snapshots()
        if snaps:
            snap_lsn, sp = snaps[-1]
            data = sp.read_bytes()
            lsn, self.snap_epoch, payload = unpack_snapshot(data, str(sp))
            if lsn != snap_lsn:
                raise SpoolCorrupt(f"{sp}: snapshot says lsn {lsn}")
            self.snapshot_bytes = len(data)
            if decode:
                snap = msgpack.unpackb(payload, raw=False, strict_map_key=False)
                want = {e[2]: e for e in snap.get("bodies", ()) if e[1] is None}
        self.snap_lsn = snap_lsn
        records: list[tuple[int, int, Any]] = []
        segs = self._segments()
        last_lsn = snap_lsn
        for i, (first, path) in enumerate(segs):
            data = path.read_bytes()
            good_end = 0
            seg_last = first - 1
            for epoch, lsn, start, end in iter_headers(data):
                good_end = end
                seg_last = lsn
                if lsn <= snap_lsn:
                    if lsn in want:   # a body the snapshot left in the log
                        want.pop(lsn)[1] = _body_of(msgpack.unpackb(
                            data[start + _HDR.size:end], raw=False, strict_map_key=False),
                            lsn, path)
                    continue
                if lsn != last_lsn + 1:
                    raise SpoolCorrupt(f"{path}: lsn {lsn} follows {last_lsn}")
                if decode:
                    records.append((epoch, lsn, msgpack.unpackb(
                        data[start + _HDR.size:end], raw=False, strict_map_key=False)))
                self._note(epoch, lsn)
                last_lsn = lsn
            if good_end != len(data):
                if i != len(segs) - 1:
                    raise SpoolCorrupt(f"{path}: bad frame at offset {good_end} of {len(data)} "
                                       "in a closed segment")
                with open(path, "r+b") as fh:  # torn tail of an unacknowledged write
                    fh.truncate(good_end)
                    os.fsync(fh.fileno())
            self._segs[first] = [seg_last, good_end]
        if want:
            raise SpoolCorrupt(f"{self.dir}: the snapshot at lsn {snap_lsn} refers to "
                               f"{len(want)} frames the log does not hold (first: lsn "
                               f"{min(want)})")
        self.next_lsn = last_lsn + 1
        if segs:
            self._open_segment(segs[-1][1])
        else:
            self._open_segment(self.dir / f"seg-{self.next_lsn:020d}.log")
        self._count_since_snapshot()
        return snap, records

    def _count_since_snapshot(self) -> None:
        """Bytes of the segments holding frames after the snapshot (what compaction would
        drop), not those kept only for the bodies the snapshot refers to."""
        self.bytes_since_snapshot = sum(size for last, size in self._segs.values()
                                        if last > self.snap_lsn)

    def _open_segment(self, path: Path) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = open(path, "ab")
        self._seg_size = self._fh.tell()
        self._cur_first = int(path.name[4:-4])
        self._segs.setdefault(self._cur_first, [self._cur_first - 1, self._seg_size])
        _fsync_dir(self.dir)

    # ------------------------------------------------------------------ appending
    def assign(self, records: list[Any], epoch: int) -> tuple[bytes, int]:
        """Encode records with consecutive lsns; returns (frames, first lsn). Cheap, in memory:
        the frames are built in one list of parts and joined once (a function call and a
        payload copy per frame were ~30 % of it)."""
        first = self.next_lsn
        pack = msgpack.Packer(use_bin_type=True).pack   # one packer: packb makes one a record
        crc32, head, epoch_lsn = zlib.crc32, _LEN_CRC.pack, _EPOCH_LSN.pack
        parts: list[bytes] = []
        add = parts.append
        for lsn, r in enumerate(records, first):
            payload = pack(r)
            el = epoch_lsn(epoch, lsn)
            add(head(len(payload), crc32(payload, crc32(el))))
            add(el)
            add(payload)
        self.next_lsn = first + len(records)
        self._assigned_epoch = epoch
        return b"".join(parts), first

    def write(self, frames: bytes, first_lsn: int) -> None:
        """Append encoded frames (made by :meth:`assign`, all of its epoch) and make them
        durable (one fsync). Blocking: run in a thread."""
        self._write(frames, first_lsn, [(self._assigned_epoch, first_lsn)])

    def append_frames(self, frames: bytes) -> int:
        """Append frames made elsewhere (another copy's), which must continue this log; checks
        each frame and returns the new end lsn. Blocking: run in a thread."""
        first = self.next_lsn
        hdrs = list(self._headers(frames, first))
        self.next_lsn = first + len(hdrs)
        self._write(frames, first, hdrs)
        return self.end

    def append_batch(self, frames: bytes, last: int, epoch: int, crc: int) -> int:
        """Append one batch of a leader's frames, this log's next lsn through ``last``, all
        of ``epoch``, checked as a whole: its crc32 must be ``crc`` and its first frame's
        header must say ``epoch`` and the next lsn (each frame's own checksum is checked
        when the log is read; walking them here was ~25 % of a copy's user CPU). Blocking."""
        first = self.next_lsn
        if zlib.crc32(frames) != crc:
            raise SpoolCorrupt(f"batch of lsns {first}-{last} received: checksum mismatch")
        if len(frames) < _HDR.size or last < first:
            raise SpoolCorrupt(f"batch of lsns {first}-{last} received: {len(frames)} bytes")
        _length, _crc32, e, lsn = _HDR.unpack_from(frames)
        if (e, lsn) != (epoch, first):
            raise SpoolCorrupt(f"batch starts with the frame of epoch {e} lsn {lsn} where "
                               f"epoch {epoch} lsn {first} was expected")
        self.next_lsn = last + 1
        self._write(frames, first, [(epoch, first)])
        return self.end

    @staticmethod
    def _headers(frames: bytes, first: int) -> Iterator[tuple[int, int]]:
        expect = first
        end = 0
        for epoch, lsn, _start, end in iter_headers(frames):
            if lsn != expect:
                raise SpoolCorrupt(f"frame lsn {lsn} where {expect} was expected")
            expect += 1
            yield epoch, lsn
        if end != len(frames):
            raise SpoolCorrupt(f"bad frame at offset {end} of {len(frames)} bytes received")

    def _write(self, frames: bytes, first_lsn: int, hdrs: list[tuple[int, int]]) -> None:
        """``hdrs``: (epoch, lsn) of the frames, or at least of each one where the epoch
        changes (that is all the epoch runs need)."""
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
        for epoch, lsn in hdrs:
            self._note(epoch, lsn)
        self._seg_size += len(frames)
        self._segs[self._cur_first] = [self.next_lsn - 1, self._seg_size]
        self.bytes_since_snapshot += len(frames)

    # ------------------------------------------------------------------ reading, cutting back
    def read_frames(self, from_lsn: int, max_bytes: int = 8 << 20) -> bytes:
        """Raw frames from ``from_lsn`` on: at least one if there is one, and no more than
        ``max_bytes`` beyond that. Raises :class:`Compacted` if a snapshot covers
        ``from_lsn``. Blocking."""
        if from_lsn <= self.snap_lsn:
            raise Compacted(f"lsn {from_lsn} is covered by the snapshot at {self.snap_lsn}")
        if from_lsn > self.end:
            return b""
        self._fh.flush()
        out: list[bytes] = []
        size = 0
        full = False
        segs = self._segments()
        for i, (_first, path) in enumerate(segs):
            if i + 1 < len(segs) and segs[i + 1][0] <= from_lsn:
                continue
            data = path.read_bytes()
            begin = stop = -1
            for _e, lsn, start, end in iter_headers(data):
                if lsn < from_lsn:
                    continue
                if size and size + (end - start) > max_bytes:
                    full = True    # stop here: frames of a later segment would leave a gap
                    break
                if begin < 0:
                    begin = start
                stop = end
                size += end - start
                from_lsn = lsn + 1
            if begin >= 0:
                out.append(data[begin:stop])
            if full or size >= max_bytes or from_lsn > self.end:
                break
        return b"".join(out)

    def truncate_after(self, lsn: int) -> None:
        """Cut the log back so that ``lsn`` is its last frame (a divergent tail from an old
        epoch that was never committed). Blocking."""
        if lsn >= self.end:
            return
        if lsn < self.snap_lsn:
            raise ValueError(f"cannot cut back to {lsn}: the snapshot covers up to "
                             f"{self.snap_lsn}")
        self._fh.close()
        self._fh = None
        segs = self._segments()
        # drop whole segments first, newest first, so that a crash at any point leaves a
        # contiguous log (a prefix of the old one), never a gap between segments
        for first, path in reversed(segs):
            if first > lsn:
                path.unlink()   # every frame in it is after lsn
                self._segs.pop(first, None)
        _fsync_dir(self.dir)
        for first, path in segs:
            if first > lsn:
                continue
            data = path.read_bytes()
            for _e, flsn, start, _end in iter_headers(data):
                if flsn == lsn + 1:
                    with open(path, "r+b") as fh:
                        fh.truncate(start)
                        os.fsync(fh.fileno())
                    self._segs[first] = [lsn, start]
                    break
        self.next_lsn = lsn + 1
        self.runs = [r for r in self.runs if r[1] <= lsn]
        remaining = self._segments()
        self._open_segment(remaining[-1][1] if remaining
                           else self.dir / f"seg-{self.next_lsn:020d}.log")
        self._count_since_snapshot()

    # ------------------------------------------------------------------ compaction
    def write_snapshot(self, state: dict[str, Any], epoch: int | None = None) -> int:
        """Write a snapshot of the state as of ``state['lsn']`` (the log's end) and drop what it
        covers. Returns the snapshot's size. Blocking: run in a thread."""
        lsn = state["lsn"]
        if lsn != self.end:
            raise ValueError(f"snapshot lsn {lsn} is not the log end {self.end}")
        ep = self.last_epoch if epoch is None else epoch
        return self.install_snapshot(pack_snapshot(lsn, ep, packb_sliced(state)))

    def install_snapshot(self, data: bytes) -> int:
        """Make a snapshot (the bytes of a snapshot file, from this copy or another) the base
        of the log: frames it covers are dropped; a log that ended before it continues after
        it. Order: write snap-N.tmp, fsync, rename, fsync the directory, then drop covered
        segments and older snapshots; a crash at any step leaves the old snapshot with all its
        segments, or the new one: never a gap. Returns the snapshot's size. Blocking."""
        lsn, epoch, payload = unpack_snapshot(data)
        if lsn < self.snap_lsn:
            raise ValueError(f"snapshot at lsn {lsn} is older than the one held ({self.snap_lsn})")
        keep = snapshot_keep(payload)
        missing = self.missing(keep)
        if missing:
            raise Unresolved(f"snapshot at lsn {lsn} refers to {missing} frames this copy "
                             "does not hold")
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        old_end = self.end
        write_atomic(self.dir / f"snap-{lsn:020d}.msgpack", data, fsync=self.fsync)
        if old_end <= lsn:
            # every frame held is covered: continue in a fresh segment after the snapshot
            # (only once the snapshot is durable: opened before, a crash would leave an empty
            # seg-<lsn+1> that the old log, recovered, appends lsns <= lsn to)
            self.next_lsn = lsn + 1
            self._open_segment(self.dir / f"seg-{self.next_lsn:020d}.log")
        segs = self._segments()
        kept = iter(keep)
        k = next(kept, None)
        for first, p in segs[:-1]:
            last = self._segs.get(first, [first - 1])[0]
            while k is not None and k < first:
                k = next(kept, None)
            if last <= lsn and (k is None or k > last):
                p.unlink()   # every frame in it is ≤ lsn and no body in it is referred to
                self._segs.pop(first, None)
        for s_lsn, p in self._snapshots():
            if s_lsn < lsn:
                p.unlink()
        runs = []
        for i, (ep, first) in enumerate(self.runs):
            run_end = self.runs[i + 1][1] - 1 if i + 1 < len(self.runs) else old_end
            if run_end > lsn:
                runs.append([ep, max(first, lsn + 1)])
        self.runs = runs
        self.snap_lsn, self.snap_epoch = lsn, epoch
        self._count_since_snapshot()
        self.snapshot_bytes = len(data)
        return len(data)

    def segment_ranges(self) -> list[tuple[int, int, int]]:
        """(first lsn, last lsn, bytes) of each segment, oldest first (what a snapshot's
        choice of bodies to leave in the log is made on)."""
        return [(f, v[0], v[1]) for f, v in sorted(self._segs.items())]

    def missing(self, lsns: list[int]) -> int:
        """How many of these (sorted) lsns this copy does not hold a frame for."""
        if not lsns:
            return 0
        firsts = sorted(self._segs)
        n = 0
        for lsn in lsns:
            i = bisect.bisect_right(firsts, lsn) - 1
            if i < 0 or lsn > self._segs[firsts[i]][0] or lsn > self.end:
                n += 1
        return n

    def read_bodies(self, lsns: list[int]) -> dict[int, bytes]:
        """The bodies carried by the frames at these lsns (kept below a snapshot that refers
        to them). Blocking."""
        want = set(lsns)
        lsns = sorted(want)
        out: dict[int, bytes] = {}
        self._fh.flush()
        for first in sorted(self._segs):
            last = self._segs[first][0]
            j = bisect.bisect_left(lsns, first)
            if j == len(lsns) or lsns[j] > last:
                continue
            path = self.dir / f"seg-{first:020d}.log"
            data = path.read_bytes()
            for _e, lsn, start, end in iter_headers(data):
                if lsn in want:
                    out[lsn] = _body_of(msgpack.unpackb(
                        data[start + _HDR.size:end], raw=False, strict_map_key=False), lsn, path)
        if len(out) != len(want):
            raise Unresolved(f"{self.dir}: {len(want) - len(out)} referred-to frames not found")
        return out

    def snapshot_file(self, *, self_contained: bool = True) -> bytes | None:
        """The bytes of the newest snapshot, if any. Self-contained (the default, to install
        on a copy that may not hold the frames it refers to): bodies left in the log are
        read and copied in. ``self_contained=False``: as written (compaction, where the
        copy is checked to hold them)."""
        snaps = self._snapshots()
        if not snaps:
            return None
        data = snaps[-1][1].read_bytes()
        if not self_contained:
            return data
        lsn, epoch, payload = unpack_snapshot(data)
        keep = snapshot_keep(payload)
        if not keep:
            return data
        snap = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        found = self.read_bodies(keep)
        snap["keep"] = []
        snap["bodies"] = [[e[0], found[e[2]]] if e[1] is None else e for e in snap["bodies"]]
        return pack_snapshot(lsn, epoch, msgpack.packb(snap, use_bin_type=True))

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
