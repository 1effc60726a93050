"""The suppression list: addresses raymta must not send to, and why.

Owns what an entry is (address, scope, reason, the event that caused it, created, expiry),
the lookup the shard leader makes for every recipient at submission (two dict probes: global
and the sender's domain), expiry of hard-bounce entries, and the entry's wire and snapshot
form. Entries live in the replicated queue state (:class:`cluster.core.queue.QueueState`
applies ``s`` records through :meth:`SuppressionList.apply`), so they survive a leader's
SIGKILL and a node loss and are in every backup; every shard holds the whole list, because a
recipient may be submitted to any shard.

Reasons: ``hard-bounce`` (expires after ``suppression.hard_bounce_ttl``), ``complaint`` and
``unsubscribe`` (never expire), ``manual``. Soft bounces never suppress (the caller decides).

Pure: no I/O, no clock (``now`` is an argument), no Ray.
"""

from __future__ import annotations

import heapq
import struct
import time
from typing import Any, Iterable, Iterator

__all__ = ["REASONS", "HARD_CATEGORIES", "SuppressionList", "Entry", "check_rows", "entry_key",
           "normalize_address", "rows_from_snapshot", "suppressed_note"]

REASONS = ("hard-bounce", "complaint", "unsubscribe", "manual")
_REASON_CODE = {r: i for i, r in enumerate(REASONS)}
#: an entry's value in memory: reason code, created, expires_at (0 = never). The cause is kept
#: apart and only when given (most entries of an import have none): ~50 bytes instead of a
#: tuple of objects (~150)
_VALUE = struct.Struct("<Bdd")


def normalize_address(address: str) -> str:
    """The form an address is suppressed and looked up under: the domain lowercased (RFC 5321
    §2.4: the local part is case-sensitive, but in practice every large provider folds it, and
    a suppression that misses ``Ann@`` for ``ann@`` is the worse mistake)."""
    return address.strip().strip("<>").lower()


def entry_key(address: str, scope: str = "") -> str:
    """``scope`` is "" (every sender) or a sender domain."""
    return f"{scope.lower()}\x00{address}" if scope else address


class Entry(dict):  # type: ignore[type-arg]
    """One suppression as plain data (what ``list``/``export``/events show)."""


def suppressed_note(rcpt: str, e: dict[str, Any]) -> dict[str, Any]:
    """Why mail to ``rcpt`` is not sent, from the entry ``e`` that stops it: recipient,
    reason, since, and an ``error`` sentence naming the reason and the date."""
    when = time.strftime("%Y-%m-%d", time.gmtime(e["created"]))
    scope = f" for mail from {e['scope']}" if e["scope"] else ""
    return {"recipient": rcpt, "reason": e["reason"], "since": e["created"],
            "error": f"{rcpt} is suppressed{scope}: {e['reason']} since {when}"}


class SuppressionList:
    def __init__(self) -> None:
        self._entries: dict[str, bytes] = {}
        self._causes: dict[str, str] = {}
        #: (expires_at, key) of entries that expire, lazily cleaned: expiry costs a heap pop
        #: per expired entry, not a scan of the whole list
        self._expiry: list[tuple[float, str]] = []
        self.counters = {"added": 0, "removed": 0, "expired": 0}

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ changes (from records)
    def add(self, address: str, scope: str, reason: str, created: float,
            expires_at: float | None, cause: str | None = None) -> None:
        key = entry_key(address, scope)
        self._entries[key] = _VALUE.pack(_REASON_CODE[reason], created, expires_at or 0.0)
        if expires_at:
            heapq.heappush(self._expiry, (expires_at, key))
        if cause:
            self._causes[key] = cause
        else:
            self._causes.pop(key, None)
        self.counters["added"] += 1

    def remove(self, address: str, scope: str) -> bool:
        key = entry_key(address, scope)
        self._causes.pop(key, None)
        if self._entries.pop(key, None) is None:
            return False
        self.counters["removed"] += 1
        return True

    def apply(self, op: str, rows: list[list[Any]]) -> None:
        """An ``s`` record: ``op`` "add" with rows ``[address, scope, reason, created,
        expires_at, cause]``, or "remove" with rows ``[address, scope]``."""
        if op == "add":
            for address, scope, reason, created, expires_at, cause in rows:
                self.add(address, scope, reason, created, expires_at, cause)
        elif op == "remove":
            for address, scope in rows:
                self.remove(address, scope)
        else:
            raise ValueError(f"unknown suppression op {op!r}")

    # ------------------------------------------------------------------ lookups
    def find(self, address: str, sender_domain: str, now: float) -> Entry | None:
        """The entry that stops mail from ``sender_domain`` to ``address`` (normalized), if
        any: a global one, else one scoped to that sender domain or a parent of it (an
        unsubscribe from ``example.com`` also stops the envelope sender
        ``bounces.example.com``). Expired entries do not count (they are dropped by
        :meth:`expire`)."""
        e = self._entries
        if not e:
            return None
        keys = [address]
        d = sender_domain.lower()
        while d.count(".") >= 1:
            keys.append(f"{d}\x00{address}")
            d = d.partition(".")[2]
        for key in keys:
            v = e.get(key)
            if v is not None:
                code, created, expires = _VALUE.unpack(v)
                if expires and expires <= now:
                    continue
                return self._entry(key, v)
        return None

    def _entry(self, key: str, v: bytes) -> Entry:
        code, created, expires = _VALUE.unpack(v)
        scope, _, address = key.rpartition("\x00")
        return Entry(address=address, scope=scope, reason=REASONS[code], created=created,
                     expires_at=expires or None, cause=self._causes.get(key))

    def get(self, address: str, scope: str = "") -> Entry | None:
        key = entry_key(address, scope)
        v = self._entries.get(key)
        return None if v is None else self._entry(key, v)

    def entries(self, prefix: str = "", limit: int | None = None) -> Iterator[Entry]:
        """Entries whose address starts with ``prefix``, in insertion order."""
        n = 0
        for key, v in self._entries.items():
            if prefix and not key.rpartition("\x00")[2].startswith(prefix):
                continue
            yield self._entry(key, v)
            n += 1
            if limit is not None and n >= limit:
                return

    def expire(self, now: float, limit: int = 10_000) -> int:
        """Drop up to ``limit`` entries whose expiry has passed (soft state: every leader
        does this the same way from its own clock; a lookup already ignores them)."""
        h, n = self._expiry, 0
        while h and h[0][0] <= now and n < limit:
            at, key = heapq.heappop(h)
            v = self._entries.get(key)
            if v is None or _VALUE.unpack(v)[2] != at:
                continue    # removed, or added again with another expiry since
            del self._entries[key]
            self._causes.pop(key, None)
            n += 1
        self.counters["expired"] += n
        return n

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> list[list[Any]]:
        return [[k, v, self._causes.get(k)] for k, v in self._entries.items()]

    def restore(self, rows: Iterable[list[Any]]) -> None:
        for key, v, cause in rows:
            self._entries[key] = v = bytes(v)
            if cause:
                self._causes[key] = cause
            expires = _VALUE.unpack(v)[2]
            if expires:
                heapq.heappush(self._expiry, (expires, key))


#: categories of a permanent failure that mean "this address does not exist": they suppress
HARD_CATEGORIES = frozenset(("invalid-recipient", "inactive-mailbox", "bad-domain"))


def check_rows(op: str, rows: Any, now: float, *, ttl: float | None = None
               ) -> tuple[list[list[Any]], list[str]]:
    """Rows a client sent for ``op`` ("add": ``[address, scope, reason, cause]`` or
    ``{"address", "scope", "reason", "cause", "expires_at"}``; "remove": ``[address, scope]``)
    as record rows (normalized, ``created`` = ``now``, hard bounces given ``ttl``), and one
    error per bad row naming its index. Checked where they are trusted (the shard leader)."""
    from cluster.core.addresses import AddressError, parse_address
    good: list[list[Any]] = []
    errors: list[str] = []
    if type(rows) is not list:
        return [], [f"rows: must be a list, not {type(rows).__name__}"]
    for i, row in enumerate(rows):
        if type(row) is dict:
            row = [row.get("address"), row.get("scope", ""), row.get("reason", "manual"),
                   row.get("cause"), row.get("expires_at")][: 2 if op == "remove" else 5]
        if type(row) is not list or not row or len(row) > 5:
            errors.append(f"rows[{i}]: must be [address, scope, ...]")
            continue
        address, scope = row[0], row[1] if len(row) > 1 else ""
        if type(address) is not str or type(scope) is not str:
            errors.append(f"rows[{i}]: address and scope must be strings")
            continue
        try:
            parse_address(address.strip(), field=f"rows[{i}].address", allow_smtputf8=True)
        except AddressError as e:
            errors.append(str(e))
            continue
        if scope and (not scope.isascii() or "@" in scope or " " in scope or
                      len(scope) > 253 or "." not in scope):
            errors.append(f"rows[{i}].scope: {scope!r} is not a domain name")
            continue
        if op == "remove":
            good.append([normalize_address(address), scope.lower()])
            continue
        reason = row[2] if len(row) > 2 else "manual"
        cause = row[3] if len(row) > 3 else None
        expires = row[4] if len(row) > 4 else None
        if reason not in REASONS:
            errors.append(f"rows[{i}].reason: {reason!r} is not one of {', '.join(REASONS)}")
            continue
        if cause is not None and (type(cause) is not str or len(cause) > 200):
            errors.append(f"rows[{i}].cause: must be a string of at most 200 characters")
            continue
        if expires is not None and (type(expires) not in (int, float) or expires <= now):
            errors.append(f"rows[{i}].expires_at: must be a time in the future")
            continue
        if expires is None and reason == "hard-bounce" and ttl:
            expires = now + ttl
        good.append([normalize_address(address), scope.lower(), reason, now,
                     None if expires is None else float(expires), cause])
    return good, errors


def rows_from_snapshot(rows: Iterable[list[Any]]) -> list[list[Any]]:
    """A snapshot's (or backup's) entries as rows for :func:`check_rows` ("add"), to restore
    them into another cluster."""
    out = []
    for key, v, cause in rows:
        code, _created, expires = _VALUE.unpack(bytes(v))
        scope, _, address = key.rpartition("\x00")
        out.append([address, scope, REASONS[code], cause, expires or None])
    return out
