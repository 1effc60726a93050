"""MTA-STS policy discovery and fetch (RFC 8461 §3, §5): the I/O half.

Role: for a recipient domain, find the policy in force: the ``_mta-sts.<domain>`` TXT record
through raymta's own resolver (:class:`cluster.adapters.dns.MxResolver`, the configured
nameservers, as MX lookups; never another), then, when its id is new, the policy over HTTPS
from ``mta-sts.<domain>`` (the name resolved by the same resolver, its addresses checked by the
MX address guard, the certificate verified for that name, no redirects (§3.3), a 200 with
``text/plain``, at most 64 KiB, bounded in time).
Owns: a :class:`cluster.core.mta_sts.StsCache` (what to fetch, what stays in force when a
fetch fails), one lookup per domain at a time, and counters of what happened.
Must not: decide what a policy means for a delivery (the relay does, with the core's help),
use the system resolver when nameservers are configured, or follow a redirect.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import aiohttp.abc

from cluster.adapters.dns import MxResolver
from cluster.core.mta_sts import (
    MAX_POLICY_BYTES,
    StsCache,
    StsPolicy,
    StsPolicyError,
    parse_policy,
    parse_txt,
    policy_url,
)
from cluster.core.mxguard import AddressGuard

__all__ = ["StsFetcher"]

log = logging.getLogger("raymta.mta_sts")

#: seconds for one whole policy fetch (connect, TLS, request, body)
FETCH_TIMEOUT = 10.0


class _FetchError(Exception):
    pass


class _Pinned(aiohttp.abc.AbstractResolver):
    """Hands aiohttp the addresses raymta's resolver found and the guard allowed: aiohttp
    must not ask the system resolver."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        self.host, self.addresses = host, addresses

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET
                      ) -> list[aiohttp.abc.ResolveResult]:
        if host != self.host:
            raise OSError(f"unexpected host {host!r}")
        return [{"hostname": host, "host": a, "port": port,
                 "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in self.addresses]

    async def close(self) -> None:
        return None


class StsFetcher:
    """The MTA-STS policy per recipient domain (None: none in force). Use from one event loop.

    ``ca_file``: CA certificates verifying the policy hosts ("" = the system CAs). ``port``:
    443 except in tests. ``guard``: the MX address guard (policy host addresses it refuses are
    not contacted)."""

    def __init__(self, resolver: MxResolver, guard: AddressGuard, *, ca_file: str = "",
                 port: int = 443, timeout: float = FETCH_TIMEOUT, recheck: float = 300.0,
                 max_domains: int = 10_000) -> None:
        self.resolver = resolver
        self.guard = guard
        self.port = port
        self.timeout = timeout
        self.cache = StsCache(recheck, max_domains)
        self._ssl = ssl.create_default_context(cafile=ca_file or None)
        self._inflight: dict[str, asyncio.Future[StsPolicy | None]] = {}
        self.counters = {"sts_lookups": 0, "sts_txt_given": 0, "sts_fetches": 0, "sts_fetch_failures": 0,
                         "sts_invalid": 0}
        #: the words of the last failed fetch (for stats and tests)
        self.last_failure = ""

    async def policy(self, domain: str, now: float | None = None,
                     txt: Sequence[Any] | None = None) -> StsPolicy | None:
        """The policy in force for ``domain`` (mode enforce or testing), or None.

        ``txt``: the domain's TXT answer already looked up elsewhere (the throttle does it
        beside the MX lookup), ``[records, error, checked_at]``; used instead of a query of
        our own while younger than the recheck interval and an answer (error None or
        "nxdomain"), otherwise ignored."""
        now = time.time() if now is None else now
        known, pol = self.cache.fresh(domain, now)
        if known:
            return pol
        fut = self._inflight.get(domain)
        if fut is None:
            hint = None
            if txt is not None and self.cache.answer_usable(txt[1], float(txt[2]), now):
                hint = (list(txt[0]), txt[1], min(float(txt[2]), now))
            fut = asyncio.ensure_future(self._lookup(domain, now, hint))
            self._inflight[domain] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(domain, None))
        return await asyncio.shield(fut)

    def settle(self, domain: str, txt: Sequence[Any], now: float | None = None) -> bool:
        """Take a TXT answer the throttle looked up (``[records, error, checked_at]``, as
        :meth:`policy`'s ``txt``) without a task or any I/O when it settles the domain: an
        answer young enough, and no policy to fetch for it (no ``v=STSv1`` record, or the id
        of the policy already cached). True when it did; False: ask :meth:`policy`. Most of
        a long tail publishes no policy: this is the relay's whole MTA-STS cost for them."""
        now = time.time() if now is None else now
        if domain in self._inflight or not self.cache.answer_usable(txt[1], float(txt[2]), now):
            return False
        try:
            txt_id = parse_txt(list(txt[0])) if txt[1] in (None, "nxdomain") else None
        except StsPolicyError:
            return False        # :meth:`policy` counts and logs it
        if self.cache.needs_fetch(domain, txt_id, now):
            return False
        self.counters["sts_txt_given"] += 1
        self.cache.txt_checked(domain, min(float(txt[2]), now))
        return True

    def current(self, domain: str, now: float | None = None) -> tuple[bool, StsPolicy | None]:
        """Without I/O: (known, policy); a cached policy holds until it expires even when
        its TXT record is due to be looked at again. Not known: ask :meth:`policy` first."""
        now = time.time() if now is None else now
        return self.cache.known(domain, now)

    def due(self, domain: str, now: float | None = None) -> bool:
        """Whether :meth:`policy` would look at DNS (the domain is new or due a recheck)."""
        now = time.time() if now is None else now
        return not self.cache.fresh(domain, now)[0]

    async def _lookup(self, domain: str, now: float,
                      hint: tuple[list[str], str | None, float] | None = None
                      ) -> StsPolicy | None:
        checked = now
        if hint is None:
            self.counters["sts_lookups"] += 1
            records, error = await self.resolver.txt(f"_mta-sts.{domain}")
        else:
            self.counters["sts_txt_given"] += 1
            records, error, checked = hint
        try:
            txt_id = parse_txt(records) if error in (None, "nxdomain") else None
        except StsPolicyError as e:
            self.counters["sts_invalid"] += 1
            log.warning("MTA-STS %s: %s", domain, e)
            txt_id = None
        if not self.cache.needs_fetch(domain, txt_id, now):
            self.cache.txt_checked(domain, checked)
            return self.cache.current(domain, now)
        assert txt_id is not None
        self.counters["sts_fetches"] += 1
        try:
            pol = parse_policy(await self._fetch(domain, now))
        except (_FetchError, StsPolicyError) as e:
            # §5.1: a policy that cannot be had now leaves an unexpired cached one in force
            self.counters["sts_fetch_failures"] += 1
            self.last_failure = f"{domain}: {e}"
            log.warning("MTA-STS %s: policy fetch failed: %s", domain, e)
            self.cache.fetch_failed(domain, now)
            return self.cache.current(domain, now)
        self.cache.store(domain, txt_id, pol, now)
        return self.cache.current(domain, now)

    async def _fetch(self, domain: str, now: float) -> str:
        host = f"mta-sts.{domain}"
        addresses, error = await self.resolver.host_addresses(host, now)
        if not addresses:
            raise _FetchError(f"{host} has no address ({error})")
        allowed = [a for a in addresses if self.guard.why_refused(a) is None]
        if not allowed:
            raise _FetchError(f"{host} resolves only to {', '.join(addresses[:3])}; refused "
                              "(delivery.allow_networks)")
        url = policy_url(domain, self.port)
        conn = aiohttp.TCPConnector(resolver=_Pinned(host, allowed), ssl=self._ssl,
                                    force_close=True, use_dns_cache=False)
        try:
            async with aiohttp.ClientSession(
                    connector=conn, timeout=aiohttp.ClientTimeout(total=self.timeout)) as s, \
                    s.get(url, allow_redirects=False) as r:
                if r.status != 200:
                    raise _FetchError(f"{url}: HTTP {r.status} (a 200 is needed, no "
                                      "redirects: RFC 8461 §3.3)")
                if r.content_type != "text/plain":
                    raise _FetchError(f"{url}: media type {r.content_type!r}, not "
                                      "text/plain")
                body = b""
                while len(body) <= MAX_POLICY_BYTES:
                    chunk = await r.content.read(MAX_POLICY_BYTES + 1 - len(body))
                    if not chunk:
                        break
                    body += chunk
                if len(body) > MAX_POLICY_BYTES:
                    raise _FetchError(f"{url}: policy larger than {MAX_POLICY_BYTES} bytes")
                return body.decode("utf-8", "replace")
        except aiohttp.ClientSSLError as e:
            raise _FetchError(f"{url}: TLS: {e}") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise _FetchError(f"{url}: {type(e).__name__}: {e}") from None

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "sts_domains": len(self.cache),
                "sts_last_failure": self.last_failure}
