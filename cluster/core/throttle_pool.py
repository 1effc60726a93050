"""The shared throttle pool: how many ``throttle:pool:<k>`` actors, where, and which owns a site.

Owns four decisions the deployment, the coordinators and the throttles must agree on:

- **Owner of a site**: rendezvous (HRW) hashing of the site over the pool's names
  (:func:`cluster.core.relay_choice.rank_relays`' weights). When the pool grows from ``n`` to
  ``m`` throttles only the sites that now weigh most on a new throttle move (about
  ``(m - n) / m`` of them), and they move only to the new ones; ``hash % n`` moved nearly all.
- **How many** with ``throttle_actors = "auto"``: one per live node that can host one, at most
  :data:`AUTO_MAX`. On one node that is one throttle (on 2 cores one was cheaper than two,
  docs/operations.md); each node that joins brings its own throttle at the next deploy.
- **Where**: each throttle on a node of its own while there are nodes without one (a node
  already hosting a throttle keeps it; a new throttle goes to the least loaded node).
- **The move** (:class:`PoolView`): the pool's size is published with the previous size and
  the time of the change. For :data:`MOVE_WINDOW` seconds after it, the new owner of a site that
  moved first takes the site's book (leases, in-flight reports, backoff, rate state) from the
  previous owner, which from then on refuses the site grants and leases and forwards the
  relays' renewals and releases to the new owner, so the site's limits hold cluster-wide
  through the change. After the window a throttle refuses renewals of leases for sites it does
  not own: a relay that still renews there closes those connections (safe, never over).

Pure: no Ray, no I/O, ``now`` is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from cluster.core.relay_choice import rank_relays

__all__ = ["AUTO_MAX", "MOVE_WINDOW", "PoolView", "auto_count", "place_throttles",
           "pool_name", "pool_names", "pool_owner"]

#: ``throttle_actors = "auto"`` never starts more shared throttles than this
AUTO_MAX = 16

#: seconds after a change of the pool's size during which moved sites are handed over (longer
#: than a coordinator's refresh of the size, 5 s, and than a lease's life by default, 20 s)
MOVE_WINDOW = 60.0


def pool_name(k: int) -> str:
    return f"throttle:pool:{k}"


@lru_cache(maxsize=64)
def pool_names(n: int) -> tuple[str, ...]:
    if n < 1:
        raise ValueError(f"a throttle pool of {n} actors: needs at least one")
    return tuple(pool_name(k) for k in range(n))


def pool_owner(site: str, n: int) -> str:
    """The pool throttle (of ``n``) that is the authority for ``site``."""
    if n == 1:
        return pool_name(0)
    return _hrw_owner(site, n)


@lru_cache(maxsize=1 << 16)
def _hrw_owner(site: str, n: int) -> str:
    # cached (bounded, ~8 MiB full): a coordinator asks for every site it has mail for in
    # every dispatch round, and ranking costs n keyed hashes
    return rank_relays(site, pool_names(n))[0]


def auto_count(hosting_nodes: int, cap: int = AUTO_MAX) -> int:
    """Shared throttles for ``throttle_actors = "auto"``: one per node that can host one
    (live, not drained), at least one, at most ``cap``."""
    return max(1, min(hosting_nodes, cap))


def place_throttles(names: Sequence[str], nodes: Sequence[str],
                    placed: Mapping[str, str]) -> dict[str, str]:
    """A node for each throttle in ``names``: those already running (``placed``: name →
    node, on a live node) stay; each other goes to the node with the fewest throttles
    (ties by the order of ``nodes``), so they are on distinct nodes while there are enough."""
    if not nodes:
        raise ValueError("no live node to place throttles on")
    load = {n: 0 for n in nodes}
    out: dict[str, str] = {}
    for name in names:
        node = placed.get(name)
        if node in load:
            out[name] = node
            load[node] += 1
    for name in names:
        if name not in out:
            node = min(nodes, key=lambda n: load[n])
            out[name] = node
            load[node] += 1
    return out


@dataclass(frozen=True)
class PoolView:
    """The pool's size as published at a deploy: ``count`` throttles since ``since``, before
    that ``previous`` (equal to ``count`` when it never changed)."""

    count: int
    previous: int
    since: float

    def __post_init__(self) -> None:
        if self.count < 1 or self.previous < 1:
            raise ValueError(f"throttle pool of {self.count} (before {self.previous}) actors")

    def owner(self, site: str) -> str:
        return pool_owner(site, self.count)

    def moving(self, now: float) -> bool:
        """Within the window after a change of size: moved sites are handed over."""
        return self.previous != self.count and now - self.since < MOVE_WINDOW

    def previous_owner(self, site: str, now: float) -> str | None:
        """The throttle that owned ``site`` before the change, while it is moving and only if
        that is another throttle."""
        if not self.moving(now):
            return None
        old = pool_owner(site, self.previous)
        return None if old == self.owner(site) else old

    def to_wire(self) -> dict[str, float]:
        return {"count": self.count, "previous": self.previous, "since": self.since}

    @classmethod
    def from_wire(cls, w: Mapping[str, float]) -> PoolView:
        return cls(int(w["count"]), int(w["previous"]), float(w["since"]))

    def resized(self, count: int, now: float) -> PoolView:
        """The view after a deploy that wants ``count`` throttles (the same view if unchanged)."""
        if count == self.count:
            return self
        return PoolView(count, self.count, now)
