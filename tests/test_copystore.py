"""A copy of a shard's log on a real disk: SpoolLog's shape, frame shipping, cutting back,
snapshot installation and crash safety; CopyStore's persisted promise, membership, lock and
fencing between a leader's log and a copy."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import msgpack
import pytest

from cluster.adapters.copystore import CopyStore, DirectoryBusy
from cluster.adapters.spool import (Compacted, SpoolCorrupt, SpoolLog, encode_frame,
                                    iter_headers, pack_snapshot, unpack_snapshot)
from cluster.core.replication import LogShape, Members, Refused, agreement


# ---------------------------------------------------------------------------- helpers
def rec(i: int, size: int | None = None) -> list:
    return ["r", i, b"x" * ((i * 37) % 90 if size is None else size)]


def write(log: SpoolLog, records: list, epoch: int) -> tuple[bytes, int]:
    frames, first = log.assign(records, epoch)
    log.write(frames, first)
    return frames, first


def fill(log: SpoolLog, plan: list[tuple[int, int]], batch: int = 3) -> None:
    """Write ``count`` records in ``epoch`` for each (epoch, count), in small batches."""
    for epoch, count in plan:
        left = count
        while left:
            n = min(batch, left)
            write(log, [rec(log.next_lsn + k) for k in range(n)], epoch)
            left -= n


def shape(log: SpoolLog) -> LogShape:
    return LogShape(log.snap_lsn, log.snap_epoch, tuple(tuple(r) for r in log.runs), log.end)


def opened(path: Path, **kw) -> SpoolLog:
    kw.setdefault("fsync", False)
    lg = SpoolLog(path, **kw)
    lg.recover(decode=False)
    return lg


def reread(path: Path) -> tuple[LogShape, object, list]:
    """Shape, snapshot and [(epoch, lsn, record)] of a log directory, read afresh."""
    lg = SpoolLog(path, fsync=False)
    snap, records = lg.recover()
    try:
        return shape(lg), snap, records
    finally:
        lg.close()


def lsns(frames: bytes) -> list[int]:
    return [lsn for _e, lsn, _s, _end in iter_headers(frames)]


def frame_sizes(frames: bytes) -> list[int]:
    return [end - start for _e, _lsn, start, end in iter_headers(frames)]


# ---------------------------------------------------------------------------- reading frames
@pytest.mark.parametrize("max_bytes", [1, 100, 333, 1 << 20])
def test_frames_shipped_across_segments_rebuild_the_log(tmp_path, max_bytes):
    leader = opened(tmp_path / "leader", segment_bytes=200)
    fill(leader, [(1, 20), (2, 15), (5, 5)])
    copy = opened(tmp_path / "copy", segment_bytes=150)
    while copy.end < leader.end:
        data = leader.read_frames(copy.end + 1, max_bytes)
        assert lsns(data)[0] == copy.end + 1
        assert copy.append_frames(data) == copy.end
    assert shape(copy) == shape(leader) == LogShape(0, 0, ((1, 1), (2, 21), (5, 36)), 40)
    assert len(list((tmp_path / "leader").glob("seg-*.log"))) > 3
    if max_bytes < 1000:               # shipped in many batches: the copy rotated too
        assert len(list((tmp_path / "copy").glob("seg-*.log"))) > 3
    leader.close()
    copy.close()
    assert reread(tmp_path / "copy") == reread(tmp_path / "leader")
    assert reread(tmp_path / "copy")[2] == [(e, i, rec(i)) for e, i in
                                            [(1, i) for i in range(1, 21)]
                                            + [(2, i) for i in range(21, 36)]
                                            + [(5, i) for i in range(36, 41)]]


def test_read_frames_is_contiguous_bounded_and_full(tmp_path):
    lg = opened(tmp_path, segment_bytes=120)
    sizes = [40, 40, 80, 1, 1, 1, 1, 1, 1, 70, 3, 3, 120, 2, 2]
    for i, s in enumerate(sizes):
        write(lg, [rec(i + 1, s)], 1 + i // 5)
    assert len(list(tmp_path.glob("seg-*.log"))) > 4
    whole = lg.read_frames(1, 1 << 30)
    assert lsns(whole) == list(range(1, len(sizes) + 1))
    size = frame_sizes(whole)
    offset = [sum(size[:i]) for i in range(len(size) + 1)]
    for max_bytes in [1, 30, 64, 65, 99, 100, 130, 150, 199, 250, 400, 1000]:
        for first in range(1, lg.end + 1):
            data = lg.read_frames(first, max_bytes)
            got = lsns(data)
            assert got and got == list(range(first, first + len(got))), (first, max_bytes, got)
            assert data == whole[offset[first - 1]:offset[first - 1 + len(got)]]
            assert len(got) == 1 or len(data) <= max_bytes
            nxt = first + len(got)
            if nxt <= lg.end:   # stopped only because the next frame would not fit
                assert len(data) + size[nxt - 1] > max_bytes, (first, max_bytes, got)
    assert lg.read_frames(lg.end + 1) == b""
    assert lg.read_frames(lg.end + 50) == b""


def test_read_frames_returns_one_frame_bigger_than_max_bytes(tmp_path):
    lg = opened(tmp_path)
    write(lg, [rec(1, 500), rec(2, 500)], 1)
    data = lg.read_frames(1, 10)
    assert lsns(data) == [1] and len(data) > 500
    assert lsns(lg.read_frames(2, 0)) == [2]


def test_append_frames_refuses_what_does_not_continue_the_log(tmp_path):
    src = opened(tmp_path / "src")
    write(src, [rec(i) for i in range(1, 6)], 1)
    dst = opened(tmp_path / "dst")
    dst.append_frames(src.read_frames(1, 10**6))
    for bad in (src.read_frames(5, 10**6),             # already there
                encode_frame(1, 8, ["gap"]),           # a gap
                src.read_frames(1, 10**6)[:-3]):       # torn
        with pytest.raises(Exception):
            dst.append_frames(bad)
        assert dst.end == 5 and dst.next_lsn == 6
    dst.close()
    assert reread(tmp_path / "dst")[0] == LogShape(0, 0, ((1, 1),), 5)


# ---------------------------------------------------------------------------- cutting back
PLAN = [(1, 12), (2, 8), (3, 10)]          # lsn 1..12 epoch 1, 13..20 epoch 2, 21..30 epoch 3


def _segment_firsts(path: Path) -> list[int]:
    return sorted(int(p.name[4:-4]) for p in path.glob("seg-*.log"))


@pytest.mark.parametrize("cut", [0, 1, 5, 12, 13, 17, 20, 29, "segment end",
                                 "segment start"])
def test_truncate_after_then_recover_and_continue(tmp_path, cut):
    lg = opened(tmp_path, segment_bytes=150)
    fill(lg, PLAN)
    firsts = _segment_firsts(tmp_path)
    assert len(firsts) > 4
    if cut == "segment end":          # the last frame of a segment
        cut = firsts[2] - 1
    elif cut == "segment start":      # the first frame of a segment
        cut = firsts[2]
    _, _, before = reread(tmp_path)
    lg.truncate_after(cut)
    runs = tuple((e, f) for e, f in ((1, 1), (2, 13), (3, 21)) if f <= cut)
    assert shape(lg) == LogShape(0, 0, runs, cut)
    assert all(f <= max(cut, 1) for f in _segment_firsts(tmp_path))
    assert lg.read_frames(cut + 1) == b""
    assert reread(tmp_path) == (shape(lg), None, before[:cut])
    # appending continues, in a newer epoch, and survives a reopen
    write(lg, [rec(100), rec(101)], 7)
    assert shape(lg) == LogShape(0, 0, runs + ((7, cut + 1),), cut + 2)
    lg.close()
    lg2 = opened(tmp_path, segment_bytes=150)
    assert shape(lg2) == LogShape(0, 0, runs + ((7, cut + 1),), cut + 2)
    fill(lg2, [(7, 30)])
    lg2.close()
    s, _, records = reread(tmp_path)
    assert s.end == cut + 32 and [lsn for _, lsn, _ in records] == list(range(1, cut + 33))
    assert records[:cut] == before[:cut] and records[cut][2] == rec(100)


def test_truncate_after_at_or_past_the_end_is_a_no_op(tmp_path):
    lg = opened(tmp_path, segment_bytes=150)
    fill(lg, PLAN)
    before = shape(lg)
    lg.truncate_after(30)
    lg.truncate_after(99)
    assert shape(lg) == before
    lg.close()
    assert reread(tmp_path)[0] == before


def test_truncate_after_respects_the_snapshot(tmp_path):
    lg = opened(tmp_path, segment_bytes=150)
    fill(lg, [(1, 10)])
    lg.write_snapshot({"lsn": 10})
    fill(lg, [(2, 10)])
    with pytest.raises(ValueError):
        lg.truncate_after(9)
    lg.truncate_after(10)      # down to the snapshot itself is fine
    assert shape(lg) == LogShape(10, 1, (), 10)
    write(lg, [rec(11)], 3)
    lg.close()
    s, snap, records = reread(tmp_path)
    assert s == LogShape(10, 1, ((3, 11),), 11) and snap == {"lsn": 10}
    assert records == [(3, 11, rec(11))]


# ---------------------------------------------------------------------------- snapshots
SNAP_STATE = {"lsn": 10, "state": "S"}
SNAP = pack_snapshot(10, 2, msgpack.packb(SNAP_STATE, use_bin_type=True))


@pytest.mark.parametrize("end", [0, 3, 10, 17], ids=["empty", "behind", "at", "ahead"])
def test_install_snapshot_behind_at_or_ahead(tmp_path, end):
    lg = opened(tmp_path, segment_bytes=100)
    fill(lg, [(1, min(end, 6)), (2, max(0, end - 6))])
    _, _, before = reread(tmp_path)
    assert lg.install_snapshot(SNAP) == len(SNAP)
    want = LogShape(10, 2, ((2, 11),) if end > 10 else (), max(end, 10))
    assert shape(lg) == want
    assert lg.snapshot_file() == SNAP
    for lsn in (1, 10):
        with pytest.raises(Compacted):
            lg.read_frames(lsn)
    assert lsns(lg.read_frames(11)) == list(range(11, end + 1))
    # segments that held only covered frames are gone
    firsts = _segment_firsts(tmp_path)
    assert sum(1 for f in firsts if f <= 11) <= 1
    assert reread(tmp_path) == (want, SNAP_STATE, before[10:])
    # and the log continues after it
    write(lg, [rec(50), rec(51)], 3)
    lg.close()
    s, snap, records = reread(tmp_path)
    assert s == LogShape(10, 2, want.runs + ((3, want.end + 1),), want.end + 2)
    assert snap == SNAP_STATE
    assert records == before[10:] + [(3, want.end + 1, rec(50)), (3, want.end + 2, rec(51))]


def test_install_snapshot_older_than_held_is_refused(tmp_path):
    lg = opened(tmp_path)
    fill(lg, [(1, 12)])
    lg.write_snapshot({"lsn": 12})
    with pytest.raises(ValueError):
        lg.install_snapshot(SNAP)
    assert shape(lg) == LogShape(12, 1, (), 12)


def test_write_snapshot_then_compacted(tmp_path):
    lg = opened(tmp_path, segment_bytes=100)
    fill(lg, [(1, 8), (4, 4)])
    with pytest.raises(ValueError):
        lg.write_snapshot({"lsn": 11})            # not the log end
    lg.write_snapshot({"lsn": 12, "q": [1, 2]})
    lsn, epoch, payload = unpack_snapshot(lg.snapshot_file())
    assert (lsn, epoch) == (12, 4) and msgpack.unpackb(payload) == {"lsn": 12, "q": [1, 2]}
    write(lg, [rec(13)], 4)
    with pytest.raises(Compacted):
        lg.read_frames(12)
    assert lsns(lg.read_frames(13)) == [13]
    lg.write_snapshot({"lsn": 13}, epoch=9)
    assert (lg.snap_lsn, lg.snap_epoch, lg.runs) == (13, 9, [])
    assert len(list(tmp_path.glob("snap-*.msgpack"))) == 1
    lg.close()
    assert reread(tmp_path)[:2] == (LogShape(13, 9, (), 13), {"lsn": 13})


# ---------------------------------------------------------------------------- crash safety
def test_leftover_temporary_files_are_ignored(tmp_path):
    store = CopyStore(tmp_path, 1, fsync=False)
    store.recover()
    store.claim(3, "L")
    uuid = store.uuid
    store.close()
    (tmp_path / "log" / "snap-00000000000000000009.tmp").write_bytes(b"half a snapshot")
    (tmp_path / "meta.tmp").write_bytes(b"\x93half")
    store = CopyStore(tmp_path, 1, fsync=False)
    store.recover()
    assert (store.uuid, store.fence.promised, store.fence.leader) == (uuid, 3, "L")
    assert store.shape() == LogShape() and store.snapshot_file() is None
    assert not list((tmp_path / "log").glob("*.tmp"))
    store.close()


class Crash(BaseException):
    pass


@contextlib.contextmanager
def crash_at(n: int):
    """The process dies just before its n-th durable step (fsync, rename or unlink): what it
    did before is on disk, nothing after. Yields the count of steps reached."""
    real = (os.fsync, os.replace, Path.unlink)
    calls = [0]

    def step():
        calls[0] += 1
        if calls[0] == n:
            raise Crash(n)

    os.fsync = lambda fd: (step(), real[0](fd))[1]
    os.replace = lambda a, b: (step(), real[1](a, b))[1]
    Path.unlink = lambda self, *a, **k: (step(), real[2](self, *a, **k))[1]
    try:
        yield calls
    finally:
        os.fsync, os.replace, Path.unlink = real


def _crash_each_step(build, op, check):
    """Run ``op`` on a freshly built log, crashing at step 1, 2, ... until it completes;
    after each crash ``check`` the recovered directory."""
    for n in range(1, 100):
        path = build(n)
        lg = SpoolLog(path, segment_bytes=120)
        lg.recover()
        crashed = False
        with crash_at(n):
            try:
                op(lg)
            except Crash:
                crashed = True
        if lg._fh is not None:
            lg._fh.close()
        check(path, crashed)
        if not crashed:
            return n
    raise AssertionError("never completed")


def _continue_after_crash(path: Path) -> None:
    """A recovered log must keep working: append, cut back, reopen: the same shape."""
    lg = SpoolLog(path, segment_bytes=120)
    lg.recover()
    end = lg.end
    write(lg, [rec(200 + k) for k in range(3)], 8)
    lg.truncate_after(end + 2)
    want = shape(lg)
    assert want.end == end + 2
    lg.close()
    s, _, records = reread(path)
    assert s == want and [r for _, _, r in records[-2:]] == [rec(200), rec(201)]


def test_crash_at_any_step_of_truncate_after(tmp_path):
    def build(n):
        lg = SpoolLog(tmp_path / f"t{n}", segment_bytes=120)
        lg.recover()
        fill(lg, PLAN)
        lg.close()
        return tmp_path / f"t{n}"

    _, _, original = reread(build(0))

    def check(path, crashed):
        s, _, records = reread(path)      # never SpoolCorrupt
        # the old log, the new one, or something between: always a prefix of the old
        assert 9 <= s.end <= 30 and records == original[:s.end]
        if not crashed:
            assert s.end == 9
        _continue_after_crash(path)

    steps = _crash_each_step(build, lambda lg: lg.truncate_after(9), check)
    assert steps > 3


@pytest.mark.parametrize("end", [4, 10, 17], ids=["behind", "at", "ahead"])
def test_crash_at_any_step_of_install_snapshot(tmp_path, end):
    def build(n):
        lg = SpoolLog(tmp_path / f"t{n}", segment_bytes=120)
        lg.recover()
        fill(lg, [(1, min(end, 6)), (2, max(0, end - 6))])
        lg.close()
        return tmp_path / f"t{n}"

    old = reread(build(0))
    new = (LogShape(10, 2, ((2, 11),) if end > 10 else (), max(end, 10)), SNAP_STATE,
           old[2][10:])

    def check(path, crashed):
        got = reread(path)
        assert got in (old, new)           # the old snapshot with its segments, or the new
        if not crashed:
            assert got == new
        _continue_after_crash(path)

    steps = _crash_each_step(build, lambda lg: lg.install_snapshot(SNAP), check)
    assert steps > 3


# ---------------------------------------------------------------------------- CopyStore

def members_with(store: CopyStore, version=(1, 0)) -> Members:
    return Members(version, ("leader-uuid", store.uuid, "other"))


def store_at(path: Path, **kw) -> CopyStore:
    kw.setdefault("fsync", False)
    s = CopyStore(path, 1, **kw)
    s.recover()
    return s


def test_meta_persists_across_reopen(tmp_path):
    s = store_at(tmp_path, segment_bytes=100)
    uuid = s.uuid
    assert (s.fence.promised, s.fence.leader, s.members) == (0, "", Members())
    info = s.claim(4, "L-a")
    assert (info.slot, info.uuid, info.promised, info.granted) == (1, uuid, 4, True)
    m = members_with(s, (4, 1))
    s.sync(4, "L-a", 0, m)
    s.close()

    s = store_at(tmp_path, segment_bytes=100)
    assert s.uuid == uuid
    assert (s.fence.promised, s.fence.leader, s.members) == (4, "L-a", m)
    assert s.stats()["member"] is True and s.stats()["members_version"] == [4, 1]
    # being synced is not persisted: a restarted copy is synced again before it takes frames
    with pytest.raises(Refused) as e:
        s.append(4, "L-a", 1, encode_frame(4, 1, ["x"]))
    assert e.value.reason == "unsynced"
    # the same leader instance may claim again; another one of the same epoch may not
    s.claim(4, "L-a")
    with pytest.raises(Refused) as e:
        s.claim(4, "L-b")
    assert e.value.reason == "stale" and e.value.promised == 4
    s.close()
    s = store_at(tmp_path)
    assert (s.fence.promised, s.fence.leader) == (4, "L-a")   # a refused claim wrote nothing
    s.close()


def test_older_membership_is_not_taken(tmp_path):
    s = store_at(tmp_path)
    s.claim(5, "L")
    new = members_with(s, (5, 2))
    s.sync(5, "L", 0, new)
    s.set_members(5, "L", members_with(s, (5, 1)))
    s.set_members(5, "L", Members((2, 7), ("a", "b", "c")))
    assert s.members == new
    s.close()
    s = store_at(tmp_path)
    assert s.members == new
    s.close()


def test_new_directory_gets_a_new_uuid(tmp_path):
    a, b = store_at(tmp_path / "a"), store_at(tmp_path / "b")
    ua, ub = a.uuid, b.uuid
    assert ua != ub and len(ua) == 32
    a.close()
    b.close()
    assert store_at(tmp_path / "a").uuid == ua
    # a copy that comes back with an empty directory is another copy
    import shutil
    shutil.rmtree(tmp_path / "b")
    assert store_at(tmp_path / "b").uuid not in (ua, ub)


def test_directory_lock(tmp_path):
    a = store_at(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(DirectoryBusy):
        CopyStore(tmp_path, 1, fsync=False, lock_wait=0.2)
    assert time.monotonic() - t0 < 2
    a.close()
    b = CopyStore(tmp_path, 1, fsync=False, lock_wait=0.2)
    b.close()


def _leader_and_copy(tmp_path, epoch=1, leader="L1"):
    lead = opened(tmp_path / "leader", segment_bytes=200)
    copy = store_at(tmp_path / "copy", segment_bytes=150)
    copy.claim(epoch, leader)
    keep = agreement(shape(lead), copy.shape())
    copy.sync(epoch, leader, keep, members_with(copy, (epoch, 0)))
    return lead, copy


def _ship(lead: SpoolLog, copy: CopyStore, epoch: int, leader: str, records: list) -> int:
    frames, first = write(lead, records, epoch)
    return copy.append(epoch, leader, first, frames)


def test_claim_sync_append_compact_flow(tmp_path):
    lead, copy = _leader_and_copy(tmp_path)
    for i in range(20):
        assert _ship(lead, copy, 1, "L1", [rec(3 * i + k + 1) for k in range(3)]) == lead.end
    assert copy.shape() == shape(lead) == LogShape(0, 0, ((1, 1),), 60)
    # compaction on the leader, then on the copy
    lead.write_snapshot({"lsn": 60, "live": 3})
    copy.compact(1, "L1", lead.snapshot_file())
    assert copy.shape() == shape(lead) == LogShape(60, 1, (), 60)
    with pytest.raises(Compacted):
        copy.read(60, 1000)
    for i in range(5):
        _ship(lead, copy, 1, "L1", [rec(100 + i)])
    assert copy.shape() == shape(lead)
    assert copy.read(61, 1 << 20) == lead.read_frames(61, 1 << 20)
    assert copy.snapshot_file() == lead.snapshot_file()
    copy.close()
    lead.close()
    copy = store_at(tmp_path / "copy")
    assert copy.shape() == reread(tmp_path / "leader")[0] == LogShape(60, 1, ((1, 61),), 65)
    assert reread(tmp_path / "copy" / "log") == reread(tmp_path / "leader")
    st = copy.stats()
    assert (st["end"], st["snap_lsn"], st["promised"], st["synced"]) == (65, 60, 1, 0)
    copy.close()


def test_new_leader_cuts_a_divergent_tail(tmp_path):
    # the old leader (epoch 1) got frames 6..8 onto this copy only; the new leader of epoch 2
    # has 1..5 and wrote 6..10 itself
    old = opened(tmp_path / "old")
    copy = store_at(tmp_path / "copy")
    copy.claim(1, "A")
    copy.sync(1, "A", 0, members_with(copy))
    for i in range(1, 9):
        _ship(old, copy, 1, "A", [rec(i)])
    new = opened(tmp_path / "new")
    new.append_frames(old.read_frames(1, 10**6)[:sum(frame_sizes(old.read_frames(1))[:5])])
    assert new.end == 5
    fill(new, [(2, 5)])
    copy.claim(2, "B")
    keep = agreement(shape(new), copy.shape())
    assert keep == 5
    copy.sync(2, "B", keep, members_with(copy, (2, 0)))
    assert copy.shape() == LogShape(0, 0, ((1, 1),), 5)
    assert copy.append(2, "B", 6, new.read_frames(6, 10**6)) == 10
    assert copy.shape() == shape(new) == LogShape(0, 0, ((1, 1), (2, 6)), 10)
    copy.close()
    new.close()
    assert reread(tmp_path / "copy" / "log") == reread(tmp_path / "new")


def test_copy_diverging_under_the_leaders_snapshot_takes_the_snapshot(tmp_path):
    # this copy holds epoch-1 frames 1..20 that nobody else has past 5; the new leader wrote
    # 6..12 in epoch 2 and compacted at 12: comparing epochs after 12 finds nothing in common,
    # and the copy's frames 6..12 are not the leader's
    old = opened(tmp_path / "old")
    copy = store_at(tmp_path / "copy")
    copy.claim(1, "A")
    copy.sync(1, "A", 0, members_with(copy))
    for i in range(1, 21):
        _ship(old, copy, 1, "A", [rec(i)])
    new = opened(tmp_path / "new")
    new.append_frames(old.read_frames(1, sum(frame_sizes(old.read_frames(1))[:5])))
    assert new.end == 5
    fill(new, [(2, 7)])
    new.write_snapshot({"lsn": 12, "state": "new"})
    fill(new, [(2, 3)])
    copy.claim(2, "B")
    keep = agreement(shape(new), copy.shape())
    assert keep is None
    copy.install(2, "B", new.snapshot_file(), members_with(copy, (2, 0)))
    assert copy.shape() == LogShape(12, 2, (), 12)
    copy.append(2, "B", 13, new.read_frames(13))
    assert copy.shape() == shape(new) == LogShape(12, 2, ((2, 13),), 15)
    copy.close()
    new.close()
    assert reread(tmp_path / "copy" / "log") == reread(tmp_path / "new")


def test_zombie_leader_is_refused_and_changes_nothing(tmp_path):
    lead, copy = _leader_and_copy(tmp_path)
    for i in range(4):
        _ship(lead, copy, 1, "L1", [rec(i + 1)])
    snap_bytes = pack_snapshot(4, 1, msgpack.packb({"lsn": 4}))
    copy.claim(2, "L2")                         # a new leader took over
    before = copy.shape()
    files = {p.name: p.read_bytes() for p in (tmp_path / "copy" / "log").iterdir()}
    frames, first = write(lead, [rec(5), rec(6)], 1)   # the old one still writes
    attempts = [lambda: copy.append(1, "L1", first, frames),
                lambda: copy.sync(1, "L1", 0, members_with(copy)),
                lambda: copy.install(1, "L1", snap_bytes, members_with(copy)),
                lambda: copy.compact(1, "L1", snap_bytes),
                lambda: copy.set_members(1, "L1", members_with(copy, (1, 5))),
                lambda: copy.claim(1, "L1"),
                lambda: copy.claim(2, "L1")]
    for attempt in attempts:
        with pytest.raises(Refused) as e:
            attempt()
        assert e.value.reason == "stale" and e.value.promised == 2
        assert e.value.to_wire()[:3] == ["refused", "stale", 2]
    # the new leader must sync before appending, and cannot append in the future
    with pytest.raises(Refused) as e:
        copy.append(2, "L2", first, frames)
    assert e.value.reason == "unsynced"
    with pytest.raises(Refused) as e:
        copy.append(3, "L2", first, frames)
    assert e.value.reason == "unclaimed"
    assert copy.shape() == before and copy.fence.promised == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "copy" / "log").iterdir()} == files
    copy.close()
    copy = store_at(tmp_path / "copy")
    assert (copy.fence.promised, copy.fence.leader) == (2, "L2") and copy.shape() == before
    copy.close()


def test_retried_append_is_a_no_op(tmp_path):
    lead, copy = _leader_and_copy(tmp_path)
    frames, first = write(lead, [rec(i) for i in range(1, 6)], 1)
    assert copy.append(1, "L1", first, frames) == 5
    disk = copy.log.disk_bytes()
    assert copy.append(1, "L1", first, frames) == 5        # the same call again
    assert copy.log.disk_bytes() == disk and copy.shape() == shape(lead)
    # a retry that overlaps: frames 3..8 onto a copy holding 1..5 appends 6..8 only
    more, _ = write(lead, [rec(i) for i in range(6, 9)], 1)
    overlap = lead.read_frames(3, 1 << 20)
    assert lsns(overlap) == list(range(3, 9)) and more
    assert copy.append(1, "L1", 3, overlap) == 8
    assert copy.append(1, "L1", 3, overlap) == 8
    assert copy.shape() == shape(lead)
    with pytest.raises(Refused) as e:                      # a gap
        copy.append(1, "L1", 10, encode_frame(1, 10, ["x"]))
    assert e.value.reason == "gap"
    copy.close()
    lead.close()
    assert reread(tmp_path / "copy" / "log") == reread(tmp_path / "leader")


def test_compact_on_an_unsynced_copy_behind_the_snapshot_is_refused(tmp_path):
    lead, copy = _leader_and_copy(tmp_path)
    fill(lead, [(1, 6)])
    lead.write_snapshot({"lsn": 6})
    copy.close()
    copy = store_at(tmp_path / "copy")                     # restarted: not synced
    with pytest.raises(Refused) as e:
        copy.compact(1, "L1", lead.snapshot_file())
    assert e.value.reason == "unsynced" and copy.shape() == LogShape()
    copy.sync(1, "L1", 0, members_with(copy))
    copy.compact(1, "L1", lead.snapshot_file())            # synced: it jumps to the snapshot
    assert copy.shape() == shape(lead) == LogShape(6, 1, (), 6)
    copy.close()


def test_a_batch_append_checked_by_one_checksum_rebuilds_the_log(tmp_path):
    """Whole commits of one epoch go with their shape [last, epoch, crc32] and are checked as
    a whole; the copy ends up byte for byte the leader's, across segments and an epoch
    change. A wrong checksum or epoch, or a torn batch, is refused as "corrupt" and writes
    nothing; a batch starting at another lsn is corrupt to the log."""
    import zlib
    lead, copy = _leader_and_copy(tmp_path)
    lead.segment_bytes = copy.log.segment_bytes = 300
    leader = "L1"
    for i in range(12):
        epoch = 1 if i < 8 else 2
        if i == 8:                                  # a new leader claims and syncs the copy
            leader = "L2"
            copy.claim(2, leader)
            copy.sync(2, leader, agreement(shape(lead), copy.shape()),
                      members_with(copy, (2, 0)))
        frames, first = write(lead, [rec(3 * i + k + 1) for k in range(3)], epoch)
        good = [first + 2, epoch, zlib.crc32(frames)]
        before = (copy.log.end, copy.log.disk_bytes())
        for bad in ([first + 2, epoch, good[2] ^ 1], [first + 2, epoch + 1, good[2]]):
            with pytest.raises(Refused) as refused:
                copy.append(epoch, leader, first, frames, bad)
            assert refused.value.reason == "corrupt", refused.value
            assert (copy.log.end, copy.log.disk_bytes()) == before
        torn = frames[:-3]                          # checked frame by frame: refused too
        with pytest.raises(Refused, match="corrupt"):
            copy.append(epoch, leader, first, torn)
        assert (copy.log.end, copy.log.disk_bytes()) == before
        other = encode_frame(epoch, first + 1, ["x"])   # a frame of another lsn
        with pytest.raises(SpoolCorrupt):
            copy.log.append_batch(other, first + 1, epoch, zlib.crc32(other))
        assert copy.append(epoch, leader, first, frames, good) == first + 2
        # a retried batch append is skipped like any other
        assert copy.append(epoch, leader, first, frames, good) == first + 2
    assert copy.shape() == shape(lead) == LogShape(0, 0, ((1, 1), (2, 25)), 36)
    assert len(list((tmp_path / "copy" / "log").glob("seg-*.log"))) > 3
    copy.close()
    lead.close()
    assert reread(tmp_path / "copy" / "log") == reread(tmp_path / "leader")
