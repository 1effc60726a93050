"""Event files: bounded by rotation, read by cursor, repaired after a torn last line."""

from cluster.adapters.eventlog import EventLog


def ev(i):
    return {"seq": i, "type": "Delivery", "id": f"m{i}"}


def test_rotation_keeps_a_bounded_number_of_files(tmp_path):
    log = EventLog(tmp_path, file_bytes=200, files_kept=3)
    for i in range(1, 200):
        log.write([ev(i)])
    assert len(list(tmp_path.glob("events-*.jsonl"))) == 3
    got = log.read(0)
    assert got[-1]["seq"] == 199 and got == sorted(got, key=lambda e: e["seq"])


def test_read_since_a_cursor_and_limit(tmp_path):
    log = EventLog(tmp_path, file_bytes=300)
    log.write([ev(i) for i in range(1, 101)])
    assert [e["seq"] for e in log.read(95)] == [96, 97, 98, 99, 100]
    assert [e["seq"] for e in log.read(10, limit=3)] == [11, 12, 13]
    assert log.read(100) == []


def test_events_at_or_below_last_seq_are_not_written_twice(tmp_path):
    log = EventLog(tmp_path)
    log.write([ev(1), ev(2)])
    log.close()
    again = EventLog(tmp_path)
    assert again.last_seq == 2
    again.write([ev(2), ev(3)])          # replay after a restart overlaps what was written
    assert [e["seq"] for e in again.read(0)] == [1, 2, 3]


def test_a_torn_last_line_is_dropped_on_open(tmp_path):
    log = EventLog(tmp_path)
    log.write([ev(1), ev(2)])
    log.close()
    f = next(tmp_path.glob("events-*.jsonl"))
    f.write_bytes(f.read_bytes() + b'{"seq": 3, "ty')
    again = EventLog(tmp_path)
    assert again.last_seq == 2
    again.write([ev(3)])
    assert [e["seq"] for e in again.read(0)] == [1, 2, 3]


def test_read_seeks_near_the_cursor_and_agrees_with_a_full_scan(tmp_path):
    log = EventLog(tmp_path, file_bytes=1 << 20)
    for start in range(1, 5001, 100):
        log.write([ev(i) for i in range(start, start + 100)])
    for since in (0, 1, 255, 256, 257, 1000, 4999, 5000):
        got = [e["seq"] for e in log.read(since, limit=20)]
        assert got == list(range(since + 1, min(since + 21, 5001))), since
    log.close()
    again = EventLog(tmp_path, file_bytes=1 << 20)   # index rebuilt from the file
    again.write([ev(5001)])
    assert [e["seq"] for e in again.read(4998)] == [4999, 5000, 5001]
    seqs, offs = again._index[next(tmp_path.glob("events-*.jsonl")).name]
    assert len(seqs) == len(offs) > 10   # sparse: one entry per 256 lines


def test_the_index_kept_while_writing_equals_the_one_rebuilt_from_the_files(tmp_path):
    """Batches of every size (none, one, around the 256-line stride, several strides), with
    rotations and a replayed overlap: the index built as lines are written is the one a
    reader rebuilds by scanning the files."""
    import random
    rng = random.Random(7)
    log = EventLog(tmp_path, file_bytes=40_000, files_kept=100)
    seq = 0
    for _ in range(80):
        n = rng.choice([0, 1, 2, 99, 255, 256, 257, 511, 700])
        start = max(0, seq - rng.choice([0, 0, 0, 5]))       # sometimes a replayed overlap
        log.write([{"seq": s, "type": "Reception", "id": f"m{s}", "pad": "x" * (s % 40)}
                   for s in range(start + 1, start + n + 1)])
        seq = max(seq, start + n)
    assert log.last_seq == seq
    files = list(tmp_path.glob("events-*.jsonl"))
    assert len(files) > 5
    kept = {name: (list(s), list(o)) for name, (s, o) in log._index.items()}
    log._index.clear()
    for p in files:
        assert log._file_index(p) == kept[p.name], p.name
    assert [e["seq"] for e in log.read(0, limit=10**6)] == list(range(1, seq + 1))


def test_a_snapshot_tail_rebuilds_the_newest_events_in_an_empty_directory(tmp_path):
    """What a snapshot carries (tail_bytes) is whole lines, newest last, within its bound,
    across rotated files; written into a new node's empty event directory it reads back
    exactly as the old one did, and what is already there is not written twice."""
    old = EventLog(tmp_path / "old", file_bytes=500)
    old.write([ev(i) for i in range(1, 301)])
    line = len(b'{"seq":100,"type":"Delivery","id":"m100"}\n')
    tail = old.tail_bytes(60 * line)
    assert len(tail) <= 60 * line and tail.endswith(b"\n")
    seqs = [e["seq"] for e in (EventLog(tmp_path / "probe").read(0) or [])]
    assert seqs == []
    new = EventLog(tmp_path / "new", file_bytes=500)
    n = new.write_lines(tail)
    assert 55 <= n <= 60, n
    assert new.read(0) == old.read(300 - n)
    assert new.last_seq == 300
    assert new.write_lines(tail) == 0          # a second restore of the same snapshot
    # then the records after the snapshot, replayed, continue the stream
    new.write([ev(301)])
    assert [e["seq"] for e in new.read(299)] == [300, 301]
    # the whole log fits: every event
    assert EventLog(tmp_path / "all").write_lines(old.tail_bytes(1 << 30)) == 300


# ------------------------------------------------------------- events rotated away from a reader
def _rotated(tmp_path, n=200, step=2, kept=2):
    """Events at every ``step``-th seq (records without events in between), rotated often."""
    log = EventLog(tmp_path, file_bytes=300, files_kept=kept, seq_files_kept=kept)
    for i in range(step, n * step + 1, step):
        log.write([ev(i)])
    return log


def test_a_reader_behind_rotation_learns_exactly_how_many_events_it_lost(tmp_path):
    log = _rotated(tmp_path)
    first = log.read(0, limit=1)[0]["seq"]         # the oldest event still in a file
    assert first > 2
    assert log.gap(first - 1) is None              # nothing lost after the last lost one
    assert log.gap(first - 2) is None
    assert log.gap(400) is None
    for since in (first - 3, first - 4, first - 10, first - 11):
        g = log.gap(since)
        # events are at even seqs: those in (since, first) are the lost ones
        lost = len([s for s in range(since + 1, first) if s % 2 == 0])
        assert g == {"first_seq": since + 1, "last_seq": first - 2, "events": lost,
                     "exact": True}, (since, g)


def test_a_reader_older_than_the_kept_seq_lists_gets_a_lower_bound(tmp_path):
    log = _rotated(tmp_path)
    lists = sorted(tmp_path.glob("events-*.seqs"))
    assert len(lists) == 2                         # bounded
    assert (tmp_path / "events-dropped.json").exists()
    g = log.gap(0)
    assert g is not None and g["exact"] is False and g["first_seq"] == 1
    first = log.read(0, limit=1)[0]["seq"]
    assert g["last_seq"] == first - 2 and 0 < g["events"] < first // 2
    log.close()
    # the lists survive a restart
    assert EventLog(tmp_path, file_bytes=300, files_kept=2, seq_files_kept=2).gap(0) == g


# ---------------------------------------------------------------- retention for webhook cursors
def _held_log(tmp_path, cursors, retain_bytes, capped=None):
    return EventLog(tmp_path, file_bytes=300, files_kept=2, seq_files_kept=100,
                    retain_bytes=retain_bytes, holds=lambda: cursors, on_capped=capped)


def test_files_an_endpoint_has_not_passed_are_kept_until_it_passes_them(tmp_path):
    cursors = {"crm": 0}
    log = _held_log(tmp_path, cursors, retain_bytes=1 << 20)
    for i in range(1, 201):
        log.write([ev(i)])
    # nothing deleted: the reader at the endpoint's cursor gets every event, no gap
    assert [e["seq"] for e in log.read(0, limit=1000)] == list(range(1, 201))
    assert log.gap(0) is None
    held = dict(log.retention)
    assert held["held_files"] == len(list(tmp_path.glob("events-*.jsonl"))) - 2 > 10
    assert held["capped_files"] == 0
    # the endpoint acknowledges up to 150: at the next rotation the files before it go
    cursors["crm"] = 150
    for _ in range(20):                            # up to the next rotation
        log.write([ev(log.last_seq + 1)])
        if log.retention["held_files"] != held["held_files"]:
            break
    first = log.read(0, limit=1)[0]["seq"]
    assert 140 < first <= 151                      # the file holding 151 stays
    assert log.gap(150) is None
    assert log.gap(0)["last_seq"] == first - 1     # a reader without a cursor lost them


def test_past_retain_bytes_the_oldest_go_and_the_endpoint_is_named(tmp_path):
    plans = []
    log = _held_log(tmp_path, {"crm": 0, "fast": 10_000}, retain_bytes=1200,
                    capped=plans.append)
    for i in range(1, 201):
        log.write([ev(i)])
    files = sorted(tmp_path.glob("events-*.jsonl"))
    held = sum(p.stat().st_size for p in files[:-2])
    assert 0 < held <= 1200 and log.retention["held_bytes"] == held
    assert plans and all(p.holders == ("crm",) for p in plans)
    assert log.retention["capped_files"] == sum(len(p.capped) for p in plans)
    assert log.retention["last_capped"]["endpoints"] == ["crm"]
    # what went at the cap is reported exactly, as without retention
    first = log.read(0, limit=1)[0]["seq"]
    assert log.gap(0) == {"first_seq": 1, "last_seq": first - 1, "events": first - 1,
                          "exact": True}


def test_an_endpoint_no_longer_configured_holds_nothing(tmp_path):
    cursors = {"crm": 0}
    log = _held_log(tmp_path, cursors, retain_bytes=1 << 20)
    for i in range(1, 101):
        log.write([ev(i)])
    assert log.retention["held_files"] > 5
    cursors.clear()                                # (the coordinator passes configured ones)
    log.write([ev(i) for i in range(101, 120)])
    log.write([ev(120)])
    assert len(list(tmp_path.glob("events-*.jsonl"))) == 2
    assert log.retention["held_files"] == 0 and log.retention["capped_files"] == 0
