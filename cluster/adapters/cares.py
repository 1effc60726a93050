"""One DNS query through c-ares: the wire work (encoding, sockets, parsing) done in C.

Role: the query engine under :class:`cluster.adapters.dns.MxResolver`'s MX, A/AAAA and TXT
lookups. dnspython spent ~0.4-0.6 ms of Python CPU per query (building and parsing messages,
a socket per query); c-ares does the same in C and keeps its UDP sockets open (issue 17).
Owns: a c-ares channel (its own event thread, answers handed to the asyncio loop that asked),
the mapping of c-ares outcomes to :class:`Lookup` (records, TTL, error), CNAME chains in an
answer, and the negative TTL of NXDOMAIN/NODATA from the authority section's SOA (RFC 2308 §5,
as dnspython computes it). Must not: cache (c-ares' own query cache is switched off: the
resolver caches with the caller's clock), retry a SERVFAIL (the caller decides), or read the
system resolver configuration when explicit nameservers are given.

Uses the cffi library that ``pycares`` (>= 5, c-ares >= 1.34) ships: its ``Channel.query``
drops the response of an NXDOMAIN/NODATA answer, and with it the SOA that sets how long the
"no" may be cached, and it offers no switch for c-ares' query cache.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import math
import socket
import weakref
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import pycares
from pycares._cares import ffi as _ffi  # type: ignore[import-not-found]
from pycares._cares import lib as _lib  # type: ignore[import-not-found]

__all__ = ["NEGATIVE_TTL_WITHOUT_SOA", "RDTYPES", "AresChannel", "Lookup", "settle"]

#: ares.h's ARES_OPT_QUERY_CACHE (c-ares >= 1.23), which pycares does not export
_OPT_QUERY_CACHE = 1 << 21
#: ares.h's ARES_OPT_MAXTIMEOUTMS (c-ares >= 1.22): the longest one try may wait
_OPT_MAXTIMEOUTMS = 1 << 20
_BAD = _lib.ARES_SOCKET_BAD
#: as dnspython: no SOA in a negative answer → this many seconds
NEGATIVE_TTL_WITHOUT_SOA = 300.0
#: as dnspython's resolve_chaining: at most this many CNAMEs followed in one answer
_MAX_CHAIN = 16
_MAX_TTL = float(2**31 - 1)

#: the record types asked through c-ares, by their text name
RDTYPES: dict[str, int] = {"A": _lib.ARES_REC_TYPE_A, "AAAA": _lib.ARES_REC_TYPE_AAAA,
                           "MX": _lib.ARES_REC_TYPE_MX, "TXT": _lib.ARES_REC_TYPE_TXT}
_A, _AAAA, _MX, _TXT = (RDTYPES[t] for t in ("A", "AAAA", "MX", "TXT"))
_CNAME, _SOA = _lib.ARES_REC_TYPE_CNAME, _lib.ARES_REC_TYPE_SOA
_ANSWER, _AUTHORITY = _lib.ARES_SECTION_ANSWER, _lib.ARES_SECTION_AUTHORITY
_OK, _NODATA, _NOTFOUND = _lib.ARES_SUCCESS, _lib.ARES_ENODATA, _lib.ARES_ENOTFOUND
_TIMEOUT, _BADNAME = _lib.ARES_ETIMEOUT, _lib.ARES_EBADNAME
_CB_TYPE = "void(*)(void *, ares_status_t, size_t, struct ares_dns_record *)"


class Lookup(NamedTuple):
    """Outcome of one (name, type) query (a named tuple: one is made per query, and a frozen
    dataclass's ``__init__`` cost several times as much)."""

    #: A/AAAA: address text; MX: (preference, exchange lowercased without the final dot, ""
    #: for the root); TXT: the record's strings joined, decoded as UTF-8 (errors replaced)
    records: tuple[Any, ...]
    #: seconds the outcome may be cached (record TTL, or the negative TTL from the SOA)
    ttl: float
    #: "nxdomain", "servfail", "timeout" or None (answered, possibly with no records)
    error: str | None = None
    detail: str = ""


def _text(p: Any) -> str:
    return _ffi.string(p).decode("ascii", "replace") if p != _ffi.NULL else ""


def _name(p: Any) -> str:
    return _text(p).rstrip(".").lower()


def _rdata(rr: Any, rdtype: int) -> Any:
    if rdtype == _A:
        return socket.inet_ntop(socket.AF_INET, bytes(_ffi.buffer(
            _lib.ares_dns_rr_get_addr(rr, _lib.ARES_RR_A_ADDR), 4)))
    if rdtype == _AAAA:
        return str(ipaddress.IPv6Address(bytes(_ffi.buffer(
            _lib.ares_dns_rr_get_addr6(rr, _lib.ARES_RR_AAAA_ADDR), 16))))
    if rdtype == _MX:
        return (int(_lib.ares_dns_rr_get_u16(rr, _lib.ARES_RR_MX_PREFERENCE)),
                _name(_lib.ares_dns_rr_get_str(rr, _lib.ARES_RR_MX_EXCHANGE)))
    # TXT: one record's character-strings, joined (RFC 7208 §3.3)
    n = _lib.ares_dns_rr_get_abin_cnt(rr, _lib.ARES_RR_TXT_DATA)
    size = _ffi.new("size_t *")
    parts = []
    for i in range(n):
        p = _lib.ares_dns_rr_get_abin(rr, _lib.ARES_RR_TXT_DATA, i, size)
        parts.append(bytes(_ffi.buffer(p, size[0])) if p != _ffi.NULL else b"")
    return b"".join(parts).decode("utf-8", "replace")


def parse_answer(status: int, rec: Any, qname: str, rdtype: int) -> Lookup:
    """A c-ares outcome as a :class:`Lookup`: the records of ``rdtype`` at ``qname`` (following
    CNAMEs within the answer), the smallest TTL of the records and CNAMEs used, and for no
    records the negative TTL min(SOA TTL, SOA MINIMUM) (300 s without a SOA)."""
    if status == _TIMEOUT:
        return Lookup((), 0.0, "timeout", "no answer from the DNS server in time")
    if status == _BADNAME:
        return _refused(status)
    if status not in (_OK, _NODATA, _NOTFOUND) or rec == _ffi.NULL:
        err = pycares.errno.errorcode.get(status, str(status))
        return Lookup((), 0.0, "servfail", f"{err}: {_text(_lib.ares_strerror(status))}")
    rrs = []
    for i in range(_lib.ares_dns_record_rr_cnt(rec, _ANSWER)):
        rr = _lib.ares_dns_record_rr_get_const(rec, _ANSWER, i)
        rrs.append((_name(_lib.ares_dns_rr_get_name(rr)), _lib.ares_dns_rr_get_type(rr), rr))
    name, min_ttl, found = qname.rstrip(".").lower(), _MAX_TTL, []
    for _ in range(_MAX_CHAIN + 1):
        target = None
        for owner, t, rr in rrs:
            if owner != name:
                continue
            if t == rdtype:
                found.append(_rdata(rr, rdtype))
                min_ttl = min(min_ttl, _lib.ares_dns_rr_get_ttl(rr))
            elif t == _CNAME and target is None:
                target = (_name(_lib.ares_dns_rr_get_str(rr, _lib.ARES_RR_CNAME_CNAME)),
                          _lib.ares_dns_rr_get_ttl(rr))
        if found or target is None:
            break
        name, min_ttl = target[0], min(min_ttl, target[1])
    else:
        return Lookup((), 0.0, "servfail", f"CNAME chain longer than {_MAX_CHAIN}")
    if status == _NOTFOUND and found:
        return Lookup((), 0.0, "servfail", "records in an NXDOMAIN answer")
    if not found:
        neg = NEGATIVE_TTL_WITHOUT_SOA
        for i in range(_lib.ares_dns_record_rr_cnt(rec, _AUTHORITY)):
            rr = _lib.ares_dns_record_rr_get_const(rec, _AUTHORITY, i)
            owner = _name(_lib.ares_dns_rr_get_name(rr))
            if _lib.ares_dns_rr_get_type(rr) == _SOA and (
                    owner == "" or name == owner or name.endswith("." + owner)):
                neg = min(_lib.ares_dns_rr_get_ttl(rr),
                          _lib.ares_dns_rr_get_u32(rr, _lib.ARES_RR_SOA_MINIMUM))
                break
        min_ttl = min(min_ttl, neg)
    return Lookup(tuple(found), float(min_ttl), "nxdomain" if status == _NOTFOUND else None)


class AresChannel:
    """A c-ares channel asking ``nameservers`` on ``port`` (None: the system configuration,
    /etc/resolv.conf). ``timeout`` bounds one whole query; one UDP try waits at most
    ``try_timeout`` of it (less once c-ares has measured the server), then c-ares asks again.

    Driven by the asking coroutine's event loop, as aiodns drives pycares: c-ares reports the
    sockets it wants watched, the loop calls back when they are readable, and a timer runs
    c-ares' retries, so answers are parsed on the loop's thread with no thread hop. Used from
    one loop at a time (an actor's); a later loop (a new ``asyncio.run``) takes the sockets
    over. Its sockets are closed when the channel is collected, or by :meth:`close`."""

    def __init__(self, nameservers: list[str] | None, port: int, *, timeout: float,
                 try_timeout: float = 2.0) -> None:
        self.timeout = timeout
        per_try = min(timeout, try_timeout)
        self._driver = drv = _Driver(timeout)
        opts = _ffi.new("struct ares_options *")
        # no SERVFAIL/REFUSED retry (one server: dnspython gave up at once too), no search list
        opts.flags = (_lib.ARES_FLAG_NOCHECKRESP | _lib.ARES_FLAG_NOSEARCH
                      | _lib.ARES_FLAG_EDNS)
        opts.ednspsz = 1232
        opts.timeout = opts.maxtimeout = max(1, int(per_try * 1000))
        # c-ares shortens a try to a few RTTs of the server and doubles it per round: enough
        # tries to fill ``timeout`` (the deadline in :meth:`query` ends the query at the latest)
        opts.tries = max(2, math.ceil(timeout / per_try) + 3)
        opts.qcache_max_ttl = 0
        opts.sock_state_cb = _lib._sock_state_cb
        opts.sock_state_cb_data = drv.handle
        mask = (_lib.ARES_OPT_FLAGS | _lib.ARES_OPT_TIMEOUTMS | _lib.ARES_OPT_TRIES
                | _lib.ARES_OPT_EDNSPSZ | _OPT_QUERY_CACHE | _OPT_MAXTIMEOUTMS
                | _lib.ARES_OPT_SOCK_STATE_CB)
        devnull = _ffi.new("char[]", b"/dev/null")
        if nameservers is not None:
            # no system configuration read: the servers are set right after, before any query
            opts.resolvconf_path = devnull
            mask |= _lib.ARES_OPT_RESOLVCONF
        chan = _ffi.new("ares_channel *")
        r = _lib.ares_init_options(chan, opts, mask)
        if r != _OK:
            raise RuntimeError(f"c-ares channel: {_text(_lib.ares_strerror(r))}")
        drv.chan = chan
        if nameservers is not None:
            csv = ",".join(f"[{ns}]:{port}" if ":" in ns else f"{ns}:{port}"
                           for ns in nameservers)
            r = _lib.ares_set_servers_csv(chan[0], csv.encode("ascii"))
            if r != _OK:
                _lib.ares_destroy(chan[0])
                drv.chan = None
                raise ValueError(f"nameservers {nameservers!r}: "
                                 f"{_text(_lib.ares_strerror(r))}")
        self._finalizer = weakref.finalize(self, drv.close)

    def servers(self) -> list[str]:
        """The servers asked, "ip:port" (tests: proof no system configuration was read)."""
        p = _lib.ares_get_servers_csv(self._driver.chan[0])
        try:
            return _text(p).split(",") if p != _ffi.NULL else []
        finally:
            if p != _ffi.NULL:
                _lib.ares_free_string(p)

    def close(self) -> None:
        """Stop watching the sockets and destroy the channel (queries in flight: cancelled)."""
        self._finalizer()

    async def query(self, qname: str, rdtype: str) -> Lookup:
        """Ask ``rdtype`` ("A", "AAAA", "MX", "TXT") of ``qname`` (ASCII, no trailing dot)."""
        fut: asyncio.Future[Lookup] = asyncio.get_running_loop().create_future()
        self.send(qname, rdtype, partial(settle, fut))
        return await fut

    def send(self, qname: str, rdtype: str, done: Callable[[Lookup], Any]) -> None:
        """Ask as :meth:`query` does, without a coroutine: ``done(lookup)`` is called once, on
        the running loop's thread, with the answer or at the latest a "timeout" after
        ``timeout`` seconds; right away with the refusal when c-ares will not send the name.
        A query sent while the channel reads answers (from another query's ``done``) goes
        out as soon as that read ends (c-ares is not re-entered)."""
        drv = self._driver
        if drv.chan is None:
            raise RuntimeError("c-ares channel closed")
        loop = asyncio.get_running_loop()
        if drv.loop is not loop:
            drv.move_to(loop)
        if drv.reading:
            drv.later.append((qname, rdtype, done))
            return
        drv.send(qname, rdtype, done)
        drv.arm()


class _Driver:
    """A channel's sockets and timer on an asyncio loop, and the queries waiting for answers.
    Holds no reference to the :class:`AresChannel`, so that one can be collected."""

    def __init__(self, timeout: float) -> None:
        #: a query not answered in this many seconds ends as a "timeout"
        self.timeout = timeout
        self.chan: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fds: dict[int, tuple[bool, bool]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        #: queries sent and not yet answered: id -> (done, qname, record type)
        self.pending: dict[int, tuple[Callable[[Lookup], Any], str, int]] = {}
        self.ids = itertools.count(1)
        self.closed = False
        #: (loop time after which a query is given up, its id), in the order sent: one
        #: timeout per channel, so the deadlines come in order and one timer serves them all
        self.deadlines: deque[tuple[float, int]] = deque()
        self.deadline_timer: asyncio.TimerHandle | None = None
        #: inside ares_process_fd (answers being handed out): sends wait in ``later``
        self.reading = False
        self.later: list[tuple[str, str, Callable[[Lookup], Any]]] = []
        self._tv = _ffi.new("struct timeval *")
        self.handle = _ffi.new_handle(self._sock_state)
        self.callback = _ffi.callback(_CB_TYPE, self._on_answer)

    def send(self, qname: str, rdtype: str, done: Callable[[Lookup], Any]) -> None:
        """Hand one query to c-ares (the caller arms the timer once it has sent its lot)."""
        t = RDTYPES[rdtype]
        key = next(self.ids)
        self.pending[key] = (done, qname, t)
        r = _lib.ares_query_dnsrec(self.chan[0], qname.encode("ascii"), _lib.ARES_CLASS_IN, t,
                                   self.callback, _ffi.cast("void *", key), _ffi.NULL)
        if r != _OK:
            # c-ares may already have called back with the refusal (then nothing is pending)
            if self.pending.pop(key, None) is not None:
                self._hand(done, _refused(r))
            return
        assert self.loop is not None
        self.deadlines.append((self.loop.time() + self.timeout, key))
        if self.deadline_timer is None:
            self.deadline_timer = self.loop.call_at(self.deadlines[0][0], self._on_deadline)

    def _on_deadline(self) -> None:
        self.deadline_timer = None
        loop, dl = self.loop, self.deadlines
        if loop is None or self.closed:
            return
        now, pending = loop.time(), self.pending
        while dl and dl[0][0] <= now:
            entry = pending.pop(dl.popleft()[1], None)
            if entry is not None:
                self._hand(entry[0], Lookup((), 0.0, "timeout",
                                            f"no answer in {self.timeout} s"))
        # the queries already answered need no wake-up: the timer waits for the oldest one
        # still unanswered (about one wake-up per timeout, not one per query sent)
        while dl and dl[0][1] not in pending:
            dl.popleft()
        if dl and self.deadline_timer is None:
            self.deadline_timer = loop.call_at(dl[0][0], self._on_deadline)

    def _hand(self, done: Callable[[Lookup], Any], res: Lookup) -> None:
        try:
            done(res)
        except Exception as e:  # noqa: BLE001 - the asker's bug must not stop the others
            loop = self.loop
            if loop is not None:
                loop.call_exception_handler({"message": "c-ares answer handler failed",
                                             "exception": e})

    def _sock_state(self, fd: int, readable: bool, writable: bool) -> None:
        # c-ares opened, changed or closed a socket (called from ares_* calls on our thread)
        if self.closed:
            return
        old = self.fds.pop(fd, (False, False))
        loop = self.loop
        if loop is not None and not loop.is_closed():
            self._watch(loop, fd, old, (bool(readable), bool(writable)))
        if readable or writable:
            self.fds[fd] = (bool(readable), bool(writable))

    def _watch(self, loop: asyncio.AbstractEventLoop, fd: int, old: tuple[bool, bool],
               new: tuple[bool, bool]) -> None:
        if old[0] and not new[0]:
            loop.remove_reader(fd)
        if new[0] and not old[0]:
            loop.add_reader(fd, self._process, fd, _BAD)
        if old[1] and not new[1]:
            loop.remove_writer(fd)
        if new[1] and not old[1]:
            loop.add_writer(fd, self._process, _BAD, fd)

    def move_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the sockets from ``loop`` from now on (the previous loop ended)."""
        old = self.loop
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None
        # the previous loop's askers are gone with it: their answers, when they come, are
        # dropped (as a cancelled future's were)
        self.pending.clear()
        self.deadlines.clear()
        self.later.clear()
        for fd, state in self.fds.items():
            if old is not None and not old.is_closed():
                self._watch(old, fd, state, (False, False))
            self._watch(loop, fd, (False, False), state)
        self.loop = loop

    def _process(self, rfd: int, wfd: int) -> None:
        if self.chan is None:
            return
        self.reading = True
        try:
            _lib.ares_process_fd(self.chan[0], rfd, wfd)
        finally:
            self.reading = False
        if self.later:
            # queries the answers' handlers asked for, sent now that c-ares is done
            later, self.later = self.later, []
            for qname, rdtype, done in later:
                if self.chan is None:
                    break
                self.send(qname, rdtype, done)
            self.arm()

    def arm(self) -> None:
        """(Re)start the timer for c-ares' next retry or timeout, if sooner than the one set."""
        loop = self.loop
        if self.chan is None or loop is None:
            return
        tv = _lib.ares_timeout(self.chan[0], _ffi.NULL, self._tv)
        if tv == _ffi.NULL:
            return
        when = loop.time() + tv.tv_sec + tv.tv_usec / 1e6
        if self.timer is not None:
            if self.timer_at <= when + 0.005:
                return
            self.timer.cancel()
        # (uvloop's handles have no when(): the time is kept here)
        self.timer, self.timer_at = loop.call_at(when, self._on_timer), when

    def _on_timer(self) -> None:
        self.timer = None
        self._process(_BAD, _BAD)
        self.arm()

    def _on_answer(self, arg: Any, status: int, _timeouts: int, rec: Any) -> None:
        # inside an ares_* call on the loop's thread; ``rec`` is valid only during this call
        entry = self.pending.pop(int(_ffi.cast("uintptr_t", arg)), None)
        if entry is None or self.closed:
            return
        done, qname, rdtype = entry
        try:
            res = parse_answer(status, rec, qname, rdtype)
        except Exception as e:  # noqa: BLE001 - a response we cannot read
            res = Lookup((), 0.0, "servfail", f"unreadable response ({type(e).__name__})")
        self._hand(done, res)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.loop
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None
        self.pending.clear()
        self.later.clear()
        if loop is not None and not loop.is_closed():
            for fd, state in self.fds.items():
                try:
                    self._watch(loop, fd, state, (False, False))
                except RuntimeError:
                    pass  # collected on another thread while the loop runs: it closes soon
        self.fds.clear()
        if self.chan is not None:
            # cancelled and destroyed on pycares' shutdown thread; the callbacks it still
            # makes find ``closed`` set and do nothing
            pycares._shutdown_manager.start()
            pycares._shutdown_manager.destroy_channel(self.chan, (self.handle, self.callback))
            self.chan = None


def _refused(status: int) -> Lookup:
    """c-ares would not send the query: a name it cannot encode (a space, say) can never
    resolve (as MxResolver treats names dnspython cannot encode); anything else: servfail."""
    why = f"c-ares: {_text(_lib.ares_strerror(status))}"
    if status == _BADNAME:
        return Lookup((), NEGATIVE_TTL_WITHOUT_SOA, "nxdomain", f"invalid domain name ({why})")
    return Lookup((), 0.0, "servfail", why)


def settle(fut: asyncio.Future[Any], value: Any) -> None:
    """``fut``'s result, unless its asker has gone (cancelled)."""
    if not fut.done():
        fut.set_result(value)
