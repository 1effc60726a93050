"""ReadySites: ready mail by site, kept as it changes (cluster/core/ready_sites.py)."""

from __future__ import annotations

import pytest

from cluster.core.ready_sites import ReadySites


def _idx(*placed: tuple[str, str | None, int]) -> ReadySites[str]:
    idx: ReadySites[str] = ReadySites()
    for domain, site, n in placed:
        idx.place(domain, site, n, None if site is None else f"info:{site}")
    return idx


@pytest.mark.parametrize("placed, ready, domains", [
    # one domain per site
    ([("a.test", "mx.a", 3)], {"mx.a": 3}, {"mx.a": ["a.test"]}),
    # two domains on one site add up, in the order they got mail
    ([("g1.test", "g", 2), ("g2.test", "g", 5)], {"g": 7}, {"g": ["g1.test", "g2.test"]}),
    # a count that changes replaces the domain's old one
    ([("a.test", "s", 2), ("a.test", "s", 9)], {"s": 9}, {"s": ["a.test"]}),
    # a domain that moves site (its route changed) leaves the old one
    ([("a.test", "s1", 2), ("b.test", "s1", 1), ("a.test", "s2", 4)],
     {"s1": 1, "s2": 4}, {"s1": ["b.test"], "s2": ["a.test"]}),
    # nothing ready, or no usable route: the domain is not counted; an emptied site goes
    ([("a.test", "s", 2), ("a.test", "s", 0)], {}, {}),
    ([("a.test", "s", 2), ("a.test", None, 2)], {}, {}),
    ([("a.test", None, 5)], {}, {}),
])
def test_place_keeps_ready_by_site(placed, ready, domains) -> None:
    idx = _idx(*placed)
    assert idx.ready == ready
    assert {s: list(d) for s, d in idx.domains.items()} == domains
    assert set(idx.info) == set(ready)


@pytest.mark.parametrize("steps, due_at, want", [
    # placed sites are active, in the order they got mail
    ([], 0.0, ["a", "b", "c"]),
    # a held site comes back (at the back) when its time has come, not before
    ([("hold", "a", 5.0)], 4.9, ["b", "c"]),
    ([("hold", "a", 5.0)], 5.0, ["b", "c", "a"]),
    # a later hold replaces an earlier one
    ([("hold", "a", 5.0), ("hold", "a", 9.0)], 6.0, ["b", "c"]),
    # a parked site waits for wake, whatever the time
    ([("park", "b", 0.0)], 1e9, ["a", "c"]),
    ([("park", "b", 0.0), ("wake", "b", 0.0)], 0.0, ["a", "c", "b"]),
    # wake does not end a throttle's hold
    ([("hold", "b", 5.0), ("wake", "b", 0.0)], 1.0, ["a", "c"]),
    # a served site goes to the back: the next round starts with the others
    ([("served", "a", 0.0)], 0.0, ["b", "c", "a"]),
    ([("served", "a", 0.0), ("served", "b", 0.0)], 0.0, ["c", "a", "b"]),
    # more mail for a held or parked site does not make it active
    ([("hold", "a", 5.0), ("more", "a", 0.0)], 1.0, ["b", "c"]),
    ([("park", "a", 0.0), ("more", "a", 0.0)], 1.0, ["b", "c"]),
    # a site that lost its mail forgets its hold: new mail makes it active at once
    ([("hold", "a", 5.0), ("empty", "a", 0.0), ("more", "a", 0.0)], 1.0, ["b", "c", "a"]),
])
def test_due_sites_in_fair_order(steps, due_at, want) -> None:
    idx = _idx(("a.test", "a", 1), ("b.test", "b", 1), ("c.test", "c", 1))
    for op, site, t in steps:
        if op == "hold":
            idx.hold(site, t)
        elif op == "park":
            idx.park(site)
        elif op == "wake":
            idx.wake(site)
        elif op == "served":
            idx.served(site)
        elif op == "more":
            idx.place(f"{site}.test", site, 2, f"info:{site}")
        elif op == "empty":
            idx.place(f"{site}.test", site, 0)
    assert idx.due(due_at) == want


def test_states_and_next_release() -> None:
    idx = _idx(("a.test", "a", 1), ("b.test", "b", 1), ("c.test", "c", 1))
    idx.hold("a", 7.0)
    idx.hold("b", 3.0)
    idx.park("c")
    assert [idx.state(s) for s in ("a", "b", "c", "zzz")] == ["held", "held", "parked", ""]
    assert idx.next_release() == 3.0
    assert idx.due(3.0) == ["b"]
    assert idx.next_release() == 7.0
    # hold or park of a site without ready mail is a no-op
    idx.hold("zzz", 1.0)
    idx.park("zzz")
    assert "zzz" not in idx and idx.state("zzz") == ""


def test_superseded_timers_stay_bounded() -> None:
    idx = _idx(("a.test", "a", 1))
    for k in range(10_000):
        idx.hold("a", 1000.0 + k)
    assert len(idx._timers) < 200
    assert idx.due(10_999.0) == ["a"]


@pytest.mark.parametrize("domain, site, n, info, err", [
    ("a.test", "s", -1, "i", "negative"),
    ("a.test", "s", 1, None, "without its info"),
])
def test_bad_input_named(domain, site, n, info, err) -> None:
    with pytest.raises(ValueError, match=err):
        ReadySites().place(domain, site, n, info)
