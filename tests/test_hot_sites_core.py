"""Relay choice for sites (rendezvous hashing, hot-site spreading), egress sources tied to
nodes, and fair connection shares between the relays of one site: the pure parts."""

from __future__ import annotations

import pytest

from cluster.core.ratespec import RateSpec
from cluster.core.relay_choice import (
    NodeInfo,
    choose_relays,
    rank_relays,
    relay_node,
    source_nodes,
    split_counts,
    spread_count,
)
from cluster.core.sites import SiteLimits, limits_from_wire, limits_to_wire, stable_hash
from cluster.core.throttle import ThrottleBook

SITES = [f"mx{i}.site{i % 97}.test" for i in range(3000)]


def _relays(n: int) -> list[str]:
    return [f"relay:node{i:07d}ab:default" for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_adding_a_relay_moves_only_its_share_of_sites(n):
    before = _relays(n)
    after = [*before, "relay:newnode0000:default"]
    moved = [s for s in SITES if choose_relays(s, before, 1) != choose_relays(s, after, 1)]
    # every site that moves goes to the new relay, and about 1/(n+1) of them move
    assert all(choose_relays(s, after, 1) == [after[-1]] for s in moved)
    share = len(moved) / len(SITES)
    assert abs(share - 1 / (n + 1)) < 0.05, (n, share)
    # modulo hashing, for comparison, moves most sites
    mod = sum(1 for s in SITES if stable_hash(s) % n != stable_hash(s) % (n + 1))
    assert mod / len(SITES) > 0.4


@pytest.mark.parametrize("n", [3, 5])
def test_removing_a_relay_moves_only_the_sites_it_carried(n):
    relays = _relays(n)
    gone = relays[1]
    rest = [r for r in relays if r != gone]
    for s in SITES:
        was = choose_relays(s, relays, 1)[0]
        now = choose_relays(s, rest, 1)[0]
        assert now == was or was == gone


def test_sites_spread_evenly_over_relays():
    relays = _relays(4)
    counts = {r: 0 for r in relays}
    for s in SITES:
        counts[choose_relays(s, relays, 1)[0]] += 1
    assert min(counts.values()) > 0.8 * len(SITES) / 4


@pytest.mark.parametrize("relays,k,want_nodes", [
    # three nodes, two sources each: k=3 takes one relay per node
    ([f"relay:n{i}:{src}" for i in range(3) for src in ("a", "b")], 3, 3),
    # two nodes only: k=3 takes both nodes, then the next ranked relay
    ([f"relay:n{i}:{src}" for i in range(2) for src in ("a", "b")], 3, 2),
    ([f"relay:n{i}:a" for i in range(5)], 2, 2),
])
def test_hot_site_takes_top_k_on_distinct_nodes_first(relays, k, want_nodes):
    for site in SITES[:200]:
        got = choose_relays(site, relays, k)
        assert len(got) == k and len(set(got)) == k
        assert len({relay_node(r) for r in got}) == want_nodes
        # the first is always the site's top relay: a site turning hot keeps its relay
        assert got[0] == rank_relays(site, relays)[0]


@pytest.mark.parametrize("relays", [[], ["relay:n0:a"]])
@pytest.mark.parametrize("k", [1, 3])
def test_with_one_relay_or_none_every_site_gets_what_there_is(relays, k):
    """A one-node cluster's long tail: no ranking, the same answer as the ranked choice."""
    for site in SITES[:50]:
        assert choose_relays(site, relays, k) == relays == rank_relays(site, relays)


def test_top_k_is_stable_when_an_unrelated_relay_leaves():
    relays = _relays(6)
    for site in SITES[:300]:
        top3 = choose_relays(site, relays, 3)
        other = next(r for r in relays if r not in top3)
        assert choose_relays(site, [r for r in relays if r != other], 3) == top3


@pytest.mark.parametrize("kw,want", [
    (dict(ready=10, configured=0, hot_ready=500, hot_relays=3, max_connections=10,
          available=3), 1),                                    # cold site: one relay
    (dict(ready=500, configured=0, hot_ready=500, hot_relays=3, max_connections=10,
          available=3), 3),                                    # hot: spread
    (dict(ready=5000, configured=0, hot_ready=0, hot_relays=3, max_connections=10,
          available=3), 1),                                    # automatic spreading off
    (dict(ready=1, configured=2, hot_ready=500, hot_relays=3, max_connections=10,
          available=3), 2),                                    # configured wins
    (dict(ready=900, configured=0, hot_ready=500, hot_relays=3, max_connections=2,
          available=3), 2),                                    # no more relays than conns
    (dict(ready=900, configured=5, hot_ready=500, hot_relays=3, max_connections=10,
          available=2), 2),                                    # no more than exist
])
def test_spread_count(kw, want):
    assert spread_count(**kw) == want


@pytest.mark.parametrize("n,k,turn,want", [
    (10, 3, 0, [4, 3, 3]),
    (10, 3, 1, [3, 4, 3]),
    (2, 3, 2, [1, 0, 1]),
    (0, 2, 0, [0, 0]),
    (7, 1, 0, [7]),
])
def test_split_counts(n, k, turn, want):
    assert split_counts(n, k, turn) == want
    assert sum(split_counts(n, k, turn)) == n


def test_split_counts_refuses_zero_relays():
    with pytest.raises(ValueError, match="0 relays"):
        split_counts(3, 0)


def _node(nid, labels=None, resources=None):
    return NodeInfo(nid, labels or {}, resources or {})


@pytest.mark.parametrize("label,want", [
    ("", ["n1", "n2", "n3"]),        # a source without a node label: everywhere
    ("egress-a", ["n1"]),            # by label
    ("egress-b", ["n2", "n3"]),      # by a comma list and by a resource
    ("egress-z", []),                # nowhere: no relay at all
])
def test_sources_live_on_the_nodes_that_carry_their_label(label, want):
    nodes = [_node("n1", {"egress": "egress-a"}),
             _node("n2", {"egress": "egress-c, egress-b"}),
             _node("n3", resources={"egress:egress-b": 1.0, "CPU": 2.0})]
    assert source_nodes(label, nodes) == want


def test_node_info_from_ray_nodes_entry():
    n = NodeInfo.from_ray({"NodeID": "abc", "Labels": {"egress": "e1"}, "Resources": {}})
    assert n.node_id == "abc" and n.egress_labels() == {"e1"}


def test_relays_setting_goes_over_the_wire():
    lim = SiteLimits(rates=(RateSpec.parse("10/s"),), relays=3)
    assert limits_from_wire(limits_to_wire(lim)) == lim
    old = dict(limits_to_wire(SiteLimits()))
    old.pop("relays")        # from a process that predates the setting
    assert limits_from_wire(old).relays == 0


HOT = SiteLimits(rates=(RateSpec.parse("1000/s"),), max_connections=6)


def test_a_waiting_relay_gets_its_share_and_the_total_never_passes_the_limit():
    b = ThrottleBook(lease_ttl=10)
    a = b.acquire("hot", HOT, "relay:n1:d", "i1", 6, 0.0)
    assert len(a) == 6                                    # alone: all of them
    assert b.acquire("hot", HOT, "relay:n2:d", "i2", 3, 0.5) == []   # full: it waits
    # relay n1's next renewal gives back what it holds above its share (6 / 2 relays)
    refused = b.renew("hot", HOT, "relay:n1:d", "i1", a, 1.0)
    assert len(refused) == 3 and set(refused) == set(sorted(a)[3:])
    # they count until n1 has closed those connections and given them back
    assert b.acquire("hot", HOT, "relay:n2:d", "i2", 3, 1.05) == []
    b.release("hot", refused)
    got = b.acquire("hot", HOT, "relay:n2:d", "i2", 3, 1.1)
    assert len(got) == 3
    # a third relay: shares of 2 each; n1 cannot take back more meanwhile
    assert b.acquire("hot", HOT, "relay:n3:d", "i3", 2, 1.2) == []
    assert b.acquire("hot", HOT, "relay:n1:d", "i1", 3, 1.3) == []
    r1 = b.renew("hot", HOT, "relay:n1:d", "i1", sorted(a)[:3], 2.0)
    r2 = b.renew("hot", HOT, "relay:n2:d", "i2", got, 2.0)
    assert len(r1) == 1 and len(r2) == 1
    b.release("hot", r1 + r2)
    assert len(b.acquire("hot", HOT, "relay:n3:d", "i3", 2, 2.1)) == 2
    assert len(b.sites["hot"].leases) == 6
    by_pool = {}
    for p, _, _ in b.sites["hot"].leases.values():
        by_pool[p] = by_pool.get(p, 0) + 1
    assert by_pool == {"relay:n1:d": 2, "relay:n2:d": 2, "relay:n3:d": 2}


def test_a_lone_relay_keeps_all_connections_once_the_others_stop_waiting():
    b = ThrottleBook(lease_ttl=10)
    b.acquire("hot", HOT, "relay:n2:d", "i2", 1, 0.0)
    b.release("hot", list(b.sites["hot"].leases))
    assert b.acquire("hot", HOT, "relay:n2:d", "i2", 9, 0.1) == \
        sorted(b.sites["hot"].leases)                          # got 6 of 9: it waits
    ids = sorted(b.sites["hot"].leases)
    b.release("hot", ids)
    # n1 now: n2's wait is still recent, so n1 gets an even share, not everything
    assert len(b.acquire("hot", HOT, "relay:n1:d", "i1", 6, 1.0)) == 3
    # after lease_ttl without asking, n2 no longer counts
    assert len(b.acquire("hot", HOT, "relay:n1:d", "i1", 3, 20.0)) == 3
