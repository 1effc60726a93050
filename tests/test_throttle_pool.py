"""Shared throttle pool: which throttle owns a site, how many, where, and the move window."""

import pytest

from cluster.core.throttle_pool import (
    AUTO_MAX,
    MOVE_WINDOW,
    PoolView,
    auto_count,
    place_throttles,
    pool_names,
    pool_owner,
)

SITES = [f"mx{i}.site{i}.test" for i in range(3000)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_every_throttle_gets_a_fair_share_of_sites(n):
    counts = {name: 0 for name in pool_names(n)}
    for s in SITES:
        counts[pool_owner(s, n)] += 1
    assert set(counts) == set(pool_names(n))
    for c in counts.values():   # within 20 % of even
        assert abs(c - len(SITES) / n) < 0.2 * len(SITES) / n, counts


@pytest.mark.parametrize("old, new", [(1, 2), (2, 3), (3, 4), (4, 8)])
def test_growing_the_pool_moves_only_a_share_and_only_to_new_throttles(old, new):
    moved = [s for s in SITES if pool_owner(s, old) != pool_owner(s, new)]
    new_names = set(pool_names(new)) - set(pool_names(old))
    assert all(pool_owner(s, new) in new_names for s in moved)
    share = (new - old) / new
    assert abs(len(moved) / len(SITES) - share) < 0.05, (len(moved), share)


@pytest.mark.parametrize("nodes, cap, want", [
    (0, AUTO_MAX, 1), (1, AUTO_MAX, 1), (3, AUTO_MAX, 3), (40, AUTO_MAX, AUTO_MAX), (5, 2, 2),
])
def test_auto_count_is_one_per_hosting_node_capped(nodes, cap, want):
    assert auto_count(nodes, cap) == want


@pytest.mark.parametrize("n, nodes, placed, want", [
    # nothing running: one per node
    (3, ["a", "b", "c"], {}, {0: "a", 1: "b", 2: "c"}),
    # 0 runs on c: it stays, the new ones fill a and b
    (3, ["a", "b", "c"], {0: "c"}, {0: "c", 1: "a", 2: "b"}),
    # a node joined (d): the new throttle goes there
    (4, ["a", "b", "c", "d"], {0: "a", 1: "b", 2: "c"}, {0: "a", 1: "b", 2: "c", 3: "d"}),
    # more throttles than nodes: spread evenly
    (4, ["a", "b"], {}, {0: "a", 1: "b", 2: "a", 3: "b"}),
    # a throttle on a node that left is placed again
    (2, ["a", "b"], {0: "gone", 1: "a"}, {0: "b", 1: "a"}),
])
def test_throttles_go_to_distinct_nodes_and_running_ones_stay(n, nodes, placed, want):
    names = pool_names(n)
    got = place_throttles(names, nodes, {names[k]: v for k, v in placed.items()})
    assert got == {names[k]: v for k, v in want.items()}


def test_placing_without_nodes_is_an_error():
    with pytest.raises(ValueError, match="no live node"):
        place_throttles(pool_names(1), [], {})


def test_the_move_window_names_the_previous_owner_only_of_moved_sites():
    v = PoolView(1, 1, 0.0).resized(2, 1000.0)
    assert v == PoolView(2, 1, 1000.0) and v.resized(2, 5000.0) is v
    moved = [s for s in SITES[:200] if v.owner(s) != pool_owner(s, 1)]
    stayed = [s for s in SITES[:200] if s not in moved]
    assert moved and stayed
    assert all(v.previous_owner(s, 1001.0) == "throttle:pool:0" for s in moved)
    assert all(v.previous_owner(s, 1001.0) is None for s in stayed)
    assert v.moving(1000.0 + MOVE_WINDOW - 1) and not v.moving(1000.0 + MOVE_WINDOW)
    assert all(v.previous_owner(s, 1000.0 + MOVE_WINDOW) is None for s in moved)
    assert PoolView.from_wire(v.to_wire()) == v


def test_a_pool_of_no_throttles_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        pool_names(0)
    with pytest.raises(ValueError, match="throttle pool of 0"):
        PoolView(0, 1, 0.0)
