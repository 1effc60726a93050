"""Event files: every queue state change as one JSON line, rotated by size, read by cursor.

Owns: ``events-<first seq>.jsonl`` files in a shard's ``events/`` directory. An event's ``seq``
is the log sequence number of the record that produced it, so after a crash the coordinator
rewrites exactly the events whose records are durable but whose lines were not yet written
(:attr:`EventLog.last_seq`). Bounded: at most ``files_kept`` files of ``file_bytes`` each,
plus at most ``retain_bytes`` of older files held back for webhook endpoints (below).

A reader that falls behind rotation (a webhook endpoint down for long) must not skip events
silently: when a file is deleted its events' seqs are kept as ``events-<first seq>.seqs`` (8
bytes an event against the ~300 of its line; at most ``seq_files_kept``, by default
:data:`SEQ_FILES_PER_FILE_KEPT` × ``files_kept``, such files; anything older is summed up in
``events-dropped.json``), and :meth:`EventLog.gap` says how many events after a cursor are gone
and which seqs they spanned — exactly while the cursor is within those seq lists, as a lower
bound beyond them.

A leader rebuilt on another node has only the events its snapshot carried (the newest ones)
and those of the records after it: the older ones are a **hole** (:mod:`cluster.core.
event_holes`). The old leader counts them when it builds the snapshot (:meth:`EventLog.
hole_before`), the new one keeps the count as ``events-holes.json`` (:meth:`EventLog.
install_holes`), and :meth:`EventLog.gap` reports them like rotated-away events.

Webhook endpoints hold files back (``retain_bytes``, :func:`cluster.core.event_retention.
plan_rotation`): a file beyond ``files_kept`` is not deleted while ``holds()`` — the committed
cursors of the configured endpoints, from the shard's replicated state — has one that has not
passed its events, up to ``retain_bytes`` of such files; past that the oldest go as above and
``on_capped(plan)`` is told which endpoints were still before them. Readers without a committed
cursor (``GET /v1/events``) hold nothing.
"""

from __future__ import annotations

import array
import bisect
import itertools
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from cluster.adapters.spool import numbered_files
from cluster.core.event_holes import MAX_HOLES, hole_gap, make_hole, merge_gaps
from cluster.core.event_retention import RotationPlan, plan_rotation

__all__ = ["EventLog"]

_DROPPED = "events-dropped.json"
_HOLES = "events-holes.json"
#: seq lists of deleted files kept per event file kept: a reader up to this many times
#: ``files_kept`` files behind the oldest kept file learns exactly how many events it lost
SEQ_FILES_PER_FILE_KEPT = 4

#: one (seq, byte offset) index entry per this many lines: read(since) seeks instead of scanning
_STRIDE = 256

_JSON_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE


class EventLog:
    def __init__(self, directory: str | os.PathLike[str], *, file_bytes: int = 64 << 20,
                 files_kept: int = 16, seq_files_kept: int | None = None,
                 retain_bytes: int = 0, holds: Callable[[], Mapping[str, int]] | None = None,
                 on_capped: Callable[[RotationPlan], None] | None = None) -> None:
        self.dir = Path(directory)
        self.retain_bytes = retain_bytes
        self.holds = holds
        self.on_capped = on_capped
        #: what the last rotation kept for webhook endpoints, and files deleted at the cap
        self.retention: dict[str, Any] = {"held_files": 0, "held_bytes": 0, "capped_files": 0,
                                          "last_capped": None}
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file_bytes = file_bytes
        self.files_kept = files_kept
        self.seq_files_kept = (SEQ_FILES_PER_FILE_KEPT * files_kept if seq_files_kept is None
                               else seq_files_kept)
        self._fh: Any = None
        self._size = 0
        self._lines = 0                                   # lines in the active file
        # file name → ([seq, ...], [offset, ...]) every _STRIDE lines; old files are immutable
        self._index: dict[str, tuple[list[int], list[int]]] = {}
        self.last_seq = 0
        try:
            self.holes: list[dict[str, Any]] = orjson.loads((self.dir / _HOLES).read_bytes())
        except FileNotFoundError:
            self.holes = []
        files = self._files()
        if files:
            self.last_seq = self._last_seq_in(files[-1][1])
            self._fh = open(files[-1][1], "ab")
            self._size = self._fh.tell()
            self._active = files[-1][1].name
            self._file_index(files[-1][1])
            with open(files[-1][1], "rb") as fh:
                self._lines = sum(1 for _ in fh)

    def _files(self) -> list[tuple[int, Path]]:
        return numbered_files(self.dir, "events-", ".jsonl")

    @staticmethod
    def _last_seq_in(path: Path) -> int:
        data = path.read_bytes()
        good = data.rfind(b"\n") + 1
        if good != len(data):  # a half-written last line from a crash: drop it
            with open(path, "r+b") as fh:
                fh.truncate(good)
        last = 0
        for line in data[:good].splitlines()[-1:]:
            last = json.loads(line)["seq"]
        if last == 0:
            try:
                last = int(path.stem[7:]) - 1
            except ValueError:
                last = 0
        return last

    def write(self, events: list[dict[str, Any]]) -> None:
        """Append events (seq ascending); events at or below :attr:`last_seq` are skipped."""
        last = self.last_seq
        if events and events[0]["seq"] <= last:   # a replay after a restart: skip what is in
            events = [ev for ev in events if ev["seq"] > last]
        if not events:
            return
        # orjson: ~6x faster than json.dumps here (events were ~7 % of a shard leader's CPU)
        dumps = orjson.dumps
        lines = [dumps(ev, default=str, option=_JSON_OPTS) for ev in events]
        if self._fh is None or self._size >= self.file_bytes:
            self._rotate(events[0]["seq"])
        seqs, offs = self._index[self._active]
        first = (-self._lines) % _STRIDE    # this batch's first line to index, if it has one
        if first < len(lines):
            # an index entry every _STRIDE lines of the file: its seq and byte offset
            starts = list(itertools.accumulate(map(len, lines), initial=self._size))
            for k in range(first, len(lines), _STRIDE):
                seqs.append(events[k]["seq"])
                offs.append(starts[k])
        self._lines += len(lines)
        data = b"".join(lines)
        self._fh.write(data)
        self._fh.flush()
        self._size += len(data)
        self.last_seq = events[-1]["seq"]

    def write_lines(self, data: bytes) -> int:
        """Append events given as JSON lines (a snapshot's :meth:`tail_bytes`), skipping
        those at or below :attr:`last_seq`; returns how many were written."""
        loads = orjson.loads
        evs = [loads(line) for line in data.splitlines() if line]
        before = self.last_seq
        self.write([ev for ev in evs if ev["seq"] > before])
        return sum(1 for ev in evs if ev["seq"] > before)

    def tail_bytes(self, limit: int) -> bytes:
        """The newest events as JSON lines, at most ``limit`` bytes of whole lines, oldest
        first: what a snapshot carries so that a leader rebuilt elsewhere from it still has
        the events just before it (read by a consumer that lags behind)."""
        if self._fh is not None:
            self._fh.flush()
        parts: list[bytes] = []
        left = limit
        for _, p in reversed(self._files()):
            size = p.stat().st_size
            with open(p, "rb") as fh:
                if size > left:
                    fh.seek(size - left)
                    chunk = fh.read(left)
                    cut = chunk.find(b"\n") + 1      # drop the partial first line
                    parts.append(chunk[cut:] if cut else b"")
                    left = 0
                else:
                    parts.append(fh.read())
                    left -= size
            if left <= 0:
                break
        data = b"".join(reversed(parts))
        end = data.rfind(b"\n") + 1                   # and a half-written last one
        return data[:end]

    def _rotate(self, first_seq: int) -> None:
        if self._fh is not None:
            self._fh.close()
        path = self.dir / f"events-{first_seq:020d}.jsonl"
        self._fh = open(path, "ab")
        self._size = self._fh.tell()
        self._active = path.name
        self._index[path.name] = ([], [])
        self._lines = 0
        files = self._files()
        cursors = self.holds() if self.holds is not None and self.retain_bytes > 0 else {}
        plan = plan_rotation([(first, p.stat().st_size) for first, p in files],
                             self.files_kept, cursors, self.retain_bytes)
        paths = dict(files)
        for first in plan.delete:
            p = paths[first]
            self._keep_seqs(first, p)
            p.unlink()
            self._index.pop(p.name, None)
        r = self.retention
        r["held_files"], r["held_bytes"] = len(plan.held), plan.held_bytes
        if plan.capped:
            r["capped_files"] += len(plan.capped)
            r["last_capped"] = {"files": len(plan.capped), "first_seq": plan.capped[0],
                                "endpoints": list(plan.holders)}
            if self.on_capped is not None:
                self.on_capped(plan)

    # ------------------------------------------------------------------ rotated-away events
    def _keep_seqs(self, first: int, path: Path) -> None:
        """Before ``path`` is deleted: its events' seqs as ``events-<first>.seqs``; the oldest
        such lists beyond ``seq_files_kept`` are folded into ``events-dropped.json``."""
        seqs = array.array("q")
        with open(path, "rb") as fh:
            for line in fh:
                if line.endswith(b"\n"):
                    seqs.append(orjson.loads(line)["seq"])
        tmp = self.dir / f"events-{first:020d}.seqs.tmp"
        tmp.write_bytes(seqs.tobytes())
        os.replace(tmp, self.dir / f"events-{first:020d}.seqs")
        lists = self._seq_files()
        for _, old in lists[: max(0, len(lists) - self.seq_files_kept)]:
            gone = self._read_seqs(old)
            agg = self._dropped()
            agg = {"through": max(agg["through"], gone[-1] if gone else 0),
                   "events": agg["events"] + len(gone)}
            t = self.dir / (_DROPPED + ".tmp")
            t.write_bytes(orjson.dumps(agg))
            os.replace(t, self.dir / _DROPPED)
            old.unlink()

    def _seq_files(self) -> list[tuple[int, Path]]:
        return numbered_files(self.dir, "events-", ".seqs")

    @staticmethod
    def _read_seqs(path: Path) -> array.array:
        a = array.array("q")
        a.frombytes(path.read_bytes())
        return a

    def _dropped(self) -> dict[str, int]:
        try:
            d = orjson.loads((self.dir / _DROPPED).read_bytes())
            return {"through": int(d["through"]), "events": int(d["events"])}
        except FileNotFoundError:
            return {"through": 0, "events": 0}

    def gap(self, since: int) -> dict[str, Any] | None:
        """The events after ``since`` that a reader at ``since`` will never see: rotated away,
        or in a hole a snapshot could not carry (:mod:`cluster.core.event_holes`):
        ``{"first_seq", "last_seq", "events", "exact"}``, or None when nothing after
        ``since`` is gone. ``exact`` is False when the cursor is older than the kept seq
        lists, or between a hole's counted points: ``events`` is then a lower bound."""
        return merge_gaps(since, self._rotated_parts(since) + self._hole_parts(since))

    def _rotated_parts(self, since: int) -> list[tuple[int, int, bool]]:
        agg = self._dropped()
        lost, last = 0, agg["through"]
        for _, p in self._seq_files():
            seqs = self._read_seqs(p)
            if seqs and seqs[-1] > since:
                lost += len(seqs) - bisect.bisect_right(seqs, since)
                last = max(last, seqs[-1])
        return [(last, lost, since >= agg["through"])] if last > since else []

    def _hole_parts(self, since: int) -> list[tuple[int, int, bool]]:
        out = []
        for h in self.holes:
            g = hole_gap(since, h)
            if g is not None:
                out.append((int(h["through"]), g[0], g[1]))
        return out

    # ------------------------------------------------------------------ snapshot holes
    def _count_upto(self, path: Path, seq: int) -> int:
        """Lines of ``path`` with seq <= ``seq`` (the line index, then at most _STRIDE lines)."""
        seqs, offs = self._file_index(path)
        i = bisect.bisect_right(seqs, seq) - 1
        if i < 0:
            return 0
        n = i * _STRIDE
        with open(path, "rb") as fh:
            fh.seek(offs[i])
            for line in fh:
                if not line.endswith(b"\n") or orjson.loads(line)["seq"] > seq:
                    break
                n += 1
        return n

    def count_between(self, after: int, through: int) -> int:
        """Events in the files with ``after < seq <= through``."""
        if self._fh is not None:
            self._fh.flush()
        files = self._files()
        n = 0
        for i, (first, p) in enumerate(files):
            end = files[i + 1][0] - 1 if i + 1 < len(files) else self.last_seq
            if end <= after or first > through:
                continue
            n += self._count_upto(p, through) - self._count_upto(p, after)
        return n

    def hole_before(self, first_carried: int, cursors: list[int]) -> list[dict[str, Any]]:
        """What a snapshot whose events start at ``first_carried`` leaves out, counted here
        (the events are here): the hole up to ``first_carried - 1`` with a count at each of
        ``cursors`` (the committed webhook cursors) and at index seqs from the lowest of them
        on, then this node's own holes that lie within what it carries. Blocking."""
        through = first_carried - 1
        out: list[dict[str, Any]] = []
        if self._fh is not None:
            self._fh.flush()
        files = self._files()
        before = [(f, p) for f, p in files if f <= through]
        anything = bool(before) or self.gap(0) is not None
        if anything and through >= 1:
            cur_pts = []
            for c in sorted(set(cursors)):
                if c >= through:
                    continue
                parts = [pt for pt in self._rotated_parts(c) + self._hole_parts(c)
                         if pt[0] <= through]
                cur_pts.append((c, sum(pt[1] for pt in parts) + self.count_between(c, through),
                                all(pt[2] for pt in parts)))
            # index seqs of the files from the lowest cursor on (the ones held for it)
            low = min(cursors) if cursors else through
            idx_pts: list[tuple[int, int, bool]] = []
            after_files = 0       # lines <= through in the files after the current one
            for i in range(len(before) - 1, -1, -1):
                p = before[i][1]
                end = files[i + 1][0] - 1 if i + 1 < len(files) else self.last_seq
                if end <= low:
                    break
                cnt = self._count_upto(p, through)
                seqs, _ = self._file_index(p)
                for k, s in enumerate(seqs):
                    if low <= s < through:
                        holes = sum(n for last, n, _ in self._hole_parts(s) if last <= through)
                        idx_pts.append((s, cnt - (k * _STRIDE + 1) + after_files + holes, True))
                after_files += cnt
            hole = make_hole(through, cur_pts, idx_pts)
            if hole is not None:
                out.append(hole)
        out += [dict(h) for h in self.holes if int(h["through"]) >= first_carried]
        return out

    def install_holes(self, holes: list[dict[str, Any]], local_last: int) -> int:
        """A snapshot's holes (:meth:`hole_before`) that this node's files do not cover (its
        last event ``local_last`` is before them), kept as ``events-holes.json``; the oldest
        beyond :data:`MAX_HOLES` go. Returns how many were installed."""
        new = [{**h, "after": max(int(h.get("after", 0)), local_last)} for h in holes
               if int(h["through"]) > local_last]
        if not new:
            return 0
        self.holes = (self.holes + new)[-MAX_HOLES:]
        tmp = self.dir / (_HOLES + ".tmp")
        tmp.write_bytes(orjson.dumps(self.holes))
        os.replace(tmp, self.dir / _HOLES)
        return len(new)

    def _file_index(self, path: Path) -> tuple[list[int], list[int]]:
        idx = self._index.get(path.name)
        if idx is None:
            seqs: list[int] = []
            offs: list[int] = []
            off = 0
            with open(path, "rb") as fh:
                for n, line in enumerate(fh):
                    if not line.endswith(b"\n"):
                        break
                    if n % _STRIDE == 0:
                        seqs.append(json.loads(line)["seq"])
                        offs.append(off)
                    off += len(line)
            idx = self._index[path.name] = (seqs, offs)
        return idx

    def read(self, since: int = 0, limit: int = 10_000) -> list[dict[str, Any]]:
        """Events with seq > since, oldest first, at most ``limit``."""
        files = self._files()
        start = 0
        for i, (first, _) in enumerate(files):
            if first <= since + 1:
                start = i
        out: list[dict[str, Any]] = []
        for k, (_, p) in enumerate(files[start:]):
            with open(p, "rb") as fh:
                if k == 0:   # seek near `since` instead of reading the file from its start
                    seqs, offs = self._file_index(p)
                    i = bisect.bisect_right(seqs, since) - 1
                    if i >= 0:
                        fh.seek(offs[i])
                for line in fh:
                    if not line.endswith(b"\n"):
                        break
                    ev = json.loads(line)
                    if ev["seq"] > since:
                        out.append(ev)
                        if len(out) >= limit:
                            return out
        return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
