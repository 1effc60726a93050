"""RelayPool actor: the only part of raymta that talks SMTP to the outside world.

One per egress source on each node that owns it (``relay:<node>:<source>``; a source's
``node_label`` names its nodes). It takes batches of messages from
coordinators (grouped by site), keeps up to the site's connection limit open per site — each
connection under a lease from the site's SiteThrottle — reuses a connection for up to the site's
deliveries-per-connection, walks MX hosts in preference order, and streams back one classified
result per message. Replies that concern the whole site (421, "try again later") go to the
throttle as feedback. All sites together never have more than ``delivery.max_connections``
connections open from one relay (``cluster.core.relay_slots``: a site beyond it waits its turn).

DKIM: when keys are configured, each message is signed here, just before DATA, with the keys
of its From domain (``cluster.adapters.dkim_keys``; docs/dkim.md says why here): every attempt,
MX failover and restored backup carries a signature made with the current key. Key files are
re-read when their mtime changes (checked at most every ``dkim.reload_interval``) or on
:meth:`RelayPool.reload_dkim`. Without keys the delivery path does no DKIM work at all.

VERP: with ``[bounce]`` configured, each message goes out with MAIL FROM = its VERP return path
(``cluster.core.verp``: ``<prefix>-<tag>-<message id>@<bounce domain>``); see
``actors/bounce_listener.py`` for what comes back to it.

One-click unsubscribe: mail from a sender domain with ``[[unsubscribe]]`` gets List-Unsubscribe
and List-Unsubscribe-Post (``cluster.core.unsubscribe``), before DKIM signing.

TLS and the address guard: each site's route is first checked by the MX address guard
(``cluster.core.mxguard``): a route whose every address is loopback, private, link-local, ... or
one of the cluster's own (unless ``delivery.allow_networks`` allows it) bounces at once with
5.4.4, without a lease and without a connection. STARTTLS follows the site's ``tls`` policy
(``cluster.adapters.smtp``; opportunistic falls back to plaintext on the same host, required
verifies and defers as a TLS failure), or the recipient domain's MTA-STS policy where no
[[site]] sets ``tls`` (``actors/relay_sts.py``), and with ``delivery.dane`` an MX host's
DNSSEC-secure TLSA records before either (``actors/relay_dane.py``); ``[routes]`` hosts are
guarded too (a refusal defers); per-site TLS figures are in :meth:`RelayPool.stats`.

Failure: if this process dies, its TCP connections die with it and the coordinators' streaming
calls fail, so they put the messages back in their queues (at-least-once; duplicates are bounded
by what was in flight here). Leases of a dead incarnation are dropped by the throttle when the
restarted pool first asks, or expire after ``delivery.lease_ttl``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import ray

from actors.loop import LoopLag, preload, tune_gc, unwrap_private, use_uvloop
from actors.relay_dane import DaneGate
from actors.relay_sts import StsGate, rcpt_domain
from cluster.adapters.smtp import ConnectFailure, TlsFailure, connect_site
from cluster.config import Config, EgressSource
from cluster.core.mxguard import AddressGuard
from cluster.core.relay_slots import RelaySlots
from cluster.core.replies import (
    Classification,
    Outcome,
    address_refused,
    classify,
    connection_failure,
    dane_failure,
    mta_sts_failure,
    route_refused,
    tls_failure,
)
from cluster.core.shaping import reshape
from cluster.core.sites import SiteLimits, limits_from_wire
from cluster.core.throttle import ideal_connections
from cluster.core.tls_policy import BrokenTls, ca_file_for, mta_sts_applies
from cluster.core.unsubscribe import add_header_fields, domain_matches, header_fields
from cluster.core.verp import return_path

__all__ = ["RelayDraining", "RelayPool"]

log = logging.getLogger("raymta.relay")

#: seconds a result waits to be batched with others for the same coordinator (one report call
#: per coordinator per flush, whatever the number of open deliver calls: per-call flushes
#: every 20 ms were ~20 % of the relay's CPU in Ray call overhead)
_RESULT_FLUSH = 0.1
_LEASE_RETRY = (0.05, 1.0)
#: lease requests within this many seconds go to a throttle as one call
_ASK_GATHER = 0.005
#: results kept per shard leader until it confirms them committed (bounded: a leader that
#: never answers must not make a relay grow without limit)
_UNACKED_MAX = 200_000
_RESEND_AFTER = 2.0
#: queued items a relay looks through for the other recipients of a message (bounded work
#: per transaction; the coordinator hands a message's recipients out together)
_GATHER_WINDOW = 200
#: a site at its connection cap is asked for more leases at most this often while this relay
#: has connections open to it (they drain its queue meanwhile)
_CAP_RECHECK = 0.5
#: sites with TLS figures of their own in stats (the rest are summed under "other")
_TLS_SITES_MAX = 500
#: the cluster's own addresses are looked up again this often (nodes come and go)
_OWN_REFRESH = 300.0
#: TLS figures kept per site
TLS_KINDS = ("tls", "plaintext", "fallback", "tls_failures", "sts_enforced",
             "sts_testing_failures", "dane")


def own_addresses(cfg: Config, source: EgressSource) -> set[str]:
    """This cluster's addresses, which the MX guard refuses unless allowed: this host's
    (from its name), every Ray node's, the egress bind addresses and the ingress listeners'.
    Blocking (a Ray GCS call): run it off the event loop."""
    out: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            out.add(str(info[4][0]))
    except OSError:
        pass
    try:
        out.update(n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive"))
    except Exception:  # noqa: BLE001, S110 - outside a Ray worker (tests of the pure parts)
        pass
    out.update(e.bind_address for e in cfg.egress if e.bind_address)
    if source.bind_address:
        out.add(source.bind_address)
    ing = cfg.ingress
    for hp in (*ing.submission, *ing.submissions, *ing.http):
        out.add(hp.rpartition(":")[0].strip("[]"))
    out.discard("")
    return out


class _Call:
    """The results owed to one streaming ``deliver`` call. They go into the relay's outbox for
    the calling coordinator, which one task flushes for every call at once."""

    __slots__ = ("expected", "done", "reply_to", "finished", "relay", "mark")

    def __init__(self, relay: "RelayPool", reply_to: str) -> None:
        self.expected = 0
        self.done = 0
        self.relay = relay
        self.reply_to = reply_to
        self.finished = asyncio.Event()
        self.mark = 0   # the relay's result count just after this call's last result

    def add(self, result: list[Any]) -> None:
        self.mark = self.relay._add_result(self.reply_to, result)
        self.done += 1
        if self.done >= self.expected:
            self.finished.set()


@dataclass
class _Site:
    name: str
    hosts: list[list[Any]]
    port: int
    limits: SiteLimits
    throttle: str
    limits_wire: dict[str, Any]                          # what limits was built from
    queue: deque = field(default_factory=deque)          # (item, call)
    workers: int = 0
    leases: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    acquiring: bool = False       # a task is getting leases for this site
    ask_after: float = 0.0        # at the site's cap: do not ask again before (monotonic)
    delivered: int = 0
    failed: int = 0
    #: the address guard's view of ``hosts`` (recomputed when the route changes)
    guard_of: list[list[Any]] | None = None
    usable_hosts: list[list[Any]] = field(default_factory=list)
    refusal: Classification | None = None
    ca_file: str = ""
    #: the MTA-STS mode the last connection was planned under ("" = none applied)
    sts_mode: str = ""


def _fill_bodies(batch: dict[str, Any]) -> None:
    """Items whose body came with an earlier item of the batch (same body id) get it."""
    bodies: dict[str, bytes] = {}
    for spec in batch.values():
        for item in spec["items"]:
            if len(item) > 6:
                if item[4] is None:
                    item[4] = bodies[item[6]]
                else:
                    bodies.setdefault(item[6], item[4])


def _wake(fut: asyncio.Future | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def _result(item: list[Any], c: Classification, host: str) -> list[Any]:
    # [id, outcome, code, enhanced, text, category, host]
    return [item[0], c.outcome.value, c.code, c.enhanced, c.text, c.category, host]


class RelayDraining(RuntimeError):
    """A batch offered to a relay that is draining (its node is being emptied)."""


class RelayPool:
    def __init__(self, config: Config, name: str, source: EgressSource) -> None:
        use_uvloop()
        tune_gc()
        preload("actors.coordinator", "actors.site_throttle")
        unwrap_private(self, RelayPool)
        self.cfg = config
        self.name = name
        self.source = source
        self.incarnation = uuid.uuid4().hex[:12]
        self.sites: dict[str, _Site] = {}
        self._handles: dict[str, Any] = {}
        self._feedback: list[tuple[str, ...]] = []   # throttle, site, kind, text[, source]
        self._shaping_rules = config.shaping.rules if config.shaping.enabled else None
        #: lease requests waiting to go out, per throttle: site -> (site, n, future); and
        #: leases to give back, per throttle: site -> ids. Both go as one call per throttle.
        self._asks: dict[str, dict[str, tuple[_Site, int, asyncio.Future]]] = {}
        self._asks_due = False
        self._releases: dict[str, dict[str, list[int]]] = {}
        #: connections open at once, all sites together (delivery.max_connections); a site
        #: waiting for a slot waits on its event here
        self.slots = RelaySlots(config.delivery.max_connections)
        self._slot_freed: dict[str, asyncio.Future] = {}
        self._wake_due = False      # a pass of :meth:`_wake_waiting` is scheduled
        #: sites with a connection open and idle, longest idle first (a site waiting for a
        #: slot closes the first of them: dict order is the order they went idle)
        self._idle: dict[str, int] = {}
        #: the sites of ``_idle`` a waiting site has not yet woken, in the same order; an
        #: entry found stale (its site woken otherwise, or no longer idle) is dropped when
        #: met, so each wait looks at O(1) entries, not at every idle site (a burst of
        #: sites at the cap made that quadratic: each one passed over all the ones woken
        #: before it in the same loop iteration)
        self._idle_line: dict[str, None] = {}
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        from actors.metrics import RelayMetrics
        self.metrics = RelayMetrics(name, config.metrics.enabled, source.name)
        #: ids queued or being sent here, so a batch repeated by a restarted leader is not
        #: sent twice (bounded: every id leaves with its result or its call)
        self._holding: set[str] = set()
        #: results waiting for the next flush, per coordinator
        self._outboxes: dict[str, list[list[Any]]] = {}
        #: per shard leader: results sent but not yet confirmed committed (id → result)
        self._unacked: dict[str, dict[str, list[Any]]] = {}
        self._results_ready = asyncio.Event()
        self._added = 0      # results put in outboxes, ever
        self._sent = 0       # of those, handed to Ray (as of the last flush)
        self._flushed: asyncio.Future | None = None
        #: set by ``raymta drain`` (:meth:`drain`): no new batch is taken
        self.draining = False
        self.counters = {"delivered": 0, "transient": 0, "permanent": 0, "connections": 0,
                         "tls_connections": 0, "connect_failures": 0, "tls_fallbacks": 0,
                         "tls_failures": 0, "guard_refused": 0}
        #: per site: connections with TLS, in plaintext, plaintext after a failed handshake,
        #: hosts that failed a required TLS policy (bounded: the oldest go into "other")
        self.tls_sites: OrderedDict[str, dict[str, int]] = OrderedDict()
        #: opportunistic TLS: MX hosts whose handshake failed, sent to in plaintext a while
        self.broken_tls = BrokenTls(config.delivery.tls_broken_ttl)
        self._own_at = time.monotonic()
        self.guard = AddressGuard.build(config.delivery.allow_networks,
                                        own_addresses(config, source))
        #: MTA-STS (RFC 8461): recipient domains' policies (actors/relay_sts.py)
        self.sts = StsGate(config, lambda: self.guard)
        #: DANE (RFC 7672): MX hosts' DNSSEC-secure TLSA records (actors/relay_dane.py)
        self.dane = DaneGate(config)
        #: (host, port) of [routes]: guarded too, but a refusal defers (the config's fault)
        self._static = {(r.host, r.port) for r in config.routes}
        from actors.metrics import loop_lag_reporter
        self.loop_lag = LoopLag(report=loop_lag_reporter(name, config.metrics.enabled))
        from cluster.adapters.dkim_keys import signer_from_config
        #: None when no DKIM key is configured: the hot path then does not sign at all
        self.signer = signer_from_config(config.dkim)
        #: RSA signing runs on these threads (OpenSSL releases the GIL: two threads sign
        #: twice as fast as one, measured), each with a signer of its own (its caches are not
        #: shared), so the event loop goes on with other connections meanwhile
        self._sign_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._signers: list[Any] = []
        self._sign_local = threading.local()
        self._signers_lock = threading.Lock()
        if self.signer is not None:
            self._sign_pool = concurrent.futures.ThreadPoolExecutor(
                max(2, os.cpu_count() or 2), thread_name_prefix="dkim")

    # ------------------------------------------------------------------ plumbing
    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            self._spawn(self._renew_loop())
            self._spawn(self._feedback_loop())
            self._spawn(self._flush_loop())
            self._spawn(self.loop_lag.run())

    def _add_result(self, coordinator: str, result: list[Any]) -> int:
        self._holding.discard(result[0])
        box = self._outboxes.get(coordinator)
        if box is None:
            box = self._outboxes[coordinator] = []
        box.append(result)
        self._added += 1
        self._results_ready.set()
        return self._added

    async def _sent_through(self, mark: int) -> None:
        """Return once the first ``mark`` results have been sent."""
        while self._sent < mark:
            if self._flushed is None:
                self._flushed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._flushed)

    async def _flush_loop(self) -> None:
        while True:
            await self._results_ready.wait()
            await asyncio.sleep(_RESULT_FLUSH)
            self._results_ready.clear()
            boxes, self._outboxes = self._outboxes, {}
            sent, done, self._flushed = self._added, self._flushed, None
            for coordinator, results in boxes.items():
                try:
                    self._report(coordinator, results)
                    self.metrics.count_results(results)
                except Exception:   # a bug must not stop every later flush
                    log.exception("reporting %d results to %s", len(results), coordinator)
            self._sent = sent
            if done is not None and not done.done():
                done.set_result(None)

    def _actor(self, name: str) -> Any:
        # named-actor handles (throttles and coordinators), looked up once
        h = self._handles.get(name)
        if h is None:
            h = ray.get_actor(name, namespace=self.cfg.cluster.namespace)
            self._handles[name] = h
        return h

    # ------------------------------------------------------------------ the work
    async def deliver(self, payload: bytes, reply_to: str) -> int:
        """Deliver a batch; results are pushed to the coordinator ``reply_to`` as they come.

        payload: msgpack ``{site: {"hosts", "port", "limits", "throttle",
        "items": [[id, attempt, sender, rcpt, body, smtputf8, body id], ...]}}`` (body None
        when an earlier item of the batch with the same body id carries it). Returns the number of
        messages handled, after the last result was sent: the caller uses the return (or the
        error if this process dies) only to learn that the batch is finished.

        Results go by fire-and-forget calls to the *named* coordinator rather than back on this
        call, so that they reach a coordinator restarted meanwhile (Ray queues calls to a
        restarting actor) and nothing here ever waits on a caller that has died."""
        self._ensure_started()
        if self.draining:
            # the leader requeues the batch (no message of it was taken) and lists the relays
            # again, without this one (its node is marked drained)
            raise RelayDraining(f"{self.name} is draining: it takes no new batches")
        batch = msgpack.unpackb(payload, raw=False)
        _fill_bodies(batch)
        if self.sts.enabled:
            # the policies of the recipient domains are known before their mail is queued
            # (their TXT records mostly come with the batch: the throttle looked them up
            # beside the MX records, once for the cluster)
            on = [spec for name, spec in batch.items()
                  if self._sts_on(name, spec["hosts"], spec["limits"]["tls"])]
            await self.sts.prefetch((rcpt_domain(it[3]) for spec in on for it in spec["items"]),
                                    {rcpt_domain(d): t for spec in on
                                     for d, t in (spec.get("sts") or {}).items()})
        call = _Call(self, reply_to)
        mine: list[str] = []
        refused: list[tuple[list[Any], Classification]] = []
        for site_name, spec in batch.items():
            s = self._site(site_name, spec)
            refusal = self._guard(s)
            for item in spec["items"]:
                if refusal is not None and item[0] not in self._holding:
                    # no address may be used: bounce (a [routes] host: defer) now, without a
                    # lease or a connection
                    call.expected += 1
                    refused.append((item, refusal))
                    continue
                if item[0] in self._holding:
                    # already here from an earlier batch (a shard leader that restarted hands
                    # out again what its predecessor had sent): that one's result will come
                    self.counters["duplicates_skipped"] = \
                        self.counters.get("duplicates_skipped", 0) + 1
                    continue
                self._holding.add(item[0])
                mine.append(item[0])
                s.queue.append((item, call))
                call.expected += 1
            self._start_workers(s)
        for item, c in refused:      # once call.expected is complete
            call.add(_result(item, c, ""))
            self.counters[c.outcome.value] += 1
            self.counters["guard_refused"] += 1
        try:
            if call.expected:
                await call.finished.wait()
                # every result is in an outbox now: return once they have been sent
                await self._sent_through(call.mark)
        finally:
            self._holding.difference_update(mine)
        return call.expected

    def _report(self, coordinator: str, results: list[list[Any]]) -> None:
        """Send results to their shard leader and keep them until it says they are committed:
        a leader that dies before it commits them gets them again from here when its
        successor starts (:meth:`unacked_results`), instead of sending the messages again."""
        box = self._unacked.setdefault(coordinator, {})
        for r in results:
            box[r[0]] = r
        while len(box) > _UNACKED_MAX:      # bounded: the oldest go (at-least-once still)
            box.pop(next(iter(box)))
            self.counters["unacked_dropped"] = self.counters.get("unacked_dropped", 0) + 1
        try:
            h = self._actor(coordinator)
            ref = h.report.remote(msgpack.packb(results, use_bin_type=True))
        except (ray.exceptions.RayError, ValueError) as e:
            log.warning("could not report %d results to %s: %s", len(results), coordinator, e)
            self._handles.pop(coordinator, None)
            return
        ids = [r[0] for r in results]
        fut = asyncio.wrap_future(ref.future())
        fut.add_done_callback(lambda f: self._acked(coordinator, ids, f))

    def _acked(self, coordinator: str, ids: list[str], f: asyncio.Future) -> None:
        if f.cancelled() or f.exception() is not None:
            # kept: the next leader asks for them when it starts; and they are sent again
            # in a while (to a leader that lost them without dying, or that is back)
            self._handles.pop(coordinator, None)
            asyncio.get_running_loop().call_later(_RESEND_AFTER, self._resend, coordinator,
                                                  ids)
            return
        box = self._unacked.get(coordinator)
        if box is not None:
            for mid in ids:
                box.pop(mid, None)

    def _resend(self, coordinator: str, ids: list[str]) -> None:
        box = self._unacked.get(coordinator, {})
        again = [box[i] for i in ids if i in box]
        if again:
            self.counters["results_resent"] = self.counters.get("results_resent", 0) + len(again)
            self._report(coordinator, again)

    async def drain(self) -> dict[str, int]:
        """Take no new batch from now on (``raymta drain``); what this relay still holds:
        messages queued or being sent, results not yet sent, results sent but not yet
        confirmed committed by their leader. All 0: nothing is lost when it stops."""
        self.draining = True
        return {"holding": len(self._holding),
                "outbox": sum(len(b) for b in self._outboxes.values()),
                "unacked": sum(len(b) for b in self._unacked.values())}

    async def unacked_results(self, coordinator: str) -> bytes:
        """Results reported to ``coordinator`` that it has not confirmed as committed (its
        predecessor died first): a starting leader takes them before it hands messages out
        again. msgpack list, as :meth:`QueueCoordinator.report` takes."""
        self._ensure_started()
        return msgpack.packb(list(self._unacked.get(coordinator, {}).values()),
                             use_bin_type=True)

    def _site(self, name: str, spec: dict[str, Any]) -> _Site:
        wire = spec["limits"]
        s = self.sites.get(name)
        if s is None:
            s = self.sites[name] = _Site(name, spec["hosts"], spec["port"],
                                         limits_from_wire(wire), spec["throttle"], wire)
            return s
        # newest route and limits win (DNS TTL expiry, config change); parse only on change
        s.hosts, s.port, s.throttle = spec["hosts"], spec["port"], spec["throttle"]
        if wire != s.limits_wire:
            s.limits, s.limits_wire = limits_from_wire(wire), wire
        return s

    def _guard(self, s: _Site) -> Classification | None:
        """The MX address guard for the site's route (cached until the route changes): the
        hosts and addresses that may be used go to ``s.usable_hosts``; when none may, the
        permanent 5.4.4 classification every message for the site gets."""
        if s.guard_of is s.hosts:
            return s.refusal
        if s.guard_of == s.hosts:   # every batch brings its own copy of an unchanged route
            s.guard_of = s.hosts
            return s.refusal
        s.guard_of = s.hosts
        s.ca_file = ca_file_for(s.name, [h[1] for h in s.hosts], self.cfg.sites,
                                self.cfg.delivery.tls_ca_file)
        static = bool(s.hosts) and all((h[1], s.port) in self._static for h in s.hosts)
        d = self.guard.check_route(s.hosts)
        s.usable_hosts = d.hosts
        s.refusal = None if not d.refusal else \
            route_refused(d.refusal) if static else address_refused(d.refusal)
        if d.refused and d.refusal is None:
            self.counters["guard_dropped"] = self.counters.get("guard_dropped", 0) + d.refused
        return s.refusal

    def _tls_count(self, site: str, kind: str, n: int = 1) -> None:
        t = self.tls_sites.get(site)
        if t is None:
            t = self.tls_sites[site] = dict.fromkeys(TLS_KINDS, 0)
            while len(self.tls_sites) > _TLS_SITES_MAX:
                # the oldest site's figures join "other": totals stay monotonic
                old_name, old = next((k, v) for k, v in self.tls_sites.items() if k != "other")
                del self.tls_sites[old_name]
                o = self.tls_sites.setdefault("other", dict.fromkeys(TLS_KINDS, 0))
                for k, v in old.items():
                    o[k] += v
        t[kind] += n

    def _start_workers(self, s: _Site) -> None:
        s.wake.set()
        if s.acquiring or ideal_connections(len(s.queue), s.limits) <= s.workers:
            return
        if s.workers and time.monotonic() < s.ask_after:
            return   # at the site's cap a moment ago; the open connections drain the queue
        s.acquiring = True
        self._spawn(self._acquire_for(s))

    async def _acquire_for(self, s: _Site) -> None:
        """Get leases for the connections the site's queue calls for, and start a connection
        worker on each. With none open and none to be had, retry with backoff; after half the
        in-flight timeout hand the messages back (waiting longer would let the coordinator
        time them out and send them again while they still sit here). A wait for a slot of
        this relay's own cap is not the site's: it neither defers nor counts toward that."""
        delay = _LEASE_RETRY[0]
        give_up = time.monotonic() + self.cfg.queue.inflight_timeout / 2
        try:
            while s.queue:
                want = ideal_connections(len(s.queue), s.limits) - s.workers
                if want <= 0:
                    return
                # this relay's own cap first (delivery.max_connections), then the site's
                # leases: a lease is never held without a connection slot for it
                want = self.slots.take(s.name, want)
                if not want:
                    if s.workers:
                        return     # the open connections drain the queue
                    # at the relay's cap: wait for a connection to close (not the site's
                    # fault: neither deferred nor counted against its time to get a lease)
                    await self._wait_slot(s)
                    give_up = time.monotonic() + self.cfg.queue.inflight_timeout / 2
                    continue
                got: list[int] = []
                try:
                    got = await self._ask_leases(s, want)
                finally:
                    self._give_slots(want - len(got))   # the slots the throttle did not lease
                for lease in got:
                    s.leases.add(lease)
                    s.workers += 1
                    self._spawn(self._worker(s, lease))
                if len(got) < want:
                    s.ask_after = time.monotonic() + _CAP_RECHECK
                if s.workers:
                    if got and len(got) == want:
                        continue   # the queue may have grown meanwhile
                    return         # the open connections drain it
                if time.monotonic() > give_up:
                    self._defer_queued(s, classify(
                        451, "4.4.5 raymta: no connection slot for this site in time (site "
                        "paused or at its connection limit)", phase="connection",
                        rules=self.cfg.classification.rules))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, _LEASE_RETRY[1])
        finally:
            s.acquiring = False
            self.slots.leave(s.name)
            self._slot_freed.pop(s.name, None)

    async def _wait_slot(self, s: _Site) -> None:
        """Until a connection slot may be free for ``s`` (woken by :meth:`_give_slots`; the
        timeout only guards against a lost wake-up)."""
        loop = asyncio.get_running_loop()
        fut = self._slot_freed[s.name] = loop.create_future()
        # the connections of the site idle longest see the line and close: one site per
        # wait, not every idle connection (each closed for nothing is a session to open
        # again when its site's next mail comes)
        line = self._idle_line
        while line:
            name = next(iter(line))
            del line[name]
            idle = self.sites.get(name)
            if name in self._idle and idle is not None and not idle.wake.is_set():
                idle.wake.set()             # (set: already closing, or busy again)
                break
        # a future and a timer, as _Wire.reply waits: an Event with asyncio.timeout (or
        # wait_for) costs several times as much per wait, and sites at the cap wait often
        timer = loop.call_later(1.0, _wake, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if self._slot_freed.get(s.name) is fut:
                del self._slot_freed[s.name]

    def _give_slots(self, n: int) -> None:
        if n <= 0:
            return
        self.slots.give(n)
        if self.slots.waiting and not self._wake_due:
            # once per loop iteration, after every slot given back in it: connections
            # closing in a burst each listed the (growing) front of the line again
            self._wake_due = True
            asyncio.get_running_loop().call_soon(self._wake_waiting)

    def _wake_waiting(self) -> None:
        """Wake the waiting sites a slot is free for now."""
        self._wake_due = False
        for name in self.slots.wakeable():
            _wake(self._slot_freed.get(name))

    def _ask_leases(self, s: _Site, n: int) -> asyncio.Future:
        """Up to ``n`` leases for ``s``. Asks made within a few milliseconds of each other go
        to each throttle as one call (at the start, 100 sites ask at once)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._asks.setdefault(s.throttle, {})[s.name] = (s, n, fut)
        if not self._asks_due:
            self._asks_due = True
            loop.call_later(_ASK_GATHER, self._send_asks)
        return fut

    def _send_asks(self) -> None:
        self._asks_due = False
        asks, self._asks = self._asks, {}
        for tname, per in asks.items():
            self._spawn(self._send_ask(tname, per))

    async def _send_ask(self, tname: str, per: dict[str, tuple[_Site, int, asyncio.Future]]
                        ) -> None:
        got: dict[str, list[int]] = {}
        try:
            req = msgpack.packb({site: [s.limits_wire, n] for site, (s, n, _) in per.items()},
                                use_bin_type=True)
            got = await asyncio.wait_for(
                self._actor(tname).acquire.remote(self.name, self.incarnation, req), timeout=30)
        except (ray.exceptions.RayError, asyncio.TimeoutError, ValueError) as e:
            log.warning("leases for %d sites from %s failed: %s", len(per), tname, e)
            self._handles.pop(tname, None)
        finally:
            for site, (_s, _n, fut) in per.items():
                if not fut.done():
                    fut.set_result(got.get(site, []))

    async def _worker(self, s: _Site, lease: int) -> None:
        """One connection slot: connections to the site under one lease, one after another
        while it has mail (a connection ends after the site's deliveries-per-connection)."""
        kept = False
        try:
            while s.queue and lease not in s.refused:
                await self._connection(s, lease)
                if self.slots.others_waiting(s.name) and s.queue and not kept:
                    # other sites wait for a slot of this relay: this one lets it go after
                    # its connection (a busy site must not keep the line waiting for good),
                    # unless its queue still calls for its connections and half the slots
                    # are left to go round the line (RelaySlots.keep)
                    kept = self.slots.keep(ideal_connections(len(s.queue), s.limits),
                                           s.workers)
                    if not kept:
                        break
        except Exception:  # a bug here must not strand messages: fail what is queued
            log.exception("relay worker for %s crashed", s.name)
            c = connection_failure("internal relay error")
            while s.queue and s.workers <= 1:
                item, call = s.queue.popleft()
                call.add(_result(item, c, ""))
        finally:
            if kept:
                self.slots.unkeep()
            s.workers -= 1
            s.leases.discard(lease)
            s.refused.discard(lease)
            self._releases.setdefault(s.throttle, {}).setdefault(s.name, []).append(lease)
            self._give_slots(1)
            if s.queue and s.workers == 0:
                self._start_workers(s)

    def _defer_queued(self, s: _Site, c: Classification) -> None:
        """Hand every message still queued here for the site back as a transient failure:
        the coordinator's retry schedule, not this relay's memory, holds deferred mail."""
        while s.queue:
            item, call = s.queue.popleft()
            call.add(_result(item, c, ""))
            self.counters["transient"] += 1

    def _sts_on(self, site: str, hosts: list[list[Any]], tls: str) -> bool:
        return self.sts.enabled and mta_sts_applies(site, [h[1] for h in hosts],
                                                    self.cfg.sites, tls)

    async def _open(self, s: _Site) -> tuple[Any, bool | None] | None:
        """A connection for the site's queue: (connection, None when MTA-STS does not govern
        the site, else whether it was opened under an enforced policy); None when MTA-STS
        deferred every message it was for. Raises ConnectFailure as connect_site does. With
        DANE on, MX hosts with secure TLSA records are checked against them (and then MTA-STS
        is not consulted: RFC 8461 §2); hosts whose TLSA lookup failed are left out."""
        d = self.cfg.delivery

        def connect(tls: str, hosts: list[list[Any]], dane: Any = None) -> Any:
            return connect_site(hosts, s.port, ehlo_name=self.source.ehlo_name,
                                bind_address=self.source.bind_address, tls=tls,
                                connect_timeout=d.connect_timeout,
                                command_timeout=d.command_timeout, data_timeout=d.data_timeout,
                                tls_ca_file=s.ca_file, broken_tls=self.broken_tls, dane=dane)

        usable = s.usable_hosts
        if self.dane.enabled and mta_sts_applies(s.name, [h[1] for h in s.hosts],
                                                 self.cfg.sites, s.limits.tls):
            dplan = await self.dane.plan(usable, s.port)
            usable = dplan.hosts(usable)
            if not usable and dplan.deferred:
                text = next(iter(dplan.deferred.values()))
                raise ConnectFailure(None, text, False, [], tls=TlsFailure(text, dane=True))
            if dplan.checks:
                # RFC 8461 §2: DANE wins over MTA-STS
                conn = await connect(s.limits.tls, usable, dplan.checks)
                if conn.host in dplan.checks:
                    self.dane.counters["dane_connections"] += 1
                    self._tls_count(s.name, "dane")
                return conn, None
        if not self._sts_on(s.name, s.hosts, s.limits.tls):
            return await connect(s.limits.tls, usable), None
        plan = await self.sts.plan(s.queue)
        s.sts_mode = "enforce" if plan.enforce else "testing" if plan.testing else ""
        for domain, text in self.sts.unmatched(plan, usable).items():
            self._sts_defer(s, domain, text)
        if not s.queue:
            return None
        if plan.enforce:
            hosts = plan.hosts(usable)
            try:
                conn = await connect("required", hosts)
            except ConnectFailure as e:
                if e.tls is None:
                    raise
                self.counters["tls_failures"] += e.tls_failures
                self._tls_count(s.name, "tls_failures", e.tls_failures)
                # the head's domain, and every other one whose policy allows all the hosts
                # tried (the rest are planned for on their own)
                for domain, pol in list(plan.enforce.items()):
                    if all(pol.matches(h[1]) for h in hosts):
                        self._sts_defer(s, domain, f"MTA-STS: {e.tls.text}")
                return None
            self.sts.counters["sts_enforced_connections"] += 1
            self._tls_count(s.name, "sts_enforced")
            enforced = True
        elif plan.testing:
            try:    # verified TLS first: what would fail under enforce is counted
                conn = await connect("required", usable)
                failed = conn.tls_failures
            except ConnectFailure as e:
                if e.tls is None:
                    raise
                failed = e.tls_failures
                log.warning("%s: MTA-STS testing (%s) would defer: %s", s.name,
                            ", ".join(plan.testing), e.tls.text)
                conn = await connect(s.limits.tls, usable)
            self._sts_testing_failed(s, failed)
            enforced = False
        else:
            return await connect(s.limits.tls, usable), False
        misses = self.sts.testing_misses(plan, conn.host)
        if misses:
            log.warning("%s: MTA-STS testing: %s is not an MX host %s allows", s.name,
                        conn.host, ", ".join(misses))
            self._sts_testing_failed(s, 1)
        return conn, enforced

    def _sts_testing_failed(self, s: _Site, n: int) -> None:
        if n:
            self.sts.counters["sts_testing_failures"] += n
            self._tls_count(s.name, "sts_testing_failures", n)

    def _sts_defer(self, s: _Site, domain: str, text: str) -> None:
        """Every message queued for ``domain`` goes back deferred: its MTA-STS policy in mode
        enforce cannot be met by this site now (never plaintext, never another host)."""
        c = mta_sts_failure(text)
        keep: deque = deque()
        n = 0
        for item, call in s.queue:
            if rcpt_domain(item[3]) == domain:
                call.add(_result(item, c, ""))
                n += 1
            else:
                keep.append((item, call))
        s.queue.clear()
        s.queue.extend(keep)
        self.counters["transient"] += n
        self.sts.counters["sts_deferred"] += n
        log.warning("%s: %d deferred: %s", s.name, n, text)

    def _sts_group(self, s: _Site, group: list[tuple[list[Any], _Call]], host: str,
                   enforced: bool) -> list[tuple[list[Any], _Call]]:
        """The group's recipients this connection may carry (MTA-STS); the rest go back to
        the head of the queue."""
        ok = [x for x in group[1:] if self.sts.allows(x[0], host, enforced) is True]
        if len(ok) < len(group) - 1:
            back = [x for x in group[1:] if all(x is not y for y in ok)]
            s.queue.extendleft(reversed(back))
        return [group[0], *ok]

    async def _connection(self, s: _Site, lease: int) -> None:
        d = self.cfg.delivery
        try:
            if self._guard(s) is not None:     # the route changed to one the guard refuses
                self._defer_queued(s, connection_failure("route refused by the MX guard"))
                return
            opened = await self._open(s)
            if opened is None:
                return      # MTA-STS deferred what this connection was for
            conn, sts_conn = opened
        except ConnectFailure as e:
            self.counters["connect_failures"] += 1
            self.metrics.connect_failures.inc(1, self.metrics.tags)
            c = classify(e.code, e.text, phase="greeting",
                         rules=self.cfg.classification.rules) if e.code else \
                connection_failure(e.text)
            if c.outcome != Outcome.TRANSIENT:
                c = connection_failure(e.text)   # no host answered: always worth retrying
            if e.tls is not None:
                # the site's required TLS policy failed: a TLS failure, never plaintext
                self.counters["tls_failures"] += e.tls_failures
                self._tls_count(s.name, "tls_failures", e.tls_failures)
                c = tls_failure(e.tls.text, no_starttls=e.tls.no_starttls)
                if e.tls.dane:
                    c = dane_failure(e.tls.text)
                    self.dane.counters["dane_failures"] += 1
                    self.dane.counters["dane_deferred"] += len(s.queue)
                log.warning("%s: %s", s.name, e.tls.text)
            if e.all_421:
                self._feedback.append((s.throttle, s.name, "backoff", e.text))
            if e.code:
                self._shaping_feedback(s, e.code, c)
            # Postfix marks the destination dead and defers its queue; so do we.
            self._defer_queued(s, c)
            return
        self.counters["connections"] += 1
        self.counters["tls_connections"] += conn.tls
        self.counters["tls_fallbacks"] += conn.tls_fallback
        self.counters["tls_failures"] += conn.tls_failures
        self._tls_count(s.name, "tls" if conn.tls else "plaintext")
        if conn.tls_fallback:
            self._tls_count(s.name, "fallback")
        if conn.tls_failures:
            self._tls_count(s.name, "tls_failures", conn.tls_failures)
        host = f"{conn.host}[{conn.address}]"
        limit = s.limits.deliveries_per_connection
        carry: tuple[list[Any], _Call] | None = None   # next message, its envelope sent ahead
        try:
            while conn.usable and conn.sent < limit:
                if lease in s.refused:
                    return
                if carry is not None:
                    (item, call), carry = carry, None
                elif not s.queue:
                    if self.slots.others_waiting(s.name):
                        return     # an idle connection gives its slot to a waiting site
                    s.wake.clear()
                    self._idle[s.name] = self._idle.get(s.name, 0) + 1
                    self._idle_line[s.name] = None
                    try:
                        # asyncio.timeout, not wait_for: no task of its own per idle spell
                        async with asyncio.timeout(d.idle_timeout):
                            await s.wake.wait()
                    except TimeoutError:
                        return
                    finally:
                        if self._idle[s.name] <= 1:
                            del self._idle[s.name]
                            self._idle_line.pop(s.name, None)
                        else:
                            self._idle[s.name] -= 1
                    continue
                else:
                    item, call = s.queue.popleft()
                    if sts_conn is not None and self.sts.allows(item, conn.host,
                                                                sts_conn) is not True:
                        s.queue.appendleft((item, call))   # the next connection is planned
                        return                             # for its domain's MTA-STS policy
                    group = self._gather(s, item, call, limit - conn.sent)
                    if sts_conn is not None and len(group) > 1:
                        group = self._sts_group(s, group, conn.host, sts_conn)
                    if len(group) > 1:
                        if not await self._send_group(s, conn, group, host):
                            return
                        continue
                _id, _attempt, _sender, rcpt, body, smtputf8 = item[:6]
                sender = self._mail_from(item)
                then = None
                if conn.pipelining and s.queue and conn.sent + 1 < limit and (
                        sts_conn is None
                        or self.sts.allows(s.queue[0][0], conn.host, sts_conn) is True):
                    # this connection takes the next one too: its envelope rides on this body
                    carry = s.queue.popleft()
                    then = (self._mail_from(carry[0]), carry[0][3], carry[0][5])
                # the session ends after this message (its deliveries are used up, or nothing
                # is queued and other sites wait for this relay's connection slot): QUIT rides
                # on the body, as it does for most of a long tail's one-message sessions
                last = then is None and (conn.sent + 1 >= limit or (
                    not s.queue and self.slots.others_waiting(s.name)))
                if self.cfg.unsubscribe:
                    body = self._list_unsubscribe(item, body)
                if self._sign_pool is not None:
                    body = await asyncio.get_running_loop().run_in_executor(
                        self._sign_pool, self._sign, body)
                a = await conn.send(sender, rcpt, body, smtputf8, then=then, last=last)
                c = self._classify(s, a)
                self._count_result(s, item, call, c, host)
                if c.site_backoff:
                    self._feedback.append((s.throttle, s.name, "backoff", c.text))
                    if carry is not None:
                        s.queue.appendleft(carry)
                        carry = None
                    self._defer_queued(s, c)
                    return
        finally:
            if carry is not None:
                # not sent here after all (connection lost, lease refused): back to the front
                # of the queue for another connection; its body never went, so neither did it
                s.queue.appendleft(carry)
                s.wake.set()
            await conn.close()

    def _classify(self, s: _Site, a: Any) -> Classification:
        """What a transaction's reply means for a recipient (reshaped by the site's rules,
        which also hear of it when it was not a delivery)."""
        c = classify(a.code, a.text, phase=a.phase,
                     rules=self.cfg.classification.rules) if a.code is not None else \
            connection_failure(a.text)
        if a.code is not None and c.outcome != Outcome.DELIVERED:
            c = reshape(self._shaping_rules, s.name, c)
            self._shaping_feedback(s, a.code, c)
        return c

    def _count_result(self, s: _Site, item: list[Any], call: _Call, c: Classification,
                      host: str) -> None:
        call.add(_result(item, c, host))
        if c.outcome == Outcome.DELIVERED:
            s.delivered += 1
            self.counters["delivered"] += 1
        elif c.outcome == Outcome.TRANSIENT:
            self.counters["transient"] += 1
        else:
            self.counters["permanent"] += 1

    def _gather(self, s: _Site, item: list[Any], call: _Call, room: int
                ) -> list[tuple[list[Any], _Call]]:
        """``item`` and the other recipients of the same message queued for the site, for one
        transaction (up to ``delivery.max_rcpts_per_transaction`` and the connection's
        remaining deliveries). Only where the envelope sender and the body are the same for
        all: not with VERP return paths (one per recipient) nor per-recipient
        List-Unsubscribe. Looks at the next few queued items only (bounded work)."""
        n = min(self.cfg.delivery.max_rcpts_per_transaction, room)
        if n <= 1 or len(item) < 7 or not s.queue or (self.cfg.bounce.enabled and item[2]):
            return [(item, call)]
        if self.cfg.unsubscribe and self._unsubscribe_of(item) is not None:
            return [(item, call)]
        group = [(item, call)]
        keep: list[tuple[list[Any], _Call]] = []
        for _ in range(min(len(s.queue), _GATHER_WINDOW)):
            x = s.queue.popleft()
            it = x[0]
            if len(it) > 6 and it[6] == item[6] and it[2] == item[2] and it[5] == item[5]:
                group.append(x)
                if len(group) >= n:
                    break
            else:
                keep.append(x)
        s.queue.extendleft(reversed(keep))
        return group

    async def _send_group(self, s: _Site, conn: Any, group: list[tuple[list[Any], _Call]],
                          host: str) -> bool:
        """One transaction for the recipients of ``group`` (one message); a result each.
        False when the site asked to back off (what is queued was handed back)."""
        item = group[0][0]
        body = item[4]
        if self._sign_pool is not None:
            body = await asyncio.get_running_loop().run_in_executor(
                self._sign_pool, self._sign, body)
        attempts = await conn.send_many(self._mail_from(item), [it[3] for it, _ in group],
                                        body, item[5])
        self.counters["multi_rcpt_transactions"] = \
            self.counters.get("multi_rcpt_transactions", 0) + 1
        backoff = None
        for (it, call), a in zip(group, attempts):
            c = self._classify(s, a)
            self._count_result(s, it, call, c, host)
            if c.site_backoff:
                backoff = c
        if backoff is not None:
            self._feedback.append((s.throttle, s.name, "backoff", backoff.text))
            self._defer_queued(s, backoff)
            return False
        return True

    def _shaping_feedback(self, s: _Site, code: int, c: Classification) -> None:
        """A remote reply that was not a delivery, for the site's shaping rules (bounded: a
        throttle that does not answer loses feedback, never grows this list without limit)."""
        if self._shaping_rules is not None and len(self._feedback) < 10_000:
            self._feedback.append((s.throttle, s.name, "reply",
                                   f"{code} {c.enhanced or ''} {c.text}", self.source.name))

    def _mail_from(self, item: list[Any]) -> str:
        """The envelope sender on the wire: with ``[bounce]`` configured, the message's VERP
        return path (so a later bounce names the message, with a tag proving we sent it); the
        null sender stays null. The submitted sender stays the message's own for events and
        status."""
        b = self.cfg.bounce
        if not b.enabled or not item[2]:
            return item[2]
        assert b.keys is not None
        return return_path(item[2], item[0], b.keys, prefix=b.prefix, domain=b.domain)

    def _unsubscribe_of(self, item: list[Any]) -> Any:
        """The ``[[unsubscribe]]`` entry of the message's sender domain, if it has one."""
        domain = item[2].rpartition("@")[2]
        if not domain:
            return None
        u = next((u for u in self.cfg.unsubscribe if domain_matches(domain, u.domain)), None)
        return None if u is None or u.keys is None else u

    def _list_unsubscribe(self, item: list[Any], body: bytes) -> bytes:
        """List-Unsubscribe and List-Unsubscribe-Post (RFC 8058) for a sender domain with
        ``[[unsubscribe]]``, added before DKIM signs them (both are in its signed list)."""
        u = self._unsubscribe_of(item)
        if u is None:
            return body
        fields = header_fields(item[3], u.domain, u.keys, url_base=u.url_base,
                               mail_domain=self.cfg.bounce.domain if u.mailto else "")
        return add_header_fields(body, fields)

    def _sign(self, body: bytes) -> bytes:
        """The message with its DKIM signatures, as it goes on the wire (unsigned if the
        signer fails: the failure is counted and logged without the key)."""
        signer = getattr(self._sign_local, "signer", None)
        if signer is None:      # this thread's first message: a signer of its own
            from cluster.adapters.dkim_keys import signer_from_config
            signer = self._sign_local.signer = signer_from_config(self.cfg.dkim)
            assert signer is not None
            with self._signers_lock:
                self._signers.append(signer)
        signer.ring.maybe_reload()      # one clock read; a stat per key every few seconds
        try:
            return signer.sign(body, time.time())
        except Exception as e:  # noqa: BLE001 - a signing bug must not stop delivery
            signer.counters["errors"] += 1
            log.warning("dkim signing failed (%s): sent unsigned", type(e).__name__)
            return body

    def _dkim_counters(self) -> dict[str, int]:
        """The signing threads' counters summed."""
        out: dict[str, int] = {}
        with self._signers_lock:
            for s in self._signers:
                for k, v in s.counters.items():
                    out[k] = out.get(k, 0) + v
        return out

    async def reload_dkim(self) -> dict[str, Any]:
        """Re-read DKIM key files now (``raymta dkim reload``): what changed, and the errors
        of files that could not be loaded (the previous key stays in use for those)."""
        if self.signer is None:
            return {"relay": self.name, "changed": [], "errors": [], "keys": []}
        changed = self.signer.ring.reload()
        with self._signers_lock:
            for s in self._signers:     # the signing threads' own rings
                s.ring.reload()
        return {"relay": self.name, "changed": changed, "errors": self.signer.ring.errors,
                "keys": self.signer.ring.describe()}

    # ------------------------------------------------------------------ background loops
    async def _renew_loop(self) -> None:
        period = max(self.cfg.delivery.lease_ttl / 3, 0.5)
        while True:
            await asyncio.sleep(period)
            by_throttle: dict[str, dict[str, tuple[SiteLimits, list[int]]]] = {}
            for s in self.sites.values():
                if s.leases:
                    by_throttle.setdefault(s.throttle, {})[s.name] = (s.limits, sorted(s.leases))
            for tname, held in by_throttle.items():
                try:
                    refused = await asyncio.wait_for(
                        self._actor(tname).renew.remote(self.name, self.incarnation, held),
                        timeout=period)
                except (ray.exceptions.RayError, asyncio.TimeoutError, ValueError) as e:
                    log.warning("lease renewal with %s failed: %s", tname, e)
                    self._handles.pop(tname, None)
                    continue
                for site, ids in refused.items():
                    if site in self.sites:
                        self.sites[site].refused.update(ids)
                        self.sites[site].wake.set()   # an idle connection closes now
            self.metrics.set_state(sum(len(s.leases) for s in self.sites.values()),
                                   self.counters, self.signer and self._dkim_counters())
            if time.monotonic() - self._own_at > _OWN_REFRESH:
                self._own_at = time.monotonic()
                own = await asyncio.to_thread(own_addresses, self.cfg, self.source)
                self.guard = AddressGuard.build(self.cfg.delivery.allow_networks, own)
                for st in self.sites.values():
                    st.guard_of = None
            # forget idle sites so the table stays bounded
            for name in [n for n, s in self.sites.items()
                         if not s.queue and not s.workers and not s.leases]:
                del self.sites[name]

    async def _feedback_loop(self) -> None:
        """Every 0.1 s: leases given back and site feedback, one call per throttle each."""
        while True:
            await asyncio.sleep(0.1)
            if self._releases:
                releases, self._releases = self._releases, {}
                for tname, leases in releases.items():
                    try:
                        self._actor(tname).release.remote(leases)
                    except (ray.exceptions.RayError, ValueError):
                        self._handles.pop(tname, None)   # the leases expire on their own
            if not self._feedback:
                continue
            items, self._feedback = self._feedback, []
            by_throttle: dict[str, list[tuple[str, ...]]] = {}
            for tname, *rest in items:
                by_throttle.setdefault(tname, []).append(tuple(rest))
            for tname, fb in by_throttle.items():
                try:
                    await asyncio.wait_for(self._actor(tname).feedback.remote(fb), timeout=10)
                except (ray.exceptions.RayError, asyncio.TimeoutError, ValueError):
                    self._handles.pop(tname, None)

    async def stats(self) -> dict[str, Any]:
        dkim = None if self.signer is None else {
            **self._dkim_counters(), "keys": self.signer.ring.describe(),
            "errors": self.signer.ring.errors}
        return {"name": self.name, "incarnation": self.incarnation, **self.counters,
                "dkim": dkim, "egress": self.source.name, "results": self.metrics.snapshot(),
                "loop_lag": self.loop_lag.snapshot(), "mta_sts": self.sts.stats(),
                "dane": self.dane.stats(),
                "tls_sites": {n: dict(t) for n, t in self.tls_sites.items()},
                "tls_broken_hosts": len(self.broken_tls),
                "connection_slots": {"cap": self.slots.cap, "used": self.slots.used,
                                     "peak": self.slots.peak,
                                     "sites_waiting": len(self.slots.waiting),
                                     "kept": self.slots.kept},
                "sites": {n: {"queued": len(s.queue), "connections": s.workers,
                              "leases": len(s.leases),
                              **({"mta_sts": s.sts_mode} if s.sts_mode else {})}
                          for n, s in self.sites.items()}}

    async def ping(self) -> int:
        return os.getpid()
