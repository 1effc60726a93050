"""DNS query slots (cluster/core/dns_slots.py): never more than ``max_concurrent`` queries in
flight, the waiting ones started in line order (follow-ups first), a freed slot handed over."""

from __future__ import annotations

import pytest

from cluster.core.dns_slots import QuerySlots

# each case: limit, steps (op, item, expected result), then (active, waiting) at the end.
# ops: ask -> started now?; first -> ask(first=True); done -> the item that takes the slot
CASES = [
    ("under the limit: each starts at once", 2,
     [("ask", "a", True), ("ask", "b", True)], (2, [])),
    ("at the limit: the next waits", 2,
     [("ask", "a", True), ("ask", "b", True), ("ask", "c", False), ("ask", "d", False)],
     (2, ["c", "d"])),
    ("a query that ends hands its slot to the oldest waiter", 1,
     [("ask", "a", True), ("ask", "b", False), ("ask", "c", False), ("done", "", "b")],
     (1, ["c"])),
    ("a follow-up goes to the head of the line", 1,
     [("ask", "mx1", True), ("ask", "mx2", False), ("first", "a1", False), ("done", "", "a1"),
      ("done", "", "mx2")], (1, [])),
    ("nothing waiting: the slot is freed", 2,
     [("ask", "a", True), ("ask", "b", True), ("done", "", None), ("done", "", None)],
     (0, [])),
    ("a freed slot serves the next ask", 1,
     [("ask", "a", True), ("done", "", None), ("ask", "b", True)], (1, [])),
    ("a follow-up under the limit starts at once", 3,
     [("ask", "a", True), ("first", "b", True)], (2, [])),
]


@pytest.mark.parametrize("name, limit, steps, end", CASES, ids=[c[0] for c in CASES])
def test_query_slots(name, limit, steps, end):
    s: QuerySlots[str] = QuerySlots(limit)
    for op, item, want in steps:
        if op == "done":
            got = s.done()
        else:
            got = s.ask(item, first=op == "first")
        assert got == want, (op, item)
        assert 0 <= s.active <= limit
    assert (s.active, list(s.waiting)) == end
    assert s.peak <= limit


def test_peak_counts_the_most_in_flight_and_reset_forgets_all():
    s: QuerySlots[int] = QuerySlots(3)
    for i in range(5):
        s.ask(i)
    assert (s.active, s.peak, len(s.waiting)) == (3, 3, 2)
    s.reset()
    assert (s.active, s.peak, len(s.waiting)) == (0, 3, 0)
    assert s.ask(9) is True


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "4"])
def test_a_bad_limit_is_refused_naming_the_setting(limit):
    with pytest.raises(ValueError, match="max_concurrent"):
        QuerySlots(limit)


def test_done_without_a_slot_taken_is_an_error():
    with pytest.raises(ValueError, match="without a slot"):
        QuerySlots(1).done()
