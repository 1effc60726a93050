"""DANE lookups and certificate checks for the relay (RFC 7672): the I/O half.

Role: for an MX host, ask raymta's resolver (:meth:`cluster.adapters.dns.MxResolver.
secure_query`: the configured nameservers, DO and AD bits) for its address records and its
``_<port>._tcp.<host>`` TLSA records, and let :func:`cluster.core.dane.dane_status` decide
what DANE asks of a connection to it; after a STARTTLS handshake, read the chain the server
sent (``cryptography``) and let :func:`cluster.core.dane.check_chain` judge it.
Owns: a bounded cache of statuses per (host, port), kept for the answers' TTL (clamped to
[``min_ttl``, ``max_ttl``]); counters.
Must not: trust an answer without the resolver's AD flag, use the system resolver when
nameservers are configured, or decide what a failure means for a message (the relay does).
The resolver must validate DNSSEC and be reached over a trusted path (the same host or
loopback): AD from a remote resolver can be forged on the way.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from cluster.adapters.dns import MxResolver
from cluster.core.dane import CertFacts, DaneStatus, Tlsa, check_chain, dane_status, tlsa_name

__all__ = ["DaneLookup", "cert_facts"]


def cert_facts(ders: Sequence[bytes]) -> list[CertFacts]:
    """The facts DANE needs of a chain (leaf first, as the server sent it). A certificate
    that cannot be parsed ends the chain there."""
    certs: list[tuple[bytes, x509.Certificate]] = []
    for der in ders:
        try:
            certs.append((der, x509.load_der_x509_certificate(der)))
        except ValueError:
            break
    out = []
    for i, (der, c) in enumerate(certs):
        try:
            names = [n.lower() for n in c.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)]
        except x509.ExtensionNotFound:
            names = [str(a.value).lower() for a in
                     c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        issued = False
        if i + 1 < len(certs):
            try:
                c.verify_directly_issued_by(certs[i + 1][1])
                issued = True
            except (InvalidSignature, ValueError, TypeError):
                issued = False      # another key type or issuer name, or a bad signature
        spki = c.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
        out.append(CertFacts(der, spki, tuple(names), c.not_valid_before_utc.timestamp(),
                             c.not_valid_after_utc.timestamp(), issued))
    return out


class DaneLookup:
    """DANE statuses per MX host. Use from one event loop."""

    def __init__(self, resolver: MxResolver, *, min_ttl: float = 5.0, max_ttl: float = 300.0,
                 max_hosts: int = 10_000) -> None:
        self.resolver = resolver
        self.min_ttl, self.max_ttl = min_ttl, max_ttl
        self.max_hosts = max_hosts
        self._cache: OrderedDict[tuple[str, int], tuple[float, DaneStatus]] = OrderedDict()
        self._inflight: dict[tuple[str, int], asyncio.Future[DaneStatus]] = {}
        self.counters = {"dane_lookups": 0, "dane_hosts": 0, "dane_lookup_failures": 0,
                         "dane_insecure": 0}

    async def status(self, host: str, port: int, now: float | None = None) -> DaneStatus:
        now = time.time() if now is None else now
        key = (host.lower().rstrip("."), port)
        hit = self._cache.get(key)
        if hit is not None and now < hit[0]:
            self._cache.move_to_end(key)
            return hit[1]
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._lookup(key, now))
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(fut)

    async def _lookup(self, key: tuple[str, int], now: float) -> DaneStatus:
        host, port = key
        self.counters["dane_lookups"] += 1
        types = ["A", "AAAA"] if self.resolver.use_ipv6 else ["A"]
        addrs = await asyncio.gather(*(self.resolver.secure_query(host, t) for t in types))
        # §2.2.2: every address RRset the relay may use must be secure (a NODATA answer for
        # AAAA is secure too when its denial validated)
        answered = [a for a in addrs if a.error is None]
        address_secure = bool(answered) and all(a.secure for a in answered) and any(
            a.records for a in answered)
        ttl = min((a.ttl for a in answered), default=self.min_ttl)
        records: list[Tlsa] = []
        tlsa_error: str | None = None
        tlsa_secure = False
        if address_secure:
            ans = await self.resolver.secure_query(tlsa_name(host, port), "TLSA")
            tlsa_error, tlsa_secure = ans.error, ans.secure
            records = [Tlsa(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))
                       for r in ans.records]
            if ans.error is None:
                ttl = min(ttl, ans.ttl)
        st = dane_status(host, address_secure=address_secure, tlsa_error=tlsa_error,
                         tlsa_secure=tlsa_secure, records=records, port=port)
        self.counters[{"dane": "dane_hosts", "defer": "dane_lookup_failures",
                       "none": "dane_insecure"}[st.mode]] += 1
        # a failed lookup is asked again soon; the rest for their TTL
        ttl = self.min_ttl if st.mode == "defer" else min(max(ttl, self.min_ttl), self.max_ttl)
        self._cache[key] = (now + ttl, st)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_hosts:
            self._cache.popitem(last=False)
        return st

    @staticmethod
    def check(status: DaneStatus, host: str, address: str, chain: Sequence[bytes],
              now: float | None = None) -> str | None:
        """None when the chain meets the host's TLSA records; else the deferral text."""
        why = check_chain(status.records, cert_facts(chain), host,
                          time.time() if now is None else now)
        if why is None:
            return None
        shown = ", ".join(str(r) for r in status.records[:3])
        return f"DANE: certificate of {host} [{address}] does not match its TLSA records " \
               f"({shown}): {why}"

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "dane_cached": len(self._cache)}
