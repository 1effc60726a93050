"""A relay's connection budget (cluster/core/relay_slots.py): never more than the cap taken,
free slots go to the sites that waited longest, and what is not used is given back."""

from __future__ import annotations

import pytest

from cluster.core.relay_slots import RelaySlots

# each case: cap, steps (op, site, n, expected result), then (used, waiting) at the end.
# ops: take -> slots granted; give -> None; leave -> None; wake -> wakeable(); others ->
# others_waiting(site)
CASES = [
    ("under the cap: all asked for", 3,
     [("take", "a", 2, 2), ("take", "b", 1, 1)], (3, [])),
    ("at the cap: fewer, then none and the site waits", 3,
     [("take", "a", 2, 2), ("take", "b", 2, 1), ("take", "c", 1, 0)], (3, ["c"])),
    ("a slot that frees is kept for the longest waiting", 2,
     [("take", "a", 2, 2), ("take", "b", 1, 0), ("take", "c", 1, 0), ("give", "", 1, None),
      ("wake", "", 0, ["b"]), ("take", "c", 1, 0), ("take", "b", 3, 1)], (2, ["c"])),
    ("a newcomer waits behind the line even with slots free", 3,
     [("take", "a", 3, 3), ("take", "b", 1, 0), ("give", "", 1, None), ("take", "new", 1, 0),
      ("give", "", 1, None), ("wake", "", 0, ["b", "new"]), ("take", "new", 1, 1)],
     (2, ["b"])),
    ("a site that leaves the line frees its turn", 1,
     [("take", "a", 1, 1), ("take", "b", 1, 0), ("take", "c", 1, 0), ("leave", "b", 0, None),
      ("give", "", 1, None), ("wake", "", 0, ["c"]), ("take", "c", 1, 1)], (1, [])),
    ("others waiting: a busy site should let its slot go", 1,
     [("take", "a", 1, 1), ("others", "a", 0, False), ("take", "b", 1, 0),
      ("others", "a", 0, True), ("others", "b", 0, False)], (1, ["b"])),
    ("others waiting: the site itself in a line of two still sees the other one", 1,
     [("take", "a", 1, 1), ("take", "b", 1, 0), ("take", "c", 1, 0), ("others", "b", 0, True),
      ("others", "c", 0, True), ("others", "a", 0, True), ("leave", "c", 0, None),
      ("others", "b", 0, False), ("leave", "b", 0, None), ("others", "a", 0, False)], (1, [])),
    ("asking for nothing takes nothing and never queues", 1,
     [("take", "a", 1, 1), ("take", "b", 0, 0)], (1, [])),
    ("unused slots given back serve the next", 2,
     [("take", "a", 2, 2), ("give", "", 2, None), ("take", "b", 5, 2)], (2, [])),
]


@pytest.mark.parametrize("name, cap, steps, end", CASES, ids=[c[0] for c in CASES])
def test_relay_slots(name, cap, steps, end):
    s = RelaySlots(cap)
    for op, site, n, want in steps:
        if op == "take":
            got = s.take(site, n)
        elif op == "give":
            got = s.give(n)
        elif op == "leave":
            got = s.leave(site)
        elif op == "wake":
            got = s.wakeable()
        else:
            got = s.others_waiting(site)
        assert got == want, (op, site, n)
        assert 0 <= s.used <= cap
    assert (s.used, list(s.waiting)) == end
    assert s.peak <= cap


def test_a_long_line_keeps_its_order_and_only_its_head_is_served():
    s = RelaySlots(2)
    assert s.take("busy", 2) == 2
    for i in range(10_000):
        assert s.take(f"site{i}", 1) == 0
    assert s.take("site9999", 1) == 0 and list(s.waiting)[-1] == "site9999"   # its place kept
    s.give(1)
    assert s.wakeable() == ["site0"] and s.take("site5000", 1) == 0
    assert s.take("site0", 4) == 1 and len(s.waiting) == 9_999


@pytest.mark.parametrize("cap, give, words", [(0, 0, "max_connections must be >= 1"),
                                              (2, 3, "giving back 3 slots with 0 taken")])
def test_bad_use_is_refused_with_a_clear_error(cap, give, words):
    with pytest.raises(ValueError, match=words):
        RelaySlots(cap).give(give)


# keep(): each case: cap, then (wanted, held, expected) in order (each True holds one kept
# slot until the end), then how many are kept. A site whose queue still calls for the
# connections it has keeps its slot for the next connection, up to half the cap kept.
KEEP_CASES = [
    ("a giant with a queue for its connections keeps its slot", 10,
     [(10, 10, True)], 1),
    ("a queue that calls for fewer connections than held lets the slot go", 10,
     [(3, 10, False)], 0),
    ("exactly as many as held: kept", 10, [(1, 1, True)], 1),
    ("at most half the cap is kept: the other half goes round the line", 10,
     [(10, 10, True)] * 5 + [(10, 10, False)], 5),
    ("a cap of one keeps nothing (the line must move)", 1, [(5, 1, False)], 0),
]


@pytest.mark.parametrize("name, cap, asks, kept", KEEP_CASES, ids=[c[0] for c in KEEP_CASES])
def test_keep(name, cap, asks, kept):
    s = RelaySlots(cap)
    for wanted, held, want in asks:
        assert s.keep(wanted, held) is want, (wanted, held)
    assert s.kept == kept <= cap // 2


def test_unkeep_frees_a_kept_place_and_bad_use_is_refused():
    s = RelaySlots(4)
    assert s.keep(2, 1) and s.keep(2, 1) and not s.keep(2, 1)
    s.unkeep()
    assert s.keep(2, 1)
    with pytest.raises(ValueError, match="holds at least one, got 0"):
        s.keep(1, 0)
    for _ in range(2):
        s.unkeep()
    with pytest.raises(ValueError, match="unkeep\\(\\) without a kept slot"):
        s.unkeep()
