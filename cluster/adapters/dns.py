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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from cluster.adapters.cares import AresChannel, settle
from cluster.adapters.cares import Lookup as _Lookup
from cluster.core.dns_policy import DnsPolicy
from cluster.core.dns_slots import QuerySlots

__all__ = [
    "DnsFailure",
    "FailureKind",
    "MxHost",
    "MxResolver",
    "Route",
    "SecureAnswer",
    "TxtAnswer",
    "address_literal_route",
    "merge_addresses",
    "mx_preferences",
    "normalize_domain",
]

FailureKind = Literal["nxdomain", "null_mx", "servfail", "timeout", "no_address"]

#: negative-cache time for a permanent failure when the answer carried no SOA (RFC 2308 §5
#: lets a resolver pick; 300 s is what dnspython and most stub resolvers use)
DEFAULT_NEGATIVE_TTL = 300.0
#: negative-cache time for a transient failure (SERVFAIL, timeout, MX hosts without address):
#: short, so a recovered zone is noticed quickly, long enough to stop a retry storm
DEFAULT_TRANSIENT_TTL = 10.0
#: default bound on DNS queries in flight at once per resolver (``[dns] max_concurrent``)
DEFAULT_MAX_CONCURRENT = 64


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


def mx_preferences(records: Sequence[tuple[int, str]]) -> dict[str, int] | None:
    """An MX answer's hosts with their best preference, in answer order; None for a null MX.

    RFC 7505 §3: a single "0 ." MX means "no mail" (never fall back to A/AAAA). An MX set whose
    every exchange is the root name ("") says the same, and a root exchange mixed with real
    ones (a misconfiguration §3 forbids) is simply unusable, so it is skipped. A host named
    twice keeps its lowest preference (RFC 5321 §5.1)."""
    prefs: dict[str, int] = {}
    for pref, name in records:
        if name and (name not in prefs or pref < prefs[name]):
            prefs[name] = pref
    return prefs or None


def merge_addresses(results: Sequence[Any]) -> tuple[tuple[str, ...], float, str | None, str]:
    """The A (then AAAA) lookups of one name as (addresses, smallest TTL, worst error, detail).

    The error is "servfail"/"timeout" if any query failed transiently, else "nxdomain" if the
    name does not exist, else None."""
    addrs = tuple(a for r in results for a in r.records)
    ttl = min(r.ttl for r in results)
    for r in results:
        if r.error in ("servfail", "timeout"):
            return addrs, ttl, r.error, r.detail
    if any(r.error == "nxdomain" for r in results):
        return addrs, ttl, "nxdomain", "name does not exist"
    return addrs, ttl, None, ""


class _Crash:
    """A bug in a lookup's callbacks, handed to the callers waiting on it (who raise it)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


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
        #: lookups under way (single flight): (kind, key) -> the callers waiting on it
        self._flights: dict[tuple[str, str], list[Callable[[Any], None]]] = {}
        #: the loop the flights and slots belong to
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hits = 0
        self._misses = 0
        self._queries = 0
        self.max_concurrent = max_concurrent
        base = policy or DnsPolicy(transient_ttl=self.transient_ttl)
        self.policy = DnsPolicy(**{**base.__dict__, "min_ttl": self.min_ttl,
                                   "max_ttl": self.max_ttl})
        #: a SERVFAIL or address-less answer is kept this long (``[dns] servfail_ttl``)
        self.transient_ttl = self.policy.transient_ttl
        #: queries sent and not yet answered (at most ``max_concurrent``) and those waiting
        self._slots: QuerySlots[Callable[[], None]] = QuerySlots(max_concurrent)
        self._timeouts = 0

    # ------------------------------------------------------------------ public API
    async def resolve(self, domain: str, now: float) -> Route:
        """The route for ``domain``; raises :class:`DnsFailure`. Cached until ``expires_at``."""
        res = await self._await(lambda done: self._route(domain, now, done))
        if isinstance(res, DnsFailure):
            raise res.copy()
        return res  # type: ignore[no-any-return]

    async def resolve_many(self, domains: list[str], now: float
                           ) -> dict[str, Route | DnsFailure]:
        """Resolve concurrently; keys are the domains exactly as given."""
        routes, _ = await self.resolve_batch(domains, [], now)
        return routes

    async def resolve_batch(self, domains: list[str], txt_names: list[str], now: float
                            ) -> tuple[dict[str, Route | DnsFailure], dict[str, TxtAnswer]]:
        """The routes of ``domains`` (as :meth:`resolve_many`) and the TXT answers of
        ``txt_names`` (as :meth:`txt_cached`), all asked at once; keys as given.

        No coroutine per lookup: each query's answer starts the next (MX → the MX hosts'
        addresses) by callback, and one future ends the batch. What the throttle asks per
        batch of new domains from the leaders (MX, A, ``_mta-sts`` TXT)."""
        self._on_loop()
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        routes: dict[str, Route | DnsFailure] = {}
        txts: dict[str, TxtAnswer] = {}
        crashed: list[_Crash] = []
        left = [1]   # one more until every lookup has been started

        def landed() -> None:
            left[0] -= 1
            if left[0] == 0 and not fut.done():
                fut.set_result(None)

        def into(table: dict[str, Any], key: str) -> Callable[[Any], None]:
            def done(v: Any) -> None:
                if isinstance(v, _Crash):
                    crashed.append(v)
                table[key] = v
                landed()
            return done

        for d in dict.fromkeys(domains):
            left[0] += 1
            self._route(d, now, into(routes, d))
        for n in dict.fromkeys(txt_names):
            left[0] += 1
            self._txt(n, now, into(txts, n))
        landed()
        await fut
        if crashed:
            raise crashed[0].error
        return routes, txts

    async def txt(self, name: str) -> tuple[list[str], str | None]:
        """The TXT records at ``name``, each record's strings joined (RFC 7208 §3.3 style),
        and the error: None (answered, maybe with no records), "nxdomain", "servfail" or
        "timeout". Not cached here (the caller keeps what it learns: MTA-STS's cache)."""
        try:
            qname = _ascii_name(name)
        except (ValueError, dns.exception.DNSException, UnicodeError) as e:
            return [], f"invalid name ({e})"
        res = await self._await(lambda done: self._send(qname, "TXT", done))
        return list(res.records), res.error

    async def txt_cached(self, name: str, now: float) -> TxtAnswer:
        """:meth:`txt`, cached with the answer's TTL: records with their TTL, none (NODATA,
        NXDOMAIN) with the negative TTL from the SOA (RFC 2308 §5), both clamped to
        ``min_ttl``..``max_ttl``; a failed lookup ("servfail", "timeout", an invalid name) is
        not cached. Concurrent asks for one name share one query. ``checked_at``: when the
        answer came from DNS (a cached one keeps its first time)."""
        return await self._await(lambda done: self._txt(name, now, done))  # type: ignore[no-any-return]

    async def host_addresses(self, name: str, now: float) -> tuple[tuple[str, ...], str | None]:
        """A and AAAA addresses of a host name (cached with the MX hosts' addresses), and the
        error that hid them, if any ("nxdomain", "servfail", "timeout")."""
        entry = await self._await(lambda done: self._host(name.lower().rstrip("."), now, done))
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
        await self._take_slot()
        try:
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
        finally:
            self._free_slot()
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
                "queries": self._queries, "inflight": len(self._flights),
                "queries_active": self._slots.active, "queries_peak": self._slots.peak,
                "queries_waiting": len(self._slots.waiting),
                "max_concurrent": self.max_concurrent, "timeouts": self._timeouts}

    # ------------------------------------------------------------------ callbacks' plumbing
    # Every lookup below takes ``done``, called once with its outcome (maybe at once, from
    # the cache), on the loop's thread. A lookup under way is a "flight": the callers of the
    # same key wait on it (single flight). A bug in a step lands on its callers as a
    # :class:`_Crash`, which the awaiting API raises.

    def _on_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # a new loop (a new asyncio.run): the last one's flights and waiters ended with it
            self._loop = loop
            self._flights.clear()
            self._slots.reset()

    async def _await(self, start: Callable[[Callable[[Any], None]], None]) -> Any:
        self._on_loop()
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        start(partial(settle, fut))
        v = await fut
        if isinstance(v, _Crash):
            raise v.error
        return v

    def _cached_or_joined(self, cache: _LRU, key: str, now: float,
                          expiry: Callable[[Any], float], flight: tuple[str, str],
                          done: Callable[[Any], None], *, counted: bool = True) -> bool:
        """True when ``done`` got the cached answer or waits on the lookup under way; False:
        the caller starts the lookup (``done`` waits on it). ``counted``: in hits/misses."""
        hit = cache.get(key, now, expiry)
        if hit is not None:
            self._hits += counted
            done(hit)
            return True
        self._misses += counted
        return self._join(flight, done)

    def _join(self, flight: tuple[str, str], done: Callable[[Any], None]) -> bool:
        """Wait on ``flight``: True if it was under way, False if the caller must start it."""
        waiters = self._flights.get(flight)
        if waiters is not None:
            waiters.append(done)
            return True
        self._flights[flight] = [done]
        return False

    def _land(self, flight: tuple[str, str], value: Any) -> None:
        for done in self._flights.pop(flight, ()):
            try:
                done(value)
            except Exception as e:  # noqa: BLE001 - one waiter's bug must not strand the rest
                assert self._loop is not None
                self._loop.call_exception_handler({"message": "DNS lookup waiter failed",
                                                   "exception": e})

    def _guard(self, flight: tuple[str, str], step: Callable[..., None], *args: Any) -> None:
        try:
            step(*args)
        except Exception as e:  # noqa: BLE001 - handed to the flight's callers
            self._land(flight, _Crash(e))

    def _send(self, qname: str, rdtype: str, done: Callable[[_Lookup], None], *,
              first: bool = False) -> None:
        """One query, once a slot is free (``max_concurrent``); ``first``: a follow-up, ahead
        of the queries waiting."""
        start = partial(self._issue, qname, rdtype, done)
        if self._slots.ask(start, first=first):
            start()

    def _issue(self, qname: str, rdtype: str, done: Callable[[_Lookup], None]) -> None:
        self._queries += 1
        self._channel.send(qname, rdtype, lambda res: self._answered(done, res))

    def _answered(self, done: Callable[[_Lookup], None], res: _Lookup) -> None:
        if res.error == "timeout":
            self._timeouts += 1
        self._free_slot()
        done(res)

    def _free_slot(self) -> None:
        nxt = self._slots.done()
        if nxt is not None:
            nxt()

    async def _take_slot(self) -> None:
        """A slot for a query not sent through c-ares (:meth:`secure_query`)."""
        self._on_loop()
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()

        def go() -> None:
            if fut.done():
                self._free_slot()   # its asker went away: pass the slot on
            else:
                fut.set_result(None)

        if self._slots.ask(go):
            return
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._free_slot()
            raise

    # ------------------------------------------------------------------ lookups
    def _route(self, domain: str, now: float, done: Callable[[Any], None]) -> None:
        literal = address_literal_route(domain, now, self.max_ttl)
        if literal is not None:
            done(literal)
            return
        try:
            key = normalize_domain(domain)
            if not key:
                raise ValueError("empty domain")
            qname = _ascii_name(key)
        except (ValueError, dns.exception.DNSException, UnicodeError) as e:
            # a name that cannot be encoded can never resolve
            done(DnsFailure("nxdomain", domain, permanent=True,
                            expires_at=now + self._clamp(self.negative_ttl),
                            detail=f"invalid domain name ({e})"))
            return
        flight = ("route", key)
        if self._cached_or_joined(self._routes, key, now, _expires_at, flight, done):
            return
        self._send(qname, "MX",
                   lambda mx: self._guard(flight, self._on_mx, key, qname, now, mx))

    def _route_done(self, key: str, res: Route | DnsFailure) -> None:
        self._routes.put(key, res)
        self._land(("route", key), res)

    def _on_mx(self, key: str, qname: str, now: float, mx: _Lookup) -> None:
        flight = ("route", key)
        if mx.error == "nxdomain":
            return self._route_done(key, self._permanent("nxdomain", key, now, mx.ttl,
                                                         "domain does not exist"))
        if mx.error is not None:
            return self._route_done(key, self._transient(mx.error, key, now, mx.detail))
        if not mx.records:
            # RFC 5321 §5.1: no MX → the domain itself is the MX, preference 0
            return self._addresses(qname, lambda parts: self._guard(
                flight, self._on_implicit, key, now, mx.ttl, parts))
        prefs = mx_preferences(mx.records)
        if prefs is None:
            return self._route_done(key, self._permanent(
                "null_mx", key, now, mx.ttl, "null MX: domain accepts no mail (RFC 7505)"))
        names = list(prefs)
        entries: list[Any] = [None] * len(names)
        left = [len(names)]

        def got(i: int, entry: Any) -> None:
            entries[i] = entry
            left[0] -= 1
            if left[0] == 0:
                self._guard(flight, self._on_hosts, key, now, mx.ttl, names, prefs, entries)

        for i, name in enumerate(names):
            self._host(name, now, partial(got, i))

    def _on_hosts(self, key: str, now: float, mx_ttl: float, names: list[str],
                  prefs: dict[str, int], entries: list[Any]) -> None:
        for e in entries:
            if isinstance(e, _Crash):
                raise e.error
        hosts: list[MxHost] = []
        deadline = now + mx_ttl
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
            return self._route_done(key, self._transient("no_address", key, now, detail,
                                                         timed_out=timed_out))
        if self._rng is not None:
            self._rng.shuffle(hosts)
        hosts.sort(key=lambda h: h.preference)  # stable: ties keep answer (or shuffled) order
        expires = now + self._clamp(deadline - now)
        if errors:
            # part of the answer was hidden by a transient failure: look again soon rather
            # than route to backups for a whole TTL
            expires = min(expires, now + self._transient_ttl())
        self._route_done(key, Route(key, tuple(hosts), False, expires))

    def _on_implicit(self, key: str, now: float, nodata_ttl: float,
                     parts: tuple[tuple[str, ...], float, str | None, str]) -> None:
        addrs, ttl, error, detail = parts
        if addrs:
            # the route also rests on the *absence* of MX records: the negative TTL counts
            expires = now + self._clamp(min(ttl, nodata_ttl))
            if error:
                expires = min(expires, now + self._transient_ttl())
            return self._route_done(key, Route(key, (MxHost(0, key, addrs),), True, expires))
        if error in ("servfail", "timeout"):
            return self._route_done(key, self._transient(error, key, now, detail))
        # The domain exists (the MX query said NOERROR) but has neither MX nor an address:
        # there is nowhere to deliver (RFC 5321 §5.1, last paragraph: an error). That is a
        # property of the published zone rather than a failure of a server, so permanent.
        self._route_done(key, self._permanent("no_address", key, now, min(ttl, nodata_ttl),
                                              "no MX and no A/AAAA records"))

    def _host(self, name: str, now: float, done: Callable[[Any], None]) -> None:
        flight = ("host", name)
        if self._cached_or_joined(self._hosts, name, now, _valid_until, flight, done,
                                  counted=False):
            return
        try:
            qname = _ascii_name(name)
        except (ValueError, dns.exception.DNSException, UnicodeError) as e:
            return self._land(flight, _HostEntry((), now + self.negative_ttl,
                                                 now + self._clamp(self.negative_ttl),
                                                 None, str(e)))
        # a follow-up of an MX answer: ahead of new domains' queries, so begun ones finish
        self._addresses(qname, lambda parts: self._guard(
            flight, self._on_host_addresses, name, now, parts), first=True)

    def _on_host_addresses(self, name: str, now: float,
                           parts: tuple[tuple[str, ...], float, str | None, str]) -> None:
        addrs, ttl, error, detail = parts
        if error == "timeout":
            valid = now + self.policy.cache_ttl("timeout")
        else:
            valid = now + (self._transient_ttl() if error else self._clamp(ttl))
        entry = _HostEntry(addrs, now + ttl, valid, error if error != "nxdomain" else None,
                           detail)
        self._hosts.put(name, entry)
        self._land(("host", name), entry)

    def _addresses(self, qname: str,
                   done: Callable[[tuple[tuple[str, ...], float, str | None, str]], None], *,
                   first: bool = False) -> None:
        """A then AAAA of ``qname``, concurrently: ``done`` gets :func:`merge_addresses`."""
        if not self.use_ipv6:
            self._send(qname, "A", lambda a: done(merge_addresses((a,))), first=first)
            return
        got: list[Any] = [None, None]

        def one(i: int, res: _Lookup) -> None:
            got[i] = res
            if got[0] is not None and got[1] is not None:
                done(merge_addresses(got))

        self._send(qname, "A", partial(one, 0), first=first)
        self._send(qname, "AAAA", partial(one, 1), first=first)

    def _txt(self, name: str, now: float, done: Callable[[Any], None]) -> None:
        key = name.lower().rstrip(".")
        flight = ("txt", key)
        if self._cached_or_joined(self._txts, key, now, _txt_expires, flight, done):
            return
        try:
            qname = _ascii_name(key)
        except (ValueError, dns.exception.DNSException, UnicodeError) as e:
            return self._land(flight, TxtAnswer((), f"invalid name ({e})", now, now))
        self._send(qname, "TXT", lambda res: self._guard(flight, self._on_txt, key, now, res))

    def _on_txt(self, key: str, now: float, res: _Lookup) -> None:
        ans = TxtAnswer(res.records, res.error, now, now + self._clamp(res.ttl))
        if res.error in (None, "nxdomain"):
            self._txts.put(key, ans)
        self._land(("txt", key), ans)

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
    short = name.rstrip(".")
    if 0 < len(short) <= 63 and ".." not in short and short[0] != ".":
        return short   # no label can be longer than the name: the common case, checked fast
    labels = short.split(".")
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
