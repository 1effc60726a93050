"""MTA-STS in the relay (RFC 8461 §4, §5): which hosts and which TLS a connection to a site
must use for the recipient domains queued there, and which recipients it may carry.

Role: the relay's MTA-STS gate. Before a batch is queued its recipient domains' policies are
looked up (:class:`cluster.adapters.mta_sts.StsFetcher`, cached per max_age); before a
connection is opened the gate makes its plan from the domains at the head of the site's queue:
- a domain in mode ``enforce``: only MX hosts matching its patterns are used, with TLS required
  and the certificate verified for the host name (the relay's required-TLS path,
  ``cluster.adapters.smtp``); a domain none of whose MX hosts matches, or whose matching hosts
  fail TLS, has its messages deferred (4.7.5, category auth-failure), never sent in plaintext;
- a domain in mode ``testing``: the connection first tries verified TLS; a failure is counted
  (``sts_testing_failures``, per site too) and logged, and the mail goes as opportunistic TLS;
  a host outside the patterns is counted the same way.
A recipient whose domain enforces a policy the open connection does not meet (the connection
was opened for other domains) goes back to the head of the queue and the connection ends: the
next one is planned for it.
Applies only to sites whose TLS is the default opportunistic one and that no [[site]] entry
sets ``tls`` for (``cluster.core.tls_policy.mta_sts_applies``); ``delivery.mta_sts = false``
turns it off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import dns.asyncbackend

# imported with the relay, not on the first lookup: an import (aiohttp) taking a moment while
# a site's first grants arrive would bunch its first messages beyond its rate
from cluster.adapters.dns import MxResolver
from cluster.adapters.mta_sts import StsFetcher
from cluster.config import Config
from cluster.core.mta_sts import StsPolicy, unmatched_text
from cluster.core.mxguard import AddressGuard

__all__ = ["StsGate", "StsPlan", "rcpt_domain", "relay_resolver"]

log = logging.getLogger("raymta.relay")

#: policy lookups in flight at once for one batch
_PREFETCH_CONCURRENCY = 32
#: queued items the plan looks at (the relay's gather window)
_PLAN_WINDOW = 200


def relay_resolver(cfg: Config) -> MxResolver:
    """A resolver of the relay's own (MTA-STS, DANE): the same nameservers as the MX lookups
    (never the system resolver when they are set)."""
    dc = cfg.dns
    return MxResolver(list(dc.nameservers) or None, dc.port, timeout=dc.timeout,
                      min_ttl=dc.min_ttl, max_ttl=dc.max_ttl, cache_size=10_000,
                      max_concurrent=dc.max_concurrent, policy=dc.policy(), use_ipv6=dc.ipv6)


def rcpt_domain(rcpt: str) -> str:
    return rcpt.rpartition("@")[2].lower().rstrip(".")


@dataclass
class StsPlan:
    """What the next connection to a site must do for the domains at the head of its queue."""

    #: domain -> policy, mode enforce / testing
    enforce: dict[str, StsPolicy] = field(default_factory=dict)
    testing: dict[str, StsPolicy] = field(default_factory=dict)

    def hosts(self, usable: list[list[Any]]) -> list[list[Any]]:
        """The usable hosts the policy of the first enforced domain in queue order allows.
        One policy, not any of them: a connection to a host only another domain's patterns
        allow would carry none of the head's messages, and the next plan would be the same
        (each connection now carries at least the head domain's messages)."""
        lead = next(iter(self.enforce.values()))
        return [h for h in usable if lead.matches(h[1])]


class StsGate:
    def __init__(self, cfg: Config, guard: Callable[[], AddressGuard]) -> None:
        self.cfg = cfg
        self.enabled = cfg.delivery.mta_sts
        self._guard = guard
        self._fetcher: StsFetcher | None = None
        if self.enabled:
            # now (CA certificates loaded, dnspython's asyncio backend imported: ~25 ms, half
            # a message at 50/s), not while a site's first grants wait
            self.fetcher()
            dns.asyncbackend.get_backend("asyncio")
        self.counters = {"sts_enforced_connections": 0, "sts_deferred": 0,
                         "sts_testing_failures": 0}

    def fetcher(self) -> StsFetcher:
        if self._fetcher is None:
            d = self.cfg.delivery
            self._fetcher = StsFetcher(relay_resolver(self.cfg), self._guard(),
                                       ca_file=d.tls_ca_file, port=d.mta_sts_port)
        self._fetcher.guard = self._guard()     # refreshed with the cluster's own addresses
        return self._fetcher

    async def prefetch(self, domains: Iterable[str],
                       txt: dict[str, Any] | None = None) -> None:
        """Look up the policies of ``domains`` that are new or due a TXT recheck. ``txt``:
        domain -> its TXT answer looked up by the throttle with the MX (no query here
        then; see :meth:`StsFetcher.policy`)."""
        txt = txt or {}
        f = self.fetcher()
        now = time.time()
        todo = [d for d in dict.fromkeys(domains) if d and f.due(d, now)
                and not (d in txt and f.settle(d, txt[d], now))]
        if not todo:
            return
        sem = asyncio.Semaphore(_PREFETCH_CONCURRENCY)

        async def one(d: str) -> None:
            async with sem:
                try:
                    await f.policy(d, txt=txt.get(d))
                except Exception:   # a bug here must not stop delivery
                    log.exception("MTA-STS lookup for %s", d)

        await asyncio.gather(*(one(d) for d in todo))

    async def plan(self, queue: Any) -> StsPlan:
        """The plan for the domains of the first queued items (looked up if needed)."""
        domains = list(dict.fromkeys(rcpt_domain(x[0][3])
                                     for _, x in zip(range(_PLAN_WINDOW), queue)))
        await self.prefetch(domains)
        f = self.fetcher()
        plan = StsPlan()
        for d in domains:
            known, pol = f.current(d)
            if not known:   # the lookup broke (logged): no policy, or we would plan forever
                f.cache.txt_checked(d, time.time())
            if pol is not None:
                (plan.enforce if pol.mode == "enforce" else plan.testing)[d] = pol
        return plan

    def unmatched(self, plan: StsPlan, usable: list[list[Any]]) -> dict[str, str]:
        """Enforced domains none of whose MX hosts matches: domain -> the deferral text.
        They leave the plan."""
        out = {}
        names = [h[1] for h in usable]
        for d, pol in list(plan.enforce.items()):
            if not any(pol.matches(n) for n in names):
                out[d] = unmatched_text(d, pol, names)
                del plan.enforce[d]
        return out

    def allows(self, item: list[Any], host: str, enforced: bool) -> bool | None:
        """Whether a connection to ``host`` (opened with the MTA-STS enforce plan or not) may
        carry ``item``: True; False (an enforced policy it does not meet); None (the domain's
        policy is not known yet: plan a connection for it)."""
        known, pol = self.fetcher().current(rcpt_domain(item[3]))
        if not known:
            return None
        if pol is None or pol.mode != "enforce":
            return True
        return enforced and pol.matches(host)

    def testing_misses(self, plan: StsPlan, host: str) -> list[str]:
        """Testing-mode domains of the plan whose patterns ``host`` does not match."""
        return [d for d, p in plan.testing.items() if not p.matches(host)]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        if self._fetcher is not None:
            out.update(self._fetcher.stats())
        return out
