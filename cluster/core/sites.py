"""Site rollup: which destination *site* a recipient domain belongs to, and that site's limits.

A site is the set of MX hosts a domain resolves to: every domain hosted by the same provider
shares one site, one set of rate limits and one connection budget (KumoMTA's "site_name").
Owns: the site key, the limit lookup (per-domain and per-MX-suffix overrides) and the choice of
the SiteThrottle actor that is the authority for a site. Pure: no DNS, no Ray.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

from cluster.core.ratespec import RateSpec
from cluster.core.throttle_pool import pool_owner  # at import: not per site per round

__all__ = ["SiteLimits", "SiteOverride", "StaticRoute", "SiteInfo", "site_key", "site_for",
           "throttle_actor_name", "stable_hash", "limits_to_wire", "limits_from_wire"]


@dataclass(frozen=True)
class SiteLimits:
    #: message rates; every one applies (e.g. ("100/s", "20000/h"))
    rates: tuple[RateSpec, ...] = (RateSpec.parse("100/s"),)
    max_connections: int = 10
    deliveries_per_connection: int = 100
    #: "opportunistic" (STARTTLS when offered), "required" (fail if not), "disabled"
    tls: str = "opportunistic"
    #: this site gets a SiteThrottle actor of its own (named after the site)
    dedicated: bool = False
    #: egress source names allowed for this site (empty = all)
    sources: tuple[str, ...] = ()
    #: relays the site's mail spreads over (0 = one, or delivery.hot_site_relays while the
    #: site is hot: cluster/core/relay_choice.py)
    relays: int = 0


@functools.lru_cache(maxsize=4096)
def limits_to_wire(lim: SiteLimits) -> dict[str, Any]:
    """Plain data (msgpack-able) for grants and relay batches; :func:`limits_from_wire`
    reverses. Cached (limits come from the config; a leader sends them for every site of every
    dispatch round): the dict is shared, callers must not change it."""
    return {"rates": [str(r) for r in lim.rates], "max_connections": lim.max_connections,
            "deliveries_per_connection": lim.deliveries_per_connection, "tls": lim.tls,
            "dedicated": lim.dedicated, "sources": list(lim.sources), "relays": lim.relays}


def limits_from_wire(w: dict[str, Any]) -> SiteLimits:
    """The SiteLimits a wire dict describes (cached: parsing rate specs for every site of every
    grant request cost more than the grant)."""
    return _limits_from_key((tuple(w["rates"]), w["max_connections"],
                             w["deliveries_per_connection"], w["tls"], w["dedicated"],
                             tuple(w["sources"]), w.get("relays", 0)))


@functools.lru_cache(maxsize=4096)
def _limits_from_key(key: tuple[Any, ...]) -> SiteLimits:
    rates, max_connections, per_connection, tls, dedicated, sources, relays = key
    return SiteLimits(rates=tuple(RateSpec.parse(r) for r in rates),
                      max_connections=max_connections,
                      deliveries_per_connection=per_connection, tls=tls, dedicated=dedicated,
                      sources=sources, relays=relays)


@dataclass(frozen=True)
class SiteOverride:
    """Limits for sites matching ``domain`` (exact recipient domain) or ``mx_suffix``."""

    limits: SiteLimits
    domain: str = ""
    mx_suffix: str = ""
    #: CA file verifying this site's MX hosts when its TLS is required ("" = the default)
    tls_ca_file: str = ""
    #: the entry sets ``tls`` itself: it wins over the recipient domain's MTA-STS policy
    tls_set: bool = False


@dataclass(frozen=True)
class StaticRoute:
    """Deliver a domain's mail to a fixed host:port instead of its MX (smart host, tests)."""

    domain: str
    host: str
    port: int


@dataclass(frozen=True)
class SiteInfo:
    key: str
    limits: SiteLimits


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (Python's hash() is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def site_key(mx_hosts: Sequence[str]) -> str:
    """The site of a set of MX host names: sorted, de-duplicated, comma-joined.

    Order and preference do not matter: two domains whose MX sets are equal are one site."""
    return ",".join(sorted({h.lower().rstrip(".") for h in mx_hosts}))


def _suffix_match(host: str, suffix: str) -> bool:
    suffix = suffix.lstrip(".*")
    return host == suffix or host.endswith("." + suffix)


def site_for(domain: str, mx_hosts: Sequence[str], defaults: SiteLimits,
             overrides: Sequence[SiteOverride], static_route: StaticRoute | None = None) -> SiteInfo:
    """The site and limits for ``domain`` whose MX host names are ``mx_hosts``.

    A domain override gives the domain a site of its own (``domain:<name>``) so its limits never
    leak to other domains sharing the MX set; an MX-suffix override applies to the whole site.
    A static route is a site of its own (``route:host:port``). First matching override wins."""
    domain = domain.lower().rstrip(".")
    for o in overrides:
        if o.domain and o.domain == domain:
            return SiteInfo(f"domain:{domain}", o.limits)
    if static_route is not None:
        key = f"route:{static_route.host}:{static_route.port}"
    else:
        key = site_key(mx_hosts)
    hosts = [h.lower().rstrip(".") for h in mx_hosts]
    for o in overrides:
        if o.mx_suffix and any(_suffix_match(h, o.mx_suffix) for h in hosts):
            return SiteInfo(key, o.limits)
    return SiteInfo(key, defaults)


def throttle_actor_name(site: str, dedicated: bool, shared_actors: int) -> str:
    """The SiteThrottle actor that is the authority for ``site``.

    Hot (dedicated) sites have their own actor, named after the site so the dashboard shows it;
    the long tail is hashed (rendezvous) over the pool of ``shared_actors``, since every actor
    process costs ~50 MiB (:mod:`cluster.core.throttle_pool`)."""
    if dedicated:
        return f"throttle:{site}"
    return pool_owner(site, shared_actors)
