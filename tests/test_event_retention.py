"""Which event files rotation may delete, given webhook cursors, sizes and the retention cap
(cluster/core/event_retention.py): a table of cases."""

from __future__ import annotations

import pytest

from cluster.core.event_retention import plan_rotation

# five files of a shard, oldest first: events 1-10, 11-20, 21-30, 31-40, 41-... (the active
# one); with two kept, rotation alone deletes the first three
FILES = [(1, 100), (11, 100), (21, 100), (31, 100), (41, 50)]


@pytest.mark.parametrize("case, files, kept, cursors, cap, delete, held, capped, holders", [
    ("no endpoint: rotation as without retention",
     FILES, 2, {}, 1000, (1, 11, 21), (), (), ()),
    ("retention off (cap 0): an endpoint far behind holds nothing, is not named",
     FILES, 2, {"crm": 0}, 0, (1, 11, 21), (), (), ()),
    ("an endpoint that passed every candidate holds nothing",
     FILES, 2, {"crm": 30}, 1000, (1, 11, 21), (), (), ()),
    ("past the end of the log too",
     FILES, 2, {"crm": 99}, 1000, (1, 11, 21), (), (), ()),
    ("a cursor one short of a file's last seq holds that file and the newer ones",
     FILES, 2, {"crm": 29}, 1000, (1, 11), (21,), (), ()),
    ("a cursor at a file's last seq has passed it",
     FILES, 2, {"crm": 20}, 1000, (1, 11), (21,), (), ()),
    ("a cursor inside the oldest file holds every candidate",
     FILES, 2, {"crm": 5}, 1000, (), (1, 11, 21), (), ()),
    ("the lowest cursor of several decides",
     FILES, 2, {"a": 30, "b": 12, "c": 40}, 1000, (1,), (11, 21), (), ()),
    ("exactly at the cap: all held",
     FILES, 2, {"crm": 0}, 300, (), (1, 11, 21), (), ()),
    ("over the cap: the oldest held go, the endpoint before them is named",
     FILES, 2, {"crm": 0}, 250, (1,), (11, 21), (1,), ("crm",)),
    ("cap smaller than one file: nothing held, all capped",
     FILES, 2, {"crm": 0}, 99, (1, 11, 21), (), (1, 11, 21), ("crm",)),
    ("holders: only endpoints before a capped file, lowest cursor first",
     FILES, 2, {"z": 3, "a": 15, "m": 3, "ok": 40}, 100, (1, 11), (21,), (1, 11),
     ("m", "z", "a")),
    ("an endpoint that passed the capped file but not the held one is not named",
     FILES, 2, {"slow": 5, "mid": 12}, 200, (1,), (11, 21), (1,), ("slow",)),
    ("no more files than kept: nothing to delete, nothing held",
     FILES[:2], 2, {"crm": 0}, 1000, (), (), (), ()),
    ("one file kept, big files: each held file counts its own size",
     [(1, 400), (5, 10), (9, 400), (13, 1)], 1, {"crm": 1}, 420, (1,), (5, 9), (1,),
     ("crm",)),
    ("no files at all", [], 3, {"crm": 0}, 1000, (), (), (), ()),
])
def test_plan_rotation(case, files, kept, cursors, cap, delete, held, capped, holders):
    p = plan_rotation(files, kept, cursors, cap)
    assert (p.delete, p.held, p.capped, p.holders) == (delete, held, capped, holders), case
    sizes = dict(files)
    assert p.held_bytes == sum(sizes[f] for f in p.held) <= max(cap, 0), case
    # the files kept are always the newest ones, never fewer than files_kept
    assert [f for f, _ in files[len(p.delete):]] == [f for f, _ in files if f not in p.delete]
    assert len(files) - len(p.delete) >= min(kept, len(files)), case


@pytest.mark.parametrize("kept, cap, error", [
    (0, 100, "files_kept must be >= 1, got 0"),
    (2, -1, "retain_bytes must be >= 0, got -1"),
])
def test_bad_arguments_are_named(kept, cap, error):
    with pytest.raises(ValueError, match=error):
        plan_rotation(FILES, kept, {}, cap)
