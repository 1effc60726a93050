"""Per-site throttle state: message-rate grants, in-flight caps, connection leases, backoff.

Owns the arithmetic behind "send up to N to site S now" and "you may hold connection L to S".
A SiteThrottle actor holds one :class:`ThrottleBook` and does the I/O around it. Pure: no clock
(``now`` is an argument), no Ray, no sockets. Everything here is *soft* state: after a restart
the book starts empty, relays re-register the connections they hold (:meth:`renew`), and
coordinators report their absolute in-flight counts with every grant request, so nothing leaks.
A shard that stops asking (nothing more ready for the site) stops reporting: its last count is
forgotten after ``report_ttl``, so it can never hold the other shards back for good.

Bounded memory: the books are kept in least-recently-used order. A site unused for
``idle_evict`` seconds whose book holds nothing real (no lease, nothing in flight, no backoff in
force or remembered, a rate limiter with nothing outstanding) is dropped; a book rebuilt for it
later from the limits the next call carries behaves exactly the same. Above ``max_sites`` books
the least recently used such sites go early (their limiter may then forget part of a burst:
the safety valve, never reached with the defaults). Each call evicts at most a few hundred
books, so the work is spread over the calls that made them. Shaping actions (the durable
part) are kept by the engine, not the books: eviction never lifts a suspension.

Moving a site to another throttle (:mod:`cluster.core.throttle_pool`): :meth:`hand_over` takes
a site's book out of this one as plain data and :meth:`take_over` puts it into another.

Adaptive shaping: with a :class:`cluster.core.shaping.ShapingEngine`, a site (or a site from one
egress source) that a rule suspended gets no grants and no leases until the rule ends, and a
site a rule gave lower limits is granted and leased under those. The engine's actions are hard
state kept elsewhere (pause records on the shards); the book only applies them.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

from cluster.core.ratespec import Gcra, MultiLimiter
from cluster.core.shaping import ShapingEngine
from cluster.core.sites import SiteLimits

__all__ = ["ThrottleBook", "EVICT_BATCH", "SiteBook", "Grant", "max_inflight", "ideal_connections",
           "round_interval", "QUEUED_PER_CONNECTION", "MAX_ROUND_INTERVAL"]

#: a site gets another connection for every this many messages queued for it at a relay (up to
#: its max_connections and at most deliveries_per_connection): KumoMTA's "ideal connection
#: count". One connection per queued message (up to the cap) opened ~1 connection per 4
#: messages in the bench's 100-domain mix (907 connections for 3,898 messages, each a lease, a
#: release, a connect and an EHLO).
QUEUED_PER_CONNECTION = 20

#: books looked at for eviction per call at most (the work is spread over the calls)
EVICT_BATCH = 256

#: longest pause between a shard's dispatch rounds while relays hold its mail
MAX_ROUND_INTERVAL = 0.25


def max_inflight(limits: SiteLimits) -> int:
    """Messages a site may have handed to relays at once: enough to keep every allowed
    connection busy between two dispatch rounds, never the whole queue."""
    return limits.max_connections * min(limits.deliveries_per_connection, 50)


def ideal_connections(queued: int, limits: SiteLimits) -> int:
    """Connections a relay should have open to a site with ``queued`` messages waiting."""
    if queued <= 0:
        return 0
    per = max(1, min(limits.deliveries_per_connection, QUEUED_PER_CONNECTION))
    return min(limits.max_connections, -(-queued // per))


def round_interval(base: float, held: int, result_rate: float) -> float:
    """Seconds between a shard's dispatch rounds: ``base`` while the relays hold little of its
    mail (``held`` messages out, results coming back at ``result_rate`` per second), up to
    :data:`MAX_ROUND_INTERVAL` while what they hold lasts them a while. The next round comes
    before they have finished a quarter of it, so they never run dry; rounds every 20 ms under
    load were ~15 % of each leader's CPU and most of the throttles' (measured, 4 shards)."""
    if held <= 0 or result_rate <= 0:
        return base
    return min(max(base, MAX_ROUND_INTERVAL), max(base, held / result_rate / 4))


@dataclass
class Grant:
    count: int
    retry_after: float  # when asking again could give more (0 = any time)


@dataclass
class SiteBook:
    limits: SiteLimits
    limiter: MultiLimiter
    inflight: dict[int, tuple[int, float]] = field(default_factory=dict)  # shard → (n, reported)
    leases: dict[int, tuple[str, str, float]] = field(default_factory=dict)  # id → pool, inc, exp
    backoff_until: float = 0.0
    backoff_level: int = 0
    last_backoff: float = 0.0
    granted: int = 0
    last_used: float = 0.0
    #: pools (relays) that asked for connections and got fewer than they wanted, with when:
    #: while one waits, the others hold no more than their fair share (bounded by the number
    #: of relays)
    waiting: dict[str, float] = field(default_factory=dict)


class ThrottleBook:
    def __init__(self, *, lease_ttl: float = 20.0, backoff: float = 30.0,
                 backoff_max: float = 600.0, idle_evict: float = 300.0,
                 max_sites: int = 200_000, report_ttl: float = 5.0,
                 shaping: ShapingEngine | None = None, first_lease_id: int = 1) -> None:
        #: site books, least recently used first
        self.sites: OrderedDict[str, SiteBook] = OrderedDict()
        self.shaping = shaping
        self.report_ttl = report_ttl
        self.lease_ttl = lease_ttl
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.idle_evict = idle_evict
        self.max_sites = max_sites
        #: lease ids are unique per throttle: start each throttle's at its own (random) base so
        #: leases a relay holds from two throttles (a site that moved) never share an id
        self._ids = itertools.count(first_lease_id)
        self.evicted = 0

    def _site(self, site: str, limits: SiteLimits, now: float) -> SiteBook:
        b = self.sites.get(site)
        # the limits of a grant row come from a cache (limits_from_wire): usually the very
        # object the book holds, and comparing identity first saves the dataclass __eq__
        if b is None or (b.limits is not limits and b.limits != limits):
            old = b
            b = SiteBook(limits, MultiLimiter([Gcra(r) for r in limits.rates]))
            if old is not None:  # limits changed: keep what is real (leases, in flight, backoff)
                b.inflight, b.leases, b.waiting = old.inflight, old.leases, old.waiting
                b.backoff_until, b.backoff_level = old.backoff_until, old.backoff_level
            self.sites[site] = b
        self.sites.move_to_end(site)
        b.last_used = now
        return b

    # ------------------------------------------------------------------ message grants
    def grant(self, shard: int, site: str, limits: SiteLimits, ready: int, inflight: int,
              now: float) -> Grant:
        """How many of ``ready`` messages shard may hand to relays for ``site`` right now."""
        if self.shaping is not None:
            held = self.shaping.suspended(site, "", now)
            if held is not None:
                self._site(site, limits, now).inflight[shard] = (inflight, now)
                return Grant(0, held.until)
            limits = self.shaping.limits(site, limits, now)
        b = self._site(site, limits, now)
        b.inflight[shard] = (inflight, now)
        if now < b.backoff_until:
            return Grant(0, b.backoff_until)
        room = max_inflight(limits) - self.site_inflight(b, now)
        want = min(ready, room)
        if want <= 0:
            return Grant(0, 0.0)  # results will free room; ask again next round
        n = b.limiter.take(now, want)
        b.granted += n
        b.inflight[shard] = (inflight + n, now)
        retry = 0.0 if n == want else now + max(b.limiter.wait_time(now), 0.001)
        return Grant(n, retry)

    def site_inflight(self, b: SiteBook, now: float) -> int:
        """Messages out at relays for the site, by the shards' recent reports."""
        total, stale = 0, None
        for shard, (n, t) in b.inflight.items():
            if now - t > self.report_ttl:
                stale = [shard] if stale is None else stale + [shard]
            else:
                total += n
        if stale is not None:
            for shard in stale:
                del b.inflight[shard]
        return total

    # ------------------------------------------------------------------ connection leases
    def _expire_leases(self, b: SiteBook, now: float) -> None:
        dead = [lid for lid, (_, _, exp) in b.leases.items() if exp <= now]
        for lid in dead:
            del b.leases[lid]

    def acquire(self, site: str, limits: SiteLimits, pool: str, incarnation: str, n: int,
                now: float) -> list[int]:
        """Up to ``n`` new connection leases for ``pool``; fewer (or none) at the site's cap.

        Leases held by an earlier incarnation of the same pool died with it: dropped. A pool
        is named ``relay:<node>:<egress source>``: a rule suspending the site from that source
        refuses it leases."""
        if self.shaping is not None:
            if self.shaping.suspended(site, pool.rsplit(":", 1)[-1], now) is not None:
                return []
            limits = self.shaping.limits(site, limits, now)
        b = self._site(site, limits, now)
        self._expire_leases(b, now)
        for lid in [lid for lid, (p, inc, _) in b.leases.items() if p == pool and inc != incarnation]:
            del b.leases[lid]
        if now < b.backoff_until:
            return []
        free = limits.max_connections - len(b.leases)
        held = sum(1 for p, _, _ in b.leases.values() if p == pool)
        room = min(free, self.fair_share(b, limits, pool, now) - held)
        out = []
        for _ in range(max(0, min(n, room))):
            lid = next(self._ids)
            b.leases[lid] = (pool, incarnation, now + self.lease_ttl)
            out.append(lid)
        if len(out) < n:
            b.waiting[pool] = now
        else:
            b.waiting.pop(pool, None)
        return out

    def fair_share(self, b: SiteBook, limits: SiteLimits, pool: str, now: float) -> int:
        """Connections ``pool`` may hold to the site: all of them while no other relay wants
        any; with several relays carrying a hot site, an even share (rounded up) each, so a
        relay that came first cannot keep the others from the site. The sum over all relays
        is never above the site's max_connections whatever the shares (acquire and renew
        check the total first)."""
        for p in [p for p, t in b.waiting.items() if now - t > self.lease_ttl]:
            del b.waiting[p]
        pools = {p for p, _, _ in b.leases.values()} | set(b.waiting) | {pool}
        if len(pools) == 1:
            return limits.max_connections
        return -(-limits.max_connections // len(pools))

    def release(self, site: str, lease_ids: Iterable[int]) -> None:
        b = self.sites.get(site)
        if b is None:
            return
        for lid in lease_ids:
            b.leases.pop(lid, None)

    def renew(self, site: str, limits: SiteLimits, pool: str, incarnation: str,
              lease_ids: Iterable[int], now: float) -> list[int]:
        """Extend leases; adopt unknown ones (this book restarted) while under the cap.

        Returns the lease ids refused: the relay must close those connections (all of them
        while a shaping rule suspends the site for this pool; the newest above the site's
        cap when a set_limits rule lowered it while they were open)."""
        if self.shaping is not None:
            if self.shaping.suspended(site, pool.rsplit(":", 1)[-1], now) is not None:
                ids = list(lease_ids)
                self.release(site, ids)
                return ids
            limits = self.shaping.limits(site, limits, now)
        b = self._site(site, limits, now)
        self._expire_leases(b, now)
        refused = []
        ids = sorted(lease_ids)
        # another relay waits for connections to this site: this one gives back what it holds
        # above its share (its newest leases), so the site's traffic spreads as intended. They
        # stay counted (not renewed) until the relay releases them, as it does once their
        # connection has closed: freeing them here would let the waiting relay connect while
        # the old connection still sends, one over the site's limit at the receiver
        share = self.fair_share(b, limits, pool, now) if \
            any(p != pool for p in b.waiting) else len(ids)
        # more leases than the site's cap (a set_limits rule lowered it while they were
        # open): the newest above it, whichever relay holds them, are not renewed
        over = set(sorted(b.leases)[limits.max_connections:])
        for i, lid in enumerate(ids):
            cur = b.leases.get(lid)
            if i >= share or lid in over:
                refused.append(lid)
            elif cur is not None and cur[0] == pool:
                b.leases[lid] = (pool, incarnation, now + self.lease_ttl)
            elif cur is None and len(b.leases) < limits.max_connections:
                b.leases[lid] = (pool, incarnation, now + self.lease_ttl)
            else:
                refused.append(lid)
        return refused

    def bump_ids(self, lease_ids: Iterable[int]) -> None:
        """Never hand out an id a relay still holds from before a restart."""
        top = max(lease_ids, default=0)
        cur = next(self._ids)
        self._ids = itertools.count(max(cur, top + 1))

    # ------------------------------------------------------------------ feedback
    def back_off(self, site: str, now: float) -> float:
        """The site asked us to slow down (421, "try again later"): pause it, doubling."""
        b = self.sites.get(site)
        if b is None:
            return 0.0
        if now - b.last_backoff > 2 * self.backoff_max:
            b.backoff_level = 0
        delay = min(self.backoff * (2 ** b.backoff_level), self.backoff_max)
        if now < b.backoff_until:  # already paused: reports from the same burst count once
            return b.backoff_until
        b.backoff_level += 1
        b.last_backoff = now
        b.backoff_until = now + delay
        return b.backoff_until

    def evictable(self, b: SiteBook, now: float) -> bool:
        """Nothing in the book that a rebuilt one would not have."""
        self._expire_leases(b, now)
        # a backoff is remembered for its doubling until 2 x backoff_max after it (back_off)
        return (not b.leases and not self.site_inflight(b, now) and now >= b.backoff_until
                and (b.backoff_level == 0 or now - b.last_backoff > 2 * self.backoff_max)
                and b.limiter.idle(now))

    def evict(self, now: float, batch: int = EVICT_BATCH) -> int:
        """Drop books of idle sites, least recently used first, looking at ``batch`` at most;
        above ``max_sites``, books with nothing live go early. Returns how many went."""
        gone = 0
        for _ in range(min(batch, len(self.sites))):
            site, b = next(iter(self.sites.items()))
            over = len(self.sites) > self.max_sites
            if not over and now - b.last_used <= self.idle_evict:
                break   # least recently used first: the rest are younger
            if self.evictable(b, now) or (over and not b.leases
                                          and not self.site_inflight(b, now)):
                del self.sites[site]
                gone += 1
            else:   # still holds something real: look again after the younger ones
                self.sites.move_to_end(site)
        self.evicted += gone
        return gone

    # ------------------------------------------------------------------ moving a site
    def hand_over(self, site: str, now: float) -> list[Any] | None:
        """Take ``site``'s book out (it moves to another throttle): plain data for
        :meth:`take_over`, or None when this throttle holds nothing for it."""
        b = self.sites.pop(site, None)
        if b is None:
            return None
        self._expire_leases(b, now)
        self.site_inflight(b, now)
        return [[str(r) for r in b.limits.rates], b.limiter.state(),
                [[lid, p, inc, exp] for lid, (p, inc, exp) in b.leases.items()],
                [[sh, n, t] for sh, (n, t) in b.inflight.items()],
                b.backoff_until, b.backoff_level, b.last_backoff, b.granted,
                [[p, t] for p, t in b.waiting.items()]]

    def take_over(self, site: str, limits: SiteLimits, wire: list[Any], now: float) -> SiteBook:
        """Adopt a site's book handed over by its previous throttle (:meth:`hand_over`),
        merged with what this one already holds for it (leases adopted by a renewal)."""
        rates, limiter, leases, inflight, b_until, b_level, b_last, granted, waiting = wire
        b = self._site(site, limits, now)
        if rates == [str(r) for r in limits.rates]:
            b.limiter.restore(limiter)
        for lid, p, inc, exp in leases:
            b.leases.setdefault(lid, (p, inc, exp))
        for sh, n, t in inflight:
            if sh not in b.inflight or b.inflight[sh][1] < t:
                b.inflight[sh] = (n, t)
        b.backoff_until = max(b.backoff_until, b_until)
        b.backoff_level = max(b.backoff_level, b_level)
        b.last_backoff = max(b.last_backoff, b_last)
        b.granted += granted
        for p, t in waiting:
            b.waiting[p] = max(b.waiting.get(p, 0.0), t)
        self.bump_ids(lid for lid, *_ in leases)
        return b

    def totals(self, now: float) -> tuple[int, int, int]:
        """``(sites, sites paused by backoff, live connection leases)``: what the metrics
        show, without a dict per site (:meth:`snapshot` of 100,000 sites once a second was
        most of a throttle's CPU in bench/throttle_grant.py)."""
        paused = leases = 0
        for b in self.sites.values():
            if b.backoff_until > now:
                paused += 1
            if b.leases:
                leases += sum(1 for _, _, exp in b.leases.values() if exp > now)
        return len(self.sites), paused, leases

    def snapshot(self, now: float) -> dict[str, dict]:
        out = {}
        for s, b in self.sites.items():
            self._expire_leases(b, now)
            out[s] = {"connections": len(b.leases), "inflight": self.site_inflight(b, now),
                      "granted": b.granted,
                      "backoff_remaining": max(0.0, b.backoff_until - now),
                      "max_connections": b.limits.max_connections,
                      "rates": [str(r) for r in b.limits.rates]}
        return out
