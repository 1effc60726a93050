"""SiteThrottle actor: the rate and concurrency authority for destination sites, and MX lookup.

A thin shell over :class:`cluster.core.throttle.ThrottleBook` (grants, leases, backoff) and
:class:`cluster.adapters.dns.MxResolver` (MX lookups with a TTL cache). Hot sites have an actor
of their own (``throttle:<site>``); the long tail shares ``throttle:pool:<k>``.

Everything it holds is soft state: if it dies, Ray restarts it empty, coordinators re-report
their in-flight counts on the next grant round and relays re-register the connections they hold
(:meth:`renew`), so limits hold again within one renewal period. Every method is safe to retry.

Adaptive shaping (:mod:`cluster.core.shaping`): relays send every remote reply that was not a
delivery as feedback; the rules that fire are applied here at once and written down durably on
every shard as a pause record carrying the action (``coordinator.shaping``). Why there: the
shards already honour pause records (a suspended site's mail stays ready, no grant is even
asked for), the record is replicated and snapshotted like the rest of the queue, its apply
makes the SiteSuspended / SiteShaped event, and a shard leader that restarts keeps it. A
restarted throttle recovers the actions of its sites from the shards (``shaping_state``) on its
first call, so a suspension neither ends early nor loses its expiry event. When an action runs
out, the throttle that holds it records its end (SiteResumed / SiteShapingEnded).

A pool throttle is the authority only for the sites the pool's published size gives it
(:mod:`cluster.core.throttle_pool`). When the size changes, a site that moved here is first
taken from its previous throttle (:meth:`hand_over`, one call per previous throttle for all
the sites of a call), and the previous throttle refuses it grants and leases and forwards the
relays' renewals, releases and feedback for it here, until relays and coordinators all name
the new throttle. Idle sites' books are evicted (``delivery.throttle_site_idle``), so the
throttle's memory follows the sites with mail, not all the sites ever seen.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import time
from collections import deque
from typing import Any

import msgpack

from actors.loop import preload, tune_gc, use_uvloop
from cluster.adapters.dns import DnsFailure, MxResolver, Route
from cluster.config import Config
from cluster.core.replies import parse_reply
from cluster.core.shaping import Action, ShapingEngine
from cluster.core.sites import SiteLimits, limits_from_wire
from cluster.core.throttle import ThrottleBook
from cluster.core.throttle_pool import MOVE_WINDOW, PoolView

log = logging.getLogger("raymta.throttle")

#: shaping events this throttle keeps for ``stats`` (the durable ones are the shards')
_EVENTS_KEPT = 200

__all__ = ["SiteThrottle"]


class SiteThrottle:
    def __init__(self, config: Config, name: str) -> None:
        use_uvloop()
        tune_gc()
        self.cfg = config
        self.name = name
        d = config.delivery
        sh = config.shaping
        self.shaping = ShapingEngine(sh.rules, sh.max_keys) if sh.enabled else None
        if self.shaping is not None:
            # the shaping recovery's first ray.get_actor of a shard leader imports its module:
            # at start, not in the first grant call (py-spy: 15 % of the throttle's samples
            # in a 10,000-domain bench run went to that import, compiled from source)
            preload("actors.coordinator")
        self.book = ThrottleBook(lease_ttl=d.lease_ttl, backoff=d.site_backoff,
                                 backoff_max=d.site_backoff_max, idle_evict=d.throttle_site_idle,
                                 max_sites=d.throttle_max_sites, shaping=self.shaping,
                                 first_lease_id=1 + random.getrandbits(48))
        self.pooled = name.startswith("throttle:pool:")
        from actors.throttle_pool import read_view
        self.view: PoolView = read_view(config)
        #: sites taken over from their previous throttle since the pool last changed size
        #: (cleared when the move window ends: bounded by the sites that moved)
        self._taken: set[str] = set()
        self._taking = asyncio.Lock()
        #: shaping actions fired / ended here, newest last (bounded)
        self.shaping_events: deque[dict[str, Any]] = deque(maxlen=_EVENTS_KEPT)
        #: rule firings by (rule, provider): bounded by the number of rules × providers
        self.fired: dict[str, int] = {}
        self._recovered = self.shaping is None
        self._recovering: asyncio.Task | None = None
        self._coords: dict[str, Any] = {}
        self._tasks: set[asyncio.Task] = set()
        self._resolver: MxResolver | None = None
        self.started = time.time()
        #: calls served, per method (operators: what the throttle spends its time on)
        self.calls = dict.fromkeys(("resolve", "grant", "acquire", "release", "renew",
                                    "feedback", "shaping_records", "hand_over", "forwarded"), 0)
        from actors.metrics import ThrottleMetrics
        self.metrics = ThrottleMetrics(name, config.metrics.enabled)
        #: messages granted and sites paused by a reply, ever (the exporter reads them)
        self.counters = {"granted": 0, "suspensions": 0}
        self._exported = 0.0

    def _dns(self) -> MxResolver:
        if self._resolver is None:
            dc = self.cfg.dns
            self._resolver = MxResolver(list(dc.nameservers) or None, dc.port, timeout=dc.timeout,
                                        min_ttl=dc.min_ttl, max_ttl=dc.max_ttl,
                                        max_concurrent=dc.max_concurrent, policy=dc.policy(),
                                        use_ipv6=dc.ipv6)
        return self._resolver

    # ------------------------------------------------------------------ routing
    async def resolve(self, domains: list[str]) -> dict[str, list[Any]]:
        """Route per domain: ``["ok", [[pref, mx name, [addresses]], ...], port, expires_at,
        static, sts]`` or ``["fail", kind, permanent, text, expires_at, timed_out]``.

        ``sts``: with ``delivery.mta_sts`` on, the domain's ``_mta-sts`` TXT answer (RFC 8461
        §3.1) looked up here beside the MX, ``[records, error, checked_at]`` (error None or
        "nxdomain"), cached with its TTL or negative TTL; None when the lookup failed (the
        relay then asks itself) or for a [routes] domain. Once per domain per cluster, ahead
        of dispatch, instead of once per relay on the batch's way to its connections."""
        self.calls["resolve"] += 1
        now = time.time()
        out: dict[str, list[Any]] = {}
        to_lookup: list[str] = []
        static_hosts: dict[str, tuple[str, int]] = {}
        for d in domains:
            r = self.cfg.route_for(d)
            if r is None:
                to_lookup.append(d)
                continue
            try:
                ipaddress.ip_address(r.host)
                out[d] = ["ok", [[0, r.host, [r.host]]], r.port, now + 3600, True]
            except ValueError:
                static_hosts[d] = (r.host, r.port)
                to_lookup.append(r.host)
        results: dict[str, Route | DnsFailure] = {}
        sts: dict[str, list[Any]] = {}
        if to_lookup:
            sts_for = [d for d in dict.fromkeys(domains)
                       if d not in out and d not in static_hosts] \
                if self.cfg.delivery.mta_sts else []
            # on this actor's loop: c-ares spends ~0.1 ms of CPU a query, resolver layer
            # included, so a burst of new domains no longer holds grants back for seconds
            # (dnspython's ~0.5 ms did; its lookups ran on a thread of their own then). The
            # thread's hand-offs cost as much as they saved: throttle CPU per message at
            # 10,000 / 100,000 domains 63-70 / 97-106 us without it, 71-74 / 107-112 with it
            # (bench/README "Long tail", 2026-12-05 10:42-10:56)
            results, sts = await self._resolve_with_sts(to_lookup, sts_for, now)
        for d in domains:
            if d in out:
                continue
            if d in static_hosts:
                host, port = static_hosts[d]
                res = results[host]
                if isinstance(res, Route):
                    addrs = [a for h in res.hosts if h.name == host for a in h.addresses] or \
                        [a for h in res.hosts for a in h.addresses]
                    out[d] = ["ok", [[0, host, addrs]], port, res.expires_at, True]
                    continue
            else:
                res = results[d]
            if isinstance(res, Route):
                out[d] = ["ok", [[h.preference, h.name, list(h.addresses)] for h in res.hosts],
                          self.cfg.delivery.smtp_port, res.expires_at, False, sts.get(d)]
            else:
                assert isinstance(res, DnsFailure)
                out[d] = ["fail", res.kind, res.permanent, str(res), res.expires_at,
                          res.timed_out]
        return out

    async def _resolve_with_sts(self, domains: list[str], sts_for: list[str], now: float
                                ) -> tuple[dict[str, Route | DnsFailure], dict[str, list[Any]]]:
        """The routes of ``domains`` and, at the same time, the MTA-STS
        TXT answers of ``sts_for`` (only those answered: a failure leaves it to the relay)."""
        names = [f"_mta-sts.{d}" for d in sts_for]
        routes, txts = await self._dns().resolve_batch(domains, names, now)
        return routes, {d: [list(a.records), a.error, a.checked_at]
                        for d, a in zip(sts_for, (txts[n] for n in names))
                        if a.error in (None, "nxdomain")}

    # ------------------------------------------------------------------ grants and leases
    async def grant(self, shard: int, demand: bytes) -> dict[str, tuple[int, float]]:
        """For each site: how many of its ready messages the shard may dispatch now.

        demand: msgpack ``[[site, ready, in flight, limits_to_wire(limits)], ...]`` (plain
        bytes: Ray pickling SiteLimits objects for every site of every round cost more than
        the grants themselves)."""
        self.calls["grant"] += 1
        await self._shaping_ready()
        now = time.time()
        self._expire_shaping(now)
        rows = msgpack.unpackb(demand, raw=False)
        if self.pooled and self.view.moving(now):
            await self._arrive([(r[0], r[3]) for r in rows], now)
        out = {}
        # the rows' limits are mostly one and the same wire dict (the defaults): comparing it
        # with the row before costs a fraction of limits_from_wire's key and cache look-up
        last_wire: Any = None
        limits: SiteLimits | None = None
        for site, ready, inflight, wire in rows:
            if not self._mine(site):   # moved to another throttle: the asker will learn it
                out[site] = (0, now + 1.0)
                continue
            if limits is None or wire != last_wire:
                last_wire, limits = wire, limits_from_wire(wire)
            g = self.book.grant(shard, site, limits, ready, inflight, now)
            out[site] = (g.count, g.retry_after)
            self.counters["granted"] += g.count
        self.book.evict(now)
        if now - self._exported > 1.0:   # gauges and counters, once a second at most
            self._export(now)
        return out

    async def acquire(self, pool: str, incarnation: str, request: bytes) -> dict[str, list[int]]:
        """New connection leases for ``pool``, for several sites in one call.

        request: msgpack ``{site: [limits_to_wire(limits), n]}``; returns ``{site: [lease
        ids]}`` (up to ``n`` each, fewer or none at a site's cap or while it is paused). One
        call per throttle for all the sites a relay wants connections to: a Ray call costs
        ~2-5 ms of CPU on its two sides, a lease in the book a few microseconds."""
        self.calls["acquire"] += 1
        await self._shaping_ready()
        now = time.time()
        req = msgpack.unpackb(request, raw=False)
        await self._arrive([(site, wire) for site, (wire, _) in req.items()], now)
        out = {}
        for site, (wire, n) in req.items():
            # a site that moved away: none here (the relay's next batch names its throttle)
            out[site] = self.book.acquire(site, limits_from_wire(wire), pool, incarnation, n,
                                          now) if self._mine(site) else []
        return out

    async def release(self, leases: dict[str, list[int]],
                      view: dict[str, float] | None = None) -> None:
        """Give back leases, ``{site: [lease ids]}``, several sites in one call. (``view``:
        the pool's size, from a throttle that forwards this call.)"""
        self.calls["release"] += 1
        if view is not None:
            self._adopt_view(PoolView.from_wire(view))
        away: dict[str, dict[str, list[int]]] = {}
        for site, ids in leases.items():
            self.book.release(site, ids)
            if not self._mine(site):
                away.setdefault(self.view.owner(site), {})[site] = ids
        for owner, part in away.items():   # it may have been handed over with the site
            await self._forward(owner, "release", part, view=self.view.to_wire())

    async def renew(self, pool: str, incarnation: str,
                    held: dict[str, tuple[SiteLimits, list[int]]],
                    view: dict[str, float] | None = None) -> dict[str, list[int]]:
        self.calls["renew"] += 1
        if view is not None:
            self._adopt_view(PoolView.from_wire(view))
        await self._shaping_ready()
        now = time.time()
        self._expire_shaping(now)
        from cluster.core.sites import limits_to_wire
        await self._arrive([(site, limits_to_wire(lim)) for site, (lim, _) in held.items()], now)
        self.book.bump_ids(i for _, ids in held.values() for i in ids)
        refused: dict[str, list[int]] = {}
        away: dict[str, dict[str, tuple[SiteLimits, list[int]]]] = {}
        for site, (limits, ids) in held.items():
            if not self._mine(site):
                if self.view.moving(now):   # the new owner holds the site's leases now
                    away.setdefault(self.view.owner(site), {})[site] = (limits, ids)
                else:   # nobody moved it here: close those connections (never over a limit)
                    refused[site] = list(ids)
                continue
            r = self.book.renew(site, limits, pool, incarnation, ids, now)
            if r:
                refused[site] = r
        for owner, part in away.items():
            got = await self._forward(owner, "renew", pool, incarnation, part,
                                      view=self.view.to_wire())
            if got is None:   # the owner did not answer: the relay renews again soon
                continue
            refused.update(got)
        self.book.evict(now)
        self._export(now)
        return refused

    def _export(self, now: float) -> None:
        self._exported = now
        if self.metrics.enabled:
            self.metrics.export(self.book.totals(now), self.counters)

    async def feedback(self, items: list[Any], view: dict[str, float] | None = None) -> None:
        """Replies from sites: ``(site, kind, text[, egress source])``. Kind "backoff": the
        reply asked the whole site to slow down; kind "reply": a remote reply that was not a
        delivery (text: the reply line, code first), for the shaping rules."""
        self.calls["feedback"] += 1
        if view is not None:
            self._adopt_view(PoolView.from_wire(view))
        await self._shaping_ready()
        now = time.time()
        away: dict[str, list[Any]] = {}
        for item in items:
            if not self._mine(item[0]):
                away.setdefault(self.view.owner(item[0]), []).append(item)
        for owner, part in away.items():
            await self._forward(owner, "feedback", part, view=self.view.to_wire())
        for site, kind, text, *rest in items:
            if away and not self._mine(site):
                continue
            if kind == "reply":
                if self.shaping is not None:
                    r = parse_reply(text)
                    for a in self.shaping.observe(site, rest[0] if rest else "", r.code,
                                                  r.enhanced, r.text, now):
                        self._fired(a, now)
                continue
            if kind == "backoff":
                self.book.back_off(site, now)
                b = self.book.sites.get(site)
                if b is not None and b.last_backoff == now:   # a new pause, not a repeat
                    self.counters["suspensions"] += 1

    # ------------------------------------------------------------------ shaping
    def _fired(self, a: Action, now: float) -> None:
        prov = self.shaping.rules.provider_of(a.site) if self.shaping else ""
        k = f"{a.rule}|{prov or 'other'}"
        self.fired[k] = self.fired.get(k, 0) + 1
        log.warning("shaping rule %s: %s %s until %.0f (%s)", a.rule, a.action, a.key,
                    a.until, a.text[:120])
        self.shaping_events.append({"type": "fired", "ts": now, **a.to_wire()})
        self._record(a, a.until)
        self._expire_at(a.until)

    def _expire_at(self, until: float) -> None:
        """Look for actions that ran out just after ``until``: grants and renewals look too,
        but a site that went quiet under a rule asks for neither, and its end (the
        SiteResumed / SiteShapingEnded record) must not wait for the next mail. One timer
        per action in force (bounded by the engine's max_keys)."""
        asyncio.get_running_loop().call_later(max(0.0, until - time.time()) + 0.05,
                                              lambda: self._expire_shaping(time.time()))

    def _expire_shaping(self, now: float) -> None:
        if self.shaping is None or not self._recovered:
            return
        for a in self.shaping.expire(now):
            self.shaping_events.append({"type": "expired", "ts": now, **a.to_wire()})
            self._record(a, 0.0)

    def _record(self, a: Action, until: float) -> None:
        """Write the action's start (``until``) or end (0) on every shard, in the background,
        retried: the shards' pause records are where it survives restarts."""
        t = asyncio.get_running_loop().create_task(self._record_on_shards(a, until))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _named(self, name: str) -> Any:
        h = self._coords.get(name)
        if h is None:
            import ray
            h = self._coords[name] = ray.get_actor(name, namespace=self.cfg.cluster.namespace)
        return h

    async def _record_on_shards(self, a: Action, until: float) -> None:
        import ray
        pending = [f"coordinator:{s}" for s in range(self.cfg.queue.shards)]
        delay = 0.2
        for _ in range(8):
            failed = []
            for name in pending:
                try:
                    await asyncio.wait_for(self._named(name).shaping.remote(
                        a.key, until, a.to_wire()), timeout=10)
                    self.calls["shaping_records"] += 1
                except (ray.exceptions.RayError, asyncio.TimeoutError, ValueError) as e:
                    log.warning("shaping record on %s failed: %s", name, e)
                    self._coords.pop(name, None)
                    failed.append(name)
            if not failed:
                return
            pending = failed
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _mine(self, site: str) -> bool:
        """Is this throttle the authority for ``site``? (shared pool or dedicated)"""
        if not self.pooled:
            return self.name == f"throttle:{site}"
        return self.name == self.view.owner(site)

    # ------------------------------------------------------------------ moving sites
    async def set_pool(self, view: dict[str, float]) -> None:
        """The pool's new size (the deploy tells every running pool throttle)."""
        self._adopt_view(PoolView.from_wire(view))

    def _adopt_view(self, view: PoolView) -> None:
        if view.since > self.view.since:
            self.view = view
            self._taken.clear()

    async def node(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    async def hand_over(self, sites: list[str], view: dict[str, float]) -> bytes:
        """The books of ``sites``, which moved to the asking throttle (msgpack ``{site:
        book}``, :meth:`ThrottleBook.hand_over`). From now on this throttle refuses them grants
        and leases and forwards what relays still send here for them."""
        self.calls["hand_over"] += 1
        self._adopt_view(PoolView.from_wire(view))
        now = time.time()
        out = {}
        for site in sites:
            if self._mine(site):   # not moved by the view we hold: keep it
                continue
            b = self.book.hand_over(site, now)
            if b is not None:
                out[site] = b
        return msgpack.packb(out, use_bin_type=True)

    async def _arrive(self, sites: list[tuple[str, Any]], now: float) -> None:
        """Take the books of sites that moved here from their previous throttle, once, before
        any grant or lease for them (``sites``: ``[(site, limits wire)]`` of a call)."""
        if not self.pooled or not self.view.moving(now):
            if self._taken:
                self._taken.clear()
            return
        todo = {s: w for s, w in sites if s not in self._taken and self._mine(s)
                and self.view.previous_owner(s, now) is not None}
        if not todo:
            return
        async with self._taking:
            by_prev: dict[str, list[str]] = {}
            for s in todo:
                if s not in self._taken:
                    prev = self.view.previous_owner(s, now)
                    assert prev is not None
                    by_prev.setdefault(prev, []).append(s)
            for prev, part in by_prev.items():
                got = await self._forward(prev, "hand_over", part, self.view.to_wire())
                books = msgpack.unpackb(got, raw=False) if got is not None else {}
                for s in part:
                    if s in books:
                        self.book.take_over(s, limits_from_wire(todo[s]), books[s], now)
                    self._taken.add(s)

    async def _forward(self, tname: str, method: str, *args: Any, **kw: Any) -> Any:
        """Call another throttle (a site's new or previous owner); None if it does not
        answer in time (the caller goes on as after a restart of that throttle)."""
        import ray
        self.calls["forwarded"] += 1
        try:
            return await asyncio.wait_for(
                getattr(self._named(tname), method).remote(*args, **kw),
                timeout=MOVE_WINDOW / 12)
        except (ray.exceptions.RayError, TimeoutError, ValueError) as e:
            log.warning("%s on %s failed: %s", method, tname, e)
            self._coords.pop(tname, None)
            return None

    async def _shaping_ready(self) -> None:
        """After a (re)start: adopt the actions in force for this throttle's sites from the
        shards (once; calls wait for it, at most a few seconds)."""
        if self._recovered:
            return
        if self._recovering is None:
            self._recovering = asyncio.get_running_loop().create_task(self._recover())
        try:
            await asyncio.wait_for(asyncio.shield(self._recovering), timeout=5)
        except asyncio.TimeoutError:
            pass

    async def _recover(self) -> None:
        import ray
        assert self.shaping is not None
        got: dict[tuple[str, str], Action] = {}
        for s in range(self.cfg.queue.shards):
            try:
                rows = await asyncio.wait_for(
                    self._named(f"coordinator:{s}").shaping_state.remote(), timeout=10)
            except (ray.exceptions.RayError, asyncio.TimeoutError, ValueError) as e:
                log.warning("shaping recovery from coordinator:%d failed: %s", s, e)
                continue
            for w in rows:
                a = Action.from_wire(w)
                if self._mine(a.site):
                    got[(a.key, a.action)] = a
        now = time.time()
        for a in got.values():
            if a.until > now:
                self.shaping.adopt(a)
                self.shaping_events.append({"type": "recovered", "ts": now, **a.to_wire()})
                self._expire_at(a.until)
        self._recovered = True

    async def shaping_state(self) -> dict[str, Any]:
        """Shaping rules in force here, recent firings and counters (``raymta status``)."""
        await self._shaping_ready()
        now = time.time()
        if self.shaping is None:
            return {"enabled": False, "active": [], "events": [], "fired": {}}
        return {"enabled": True, "rules": len(self.shaping.rules),
                "active": [{**a.to_wire(), "remaining": round(a.until - now, 1)}
                           for a in self.shaping.in_force(now)],
                "events": list(self.shaping_events), "fired": dict(self.fired),
                "counters": dict(self.shaping.counters)}

    async def stats(self) -> dict[str, Any]:
        return {"name": self.name, "calls": dict(self.calls), **self.counters,
                "shaping_fired": dict(self.fired),
                "shaping_active": ([{"rule": a.rule, "action": a.action, "key": a.key,
                                     "until": a.until}
                                    for a in self.shaping.in_force(time.time())]
                                   if self.shaping is not None else []),
                "started": self.started,
                "sites": self.book.snapshot(time.time()),
                "dns_cache": self._resolver.cache_info() if self._resolver else {}}

    async def ping(self) -> int:
        return os.getpid()
