"""Ready mail by site, kept up to date as it changes: what a dispatch round asks grants for.

Owns: for each site with ready mail, its domains (in the order they got mail) and how many
messages they have ready; which of those sites a round should consider now; and, for fairness,
the order in which it considers them. A round's cost is then proportional to what changed since
the last one (domains whose ready count or route changed, sites whose hold ran out or whose
in-flight count went down) and to the sites it actually asks for grants, not to every ready
domain and site of the shard: at 10,000 domains most sites sit waiting (for a throttle's retry
time, for room under their in-flight cap, for a route) while a few are being sent to.

A site is *active* (considered every round) unless it is *held* until a time (the throttle's
retry-after) or *parked* (full by the shard's own in-flight count) until :meth:`wake`. Active
sites are considered in a round-robin order: a site that was served moves to the back
(:meth:`served`), so when a round's budget runs out the sites it did not reach come first in
the next.

Pure: no I/O, no clock (times are arguments), no Ray. Sizes are bounded by the sites and
domains with ready mail (a site leaves when its last ready domain does).
"""

from __future__ import annotations

import heapq
from typing import Generic, TypeVar

__all__ = ["ReadySites"]

I = TypeVar("I")   # what the caller keeps about a site (its limits); opaque here


class ReadySites(Generic[I]):
    """Ready domains grouped by site, with each site's ready total and its dispatch state."""

    def __init__(self) -> None:
        #: domain → (site, ready count) as last counted under its site
        self._domain: dict[str, tuple[str, int]] = {}
        #: site → its ready domains, in the order they got mail (a dict: ordered set)
        self.domains: dict[str, dict[str, None]] = {}
        #: site → ready messages over its domains
        self.ready: dict[str, int] = {}
        #: site → the caller's info about it (from the route of its last placed domain)
        self.info: dict[str, I] = {}
        #: sites a round considers, in round-robin order (a dict: ordered set)
        self._active: dict[str, None] = {}
        #: held sites → until when; and the (until, site) heap that releases them (lazy)
        self._held: dict[str, float] = {}
        self._timers: list[tuple[float, str]] = []
        self._parked: set[str] = set()

    def __len__(self) -> int:
        return len(self.ready)

    def __contains__(self, site: object) -> bool:
        return site in self.ready

    # ------------------------------------------------------------------ ready counts
    def place(self, domain: str, site: str | None, ready: int, info: I | None = None) -> None:
        """``domain`` now has ``ready`` messages ready, routed to ``site`` (None: no usable
        route, so not dispatchable): the domain's old contribution (to whatever site it was
        under) is replaced. A site that gains mail and is neither held nor parked becomes
        active. ``info`` (when given) replaces the site's info."""
        if ready < 0:
            raise ValueError(f"ready count of {domain!r} is negative: {ready}")
        old = self._domain.get(domain)
        if old is not None:
            osite, on = old
            if osite == site and ready > 0:
                self.ready[site] += ready - on
                self._domain[domain] = (site, ready)
                if info is not None:
                    self.info[site] = info
                if ready > on:
                    self._activate(site)
                return
            del self._domain[domain]
            self._drop(osite, domain, on)
        if site is None or ready == 0:
            return
        self._domain[domain] = (site, ready)
        ds = self.domains.get(site)
        if ds is None:
            ds = self.domains[site] = {}
            self.ready[site] = 0
        ds[domain] = None
        self.ready[site] += ready
        if info is not None or site not in self.info:
            if info is None:
                raise ValueError(f"site {site!r} placed for the first time without its info")
            self.info[site] = info
        self._activate(site)

    def _drop(self, site: str, domain: str, n: int) -> None:
        ds = self.domains[site]
        del ds[domain]
        if ds:
            self.ready[site] -= n
            return
        # the site's last ready domain: the site goes, with every state it had
        del self.domains[site], self.ready[site], self.info[site]
        self._active.pop(site, None)
        self._held.pop(site, None)
        self._parked.discard(site)

    def site_of(self, domain: str) -> str | None:
        """The site ``domain`` is counted under (None: none, it has no ready mail placed)."""
        e = self._domain.get(domain)
        return None if e is None else e[0]

    # ------------------------------------------------------------------ dispatch state
    def _activate(self, site: str) -> None:
        if site not in self._held and site not in self._parked:
            self._active.setdefault(site, None)

    def hold(self, site: str, until: float) -> None:
        """Not considered until ``until`` (a throttle's retry-after)."""
        if site not in self.ready:
            return
        self._active.pop(site, None)
        self._parked.discard(site)
        self._held[site] = until
        t = self._timers
        heapq.heappush(t, (until, site))
        if len(t) > 4 * len(self._held) + 64:   # bounded: drop superseded timers
            self._timers = [(u, s) for u, s in t if self._held.get(s) == u]
            heapq.heapify(self._timers)

    def park(self, site: str) -> None:
        """Not considered until :meth:`wake` (full by the shard's own in-flight count)."""
        if site not in self.ready:
            return
        self._active.pop(site, None)
        self._held.pop(site, None)
        self._parked.add(site)

    def wake(self, site: str) -> None:
        """A parked site is considered again (a message of it finished); a held one is not
        (its hold is the throttle's word)."""
        if site in self._parked:
            self._parked.discard(site)
            self._active.setdefault(site, None)

    def due(self, now: float) -> list[str]:
        """The sites to consider this round, in fair order: those whose hold ran out by
        ``now`` join the back of the active ones."""
        t = self._timers
        while t and t[0][0] <= now:
            until, site = heapq.heappop(t)
            if self._held.get(site) == until:
                del self._held[site]
                self._active.setdefault(site, None)
        return list(self._active)

    def served(self, site: str) -> None:
        """``site`` got mail taken this round: it goes to the back of the order."""
        if site in self._active:
            del self._active[site]
            self._active[site] = None

    def state(self, site: str) -> str:
        """"active", "held", "parked" or "" (no ready mail): for tests and stats."""
        if site in self._active:
            return "active"
        if site in self._held:
            return "held"
        if site in self._parked:
            return "parked"
        return ""

    def next_release(self) -> float | None:
        """When the earliest hold runs out (None: none is held)."""
        while self._timers and self._held.get(self._timers[0][1]) != self._timers[0][0]:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None
