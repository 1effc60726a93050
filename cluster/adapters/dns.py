"""MX resolution: turn a recipient domain into a delivery :class:`Route` (RFC 5321 §5.1, RFC 7505).

Role: the DNS I/O adapter the SiteThrottle actors use to learn where a domain's mail goes.
Owns: the MX → A/AAAA lookup sequence, address literals (``user@[192.0.2.1]``: a route to
that address, no lookup), implicit MX (no MX: the domain's own address records,
preference 0), null MX (RFC 7505: "0 ." means the domain accepts no mail), the mapping of DNS
outcomes to permanent/transient :class:`DnsFailure` kinds, and a bounded TTL cache of routes,
failures (negative caching) and MX host addresses, and a bound on the DNS queries in flight at
once (a burst of new domains queues here, where waiting costs nothing, rather than in the
resolver, where it turns into timeouts). How long each outcome is cached is
:class:`cluster.core.dns_policy.DnsPolicy`'s table; a timeout is cached for a second only and
flagged (``DnsFailure.timed_out``) so the caller can ask again soon instead of deferring mail.
Must not: decide what a failure *means* for a message (bounce, defer, for how long: that is the
pure core's retry/bounce policy), filter addresses by policy (a route to a loopback or private
address, or an address literal, is reported as given; refusing to deliver there is the MX
address guard's call, ``cluster.core.mxguard``, applied by the relay), open SMTP connections, or touch
the system resolver configuration when explicit nameservers are given.

Time is an argument (``now``, seconds since the epoch as from :func:`time.time`): every
``expires_at`` is ``now`` plus a TTL, so the cache can be tested without sleeping.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from cluster.adapters.cares import AresChannel
from cluster.adapters.cares import Lookup as _Lookup
from cluster.core.dns_policy import DnsPolicy

__all__ = [
    "DnsFailure",
    "FailureKind",
    "MxHost",
    "MxResolver",
    "Route",
    "SecureAnswer",
    "TxtAnswer",
    "address_literal_route",
    "normalize_domain",
]

FailureKind = Literal["nxdomain", "null_mx", "servfail", "timeout", "no_address"]

#: negative-cache time for a permanent failure when the answer carried no SOA (RFC 2308 §5
#: lets a resolver pick; 300 s is what dnspython and most stub resolvers use)
DEFAULT_NEGATIVE_TTL = 300.0
#: negative-cache time for a transient failure (SERVFAIL, timeout, MX hosts without address):
#: short, so a recovered zone is noticed quickly, long enough to stop a retry storm
DEFAULT_TRANSIENT_TTL = 10.0
#: at most this many lookups in flight per :meth:`MxResolver.resolve_many` call
RESOLVE_MANY_CONCURRENCY = 64
#: default bound on DNS queries in flight at once per resolver (``[dns] max_concurrent``)
DEFAULT_MAX_CONCURRENT = 64

_T = TypeVar("_T")


@dataclass(frozen=True)
class MxHost:
    """One mail exchanger of a route."""

    preference: int
    #: lowercased, no trailing dot
    name: str
    #: A addresses then AAAA addresses, as text
    addresses: tuple[str, ...]

    @property
    def global_addresses(self) -> tuple[str, ...]:
        """The addresses that are globally routable (not loopback, private, link-local...)."""
        return tuple(a for a in self.addresses if _is_global(a))


@dataclass(frozen=True)
class Route:
    """Where a domain's mail goes, valid until ``expires_at``."""

    domain: str
    #: ascending preference (RFC 5321 §5.1); equal preferences in answer order, or shuffled
    #: when the resolver was given an ``rng``
    hosts: tuple[MxHost, ...]
    #: no MX records: the domain's own A/AAAA records, as an implicit MX of preference 0
    implicit: bool
    #: ``now`` + the smallest TTL of the records used, clamped to [min_ttl, max_ttl]
    expires_at: float

    @property
    def has_global_address(self) -> bool:
        """Whether any host has a globally routable address.

        A route whose every address is loopback/private (e.g. ``MX 0 localhost`` tricks, or an
        implicit MX on ``::1``) cannot reach the domain's real mail servers; whether to refuse
        it is the delivery policy's decision, not the resolver's.
        """
        return any(h.global_addresses for h in self.hosts)


class DnsFailure(Exception):
    """A domain has no usable route now (``permanent=False``) or ever (``permanent=True``).

    ``kind``: ``nxdomain`` (permanent), ``null_mx`` (permanent, RFC 7505), ``servfail`` and
    ``timeout`` (transient), ``no_address`` (MX hosts exist but none has an address:
    transient; no MX and the domain itself has no address: permanent).
    ``expires_at``: the failure is negative-cached until then.
    ``timed_out``: the resolver did not answer in time (``timeout``, or ``no_address`` because
    the MX hosts' lookups timed out): worth asking again in seconds, not a fact about the domain.
    """

    def __init__(self, kind: FailureKind, domain: str, *, permanent: bool,
                 expires_at: float, detail: str = "", timed_out: bool | None = None) -> None:
        self.kind: FailureKind = kind
        self.domain = domain
        self.permanent = permanent
        self.expires_at = expires_at
        self.detail = detail
        self.timed_out = (kind == "timeout") if timed_out is None else bool(timed_out)
        super().__init__(f"{kind}: {domain}" + (f": {detail}" if detail else ""))

    def copy(self) -> DnsFailure:
        """A fresh instance (raising a cached instance again would grow its traceback)."""
        return DnsFailure(self.kind, self.domain, permanent=self.permanent,
                          expires_at=self.expires_at, detail=self.detail,
                          timed_out=self.timed_out)

    def __reduce__(self) -> tuple[Any, ...]:
        # keyword-only arguments: teach pickle (Ray) how to rebuild us
        return (_rebuild_failure, (self.kind, self.domain, self.permanent, self.expires_at,
                                   self.detail, self.timed_out))

    def __repr__(self) -> str:
        return (f"DnsFailure(kind={self.kind!r}, domain={self.domain!r}, "
                f"permanent={self.permanent!r}, expires_at={self.expires_at!r})")


def _rebuild_failure(kind: FailureKind, domain: str, permanent: bool, expires_at: float,
                     detail: str, timed_out: bool = False) -> DnsFailure:
    return DnsFailure(kind, domain, permanent=permanent, expires_at=expires_at, detail=detail,
                      timed_out=timed_out)


def address_literal_route(domain: str, now: float, ttl: float) -> Route | DnsFailure | None:
    """RFC 5321 §4.1.3 / §5.1: a recipient domain that is an address literal (``[192.0.2.1]``,
    ``[IPv6:2001:db8::1]``) is delivered to that address, no DNS asked. None when ``domain`` is
    not a literal. Whether the address may be used is the MX guard's call (the relay's)."""
    d = domain.strip()
    if not (d.startswith("[") and d.endswith("]")):
        return None
    inner = d[1:-1]
    text = inner[5:] if inner[:5].lower() == "ipv6:" else inner
    try:
        addr = ipaddress.ip_address(text)
        if (addr.version == 6) != (inner[:5].lower() == "ipv6:"):
            raise ValueError("an IPv6 literal needs the 'IPv6:' tag, an IPv4 one none")
    except ValueError as e:
        return DnsFailure("nxdomain", domain, permanent=True, expires_at=now + ttl,
                          detail=f"invalid address literal ({e})")
    name = f"[IPv6:{addr}]" if addr.version == 6 else f"[{addr}]"
    return Route(name, (MxHost(0, name, (str(addr),)),), True, now + ttl)


def normalize_domain(domain: str) -> str:
    """Lowercase, strip surrounding space and one trailing dot; U-labels become A-labels."""
    d = domain.strip().rstrip(".").lower()
    if not d.isascii():
        d = dns.name.from_text(d).to_text(omit_final_dot=True).lower()
    return d


def _is_global(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_global
    except ValueError:
        return False


@dataclass(frozen=True)
class SecureAnswer:
    """Outcome of :meth:`MxResolver.secure_query`."""

    records: tuple[Any, ...]
    #: the resolver set AD: it validated the answer with DNSSEC
    secure: bool
    #: "nxdomain", "servfail" (also: bogus), "timeout" or None (answered, maybe NODATA)
    error: str | None
    ttl: float
    detail: str = ""


@dataclass(frozen=True)
class TxtAnswer:
    """The TXT records at a name (each record's strings joined), as :meth:`MxResolver.txt`,
    with when they were looked up and until when they may be used."""

    records: tuple[str, ...]
    #: None (answered, maybe with no records), "nxdomain", "servfail", "timeout", ...
    error: str | None
    checked_at: float
    expires_at: float


@dataclass(frozen=True)
class _HostEntry:
    """Addresses of one MX host, cached across domains (many domains share MX hosts)."""

    addresses: tuple[str, ...]
    #: now + smallest raw TTL of the A/AAAA outcomes (unclamped)
    deadline: float
    #: the cache entry is valid until then (clamped TTL; short when a lookup failed)
    valid_until: float
    #: a transient failure ("servfail"/"timeout") hid part of the answer
    error: str | None
    detail: str = ""


class _LRU:
    """An LRU map of entries with an expiry; expired entries are dropped on access."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._d: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str, now: float, expiry: Callable[[Any], float]) -> Any | None:
        v = self._d.get(key)
        if v is None:
            return None
        if now >= expiry(v):
            del self._d[key]
            return None
        self._d.move_to_end(key)
        return v

    def put(self, key: str, value: Any) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        self._d.clear()


class MxResolver:
    """Resolves domains to :class:`Route`\\ s, with a TTL-bounded LRU cache.

    ``nameservers=None`` uses the system resolver configuration (production). Given a list of
    IP addresses, the resolver asks exactly those, on ``port``, and never reads
    ``/etc/resolv.conf`` (tests, the demo, a dedicated local resolver).

    ``timeout`` bounds one whole query; a single UDP try waits at most 2 s of it so a lost
    datagram is retried. Queries go through c-ares (:mod:`cluster.adapters.cares`: the wire
    work in C, ~0.1 ms of CPU a query against dnspython's ~0.6); DNSSEC queries
    (:meth:`secure_query`) through dnspython. ``rng``: when given, MX hosts of equal
    preference are shuffled once per lookup (RFC 5321 §5.1 asks senders to spread load over
    equal-preference hosts); without it their order is the answer's order (deterministic).

    Concurrent lookups of the same domain (or the same MX host) share one query, and at most
    ``max_concurrent`` queries are in flight at once (the others wait, and their ``timeout``
    starts only when they are sent). ``policy`` sets the cache times of timeouts and transient
    failures (:class:`DnsPolicy`; ``min_ttl``/``max_ttl`` given here win). Not thread-safe: use
    from one event loop (an actor's).
    """

    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    transient_ttl: float = DEFAULT_TRANSIENT_TTL

    def __init__(self, nameservers: list[str] | None = None, port: int = 53, *,
                 timeout: float = 5.0, min_ttl: float = 5.0, max_ttl: float = 3600.0,
                 cache_size: int = 100_000, use_ipv6: bool = True,
                 rng: random.Random | None = None,
                 max_concurrent: int = DEFAULT_MAX_CONCURRENT,
                 policy: DnsPolicy | None = None) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        if min_ttl < 0 or max_ttl < min_ttl:
            raise ValueError(f"need 0 <= min_ttl <= max_ttl, got {min_ttl}, {max_ttl}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if nameservers is not None:
            if not nameservers:
                raise ValueError("nameservers: give at least one address, or None for the "
                                 "system resolver")
            for ns in nameservers:
                ipaddress.ip_address(ns)  # ValueError: a name would need the system resolver
            nameservers = list(nameservers)
        self._nameservers, self._port = nameservers, port
        #: MX, A/AAAA and TXT queries: c-ares (the wire work in C; None: system configuration)
        self._channel = AresChannel(nameservers, port, timeout=timeout)
        #: asks with DO and AD (:meth:`secure_query`: DANE's TLSA and the AD bit), dnspython,
        #: made on first use
        self._dnssec: dns.asyncresolver.Resolver | None = None
        self.timeout = timeout
        self.min_ttl = float(min_ttl)
        self.max_ttl = float(max_ttl)
        self.use_ipv6 = use_ipv6
        self._rng = rng
        self._routes = _LRU(cache_size)
        self._hosts = _LRU(cache_size)
        self._txts = _LRU(cache_size)
        self._inflight: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._hits = 0
        self._misses = 0
        self._queries = 0
        self.max_concurrent = max_concurrent
        base = policy or DnsPolicy(transient_ttl=self.transient_ttl)
        self.policy = DnsPolicy(**{**base.__dict__, "min_ttl": self.min_ttl,
                                   "max_ttl": self.max_ttl})
        #: a SERVFAIL or address-less answer is kept this long (``[dns] servfail_ttl``)
        self.transient_ttl = self.policy.transient_ttl
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        #: queries sent and not yet answered now, and the most there ever were
        self._queries_active = 0
        self._queries_peak = 0
        self._timeouts = 0

    # ------------------------------------------------------------------ public API
    async def resolve(self, domain: str, now: float) -> Route:
        """The route for ``domain``; raises :class:`DnsFailure`. Cached until ``expires_at``."""
        res = await self._resolve_cached(domain, now)
        if isinstance(res, DnsFailure):
            raise res.copy()
        return res

    async def resolve_many(self, domains: list[str], now: float
                           ) -> dict[str, Route | DnsFailure]:
        """Resolve concurrently; keys are the domains exactly as given."""
        sem = asyncio.Semaphore(RESOLVE_MANY_CONCURRENCY)
        unique = list(dict.fromkeys(domains))

        async def one(d: str) -> Route | DnsFailure:
            async with sem:
                return await self._resolve_cached(d, now)

        results = await asyncio.gather(*(one(d) for d in unique))
        return dict(zip(unique, results))

    async def txt(self, name: str) -> tuple[list[str], str | None]:
        """The TXT records at ``name``, each record's strings joined (RFC 7208 §3.3 style),
        and the error: None (answered, maybe with no records), "nxdomain", "servfail" or
        "timeout". Not cached here (the caller keeps what it learns: MTA-STS's cache)."""
        try:
            qname = _ascii_name(name)
        except (ValueError, dns.exception.DNSException, UnicodeError) as e:
            return [], f"invalid name ({e})"
        res = await self._query(qname, "TXT")
        return list(res.records), res.error

    async def txt_cached(self, name: str, now: float) -> TxtAnswer:
        """:meth:`txt`, cached with the answer's TTL: records with their TTL, none (NODATA,
        NXDOMAIN) with the negative TTL from the SOA (RFC 2308 §5), both clamped to
        ``min_ttl``..``max_ttl``; a failed lookup ("servfail", "timeout", an invalid name) is
        not cached. Concurrent asks for one name share one query. ``checked_at``: when the
        answer came from DNS (a cached one keeps its first time)."""
        key = name.lower().rstrip(".")
        hit = self._txts.get(key, now, _txt_expires)
        if hit is not None:
            self._hits += 1
            return hit  # type: ignore[no-any-return]
        self._misses += 1
        return await self._single_flight(("txt", key), lambda: self._lookup_txt(key, now))

    async def _lookup_txt(self, key: str, now: float) -> TxtAnswer:
        try:
            qname = _ascii_name(key)
        except (ValueError, dns.exception.DNSException, UnicodeError) as e:
            return TxtAnswer((), f"invalid name ({e})", now, now)
        res = await self._query(qname, "TXT")
        ans = TxtAnswer(res.records, res.error, now, now + self._clamp(res.ttl))
        if res.error in (None, "nxdomain"):
            self._txts.put(key, ans)
        return ans

    async def host_addresses(self, name: str, now: float) -> tuple[tuple[str, ...], str | None]:
        """A and AAAA addresses of a host name (cached with the MX hosts' addresses), and the
        error that hid them, if any ("nxdomain", "servfail", "timeout")."""
        entry = await self._host(name.lower().rstrip("."), now)
        if entry.addresses:
            return entry.addresses, None
        return (), entry.error or "nxdomain"

    async def secure_query(self, name: str, rdtype: str) -> SecureAnswer:
        """The records of ``rdtype`` at ``name`` asked with the DO bit (RFC 3225) and the AD
        bit (RFC 6840 §5.7), and whether the resolver vouched for them: ``secure`` is the AD
        flag of its answer, which a validating resolver sets only for data it validated with
        DNSSEC. Only as trustworthy as the path to the resolver: raymta must ask a validating
        resolver on its own host or loopback (as Postfix requires for DANE). Not cached here
        (DANE's cache keeps what it learns)."""
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as e:
            return SecureAnswer((), False, f"invalid name ({e})", 0.0)
        res = self._secure_resolver()
        async with self._semaphore():
            self._queries += 1
            try:
                ans = await res.resolve(qname, dns.rdatatype.from_text(rdtype),
                                        raise_on_no_answer=False, search=False)
            except dns.resolver.NXDOMAIN as e:
                return SecureAnswer((), False, "nxdomain", _nxdomain_ttl(e))
            except dns.exception.Timeout as e:
                self._timeouts += 1
                return SecureAnswer((), False, "timeout", 0.0, _short(e))
            except (dns.exception.DNSException, OSError) as e:
                # a validating resolver answers SERVFAIL for bogus data too
                return SecureAnswer((), False, "servfail", 0.0, _short(e))
        secure = bool(ans.response.flags & dns.flags.AD)
        ttl = float(ans.chaining_result.minimum_ttl)
        return SecureAnswer(tuple(ans.rrset) if ans.rrset is not None else (), secure, None,
                            ttl)

    def _secure_resolver(self) -> dns.asyncresolver.Resolver:
        if self._dnssec is None:
            if self._nameservers is None:
                res = dns.asyncresolver.Resolver()  # system configuration (production)
            else:
                res = dns.asyncresolver.Resolver(configure=False)
                res.port = self._port
                # explicit Nameserver objects: the port is bound here, not looked up later
                res.nameservers = [dns.nameserver.Do53Nameserver(ns, self._port)
                                   for ns in self._nameservers]
            res.lifetime, res.timeout, res.cache = self.timeout, min(self.timeout, 2.0), None
            res.use_edns(0, dns.flags.DO, 1232)
            res.flags = dns.flags.RD | dns.flags.AD
            self._dnssec = res
        return self._dnssec

    def cache_info(self) -> dict[str, Any]:
        return {"routes": len(self._routes), "hosts": len(self._hosts), "txts": len(self._txts),
                "max_size": self._routes.size, "hits": self._hits, "misses": self._misses,
                "queries": self._queries, "inflight": len(self._inflight),
                "queries_active": self._queries_active, "queries_peak": self._queries_peak,
                "max_concurrent": self.max_concurrent, "timeouts": self._timeouts}

    # ------------------------------------------------------------------ caching layer
    async def _resolve_cached(self, domain: str, now: float) -> Route | DnsFailure:
        literal = address_literal_route(domain, now, self.max_ttl)
        if literal is not None:
            return literal
        try:
            key = normalize_domain(domain)
            if not key:
                raise ValueError("empty domain")
            qname = _ascii_name(key)
        except (ValueError, dns.exception.DNSException, UnicodeError) as e:
            # a name that cannot be encoded can never resolve
            return DnsFailure("nxdomain", domain, permanent=True,
                              expires_at=now + self._clamp(self.negative_ttl),
                              detail=f"invalid domain name ({e})")
        hit = self._routes.get(key, now, _expires_at)
        if hit is not None:
            self._hits += 1
            return hit  # type: ignore[no-any-return]
        self._misses += 1
        res = await self._single_flight(("route", key),
                                        lambda: self._lookup_route(key, qname, now))
        return res

    async def _single_flight(self, key: tuple[str, str],
                             make: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``make()`` once for concurrent callers with the same key."""
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(make())  # type: ignore[arg-type]
            self._inflight[key] = task

            def done(t: asyncio.Task[Any], key: tuple[str, str] = key) -> None:
                if self._inflight.get(key) is t:
                    del self._inflight[key]
                if not t.cancelled():
                    t.exception()  # retrieved: no "never retrieved" warning

            task.add_done_callback(done)
        # shield: one caller being cancelled must not cancel the lookup the others wait on
        return await asyncio.shield(task)

    # ------------------------------------------------------------------ lookups
    async def _lookup_route(self, key: str, qname: str,
                            now: float) -> Route | DnsFailure:
        res = await self._route_uncached(key, qname, now)
        self._routes.put(key, res)
        return res

    async def _route_uncached(self, key: str, qname: str,
                              now: float) -> Route | DnsFailure:
        mx = await self._query(qname, "MX")
        if mx.error == "nxdomain":
            return self._permanent("nxdomain", key, now, mx.ttl, "domain does not exist")
        if mx.error is not None:
            return self._transient(mx.error, key, now, mx.detail)
        if not mx.records:
            return await self._implicit_route(key, qname, now, mx.ttl)

        # RFC 7505 §3: a single "0 ." MX means "no mail"; never fall back to A/AAAA. An MX set
        # whose every exchange is the root name says the same, and a root exchange mixed with
        # real ones (a misconfiguration §3 forbids) is simply unusable, so it is skipped.
        real = [(pref, name) for pref, name in mx.records if name]  # "": the root
        if not real:
            return self._permanent("null_mx", key, now, mx.ttl,
                                   "null MX: domain accepts no mail (RFC 7505)")

        prefs: dict[str, int] = {}
        for pref, name in real:
            if name not in prefs or pref < prefs[name]:
                prefs[name] = pref
        names = list(prefs)
        # one MX host (most of a long tail): awaited directly, no task for gather to wrap
        entries = [await self._host(names[0], now)] if len(names) == 1 else \
            await asyncio.gather(*(self._host(n, now) for n in names))

        hosts: list[MxHost] = []
        deadline = now + mx.ttl
        errors: list[str] = []
        for name, entry in zip(names, entries):
            deadline = min(deadline, entry.deadline)
            if entry.error:
                errors.append(f"{name}: {entry.error} {entry.detail}".rstrip())
            if entry.addresses:
                hosts.append(MxHost(prefs[name], name, entry.addresses))
        if not hosts:
            detail = "no MX host has an address"
            if errors:
                detail += " (" + "; ".join(errors) + ")"
            timed_out = any(e.error == "timeout" for e in entries)
            return self._transient("no_address", key, now, detail, timed_out=timed_out)
        if self._rng is not None:
            self._rng.shuffle(hosts)
        hosts.sort(key=lambda h: h.preference)  # stable: ties keep answer (or shuffled) order
        expires = now + self._clamp(deadline - now)
        if errors:
            # part of the answer was hidden by a transient failure: look again soon rather
            # than route to backups for a whole TTL
            expires = min(expires, now + self._transient_ttl())
        return Route(key, tuple(hosts), False, expires)

    async def _implicit_route(self, key: str, qname: str, now: float,
                              nodata_ttl: float) -> Route | DnsFailure:
        """RFC 5321 §5.1: no MX → the domain itself is the MX, preference 0."""
        addrs, ttl, error, detail = await self._addresses(qname)
        if addrs:
            # the route also rests on the *absence* of MX records: the negative TTL counts
            expires = now + self._clamp(min(ttl, nodata_ttl))
            if error:
                expires = min(expires, now + self._transient_ttl())
            return Route(key, (MxHost(0, key, addrs),), True, expires)
        if error in ("servfail", "timeout"):
            return self._transient(error, key, now, detail)
        # The domain exists (the MX query said NOERROR) but has neither MX nor an address:
        # there is nowhere to deliver (RFC 5321 §5.1, last paragraph: an error). That is a
        # property of the published zone rather than a failure of a server, so permanent.
        return self._permanent("no_address", key, now, min(ttl, nodata_ttl),
                               "no MX and no A/AAAA records")

    async def _host(self, name: str, now: float) -> _HostEntry:
        hit = self._hosts.get(name, now, _valid_until)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        return await self._single_flight(("host", name), lambda: self._lookup_host(name, now))

    async def _lookup_host(self, name: str, now: float) -> _HostEntry:
        try:
            qname = _ascii_name(name)
        except (ValueError, dns.exception.DNSException, UnicodeError) as e:
            return _HostEntry((), now + self.negative_ttl, now + self._clamp(self.negative_ttl),
                              None, str(e))
        addrs, ttl, error, detail = await self._addresses(qname)
        if error == "timeout":
            valid = now + self.policy.cache_ttl("timeout")
        else:
            valid = now + (self._transient_ttl() if error else self._clamp(ttl))
        entry = _HostEntry(addrs, now + ttl, valid, error if error != "nxdomain" else None,
                           detail)
        self._hosts.put(name, entry)
        return entry

    async def _addresses(self, qname: str
                         ) -> tuple[tuple[str, ...], float, str | None, str]:
        """A then AAAA of ``qname``, concurrently: (addresses, min TTL, worst error, detail).

        The error is "servfail"/"timeout" if any query failed transiently, else "nxdomain" if
        the name does not exist, else None.
        """
        results = await asyncio.gather(self._query(qname, "A"), self._query(qname, "AAAA")) \
            if self.use_ipv6 else [await self._query(qname, "A")]
        addrs = tuple(a for r in results for a in r.records)
        ttl = min(r.ttl for r in results)
        transient = [r for r in results if r.error in ("servfail", "timeout")]
        if transient:
            return addrs, ttl, transient[0].error, transient[0].detail
        if any(r.error == "nxdomain" for r in results):
            return addrs, ttl, "nxdomain", "name does not exist"
        return addrs, ttl, None, ""

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots = asyncio.Semaphore(self.max_concurrent)
            self._slots_loop = loop
        return self._slots

    async def _query(self, qname: str, rdtype: str) -> _Lookup:
        async with self._semaphore():
            self._queries_active += 1
            self._queries_peak = max(self._queries_peak, self._queries_active)
            try:
                res = await self._query_now(qname, rdtype)
            finally:
                self._queries_active -= 1
        if res.error == "timeout":
            self._timeouts += 1
        return res

    async def _query_now(self, qname: str, rdtype: str) -> _Lookup:
        self._queries += 1
        return await self._channel.query(qname, rdtype)

    # ------------------------------------------------------------------ helpers
    def _clamp(self, ttl: float) -> float:
        return min(max(ttl, self.min_ttl), self.max_ttl)

    def _transient_ttl(self) -> float:
        return min(self.transient_ttl, self.max_ttl)

    def _permanent(self, kind: FailureKind, domain: str, now: float, ttl: float,
                   detail: str) -> DnsFailure:
        return DnsFailure(kind, domain, permanent=True, expires_at=now + self._clamp(ttl),
                          detail=detail)

    def _transient(self, kind: str, domain: str, now: float, detail: str, *,
                   timed_out: bool = False) -> DnsFailure:
        assert kind in ("servfail", "timeout", "no_address"), kind
        timed_out = timed_out or kind == "timeout"
        # a timeout is asked again in seconds (DnsPolicy.timeout_retry_at): cache it only
        # long enough to merge the shards' repeats
        ttl = self.policy.cache_ttl("timeout") if timed_out else self._transient_ttl()
        return DnsFailure(kind, domain, permanent=False,  # type: ignore[arg-type]
                          expires_at=now + ttl, detail=detail, timed_out=timed_out)


def _expires_at(v: Route | DnsFailure) -> float:
    return v.expires_at


def _txt_expires(v: TxtAnswer) -> float:
    return v.expires_at


def _valid_until(v: _HostEntry) -> float:
    return v.valid_until


def _ascii_name(name: str) -> str:
    """``name`` as c-ares is asked it (ASCII, no final dot), once dnspython has checked it is
    a valid DNS name (labels of at most 63 octets, 255 in all): ValueError/DNSException if
    not. Names are plain ASCII here almost always: only others go through dnspython's IDNA."""
    if not name.isascii():
        return dns.name.from_text(name).to_text(omit_final_dot=True)
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(0 < len(x) <= 63 for x in labels):
        dns.name.from_text(name)  # raises the precise error
        raise ValueError(f"invalid DNS name {name!r}")
    return ".".join(labels)


def _nxdomain_ttl(e: dns.resolver.NXDOMAIN) -> float:
    """RFC 2308 §5: negative TTL = min(SOA TTL, SOA MINIMUM) from the authority section."""
    try:
        responses: dict[Any, dns.message.QueryMessage] = e.kwargs.get("responses", {})
        ttls = [float(r.resolve_chaining().minimum_ttl) for r in responses.values()]
    except Exception:  # noqa: BLE001 - a malformed response: use the default
        ttls = []
    return min(ttls) if ttls else DEFAULT_NEGATIVE_TTL


def _short(e: BaseException) -> str:
    s = str(e)
    return s if len(s) <= 300 else s[:297] + "..."
