"""DANE in the relay (RFC 7672 §2.2): which MX hosts of a site must be reached with TLS whose
certificate matches their DNSSEC-secure TLSA records.

Role: the relay's DANE gate. Before a connection to a site is opened the gate looks up each
usable MX host (:class:`cluster.adapters.dane.DaneLookup`, cached for the answers' TTL):
- a host with usable secure TLSA records gets a check: STARTTLS is mandatory and the chain it
  sends must match (``cluster.core.dane.check_chain``); a host that fails is failed over like
  a required-TLS one, and when no host is left the messages are deferred (4.7.5,
  auth-failure, ``cluster.core.replies.dane_failure``), never sent in plaintext;
- a signed host whose TLSA lookup failed (SERVFAIL, bogus, timeout) is left out of the
  connection (deferred when it was the only one);
- every other host: TLS as the site's policy says (opportunistic).
DANE wins over MTA-STS (RFC 8461 §2): a connection planned with a DANE host does not consult
the recipient domains' MTA-STS policies. Applies where MTA-STS would (default opportunistic
TLS, no [[site]] ``tls``, reached through MX records: ``cluster.core.tls_policy.
mta_sts_applies``); on only with ``delivery.dane = true``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from actors.relay_sts import relay_resolver
from cluster.adapters.dane import DaneLookup
from cluster.adapters.smtp import DaneCheck
from cluster.config import Config
from cluster.core.dane import DaneStatus

__all__ = ["DaneGate", "DanePlan"]


@dataclass
class DanePlan:
    """DANE for the next connection to a site."""

    #: host name -> the check of its chain (hosts with usable secure TLSA records)
    checks: dict[str, DaneCheck] = field(default_factory=dict)
    #: host name -> why it must not be contacted now
    deferred: dict[str, str] = field(default_factory=dict)

    def hosts(self, usable: list[list[Any]]) -> list[list[Any]]:
        return [h for h in usable if h[1] not in self.deferred]


class DaneGate:
    def __init__(self, cfg: Config) -> None:
        self.enabled = cfg.delivery.dane
        self.cfg = cfg
        self._lookup: DaneLookup | None = None
        self.counters = {"dane_connections": 0, "dane_deferred": 0, "dane_failures": 0}

    def lookup(self) -> DaneLookup:
        if self._lookup is None:
            self._lookup = DaneLookup(relay_resolver(self.cfg), min_ttl=self.cfg.dns.min_ttl)
        return self._lookup

    async def plan(self, usable: list[list[Any]], port: int) -> DanePlan:
        lookup = self.lookup()
        names = list(dict.fromkeys(h[1] for h in usable))
        statuses = await asyncio.gather(*(lookup.status(n, port) for n in names))
        plan = DanePlan()
        for name, st in zip(names, statuses):
            if st.mode == "dane":
                plan.checks[name] = _checker(lookup, st, name)
            elif st.mode == "defer":
                plan.deferred[name] = st.reason
        return plan

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        if self._lookup is not None:
            out.update(self._lookup.stats())
        return out


def _checker(lookup: DaneLookup, st: DaneStatus, host: str) -> DaneCheck:
    return lambda address, chain: lookup.check(st, host, address, chain)
