"""Events a snapshot could not carry (cluster/core/event_holes.py): the arithmetic as tables,
then the whole hand-over on real event files — the old leader's EventLog builds the snapshot's
tail and holes (actors.webhooks.snapshot_events_tail), a new node's empty EventLog installs
them, and a reader at a webhook cursor is told exactly how many events it will never see."""

from __future__ import annotations

import orjson
import pytest

from actors.webhooks import snapshot_events_tail
from cluster.adapters.eventlog import EventLog
from cluster.core.event_holes import hole_gap, make_hole, merge_gaps, thin_points

HOLE = {"through": 100, "after": 0, "points": [[10, 80, True], [40, 50, True], [70, 25, False]]}


@pytest.mark.parametrize("case, since, hole, want", [
    ("at a counted point: its count, exact", 10, HOLE, (80, True)),
    ("another point", 40, HOLE, (50, True)),
    ("a point the old leader knew only a lower bound for", 70, HOLE, (25, False)),
    ("between points: the next point's count, a lower bound", 20, HOLE, (50, False)),
    ("before every point: the first point's count, a lower bound", 0, HOLE, (80, False)),
    ("after the last point, before through: at least 0", 90, HOLE, (0, False)),
    ("at through: past the hole", 100, HOLE, None),
    ("beyond it", 5000, HOLE, None),
    ("before the node's own events: not in the way yet", 5, {**HOLE, "after": 8}, None),
    ("at the node's last own event: in the way", 10, {**HOLE, "after": 10}, (80, True)),
    ("no points at all", 3, {"through": 50, "points": []}, (0, False)),
])
def test_hole_gap(case, since, hole, want):
    assert hole_gap(since, hole) == want, case


@pytest.mark.parametrize("case, n, limit, want", [
    ("under the limit: all", 3, 5, [0, 1, 2]),
    ("thinned evenly, first and last kept", 9, 3, [0, 4, 8]),
    ("limit 1: the last (nearest through)", 9, 1, [8]),
    ("limit 2", 10, 2, [0, 9]),
])
def test_thin_points(case, n, limit, want):
    pts = [(i, 100 - i, True) for i in range(n)]
    assert [p[0] for p in thin_points(pts, limit)] == want, case


def test_thin_points_refuses_a_limit_below_one():
    with pytest.raises(ValueError, match="limit must be >= 1"):
        thin_points([], 0)


@pytest.mark.parametrize("case, through, cursors, index, limit, want", [
    ("nothing before the first event", 0, [(0, 0, True)], [], 4, None),
    ("cursors kept whatever the limit; index points thinned; those at or past through dropped",
     100, [(5, 90, True), (99, 1, True), (100, 0, True)],
     [(s, 100 - s, True) for s in range(10, 110, 10)], 2,
     [[5, 90, True], [10, 90, True], [90, 10, True], [99, 1, True]]),
    ("a cursor at an index seq: the cursor's (possibly inexact) count wins", 50,
     [(20, 33, False)], [(20, 30, True), (40, 10, True)], 8,
     [[20, 33, False], [40, 10, True]]),
])
def test_make_hole(case, through, cursors, index, limit, want):
    got = make_hole(through, cursors, index, limit)
    assert (got if got is None else got["points"]) == want, case


@pytest.mark.parametrize("case, parts, want", [
    ("none", [], None),
    ("rotated away and a hole add up; exact only if both are", [(40, 10, True), (100, 5, False)],
     {"first_seq": 8, "last_seq": 100, "events": 15, "exact": False}),
    ("one exact part", [(50, 42, True)],
     {"first_seq": 8, "last_seq": 50, "events": 42, "exact": True}),
])
def test_merge_gaps(case, parts, want):
    assert merge_gaps(7, parts) == want, case


# ---------------------------------------------------------------- on real event files
def _events(n, every=1):
    # not every record makes an event: seqs with holes of their own
    return [{"seq": s, "type": "Delivery", "id": f"m{s}", "pad": "x" * 40}
            for s in range(1, n * every + 1, every)]


def _old_leader(tmp_path, n, every):
    old = EventLog(tmp_path / "old", file_bytes=20_000, files_kept=64)
    evs = _events(n, every)
    for i in range(0, len(evs), 333):
        old.write(evs[i:i + 333])
    return old, evs


@pytest.mark.parametrize("every", [1, 3])
def test_a_leader_rebuilt_elsewhere_reports_exactly_what_its_snapshot_left_out(tmp_path,
                                                                               every):
    old, evs = _old_leader(tmp_path, 6000, every)
    behind, caught_up = evs[700]["seq"], evs[5990]["seq"]
    tail, holes = snapshot_events_tail(old, 2_000, 40_000, [behind, caught_up])
    lines = [orjson.loads(x) for x in tail.splitlines()]
    first = lines[0]["seq"]
    # the newest events, up to the held size (not the default 2,000 bytes: one is behind)
    assert 40_000 - 200 < len(tail) <= 40_000 and lines[-1]["seq"] == evs[-1]["seq"]
    assert len(holes) == 1 and holes[0]["through"] == first - 1
    new = EventLog(tmp_path / "new")                 # another node: no event files
    assert new.write_lines(tail) == sum(1 for e in evs if e["seq"] >= first)
    assert new.install_holes(holes, new_last := 0) == 1 and new_last == 0
    lost = sum(1 for e in evs if behind < e["seq"] < first)
    assert lost > 4000
    # the endpoint that was behind: told exactly, once it reads it jumps past the hole
    assert new.gap(behind) == {"first_seq": behind + 1, "last_seq": first - 1, "events": lost,
                               "exact": True}
    assert new.read(behind, 1)[0]["seq"] == first and new.gap(first) is None
    # the endpoint that was caught up loses nothing: the newest events were carried
    assert new.gap(caught_up) is None
    assert [e["seq"] for e in new.read(caught_up)] == [e["seq"] for e in evs[5991:]]
    # a reader between counted points: a lower bound, never more than the truth
    mid = evs[3000]["seq"] + every // 2
    g = new.gap(mid)
    truth = sum(1 for e in evs if mid < e["seq"] < first)
    assert g is not None and not g["exact"] and truth - 256 <= g["events"] <= truth
    # the holes file survives a restart of the new leader on its node
    new.close()
    assert EventLog(tmp_path / "new").gap(behind)["events"] == lost


def test_holes_chain_through_a_second_move_and_count_rotated_away_events(tmp_path):
    # the old leader had itself rotated its oldest files away (their seq lists are kept)
    old = EventLog(tmp_path / "old", file_bytes=20_000, files_kept=3)
    evs = _events(3000)
    for i in range(0, len(evs), 100):
        old.write(evs[i:i + 100])
    assert old.gap(50)["exact"] and old.gap(50)["events"] > 1000
    tail, holes = snapshot_events_tail(old, 2_000, 10_000, [50])
    first = holes[0]["through"] + 1
    second = EventLog(tmp_path / "second")
    second.write_lines(tail)
    second.install_holes(holes, 0)
    assert second.gap(50) == {"first_seq": 51, "last_seq": first - 1,
                              "events": sum(1 for e in evs if 50 < e["seq"] < first),
                              "exact": True}
    second.write([{**e, "seq": e["seq"] + 10_000} for e in evs[:500]])   # its own, later
    # a second move, from the second node: the first hole is counted into the second's
    tail2, holes2 = snapshot_events_tail(second, 2_000, 10_000, [50])
    third = EventLog(tmp_path / "third")
    third.write_lines(tail2)
    third.install_holes(holes2, 0)
    first2 = holes2[0]["through"] + 1
    truth = sum(1 for e in evs if e["seq"] > 50) + sum(
        1 for e in evs[:500] if e["seq"] + 10_000 < first2)
    assert third.gap(50) == {"first_seq": 51, "last_seq": first2 - 1, "events": truth,
                             "exact": True}


def test_without_webhook_cursors_the_hole_is_still_reported_as_a_lower_bound(tmp_path):
    old, _ = _old_leader(tmp_path, 2000, 1)
    tail, holes = snapshot_events_tail(old, 2_000, 40_000, [])
    assert len(tail) <= 2_000 and len(holes) == 1
    new = EventLog(tmp_path / "new")
    new.write_lines(tail)
    new.install_holes(holes, 0)
    g = new.gap(0)
    assert g is not None and g["last_seq"] == holes[0]["through"] and not g["exact"]


def test_a_node_whose_files_cover_the_snapshot_installs_nothing(tmp_path):
    old, evs = _old_leader(tmp_path, 2000, 1)
    _, holes = snapshot_events_tail(old, 2_000, 40_000, [10])
    # the same node (a restart in place): its files go past the hole
    assert old.install_holes(holes, old.last_seq) == 0 and old.gap(10) is None
    # nothing before the tail at all: no hole
    small = EventLog(tmp_path / "small")
    small.write(evs[:5])
    assert snapshot_events_tail(small, 2_000, 40_000, [0])[1] == []


def test_the_dispatcher_counts_a_gap_asked_about_again_once():
    # a hole with no event after it yet is reported at every poll from the same cursor
    from actors.webhooks import WebhookDispatcher
    from cluster.config import parse_config
    d = WebhookDispatcher(parse_config({"webhooks": [
        {"name": "crm", "url": "http://127.0.0.1:9/hook", "secret": "s" * 24}]}))
    w = d._workers[0]
    gap = {"first_seq": 12, "last_seq": 191, "events": 178, "exact": True}
    for _ in range(3):
        d._skipped(w, dict(gap))
    assert d.counters["crm"]["skipped_events"] == 178
    d._skipped(w, {**gap, "first_seq": 300, "last_seq": 400, "events": 7})   # a later one
    assert d.counters["crm"]["skipped_events"] == 185
    assert d.counters["crm"]["skipped"][0]["events"] == 7
