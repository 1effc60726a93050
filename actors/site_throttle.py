"""SiteThrottle actor: the rate and concurrency authority for destination sites, and MX lookup.

A thin shell over :class:`cluster.core.throttle.ThrottleBook` (grants, leases, backoff) and
:class:`cluster.adapters.dns.MxResolver` (MX lookups with a TTL cache). Hot sites have an actor
of their own (``throttle:<site>``); the long tail shares ``throttle:pool:<k>``.

Everything it holds is soft state: if it dies, Ray restarts it empty, coordinators re-report
their in-flight counts on the next grant round and relays re-register the connections they hold
(:meth:`renew`), so limits hold again within one renewal period. Every method is safe to retry.
"""

from __future__ import annotations

import ipaddress
import os
import time
from typing import Any

import msgpack

from actors.loop import tune_gc, use_uvloop
from cluster.adapters.dns import DnsFailure, MxResolver, Route
from cluster.config import Config
from cluster.core.sites import SiteLimits, limits_from_wire
from cluster.core.throttle import ThrottleBook

__all__ = ["SiteThrottle"]


class SiteThrottle:
    def __init__(self, config: Config, name: str) -> None:
        use_uvloop()
        tune_gc()
        self.cfg = config
        self.name = name
        d = config.delivery
        self.book = ThrottleBook(lease_ttl=d.lease_ttl, backoff=d.site_backoff,
                                 backoff_max=d.site_backoff_max)
        self._resolver: MxResolver | None = None
        self.started = time.time()
        #: calls served, per method (operators: what the throttle spends its time on)
        self.calls = dict.fromkeys(("resolve", "grant", "acquire", "release", "renew",
                                    "feedback"), 0)
        from actors.metrics import ThrottleMetrics
        self.metrics = ThrottleMetrics(name, config.metrics.enabled)
        #: messages granted and sites paused by a reply, ever (the exporter reads them)
        self.counters = {"granted": 0, "suspensions": 0}
        self._exported = 0.0

    def _dns(self) -> MxResolver:
        if self._resolver is None:
            dc = self.cfg.dns
            self._resolver = MxResolver(list(dc.nameservers) or None, dc.port, timeout=dc.timeout,
                                        min_ttl=dc.min_ttl, max_ttl=dc.max_ttl)
        return self._resolver

    # ------------------------------------------------------------------ routing
    async def resolve(self, domains: list[str]) -> dict[str, list[Any]]:
        """Route per domain: ``["ok", [[pref, mx name, [addresses]], ...], port, expires_at,
        static]`` or ``["fail", kind, permanent, text, expires_at]``."""
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
        results = await self._dns().resolve_many(to_lookup, now) if to_lookup else {}
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
                          self.cfg.delivery.smtp_port, res.expires_at, False]
            else:
                assert isinstance(res, DnsFailure)
                out[d] = ["fail", res.kind, res.permanent, str(res), res.expires_at]
        return out

    # ------------------------------------------------------------------ grants and leases
    async def grant(self, shard: int, demand: bytes) -> dict[str, tuple[int, float]]:
        """For each site: how many of its ready messages the shard may dispatch now.

        demand: msgpack ``[[site, ready, in flight, limits_to_wire(limits)], ...]`` (plain
        bytes: Ray pickling SiteLimits objects for every site of every round cost more than
        the grants themselves)."""
        self.calls["grant"] += 1
        now = time.time()
        out = {}
        for site, ready, inflight, wire in msgpack.unpackb(demand, raw=False):
            g = self.book.grant(shard, site, limits_from_wire(wire), ready, inflight, now)
            out[site] = (g.count, g.retry_after)
            self.counters["granted"] += g.count
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
        now = time.time()
        out = {}
        for site, (wire, n) in msgpack.unpackb(request, raw=False).items():
            out[site] = self.book.acquire(site, limits_from_wire(wire), pool, incarnation, n,
                                          now)
        return out

    async def release(self, leases: dict[str, list[int]]) -> None:
        """Give back leases, ``{site: [lease ids]}``, several sites in one call."""
        self.calls["release"] += 1
        for site, ids in leases.items():
            self.book.release(site, ids)

    async def renew(self, pool: str, incarnation: str,
                    held: dict[str, tuple[SiteLimits, list[int]]]) -> dict[str, list[int]]:
        self.calls["renew"] += 1
        now = time.time()
        self.book.bump_ids(i for _, ids in held.values() for i in ids)
        refused = {}
        for site, (limits, ids) in held.items():
            r = self.book.renew(site, limits, pool, incarnation, ids, now)
            if r:
                refused[site] = r
        self.book.forget_idle(now)
        self._export(now)
        return refused

    def _export(self, now: float) -> None:
        self._exported = now
        self.metrics.export(self.book.snapshot(now), self.counters)

    async def feedback(self, items: list[tuple[str, str, str]]) -> None:
        """Replies that concern a whole site: ``(site, kind, text)``; kind "backoff"."""
        self.calls["feedback"] += 1
        now = time.time()
        for site, kind, _text in items:
            if kind == "backoff":
                self.book.back_off(site, now)
                b = self.book.sites.get(site)
                if b is not None and b.last_backoff == now:   # a new pause, not a repeat
                    self.counters["suspensions"] += 1

    async def stats(self) -> dict[str, Any]:
        return {"name": self.name, "calls": dict(self.calls), **self.counters,
                "started": self.started,
                "sites": self.book.snapshot(time.time()),
                "dns_cache": self._resolver.cache_info() if self._resolver else {}}

    async def ping(self) -> int:
        return os.getpid()
