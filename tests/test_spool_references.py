"""Snapshots that leave bodies in the log (issue 16 item 4): a compaction snapshot names the
lsns of the frames that carry queued bodies instead of copying the bodies in, the log keeps
exactly the segments those frames are in, a leader recovering from disk gets every body back,
and a copy that lacks the frames is refused and gets a self-contained snapshot instead."""

import os

import msgpack
import pytest

from cluster.adapters.spool import (SpoolLog, Unresolved, snapshot_keep, unpack_snapshot)
from cluster.core import queue as q


def _msg(i: int, body: bytes) -> list:
    return q.message_record(f"01JAAAAAAAAAAAAAAAAAA{i:05d}", body, "s@a.test",
                            f"r{i}@b.test", "b.test", 100.0, None, 1e10, None, None, None,
                            False)


def _fill(log: SpoolLog, st: q.QueueState, n: int, start: int = 0, size: int = 2000,
          per_batch: int = 50) -> dict[str, bytes]:
    bodies = {}
    for b0 in range(start, start + n, per_batch):
        recs = []
        for i in range(b0, min(b0 + per_batch, start + n)):
            body = os.urandom(size // 2).hex().encode()
            bodies[f"01JAAAAAAAAAAAAAAAAAA{i:05d}"] = body
            recs.append(_msg(i, body))
        frames, first = log.assign(recs, 1)
        log.write(frames, first)
        for k, r in enumerate(recs):
            st.apply(r, first + k)
    return bodies


def _deliver(log: SpoolLog, st: q.QueueState, ids: list[str]) -> None:
    recs = [q.delivered_record(m, 1, 250, "ok", "b.test", 200.0) for m in ids]
    frames, first = log.assign(recs, 1)
    log.write(frames, first)
    for k, r in enumerate(recs):
        st.apply(r, first + k)


def _bodies_of(st: q.QueueState) -> dict[str, bytes]:
    return {bid: b.data for bid, b in st.bodies.items()}


def test_a_snapshot_refers_to_bodies_and_recovery_reads_them_back(tmp_path):
    log = SpoolLog(tmp_path / "l", segment_bytes=100_000, fsync=False)
    log.recover()
    st = q.QueueState()
    bodies = _fill(log, st, 400)
    assert len(log.segment_ranges()) >= 6
    snap = st.snapshot(log.segment_ranges())
    assert list(snap)[0] == "keep" and len(snap["keep"]) == 400
    size = log.write_snapshot(snap)
    whole = len(msgpack.packb(q.QueueState.snapshot(st), use_bin_type=True))
    assert size < whole / 5, (size, whole)          # metadata, not 800 KB of bodies again
    _, _, payload = unpack_snapshot(log.snapshot_file(self_contained=False))
    assert snapshot_keep(payload) == snap["keep"]
    log.close()

    again = SpoolLog(tmp_path / "l", segment_bytes=100_000, fsync=False)
    s2, recs = again.recover()
    assert recs == []
    st2 = q.QueueState()
    st2.restore(s2)
    assert _bodies_of(st2) == bodies
    # the bodies keep their lsns: the next snapshot refers to the same frames
    assert st2.snapshot(again.segment_ranges())["keep"] == snap["keep"]


def test_sparse_segments_are_copied_in_and_dropped_full_ones_kept(tmp_path):
    log = SpoolLog(tmp_path / "l", segment_bytes=100_000, fsync=False)
    log.recover()
    st = q.QueueState()
    _fill(log, st, 300)
    segs = log.segment_ranges()
    first_seg_ids = [m for m in st.messages if st.bodies[m].lsn <= segs[0][1]]
    second_seg = [m for m in st.messages if segs[1][0] <= st.bodies[m].lsn <= segs[1][1]]
    # the first segment keeps one live body (sparse), the second keeps all of them
    _deliver(log, st, first_seg_ids[1:])
    keep_one = first_seg_ids[0]
    snap = st.snapshot(log.segment_ranges())
    assert st.bodies[keep_one].lsn == 0                     # copied in from now on
    assert [e for e in snap["bodies"] if e[0] == keep_one][0][1] == st.bodies[keep_one].data
    assert all(st.bodies[m].lsn for m in second_seg)
    log.write_snapshot(snap)
    firsts = [s[0] for s in log.segment_ranges()]
    assert segs[0][0] not in firsts and segs[1][0] in firsts
    log.close()
    again = SpoolLog(tmp_path / "l", segment_bytes=100_000, fsync=False)
    s2, _ = again.recover()
    st2 = q.QueueState()
    st2.restore(s2)
    assert _bodies_of(st2) == _bodies_of(st)


def test_compaction_keeps_the_log_bounded_by_the_live_bodies(tmp_path):
    """Round after round of messages accepted, most delivered, a few left: the segments kept
    hold the live bodies, not the whole history."""
    log = SpoolLog(tmp_path / "l", segment_bytes=100_000, fsync=False)
    log.recover()
    st = q.QueueState()
    for rnd in range(8):
        _fill(log, st, 200, start=rnd * 200)
        ids = sorted(st.messages)
        _deliver(log, st, [m for k, m in enumerate(ids) if k % 20])     # 1 in 20 stays
        log.write_snapshot(st.snapshot(log.segment_ranges()))
    live = st.body_bytes
    assert log.disk_bytes() < 4 * live + 600_000, (log.disk_bytes(), live)
    log.close()
    again = SpoolLog(tmp_path / "l", segment_bytes=100_000, fsync=False)
    s2, _ = again.recover()
    st2 = q.QueueState()
    st2.restore(s2)
    assert _bodies_of(st2) == _bodies_of(st)


def test_a_copy_without_the_frames_refuses_and_takes_the_self_contained_snapshot(tmp_path):
    leader = SpoolLog(tmp_path / "leader", segment_bytes=100_000, fsync=False)
    leader.recover()
    st = q.QueueState()
    bodies = _fill(leader, st, 200)
    leader.write_snapshot(st.snapshot(leader.segment_ranges()))
    copy = SpoolLog(tmp_path / "copy", segment_bytes=100_000, fsync=False)
    copy.recover()
    with pytest.raises(Unresolved, match="does not hold"):
        copy.install_snapshot(leader.snapshot_file(self_contained=False))
    whole = leader.snapshot_file()
    _, _, payload = unpack_snapshot(whole)
    assert snapshot_keep(payload) == []
    copy.install_snapshot(whole)
    copy.close()
    again = SpoolLog(tmp_path / "copy", fsync=False)
    s2, _ = again.recover()
    st2 = q.QueueState()
    st2.restore(s2)
    assert _bodies_of(st2) == bodies
    # a copy that holds the same frames (it was appended the leader's) takes the
    # referring snapshot and keeps what it names
    twin = SpoolLog(tmp_path / "twin", segment_bytes=100_000, fsync=False)
    twin.recover()
    twin.append_frames(_all_frames(tmp_path / "leader"))
    twin.install_snapshot(leader.snapshot_file(self_contained=False))
    twin.close()
    t2 = SpoolLog(tmp_path / "twin", fsync=False)
    s3, _ = t2.recover()
    st3 = q.QueueState()
    st3.restore(s3)
    assert _bodies_of(st3) == bodies


def _all_frames(d) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(d.glob("seg-*.log")))


def test_a_referred_frame_gone_from_disk_is_named_on_recovery(tmp_path):
    log = SpoolLog(tmp_path / "l", segment_bytes=100_000, fsync=False)
    log.recover()
    st = q.QueueState()
    _fill(log, st, 200)
    _fill(log, st, 10, start=1000)          # the last segment, always kept
    log.write_snapshot(st.snapshot(log.segment_ranges()))
    log.close()
    oldest = sorted((tmp_path / "l").glob("seg-*.log"))[0]
    oldest.unlink()
    from cluster.adapters.spool import SpoolCorrupt
    with pytest.raises(SpoolCorrupt, match="refers to .* frames the log does not hold"):
        SpoolLog(tmp_path / "l", fsync=False).recover()


@pytest.mark.parametrize("live,size,expect", [
    (30_000, 100_000, True), (20_000, 100_000, False), (0, 100_000, False)])
def test_reference_policy(live, size, expect):
    segs = [(1, 100, size), (101, 200, size)]
    refs = q.reference_segments([(5, live)] if live else [], segs)
    assert refs(5) is expect
    assert refs(150) is True          # the last segment is always kept
    assert refs(300) is False         # outside every segment: copied
