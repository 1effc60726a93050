"""The queue as a state machine over log records (event sourcing), plus its scheduling indexes.

Owns: what a queued message is, the durable record types, how each record changes the queue,
the event each record produces, and the soft indexes (ready per domain, deferred by next attempt
time, expiry) the coordinator schedules from. The same :meth:`QueueState.apply` runs for live
records and for records replayed from disk, so the queue rebuilt after a restart is the queue
that was lost, and the event stream can never disagree with the queue.

Pure: no I/O, no clock (every time is an argument or inside a record), no Ray.

Record layout (msgpack arrays, first element the type):

========  ===================================================================================
``b``     body:      [b, body_id, bytes]
``a``     accept:    [a, id, body_id, sender, rcpt, domain, created, not_before, expires_at,
                      tags, metadata, idempotency_key, smtputf8]
``m``     message:   [m, id, bytes, sender, …] — an accept that carries its own body (body_id is
                     the id): one record instead of two for a message to one recipient
``t``     transient: [t, id, attempt, next_at, code, enhanced, text, site, category, ts]
``d``     delivered: [d, id, attempt, code, text, site, ts]
``f``     final:     [f, id, attempt, kind, code, enhanced, text, site, category, ts]
                     kind: "bounce" | "expired" | "cancelled"
``e``     epoch:     [e, epoch, ts] — a new shard leader's first record (no queue change)
``s``     suppression: [s, op, rows, ts, propagate] — op "add" (rows [address, scope, reason,
                     created, expires_at, cause]), "remove" (rows [address, scope]) or "sent"
                     (rows: keys of this shard's outbox now on every other shard)
``p``     pause:     [p, key, until, ts] — dispatch to a domain or site (key) is suspended until
                     ``until`` (0: resumed); an operator's ``raymta suspend``. With a fifth
                     field, [p, key, until, ts, action], a shaping rule's action
                     (:class:`cluster.core.shaping.Action` wire) fired (until > ts) or ended:
                     a suspend pauses the key like an operator's; a set_limits is kept in
                     :attr:`QueueState.shaping` and lowers the site's limits while it lasts
``o``     outside report: [o, kind, id, recipient, detail, ts] — an asynchronous bounce
                     (kind "bounce") or a complaint (kind "complaint") about a message this
                     shard sent; an event only (the message has usually finished)
``w``     webhook cursor: [w, endpoint, cursor, ts] — webhook ``endpoint`` has acknowledged
                     every event of this shard up to seq ``cursor`` (no event of its own)
``u``     warm-up:   [u, source, provider, day, reserved, ts, note] — as egress ``source``'s
                     home shard, this shard has granted ``reserved`` of its cap for
                     ``provider`` on UTC ``day`` in all (:mod:`cluster.core.warmup`; counts only
                     go up; another shard's note-only record carries its own, 0). ``note`` "" (no event),
                     "capped", "overflow" or "hold": the first such of the day makes the event
                     WarmupCapReached / WarmupOverflow / WarmupHold
``n``     DSNs owed: [n, rows, ts] — rows ``[original id, *entry]`` of
                     :attr:`QueueState.dsn_due` restored from a backup (no event of its own);
                     an original already owed, or whose DSN this shard already queued, is
                     left out
========  ===================================================================================
An accept record restored from a backup carries two more fields, ``attempts, next_at``.
A message whose metadata asks for a DSN (``raymta.dsn``) owes one when its ``f`` record
(bounce or expiry) applies (:attr:`QueueState.dsn_due`); the DSN is an ``m`` record of its own,
made by the leader, whose metadata ``raymta.dsn_of`` names the message (or, for one DSN about
several recipients of a submission, the list of them) and settles the debt.
A message state machine: accepted → (ready | deferred) → inflight → delivered | transient
(→ deferred) | bounced; any live, not inflight message → expired | cancelled.
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Iterable

from cluster.core.dsn_build import dsn_of, header_section, wants_dsn
from cluster.core.suppression import REASONS as SUPPRESSION_REASONS
from cluster.core.suppression import SuppressionList, entry_key

__all__ = [
    "REC_BODY", "REC_ACCEPT", "REC_MESSAGE", "REC_TRANSIENT", "REC_DELIVERED", "REC_FINAL",
    "REC_EPOCH", "REC_SUPPRESS", "REC_REPORT", "REC_PAUSE", "suppress_record", "report_record",
    "reference_segments", "pause_record", "REC_WEBHOOK", "webhook_record", "REC_WARMUP",
    "warmup_record", "REC_DSN_OWED", "dsn_owed_record", "bad_dsn_owed_row",
    "QueuedMessage", "QueueState", "SnapshotBuild", "StateError",
    "accept_record", "body_record", "message_record", "transient_record", "delivered_record",
    "final_record", "records_bytes",
]

REC_BODY = "b"
REC_ACCEPT = "a"
REC_MESSAGE = "m"
REC_TRANSIENT = "t"
REC_DELIVERED = "d"
REC_FINAL = "f"
REC_EPOCH = "e"
REC_SUPPRESS = "s"
REC_REPORT = "o"
REC_PAUSE = "p"
REC_WEBHOOK = "w"
REC_WARMUP = "u"
REC_DSN_OWED = "n"

QUEUED = "queued"      # ready to send now
DEFERRED = "deferred"  # waiting for next_at (retry or not_before)
INFLIGHT = "inflight"  # handed to a relay, no result yet


class StateError(ValueError):
    """A record does not fit the queue (corrupt or foreign log)."""


#: what a record costs in a log frame besides the body it may carry (header, ids, addresses,
#: times): an estimate, for bounding a group commit's bytes before its frames are made
RECORD_OVERHEAD = 200


def records_bytes(records: list[list[Any]]) -> int:
    """About how many log bytes ``records`` make: the bodies they carry (message and body
    records) plus :data:`RECORD_OVERHEAD` each. Cheap (no encoding): the bound of a group
    commit (cluster.core.replication.group_take) is counted with it."""
    n = RECORD_OVERHEAD * len(records)
    for r in records:
        if r[0] == REC_MESSAGE or r[0] == REC_BODY:
            b = r[2]
            if type(b) is bytes or type(b) is str:
                n += len(b)
    return n


def body_record(body_id: str, body: bytes) -> list[Any]:
    return [REC_BODY, body_id, body]


def accept_record(msg_id: str, body_id: str, sender: str, rcpt: str, domain: str, created: float,
                  not_before: float | None, expires_at: float, tags: dict[str, str] | None,
                  metadata: dict[str, Any] | None, idempotency_key: str | None,
                  smtputf8: bool) -> list[Any]:
    return [REC_ACCEPT, msg_id, body_id, sender, rcpt, domain, created, not_before, expires_at,
            tags or None, metadata or None, idempotency_key, smtputf8]


def message_record(msg_id: str, body: bytes, sender: str, rcpt: str, domain: str,
                   created: float, not_before: float | None, expires_at: float,
                   tags: dict[str, str] | None, metadata: dict[str, Any] | None,
                   idempotency_key: str | None, smtputf8: bool) -> list[Any]:
    """An accept record carrying its body (stored under the message's id)."""
    return [REC_MESSAGE, msg_id, body, sender, rcpt, domain, created, not_before, expires_at,
            tags or None, metadata or None, idempotency_key, smtputf8]


def transient_record(msg_id: str, attempt: int, next_at: float, code: int | None,
                     enhanced: str | None, text: str, site: str, category: str,
                     ts: float) -> list[Any]:
    return [REC_TRANSIENT, msg_id, attempt, next_at, code, enhanced, text, site, category, ts]


def delivered_record(msg_id: str, attempt: int, code: int | None, text: str, site: str,
                     ts: float) -> list[Any]:
    return [REC_DELIVERED, msg_id, attempt, code, text, site, ts]


def suppress_record(op: str, rows: list[list[Any]], ts: float, propagate: bool = False
                    ) -> list[Any]:
    """A change of the suppression list; ``propagate``: entries this shard learned itself
    (a bounce, a complaint) that it must hand to every other shard (its outbox)."""
    return [REC_SUPPRESS, op, rows, ts, propagate]


def pause_record(key: str, until: float, ts: float,
                 action: dict[str, Any] | None = None) -> list[Any]:
    return [REC_PAUSE, key, until, ts] if action is None else [REC_PAUSE, key, until, ts, action]


def webhook_record(endpoint: str, cursor: int, ts: float) -> list[Any]:
    return [REC_WEBHOOK, endpoint, cursor, ts]


def warmup_record(source: str, provider: str, day: int, reserved: int, ts: float,
                  note: str = "") -> list[Any]:
    return [REC_WARMUP, source, provider, day, reserved, ts, note]


def dsn_owed_record(rows: list[list[Any]], ts: float) -> list[Any]:
    """DSNs owed, restored from a backup: rows ``[original id, *dsn_due entry]``."""
    return [REC_DSN_OWED, rows, ts]


def bad_dsn_owed_row(rows: Any) -> str | None:
    """What is wrong with the rows of a :func:`dsn_owed_record` (None: nothing): each must be
    ``[original id, sender, recipient, "bounce" | "expired", code, enhanced, text, site,
    created, ts, headers (bytes)[, body id]]`` with a sender (never ``<>``)."""
    if type(rows) is not list:
        return f"rows must be a list, not {type(rows).__name__}"
    for k, r in enumerate(rows):
        if not (type(r) is list and len(r) in (11, 12) and type(r[0]) is str and
                type(r[1]) is str and r[1] and type(r[2]) is str and
                r[3] in ("bounce", "expired") and type(r[8]) in (int, float) and
                type(r[9]) in (int, float) and type(r[10]) in (bytes, bytearray) and
                (len(r) == 11 or type(r[11]) is str)):
            return f"row {k} is not a DSN owed: {r!r:.120}"
    return None


def report_record(kind: str, msg_id: str | None, recipient: str, detail: dict[str, Any],
                  ts: float) -> list[Any]:
    return [REC_REPORT, kind, msg_id, recipient, detail, ts]


def reference_segments(bodies: list[tuple[int, int]], segments: list[tuple[int, int, int]],
                       min_live: float = 0.25) -> Callable[[int], bool]:
    """Which bodies a snapshot may leave in the log: a predicate over a body's lsn.

    ``bodies``: (lsn, size) of each body a log record carries; ``segments``: (first lsn, last
    lsn, bytes) of the log's segments. A segment whose live body bytes are at least
    ``min_live`` of its size is worth keeping (its bodies are referenced); the bodies of a
    sparser one are copied into the snapshot so that the segment can be deleted. The last
    segment (still being written) is always kept. A body outside every segment is copied."""
    if not segments:
        return lambda lsn: False
    firsts = [s[0] for s in segments]
    live = [0] * len(segments)
    for lsn, size in bodies:
        i = bisect.bisect_right(firsts, lsn) - 1
        if i >= 0 and lsn <= segments[i][1]:
            live[i] += size
    return _referenced(segments, live, min_live)


def _referenced(segments: list[tuple[int, int, int]], live: list[int],
                min_live: float = 0.25) -> Callable[[int], bool]:
    """The predicate of :func:`reference_segments`, from the live body bytes per segment."""
    if not segments:
        return lambda lsn: False
    firsts = [s[0] for s in segments]
    last = len(segments) - 1
    keep = {segments[i][0] for i in range(len(segments))
            if i == last or (segments[i][2] and live[i] >= min_live * segments[i][2])}

    def referenced(lsn: int) -> bool:
        i = bisect.bisect_right(firsts, lsn) - 1
        return i >= 0 and lsn <= segments[i][1] and firsts[i] in keep

    return referenced


def final_record(msg_id: str, attempt: int, kind: str, code: int | None, enhanced: str | None,
                 text: str, site: str, category: str, ts: float) -> list[Any]:
    return [REC_FINAL, msg_id, attempt, kind, code, enhanced, text, site, category, ts]


class QueuedMessage:
    """One recipient's copy of a message, live in the queue."""

    __slots__ = ("id", "body_id", "sender", "rcpt", "domain", "created", "not_before",
                 "expires_at", "tags", "metadata", "idempotency_key", "smtputf8", "attempts",
                 "next_at", "state", "last_code", "last_text", "site", "cancel_requested",
                 "dispatched_at")

    def __init__(self, rec: list[Any]) -> None:
        (_, self.id, self.body_id, self.sender, self.rcpt, self.domain, self.created,
         self.not_before, self.expires_at, self.tags, self.metadata, self.idempotency_key,
         self.smtputf8) = rec[:13]
        self.attempts = 0
        self.next_at: float = self.not_before or 0.0
        if len(rec) > 13:   # restored from a backup: where the message had got to
            self.attempts, self.next_at = int(rec[13]), float(rec[14])
        self.state = QUEUED
        self.last_code: int | None = None
        self.last_text = ""
        self.site = ""
        self.cancel_requested = False
        self.dispatched_at = 0.0

    def to_snapshot(self) -> tuple[Any, ...]:
        # a tuple: once the cycle collector sees it holds only atoms it stops tracking it, so
        # the 300,000 rows a big snapshot holds while it is written cost no collection time
        # (as lists, one gen-1 collection took 0.46-0.81 s of a leader's event loop)
        return (self.id, self.body_id, self.sender, self.rcpt, self.domain, self.created,
                self.not_before, self.expires_at, self.tags, self.metadata,
                self.idempotency_key, self.smtputf8, self.attempts, self.next_at,
                self.last_code, self.last_text, self.site)

    @classmethod
    def from_snapshot(cls, row: list[Any]) -> "QueuedMessage":
        m = cls([REC_ACCEPT, *row[:12]])
        m.attempts, m.next_at, m.last_code, m.last_text, m.site = row[12:17]
        return m


@dataclass(slots=True)
class _Body:
    data: bytes
    refs: int
    #: lsn of the log record that carries the body (0: none does any longer; a snapshot
    #: then carries the bytes themselves)
    lsn: int = 0


#: fields of each fixed-length record type (accepts vary: see _apply_accept)
_RECORD_LENGTHS = {REC_BODY: 3, REC_TRANSIENT: 10, REC_DELIVERED: 7, REC_FINAL: 10,
                   REC_EPOCH: 3, REC_SUPPRESS: 5, REC_REPORT: 6, REC_PAUSE: 4,
                   REC_WEBHOOK: 4, REC_WARMUP: 7, REC_DSN_OWED: 3}


def _check_numbers(rec: list[Any], lsn: int, *values: Any) -> None:
    for v in values:
        if type(v) not in (int, float) or v != v:
            raise StateError(f"record {rec[0]!r} at lsn {lsn}: {v!r} is not a number")


_WARMUP_EVENT = {"": "", "capped": "WarmupCapReached", "overflow": "WarmupOverflow",
                 "hold": "WarmupHold"}
_EVENT_TYPES = {REC_ACCEPT: "Reception", REC_TRANSIENT: "TransientFailure",
                REC_DELIVERED: "Delivery"}
_FINAL_EVENT = {"bounce": "Bounce", "expired": "Expiration", "cancelled": "AdminBounce",
                "suppressed": "Suppressed"}
_FINAL_STATE = {"bounce": "bounced", "expired": "expired", "cancelled": "cancelled",
                "suppressed": "suppressed"}
_REPORT_EVENT = {"bounce": "OOBBounce", "complaint": "Complaint"}


_FINISHED_KEYS = ("id", "state", "recipient", "attempts", "code", "text", "site", "ts")


class SnapshotBuild:
    """A snapshot of a :class:`QueueState` taken in slices between which records go on being
    applied. :meth:`step` first adds up the live body bytes per log segment (what decides
    which bodies stay in the log), then copies the next slice of the messages and bodies
    that were live when it began; :meth:`finish` takes again every message and body a record
    touched meanwhile (a new one, a changed one, a finished one), so the result is exactly
    the state as of the last record applied, like :meth:`QueueState.snapshot`. ``segments``:
    see :meth:`QueueState.snapshot`."""

    def __init__(self, st: "QueueState",
                 segments: list[tuple[int, int, int]] | None = None) -> None:
        self.st = st
        self.segments = segments
        self._ids = list(st.messages)
        self._bids = list(st.bodies)
        self._sized = 0                 # phase 1: bodies added up per segment so far
        self._i = self._j = 0           # phase 2: messages, bodies copied so far
        self._firsts = [sg[0] for sg in segments or ()]
        self._live = [0] * len(self._firsts)
        self._refs: Callable[[int], bool] | None = None
        self.rows: dict[str, tuple[Any, ...]] = {}
        self.entries: dict[str, tuple[Any, ...]] = {}

    def _entry(self, bid: str, b: _Body) -> tuple[Any, ...]:
        if b.lsn and self._refs is not None and self._refs(b.lsn):
            return (bid, None, b.lsn)
        if self.segments is not None:
            # its segment may be dropped once this snapshot is written: from now on the
            # bytes live in the snapshots
            b.lsn = 0
        return (bid, b.data)

    def step(self, n: int | None = 5000) -> bool:
        """Do up to ``n`` more items of work (all of it: None); True when done."""
        st = self.st
        have = st.bodies
        if self._sized < len(self._bids):
            bids = self._bids[self._sized:] if n is None else \
                self._bids[self._sized:self._sized + n]
            self._sized += len(bids)
            firsts, live, segs = self._firsts, self._live, self.segments or ()
            if firsts:
                for bid in bids:
                    b = have.get(bid)
                    if b is not None and b.lsn:
                        k = bisect.bisect_right(firsts, b.lsn) - 1
                        if k >= 0 and b.lsn <= segs[k][1]:
                            live[k] += len(b.data)
            if n is not None:
                return False
        if self._refs is None:
            self._refs = _referenced(self.segments or [], self._live)
        ids = self._ids[self._i:] if n is None else self._ids[self._i:self._i + n]
        self._i += len(ids)
        msgs, rows = st.messages, self.rows
        for mid in ids:
            m = msgs.get(mid)
            if m is not None:
                rows[mid] = m.to_snapshot()
        bids = self._bids[self._j:] if n is None else self._bids[self._j:self._j + n]
        self._j += len(bids)
        entries, entry = self.entries, self._entry
        for bid in bids:
            b = have.get(bid)
            if b is not None:
                entries[bid] = entry(bid, b)
        return self._i >= len(self._ids) and self._j >= len(self._bids)

    def abandon(self) -> None:
        """Give up this build (the state stops marking what records touch)."""
        if self.st._dirty is not None:
            self.st._dirty, self.st._dirty_bodies = None, set()

    def finish(self) -> dict[str, Any]:
        """The snapshot as of now. The work not yet done in slices is done now."""
        st = self.st
        self.step(None)
        dirty, dirty_bodies = st._dirty or set(), st._dirty_bodies
        st._dirty, st._dirty_bodies = None, set()
        rows, entries = self.rows, self.entries
        for mid in dirty:
            old = rows.pop(mid, None)
            m = st.messages.get(mid)
            if m is not None:
                rows[mid] = m.to_snapshot()
                dirty_bodies.add(m.body_id)
            if old is not None:
                dirty_bodies.add(old[1])
            dirty_bodies.add(mid)   # a message record's body is stored under its id
        for bid in dirty_bodies:    # (bodies dropped meanwhile are among them: _finish)
            b = st.bodies.get(bid)
            if b is None:
                entries.pop(bid, None)
            else:
                entries[bid] = self._entry(bid, b)
        bodies = list(entries.values())
        keep = sorted(e[2] for e in bodies if e[1] is None)
        return {"keep": keep, "lsn": st.last_lsn, "bodies": bodies,
                "messages": list(rows.values()), **st._snapshot_rest()}


class QueueState:
    """Live messages, their bodies and the scheduling indexes of one queue shard."""

    def __init__(self, *, status_cache: int = 200_000, idempotency_window: float = 86400.0) -> None:
        self.messages: dict[str, QueuedMessage] = {}
        self.bodies: dict[str, _Body] = {}
        self.body_bytes = 0
        # domain → ids, FIFO. Removal is lazy: a message leaving the queued state stays in
        # its deque and is skipped when popped, so expiring or cancelling a large backlog is
        # O(1) per message. ready_live counts the real (queued) entries per domain.
        self.ready: dict[str, deque[str]] = {}
        self.ready_live: dict[str, int] = {}
        self.ready_count = 0
        #: domains whose ready count changed since :meth:`take_ready_changed` (a dispatch
        #: round looks at these, not at every ready domain); bounded by the domains
        self.ready_changed: set[str] = set()
        self._deferred: list[tuple[float, str]] = []    # (next_at, id), lazily cleaned
        self._expiry: list[tuple[float, str]] = []      # (expires_at, id), lazily cleaned
        self.inflight: dict[str, QueuedMessage] = {}
        self.idempotency: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()
        self.idempotency_window = idempotency_window
        #: id → [id, state, recipient, attempts, code, text, site, ts] (the snapshot's row:
        #: a snapshot copies the references, not 200,000 dicts)
        self.finished: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self.status_cache = status_cache
        self.last_lsn = 0
        self.counters = {"accepted": 0, "delivered": 0, "transient": 0, "bounced": 0,
                         "expired": 0, "cancelled": 0, "suppressed": 0, "reports": 0}
        self.suppression = SuppressionList()
        #: suppressions this shard learned itself and has not yet handed to every other shard
        #: (key → add row); hard state, in snapshots, emptied by "sent" records
        self.suppress_outbox: dict[str, list[Any]] = {}
        #: domains or sites an operator suspended: key → until (epoch seconds)
        self.suspended: dict[str, float] = {}
        #: shaping rules' actions in force (cluster/core/shaping.py), "action:key" → Action
        #: wire; the throttles recover from them after a restart. Soft-expired on read.
        self.shaping: dict[str, dict[str, Any]] = {}
        #: DSNs owed to envelope senders (:mod:`cluster.core.dsn_build`): original id → what
        #: the DSN says. Hard state: added when the bounce or expiry of a message that asked
        #: for one applies, removed when the DSN's own message record (metadata
        #: ``raymta.dsn_of``) applies; the leader queues one for each entry it finds, so a
        #: failover neither loses a DSN (the entry is replayed) nor sends two (the record is)
        self.dsn_due: dict[str, list[Any]] = {}
        #: originals whose DSN record applied → the DSN's id, the newest ``status_cache`` kept
        #: (hard state, in snapshots): a DSN debt restored from a backup a second time is
        #: not owed again
        self.dsn_settled: OrderedDict[str, str] = OrderedDict()
        #: how many DSN debts were ever added here (soft): the leader looks for DSNs to
        #: queue after a commit only when this moved
        self.dsn_owed = 0
        #: records this state refused to apply (lsn, type, id, reason), the newest kept
        self.quarantine: deque[dict[str, Any]] = deque(maxlen=1000)
        self.counters_quarantined = 0
        #: webhook endpoint → the seq up to which it has acknowledged this shard's events
        self.webhook_cursors: dict[str, int] = {}
        #: warm-up counts granted by this (home) shard, "source|provider|day" → count, and the notes
        #: (events) already made, "source|provider|day|note"; only today's and yesterday's
        #: are kept (``u`` records, :mod:`cluster.core.warmup`)
        self.warmup: dict[str, int] = {}
        self.warmup_notes: set[str] = set()
        #: while a snapshot is built a slice at a time: ids of messages (and bodies) that
        #: records applied meanwhile touched (:class:`SnapshotBuild`)
        self._dirty: set[str] | None = None
        self._dirty_bodies: set[str] = set()

    def apply_or_quarantine(self, rec: Any, lsn: int) -> dict[str, Any] | None:
        """:meth:`apply`, except that a record the queue cannot take (a :class:`StateError`)
        is set aside in :attr:`quarantine` and the queue goes on: one bad record must never
        stop a shard's commits or its replay. The lsn is used up either way."""
        try:
            return self.apply(rec, lsn)
        except StateError as e:
            if lsn > self.last_lsn:
                self.last_lsn = lsn
            self.counters_quarantined += 1
            kind = rec[0] if isinstance(rec, list) and rec else None
            mid = rec[1] if isinstance(rec, list) and len(rec) > 1 and \
                isinstance(rec[1], str) else None
            self.quarantine.append({"lsn": lsn, "type": kind if isinstance(kind, str) else
                                    repr(kind)[:20], "id": mid, "reason": str(e)[:500]})
            return None

    # ------------------------------------------------------------------ applying records
    def apply(self, rec: list[Any], lsn: int) -> dict[str, Any] | None:
        """Apply one durable record; return the event it produces (None for bodies).

        A record that does not fit raises :class:`StateError` before it changes anything."""
        if lsn <= self.last_lsn:
            raise StateError(f"record lsn {lsn} not after {self.last_lsn}")
        if self._dirty is not None and type(rec) is list and len(rec) > 1 and \
                type(rec[1]) is str:
            # (marked before applying: a record that fails changes nothing, and one more id
            # to take again costs nothing)
            (self._dirty_bodies if rec[0] == REC_BODY else self._dirty).add(rec[1])
        try:
            return self._apply(rec, lsn)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
            if isinstance(e, StateError):
                raise
            raise StateError(f"malformed record at lsn {lsn}: {type(e).__name__}: {e}") from None

    def _apply(self, rec: list[Any], lsn: int) -> dict[str, Any] | None:
        if type(rec) is not list or not rec:
            raise StateError(f"record at lsn {lsn} is not a list")
        kind = rec[0]
        if kind != REC_ACCEPT and kind != REC_MESSAGE and kind not in _RECORD_LENGTHS:
            raise StateError(f"unknown record type {kind!r} at lsn {lsn}")
        if kind in _RECORD_LENGTHS and len(rec) != _RECORD_LENGTHS[kind] and not (
                kind == REC_PAUSE and len(rec) == 5):   # a shaping rule's pause
            raise StateError(f"record {kind!r} at lsn {lsn} has {len(rec)} fields, not "
                             f"{_RECORD_LENGTHS[kind]}")
        if kind == REC_SUPPRESS or kind == REC_REPORT:
            return self._apply_other(rec, lsn)
        if kind == REC_WARMUP:
            return self._apply_warmup(rec, lsn)
        if kind == REC_DSN_OWED:
            self._apply_dsn_owed(rec, lsn)
            return None
        if kind == REC_WEBHOOK:
            _, endpoint, cursor, ts = rec
            _check_numbers(rec, lsn, ts)
            if type(endpoint) is not str or not endpoint or type(cursor) is not int or \
                    cursor < 0:
                raise StateError(f"webhook record at lsn {lsn}: endpoint or cursor of the "
                                 "wrong type")
            self.last_lsn = lsn
            if cursor > self.webhook_cursors.get(endpoint, 0):   # never goes back
                self.webhook_cursors[endpoint] = cursor
            return None
        if kind == REC_PAUSE:
            _, key, until, ts = rec[:4]
            _check_numbers(rec, lsn, until, ts)
            if type(key) is not str or not key:
                raise StateError(f"pause record at lsn {lsn}: key is not a name")
            if len(rec) > 4:
                return self._apply_shaping(lsn, key, until, ts, rec[4])
            self.last_lsn = lsn
            if until > ts:
                self.suspended[key] = until
            else:
                self.suspended.pop(key, None)
            return {"seq": lsn, "type": "SiteSuspended" if until > ts else "SiteResumed",
                    "ts": ts, "id": None, "site": key,
                    **({"until": until} if until > ts else {})}
        if kind != REC_EPOCH and kind != REC_BODY and type(rec[1]) is not str:
            raise StateError(f"record {kind!r} at lsn {lsn}: id is not a string")
        self.last_lsn = lsn
        if kind == REC_EPOCH:
            return None
        if kind == REC_BODY:
            _, body_id, data = rec
            if type(body_id) is not str or type(data) not in (bytes, bytearray, memoryview):
                raise StateError(f"body record at lsn {lsn}: id or bytes of the wrong type")
            if body_id not in self.bodies:
                self.bodies[body_id] = _Body(bytes(data), 0, lsn)
                self.body_bytes += len(data)
            return None
        if kind == REC_ACCEPT or kind == REC_MESSAGE:
            return self._apply_accept(rec, lsn)
        msg_id = rec[1]
        m = self.messages.get(msg_id)
        if m is None:
            # A result for a message that already finished (e.g. a duplicate delivery report
            # after a restart): harmless, nothing to change, no event.
            return None
        if kind == REC_TRANSIENT:
            _, _, attempt, next_at, code, enhanced, text, site, category, ts = rec
            _check_numbers(rec, lsn, attempt, next_at, ts)
            self.inflight.pop(msg_id, None)
            self._unready(m)
            m.attempts = max(m.attempts, attempt)
            m.last_code, m.last_text, m.site = code, text, site
            self._defer(m, next_at)
            self.counters["transient"] += 1
            return self._event("TransientFailure", lsn, m, ts, attempt=attempt, code=code,
                               enhanced=enhanced, text=text, site=site, category=category,
                               next_attempt=next_at)
        if kind == REC_DELIVERED:
            _, _, attempt, code, text, site, ts = rec
            _check_numbers(rec, lsn, attempt, ts)
            m.attempts = max(m.attempts, attempt)
            self.counters["delivered"] += 1
            ev = self._event("Delivery", lsn, m, ts, attempt=attempt, code=code, text=text,
                             site=site)
            self._mark_dsn(m, ev)
            self._finish(m, "delivered", ev)
            return ev
        if kind == REC_FINAL:
            _, _, attempt, fkind, code, enhanced, text, site, category, ts = rec
            _check_numbers(rec, lsn, attempt, ts)
            if fkind not in _FINAL_EVENT:
                raise StateError(f"final record at lsn {lsn}: unknown kind {fkind!r}")
            m.attempts = max(m.attempts, attempt)
            self.counters[_FINAL_STATE[fkind]] += 1
            if fkind in ("bounce", "expired") and wants_dsn(m.sender, m.metadata):
                body = self.bodies.get(m.body_id)
                # (the body id last: the recipients of one submission share it, and are
                # reported together: cluster/core/dsn_due.py)
                self.dsn_due[m.id] = [m.sender, m.rcpt, fkind, code, enhanced, text, site,
                                      m.created, ts,
                                      header_section(body.data) if body is not None else b"",
                                      m.body_id]
                self.dsn_owed += 1
            ev = self._event(_FINAL_EVENT[fkind], lsn, m, ts, attempt=attempt, code=code,
                             enhanced=enhanced, text=text, site=site, category=category)
            self._mark_dsn(m, ev)
            self._finish(m, _FINAL_STATE[fkind], ev)
            return ev
        raise StateError(f"unknown record type {kind!r} at lsn {lsn}")

    def _apply_other(self, rec: list[Any], lsn: int) -> dict[str, Any] | None:
        """``s`` and ``o`` records: checked whole before anything changes."""
        if rec[0] == REC_SUPPRESS:
            _, op, rows, ts, propagate = rec
            _check_numbers(rec, lsn, ts)
            if op not in ("add", "remove", "sent") or type(rows) is not list:
                raise StateError(f"suppression record at lsn {lsn}: op {op!r}")
            if op == "sent":
                if not all(type(k) is str for k in rows):
                    raise StateError(f"suppression record at lsn {lsn}: keys not strings")
            else:
                width = 6 if op == "add" else 2
                for row in rows:
                    if type(row) is not list or len(row) != width or \
                            not all(type(v) is str for v in row[:2]) or \
                            op == "add" and (row[2] not in SUPPRESSION_REASONS or
                                             type(row[3]) not in (int, float) or
                                             row[4] is not None and
                                             type(row[4]) not in (int, float) or
                                             row[5] is not None and type(row[5]) is not str):
                        raise StateError(f"suppression record at lsn {lsn}: bad row {row!r:.200}")
            self.last_lsn = lsn
            if op == "sent":
                for k in rows:
                    self.suppress_outbox.pop(k, None)
                return None
            self.suppression.apply(op, rows)
            if op == "add" and propagate:
                for row in rows:
                    self.suppress_outbox[entry_key(row[0], row[1])] = row
            # (every event has an "id": None when it is about no one message)
            return {"seq": lsn, "type": "Suppression" if op == "add" else "Unsuppression",
                    "ts": ts, "id": None, "count": len(rows),
                    "entries": [{"address": r[0], "scope": r[1],
                                 **({"reason": r[2], "cause": r[5]} if op == "add" else {})}
                                for r in rows[:20]]}
        _, kind, mid, rcpt, detail, ts = rec
        _check_numbers(rec, lsn, ts)
        if kind not in _REPORT_EVENT or not (mid is None or type(mid) is str) or \
                type(rcpt) is not str or type(detail) is not dict:
            raise StateError(f"report record at lsn {lsn}: a field of the wrong type")
        self.last_lsn = lsn
        self.counters["reports"] += 1
        return {"seq": lsn, "type": _REPORT_EVENT[kind], "ts": ts, "id": mid,
                "recipient": rcpt, **detail}

    def _apply_accept(self, rec: list[Any], lsn: int) -> dict[str, Any]:
        if len(rec) not in (13, 15):
            raise StateError(f"accept record at lsn {lsn} has {len(rec)} fields")
        m = QueuedMessage(rec)
        if m.id in self.messages:
            raise StateError(f"message {m.id} accepted twice (lsn {lsn})")
        # everything the indexes compare or hash, checked before anything changes
        if not all(type(v) is str for v in (m.sender, m.rcpt, m.domain)) or \
                type(m.body_id) is not str and rec[0] == REC_ACCEPT or \
                not (m.idempotency_key is None or type(m.idempotency_key) is str) or \
                not (m.tags is None or type(m.tags) is dict):
            raise StateError(f"accept record for {m.id} at lsn {lsn}: a field of the wrong type")
        _check_numbers(rec, lsn, m.created, m.expires_at, m.next_at, m.attempts)
        if rec[0] == REC_MESSAGE:   # the body is in the record, under the message's id
            if type(rec[2]) not in (bytes, bytearray, memoryview):
                raise StateError(f"message record for {m.id} at lsn {lsn}: body is not bytes")
            m.body_id = m.id
            if m.id not in self.bodies:
                data = bytes(rec[2])
                self.bodies[m.id] = _Body(data, 0, lsn)
                self.body_bytes += len(data)
        body = self.bodies.get(m.body_id)
        if body is None:
            raise StateError(f"message {m.id} refers to unknown body {m.body_id} (lsn {lsn})")
        body.refs += 1
        if m.metadata and m.sender == "":
            for orig in dsn_of(m.metadata):    # the DSN owed is now queued
                self.dsn_due.pop(orig, None)
                self._settle_dsn(orig, m.id)
        self.messages[m.id] = m
        if m.idempotency_key:
            ent = self.idempotency.get(m.idempotency_key)
            if ent is None:
                self.idempotency[m.idempotency_key] = (m.created, [m.id])
            else:
                ent[1].append(m.id)
        heapq.heappush(self._expiry, (m.expires_at, m.id))
        if m.attempts > 0 or (m.not_before and m.not_before > m.created):
            self._defer(m, m.next_at)
        else:
            self._make_ready(m)
        self.counters["accepted"] += 1
        return self._event("Reception", lsn, m, m.created, size=len(body.data))

    @staticmethod
    def _mark_dsn(m: QueuedMessage, ev: dict[str, Any]) -> None:
        """The fate of a DSN (delivered, bounced, suppressed…) says which messages it was
        about: ``dsn_of``, a list of ids."""
        if m.sender == "" and m.metadata:
            reported = dsn_of(m.metadata)
            if reported:
                ev["dsn_of"] = reported

    def _settle_dsn(self, orig: str, dsn_id: str) -> None:
        self.dsn_settled[orig] = dsn_id
        self.dsn_settled.move_to_end(orig)
        while len(self.dsn_settled) > max(self.status_cache, 1):
            self.dsn_settled.popitem(last=False)

    def _apply_dsn_owed(self, rec: list[Any], lsn: int) -> None:
        """An ``n`` record: checked whole before anything changes."""
        _, rows, ts = rec
        _check_numbers(rec, lsn, ts)
        bad = bad_dsn_owed_row(rows)
        if bad is not None:
            raise StateError(f"DSN record at lsn {lsn}: {bad}")
        self.last_lsn = lsn
        for orig, *entry in rows:
            if orig not in self.dsn_due and orig not in self.dsn_settled:
                entry[9] = bytes(entry[9])
                self.dsn_due[orig] = entry
                self.dsn_owed += 1

    def _event(self, etype: str, lsn: int, m: QueuedMessage, ts: float,
               **extra: Any) -> dict[str, Any]:
        ev: dict[str, Any] = {"seq": lsn, "type": etype, "ts": ts, "id": m.id,
                              "sender": m.sender, "recipient": m.rcpt, "domain": m.domain}
        if m.tags:
            ev["tags"] = m.tags
        ev.update(extra)
        return ev

    def _finish(self, m: QueuedMessage, state: str, ev: dict[str, Any]) -> None:
        self.messages.pop(m.id, None)
        self.inflight.pop(m.id, None)
        self._unready(m)
        m.state = state
        body = self.bodies.get(m.body_id)
        if body is not None:
            body.refs -= 1
            if body.refs <= 0:
                del self.bodies[m.body_id]
                if self._dirty is not None:   # a snapshot being built must drop it too
                    self._dirty_bodies.add(m.body_id)
                self.body_bytes -= len(body.data)
        if self.status_cache:
            self.finished[m.id] = (m.id, state, m.rcpt, ev.get("attempt", m.attempts),
                                   ev.get("code"), ev.get("text", ""), ev.get("site", m.site),
                                   ev["ts"])
            while len(self.finished) > self.status_cache:
                self.finished.popitem(last=False)

    def hold(self, msg_id: str, now: float) -> bool:
        """Take a queued message out of its ready queue because its outcome is already known
        (a result that reached a restarted leader) and its record is on the way: it must not
        be handed out again meanwhile. It counts as in flight until the record applies."""
        m = self.messages.get(msg_id)
        if m is None or m.state != QUEUED:
            return False
        self._unready(m)
        m.state = INFLIGHT
        m.dispatched_at = now
        self.inflight[msg_id] = m
        return True

    def _unready(self, m: QueuedMessage) -> None:
        """A queued message leaves its ready queue (its id stays there, stale, until popped)."""
        if m.state != QUEUED:
            return
        m.state = DEFERRED   # the caller sets the real state; anything but QUEUED marks stale
        self.ready_count -= 1
        self._drop_live(m.domain)

    def take_ready_changed(self) -> set[str]:
        """The domains whose ready count changed since the last call (and forget them)."""
        out, self.ready_changed = self.ready_changed, set()
        return out

    def _drop_live(self, domain: str) -> None:
        self.ready_changed.add(domain)
        n = self.ready_live[domain] - 1
        if n:
            self.ready_live[domain] = n
        else:   # nothing real left: drop the deque and whatever stale ids it still holds
            del self.ready_live[domain]
            self.ready.pop(domain, None)

    def _make_ready(self, m: QueuedMessage, front: bool = False) -> None:
        m.state = QUEUED
        q = self.ready.get(m.domain)
        if q is None:
            q = self.ready[m.domain] = deque()
        if front:
            q.appendleft(m.id)
        else:
            q.append(m.id)
        self.ready_count += 1
        self.ready_live[m.domain] = self.ready_live.get(m.domain, 0) + 1
        self.ready_changed.add(m.domain)

    def _defer(self, m: QueuedMessage, next_at: float) -> None:
        m.state = DEFERRED
        m.next_at = next_at
        heapq.heappush(self._deferred, (next_at, m.id))

    # ------------------------------------------------------------------ scheduling (soft)
    def promote_due(self, now: float) -> int:
        """Move deferred messages whose time has come to the ready queues."""
        n = 0
        h = self._deferred
        while h and h[0][0] <= now:
            at, mid = heapq.heappop(h)
            m = self.messages.get(mid)
            if m is None or m.state != DEFERRED or m.next_at != at:
                continue
            self._make_ready(m)
            n += 1
        return n

    def next_due(self) -> float | None:
        while self._deferred:
            at, mid = self._deferred[0]
            m = self.messages.get(mid)
            if m is None or m.state != DEFERRED or m.next_at != at:
                heapq.heappop(self._deferred)
                continue
            return at
        return None

    def due_expiries(self, now: float, limit: int = 10_000) -> list[QueuedMessage]:
        """Live messages past their expiry that are not in flight (those expire on result)."""
        out: list[QueuedMessage] = []
        h = self._expiry
        while h and h[0][0] <= now and len(out) < limit:
            _, mid = heapq.heappop(h)
            m = self.messages.get(mid)
            if m is None:
                continue
            if m.state == INFLIGHT:
                continue  # decided when its result comes back
            out.append(m)
        return out

    def take_ready(self, domain: str, n: int, now: float) -> list[QueuedMessage]:
        """Pop up to n ready messages of ``domain`` and mark them in flight."""
        q = self.ready.get(domain)
        out: list[QueuedMessage] = []
        while q and len(out) < n:
            mid = q.popleft()
            m = self.messages.get(mid)
            if m is None or m.state != QUEUED or m.domain != domain:
                continue   # stale: finished, deferred or taken since it was queued here
            m.state = INFLIGHT
            m.dispatched_at = now
            self.inflight[mid] = m
            out.append(m)
            self.ready_count -= 1
            self._drop_live(domain)
            q = self.ready.get(domain)
        return out

    def requeue(self, ids: Iterable[str], front: bool = True) -> int:
        """Put in-flight messages back to ready (their relay died without a result)."""
        ids = list(ids)
        # appendleft reverses: walk backwards so the batch keeps its order at the front
        return self._out_of_flight(reversed(ids) if front else ids,
                                   lambda m: self._make_ready(m, front))

    def hold_until(self, ids: Iterable[str], at: float) -> int:
        """In-flight (just taken) messages wait until ``at`` without an attempt: soft, no
        record (a restarted leader finds them ready and decides again)."""
        return self._out_of_flight(ids, lambda m: self._defer(m, at))

    def _out_of_flight(self, ids: Iterable[str], put: Callable[[QueuedMessage], None]) -> int:
        n = 0
        for mid in ids:
            m = self.inflight.pop(mid, None)
            if m is None or mid not in self.messages:
                continue
            put(m)
            n += 1
        return n

    def stale_inflight(self, now: float, timeout: float) -> list[str]:
        """In-flight messages handed out more than ``timeout`` before ``now``. The in-flight
        dict is in the order messages were handed out (one enters it, with that time, only
        when it is handed out), so the walk stops at the first message still within the
        timeout: its cost is the stale ones, not every message in flight (a clock stepped
        back only delays noticing the messages behind it)."""
        out = []
        for mid, m in self.inflight.items():
            if now - m.dispatched_at <= timeout:
                break
            out.append(mid)
        return out

    def body(self, body_id: str) -> bytes:
        return self.bodies[body_id].data

    def lookup_idempotency(self, key: str, now: float) -> list[str] | None:
        ent = self.idempotency.get(key)
        if ent is None or now - ent[0] > self.idempotency_window:
            return None
        return list(ent[1])

    def prune_idempotency(self, now: float) -> None:
        while self.idempotency:
            key, (ts, _) = next(iter(self.idempotency.items()))
            if now - ts <= self.idempotency_window:
                break
            self.idempotency.popitem(last=False)

    def _apply_shaping(self, lsn: int, key: str, until: float, ts: float,
                       action: Any) -> dict[str, Any]:
        if not isinstance(action, dict) or action.get("action") not in ("suspend", "set_limits") \
                or type(action.get("rule")) is not str:
            raise StateError(f"pause record at lsn {lsn}: shaping action is malformed")
        self.last_lsn = lsn
        slot = f"{action['action']}:{key}"
        fired = until > ts
        if fired:
            self.shaping[slot] = {**action, "until": until}
            if action["action"] == "suspend":
                self.suspended[key] = max(until, self.suspended.get(key, 0.0))
        else:
            self.shaping.pop(slot, None)
            # only the rule's own pause ends: an operator's longer one stays
            if action["action"] == "suspend" and self.suspended.get(key) == action.get("until"):
                del self.suspended[key]
        suspend = action["action"] == "suspend"
        etype = ("SiteSuspended" if fired else "SiteResumed") if suspend else \
            ("SiteShaped" if fired else "SiteShapingEnded")
        ev = {"seq": lsn, "type": etype, "ts": ts, "id": None, "site": key,
              "rule": action["rule"], "action": action["action"]}
        if fired:
            ev["until"] = until
            ev["text"] = action.get("text", "")
            if not suspend:
                ev["limits"] = {k: action[k] for k in ("rates", "max_connections",
                                                       "deliveries_per_connection")
                                if action.get(k)}
        return ev

    def _apply_warmup(self, rec: list[Any], lsn: int) -> dict[str, Any] | None:
        _, source, provider, day, reserved, ts, note = rec
        _check_numbers(rec, lsn, ts)
        if type(source) is not str or not source or type(provider) is not str or \
                not provider or type(day) is not int or type(reserved) is not int or \
                reserved < 0 or note not in _WARMUP_EVENT:
            raise StateError(f"warm-up record at lsn {lsn}: a field of the wrong type")
        self.last_lsn = lsn
        key = f"{source}|{provider}|{day}"
        if reserved > self.warmup.get(key, 0):   # never goes back
            self.warmup[key] = reserved
        old = [k for k in self.warmup if int(k.rsplit("|", 1)[1]) < day - 1]
        for k in old:   # bounded: days before yesterday go
            del self.warmup[k]
        for n in [n for n in self.warmup_notes if int(n.rsplit("|", 2)[1]) < day - 1]:
            self.warmup_notes.discard(n)
        if not note or f"{key}|{note}" in self.warmup_notes:
            return None
        self.warmup_notes.add(f"{key}|{note}")
        return {"seq": lsn, "type": _WARMUP_EVENT[note], "ts": ts, "id": None,
                "source": source, "provider": provider, "day": day, "reserved": reserved}

    def shaping_in_force(self, now: float) -> list[dict[str, Any]]:
        """Shaping actions in force (expired ones dropped: soft, every copy does the same)."""
        for slot in [k for k, a in self.shaping.items() if a["until"] <= now]:
            del self.shaping[slot]
        return list(self.shaping.values())

    def is_suspended(self, domain: str, site: str, now: float) -> bool:
        """Is dispatch to ``domain`` (or its ``site``) suspended by an operator now?"""
        s = self.suspended
        if not s:
            return False
        for key in (domain, site):
            until = s.get(key)
            if until is not None:
                if until > now:
                    return True
                del s[key]      # ran out: soft, every copy does the same from its clock
        return False

    # ------------------------------------------------------------------ views
    def status(self, msg_id: str) -> dict[str, Any] | None:
        m = self.messages.get(msg_id)
        if m is not None:
            return {"id": m.id, "state": m.state, "recipient": m.rcpt, "attempts": m.attempts,
                    "next_attempt": m.next_at if m.state == DEFERRED else None,
                    "code": m.last_code, "text": m.last_text, "site": m.site,
                    "created": m.created, "expires_at": m.expires_at}
        f = self.finished.get(msg_id)
        if f is None:
            return None
        return dict(zip(_FINISHED_KEYS, f))

    def counts(self) -> dict[str, int]:
        # every live message is exactly one of queued (in a ready queue), in flight, deferred
        deferred = len(self.messages) - self.ready_count - len(self.inflight)
        return {"live": len(self.messages), "ready": self.ready_count,
                "inflight": len(self.inflight), "deferred": deferred,
                "bodies": len(self.bodies), "body_bytes": self.body_bytes, **self.counters}

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, segments: list[tuple[int, int, int]] | None = None) -> dict[str, Any]:
        """Everything hard about the queue, as plain data (msgpack-able), in one go.

        ``segments``: ``(first lsn, last lsn, bytes)`` of the log segments that hold frames
        covered by this snapshot (from :meth:`SpoolLog.segment_ranges`). With them, a body
        whose record sits in a segment worth keeping is written as a reference ``[id, None,
        lsn]`` instead of its bytes, and ``keep`` (the first key, readable without decoding
        the rest) lists the lsns the log must keep. Bodies in sparse segments (live body
        bytes under a quarter of the segment) are copied in, so those segments can go.
        Without ``segments`` every body is copied in (a backup, a test)."""
        return self.snapshot_begin(segments).finish()

    def snapshot_begin(self, segments: list[tuple[int, int, int]] | None = None
                       ) -> "SnapshotBuild":
        """Start a snapshot taken a slice at a time (:class:`SnapshotBuild`), so that a big
        queue does not hold the event loop for the whole of it: records applied meanwhile
        mark what they touch, and :meth:`SnapshotBuild.finish` takes those again."""
        if self._dirty is not None:
            raise StateError("a snapshot is already being built")
        self._dirty = set()
        self._dirty_bodies = set()
        return SnapshotBuild(self, segments)

    def _snapshot_rest(self) -> dict[str, Any]:
        return {
            "idempotency": [[k, ts, ids] for k, (ts, ids) in self.idempotency.items()],
            "counters": dict(self.counters),
            # the bounded status cache, so status() answers the same after a restart
            "finished": list(self.finished.values()),
            "suppression": self.suppression.snapshot(),
            "suppress_outbox": list(self.suppress_outbox.values()),
            "suspended": dict(self.suspended),
            "shaping": dict(self.shaping),
            "dsn_due": [[k, *v] for k, v in self.dsn_due.items()],
            "dsn_settled": list(self.dsn_settled.items()),
            "webhook_cursors": dict(self.webhook_cursors),
            "warmup": dict(self.warmup),
            "warmup_notes": sorted(self.warmup_notes),
        }

    def restore(self, snap: dict[str, Any]) -> None:
        if self.messages or self.bodies or self.last_lsn:
            raise StateError("restore into a non-empty queue state")
        for entry in snap["bodies"]:
            # [id, bytes] or, resolved from a reference by the log, [id, bytes, lsn]
            data = entry[1]
            if data is None:
                raise StateError(f"snapshot body {entry[0]}: reference to lsn {entry[2]} "
                                 "was not resolved")
            self.bodies[entry[0]] = _Body(bytes(data), 0, entry[2] if len(entry) > 2 else 0)
            self.body_bytes += len(data)
        for row in snap["messages"]:
            m = QueuedMessage.from_snapshot(row)
            self.messages[m.id] = m
            self.bodies[m.body_id].refs += 1
            heapq.heappush(self._expiry, (m.expires_at, m.id))
            # as _apply_accept / the transient record left it: tried or scheduled → deferred
            if m.attempts > 0 or (m.not_before and m.not_before > m.created):
                self._defer(m, m.next_at)
            else:
                self._make_ready(m)
        for k, ts, ids in snap["idempotency"]:
            self.idempotency[k] = (ts, list(ids))
        self.counters.update(snap.get("counters", {}))
        for mid, state, rcpt, attempts, code, text, site, ts in snap.get("finished", []):
            self.finished[mid] = (mid, state, rcpt, attempts, code, text, site, ts)
        self.suppression.restore(snap.get("suppression", ()))
        self.suspended.update(snap.get("suspended", {}))
        self.shaping.update(snap.get("shaping", {}))
        for row in snap.get("dsn_due", ()):
            self.dsn_due[row[0]] = list(row[1:])
        for orig, dsn_id in snap.get("dsn_settled", ()):
            self.dsn_settled[orig] = dsn_id
        self.webhook_cursors.update(snap.get("webhook_cursors", {}))
        self.warmup.update(snap.get("warmup", {}))
        self.warmup_notes.update(snap.get("warmup_notes", ()))
        for row in snap.get("suppress_outbox", ()):
            self.suppress_outbox[entry_key(row[0], row[1])] = row
        self.last_lsn = snap["lsn"]
