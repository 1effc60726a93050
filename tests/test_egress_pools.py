"""Egress pools: sources with weights per sender domain (pure parts and config)."""

from __future__ import annotations

from collections import Counter

import pytest

from cluster.config import ConfigError, parse_config
from cluster.core.relay_choice import EgressPool, pool_for, weighted_pick

POOLS = (EgressPool("news", (("a", 3.0), ("b", 1.0)), ("news.example",)),
         EgressPool("deep", (("c", 1.0),), ("eu.news.example",)))


@pytest.mark.parametrize("sender,want", [
    ("x@news.example", "news"),
    ("x@shop.news.example", "news"),          # a sub-domain
    ("x@eu.news.example", "deep"),            # the longest match wins
    ("x@a.eu.news.example", "deep"),
    ("x@othernews.example", None),            # not a sub-domain
    ("", None),                               # the null sender
    ("x@NEWS.EXAMPLE", "news"),
])
def test_pool_for_sender_domain(sender, want):
    p = pool_for(sender, POOLS)
    assert (p.name if p else None) == want


@pytest.mark.parametrize("weights", [{"a": 3, "b": 1}, {"a": 1, "b": 1, "c": 2}])
def test_weighted_pick_follows_the_weights(weights):
    n = 20_000
    got = Counter(weighted_pick(f"msg{i}", weights) for i in range(n))
    total = sum(weights.values())
    for name, w in weights.items():
        assert abs(got[name] / n - w / total) < 0.02, got


def test_weighted_pick_moves_only_the_keys_of_a_removed_source():
    keys = [f"m{i}" for i in range(5000)]
    full = {"a": 3.0, "b": 1.0, "c": 2.0}
    less = {"a": 3.0, "c": 2.0}
    for k in keys:
        before = weighted_pick(k, full)
        assert before == "b" or weighted_pick(k, less) == before


def test_weighted_pick_needs_a_source():
    with pytest.raises(ValueError, match="no sources"):
        weighted_pick("k", {})


EGRESS = [{"name": "a"}, {"name": "b"}]


def test_config_round_trips_pool_sources():
    c = parse_config({"egress": EGRESS, "egress_pool": [
        {"name": "p", "sources": ["a:2.5", "b"], "sender_domains": ["News.Example."]}]})
    (p,) = c.egress_pools
    assert p.weights == (("a", 2.5), ("b", 1.0)) and p.sender_domains == ("news.example",)
    assert [EgressPool.format_source(*w) for w in p.weights] == ["a:2.5", "b"]


@pytest.mark.parametrize("pool,where,what", [
    ({"name": "p", "sources": ["zz"]}, "egress_pool[0].sources[0]", "unknown egress source"),
    ({"name": "p", "sources": ["a:0"]}, "egress_pool[0].sources[0]", "positive"),
    ({"name": "p", "sources": ["a:x"]}, "egress_pool[0].sources[0]", "not a number"),
    ({"name": "p", "sources": ["a", "a:2"]}, "egress_pool[0].sources[1]", "twice"),
    ({"name": "p", "sources": []}, "egress_pool[0].sources", "expected a list"),
    ({"name": "p", "sources": ["a"], "sender_domains": ["a@b"]},
     "egress_pool[0].sender_domains[0]", "not a domain"),
    ({"name": "p", "sources": ["a"], "color": 1}, "egress_pool[0]", "color"),
])
def test_bad_pools_are_refused_naming_the_key(pool, where, what):
    with pytest.raises(ConfigError) as e:
        parse_config({"egress": EGRESS, "egress_pool": [pool]})
    assert where in str(e.value) and what in str(e.value)


def test_a_sender_domain_belongs_to_one_pool():
    with pytest.raises(ConfigError, match=r"egress_pool\[1\].sender_domains\[0\].*pool 'p'"):
        parse_config({"egress": EGRESS, "egress_pool": [
            {"name": "p", "sources": ["a"], "sender_domains": ["x.example"]},
            {"name": "q", "sources": ["b"], "sender_domains": ["x.example"]}]})


@pytest.mark.parametrize("raw,where", [
    ({"egress": [{"name": "a", "node_label": "bad label"}]}, "egress[0].node_label"),
    ({"delivery": {"hot_site_relays": 0}}, "delivery.hot_site_relays"),
    ({"delivery": {"max_rcpts_per_transaction": 0}}, "delivery.max_rcpts_per_transaction"),
    ({"site": [{"domain": "x.test", "relays": -1}]}, "site[0].relays"),
])
def test_bad_egress_and_hot_site_settings_name_the_key(raw, where):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert where in str(e.value)
