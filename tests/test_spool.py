"""Spool log on a real disk: durability boundaries, torn tails, corruption, snapshots."""

import os

import pytest

from cluster.adapters.spool import SpoolCorrupt, SpoolLog


def write(log, recs, epoch=1):
    frames, first = log.assign(recs, epoch)
    log.write(frames, first)
    return first


def test_records_survive_reopen_in_order(tmp_path):
    log = SpoolLog(tmp_path, segment_bytes=200)
    assert log.recover() == (None, [])
    for i in range(50):
        write(log, [["a", i, b"x" * 20], ["b", i]])
    log.close()
    assert len(list(tmp_path.glob("seg-*.log"))) > 1   # rotated
    log2 = SpoolLog(tmp_path, segment_bytes=200)
    snap, recs = log2.recover()
    assert snap is None and len(recs) == 100
    assert [lsn for _, lsn, _ in recs] == list(range(1, 101))
    assert recs[0][2] == ["a", 0, b"x" * 20]
    assert log2.next_lsn == 101


@pytest.mark.parametrize("cut", [1, 7, 21])
def test_torn_tail_is_cut_and_appending_continues(tmp_path, cut):
    log = SpoolLog(tmp_path)
    log.recover()
    write(log, [["r", 1]])
    write(log, [["r", 2], ["r", 3]])
    log.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    data = seg.read_bytes()
    seg.write_bytes(data[:-cut])         # crash in the middle of the last write
    log2 = SpoolLog(tmp_path)
    _, recs = log2.recover()
    assert [r for _, _, r in recs] == [["r", 1], ["r", 2]]
    write(log2, [["r", "after"]])
    log2.close()
    _, recs = SpoolLog(tmp_path).recover()
    assert [r for _, _, r in recs][-1] == ["r", "after"] and recs[-1][1] == 3


def test_corruption_in_a_closed_segment_is_an_error(tmp_path):
    log = SpoolLog(tmp_path, segment_bytes=50)
    log.recover()
    for i in range(10):
        write(log, [["r", i, b"y" * 30]])
    log.close()
    first = sorted(tmp_path.glob("seg-*.log"))[0]
    data = bytearray(first.read_bytes())
    data[30] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt):
        SpoolLog(tmp_path, segment_bytes=50).recover()


def test_snapshot_drops_covered_segments_and_recovers(tmp_path):
    log = SpoolLog(tmp_path, segment_bytes=100)
    log.recover()
    for i in range(40):
        write(log, [["r", i, b"z" * 40]])
    before = log.disk_bytes()
    log.write_snapshot({"lsn": 40, "state": "S"})
    write(log, [["r", "tail"]])
    assert log.disk_bytes() < before
    log.close()
    snap, recs = SpoolLog(tmp_path).recover()
    assert snap == {"lsn": 40, "state": "S"}
    assert [(lsn, r) for _, lsn, r in recs] == [(41, ["r", "tail"])]


def test_leftover_temporary_snapshot_is_ignored(tmp_path):
    log = SpoolLog(tmp_path)
    log.recover()
    write(log, [["r", 1]])
    log.close()
    (tmp_path / "snap-00000000000000000001.tmp").write_bytes(b"half a snapshot")
    snap, recs = SpoolLog(tmp_path).recover()
    assert snap is None and len(recs) == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_write_is_fsynced(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    log = SpoolLog(tmp_path)
    log.recover()
    calls.clear()
    write(log, [["r", i] for i in range(100)])
    assert len(calls) == 1   # one fsync for the whole batch: group commit


def test_failed_write_leaves_no_partial_frame(tmp_path, monkeypatch):
    log = SpoolLog(tmp_path)
    log.recover()
    write(log, [["r", 1]])
    frames, first = log.assign([["r", "lost"]], 1)
    real = os.fsync

    def broken(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        log.write(frames, first)
    monkeypatch.setattr(os, "fsync", real)
    assert log.next_lsn == first
    write(log, [["r", 2]])                 # the lsn is reused, the file has no garbage
    log.close()
    _, recs = SpoolLog(tmp_path).recover()
    assert [(lsn, r) for _, lsn, r in recs] == [(1, ["r", 1]), (2, ["r", 2])]


def test_assign_builds_the_frames_encode_frame_does_and_they_read_back(tmp_path):
    from cluster.adapters.spool import encode_frame, iter_headers
    log = SpoolLog(tmp_path)
    log.recover()
    write(log, [["e", 1]])
    recs = [["m", f"id{i}", b"x" * i, None, 1.5, {"k": "v"}] for i in range(40)]
    frames, first = log.assign(recs, 7)
    assert first == 2 and log.next_lsn == 42
    assert frames == b"".join(encode_frame(7, first + i, r) for i, r in enumerate(recs))
    assert [(e, lsn) for e, lsn, _s, _e in iter_headers(frames)] == [(7, n) for n in range(2, 42)]
    bad = bytearray(frames)
    bad[len(bad) // 2] ^= 1          # one flipped bit: the frames up to it still check out
    assert 0 < len(list(iter_headers(bytes(bad)))) < 40
