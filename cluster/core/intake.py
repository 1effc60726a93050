"""Shard-leader intake: checks everything a submitter sends and turns the good items into records.

Owns: what a shard leader accepts from a client — the wire item's shape and types, message ids
(well-formed ULIDs of this shard, unique in the call, not already used), envelope addresses
(free of CR, LF, spaces and controls; domains in IDNA A-label form), tags, metadata,
idempotency keys, sizes and limits — and the bookkeeping of what is being committed
(ids, idempotency keys and message counts pending in the group commit). The leader is where a
client's data is trusted, so every item is checked here again even though the client checked
it: one bad item gets a clear error naming the field, and the others of its call go on. A
record is written only if :class:`cluster.core.queue.QueueState` is sure to apply it.

Answers (one per item, in order): ``{"ids": [...]}``; ``{"ids": [...], "duplicate": True}``
for a retried call or a known idempotency key; ``{"error": "field: reason", "retryable":
bool}``. ``retryable`` marks refusals that a later attempt with the same item may overcome
(queue full, still being committed, not serving, no quorum): protocol front ends map it to a
4xx (SMTP) or 503 (HTTP), never to a permanent failure. ``unknown`` marks an error for which
the item may or may not have been committed (retry with the same ids; they are answered as
duplicates if it was).

Pure: no I/O, no clock (``now`` is an argument), no Ray.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any, Callable, Iterable

from cluster.core import queue as q
from cluster.core.addresses import AddressError, canonical_plain_domain, parse_address
from cluster.core.message import (MAX_QUEUE_LIFETIME, MAX_RECIPIENTS, PreparedMessage, ValidationError,
                                  _idempotency_key, _tags, check_metadata)
from cluster.core.suppression import normalize_address, suppressed_note

__all__ = ["Intake", "Limits", "ITEM_FIELDS", "check_item", "dkim_required_check",
           "retryable_error", "wire_item", "RETRY_REASONS"]

#: a submit item: [body_id, body, sender, [[id, rcpt, domain], ...], tags, metadata,
#: idempotency_key, not_before, max_age, smtputf8]
ITEM_FIELDS = ("body_id", "body", "sender", "recipients", "tags", "metadata",
               "idempotency_key", "not_before", "max_age", "smtputf8")

#: a message id: a ULID (26 Crockford base32 characters, the first at most 7: 48-bit time)
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}\Z")
#: what an envelope address on the wire must never contain (RFC 5321 §4.1.2: no controls, CR
#: and LF included, anywhere; a space only inside a quoted local part)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_ADDRESS = 320


def wire_item(p: PreparedMessage, ids: Iterable[str]) -> list[Any]:
    """The submit item for a prepared message (what a client sends, what :func:`check_item`
    checks), one id per recipient taken from ``ids``."""
    # (the recipients first: zip takes an id only for a recipient it has)
    rcpts = [[mid, str(addr), addr.ascii_domain] for addr, mid in zip(p.recipients, ids)]
    return [rcpts[0][0], p.body, p.sender, rcpts, p.tags or None, p.metadata or None,
            p.idempotency_key, p.not_before, p.max_age, p.smtputf8]


#: why a refusal is retryable (``reason`` of a retryable answer, machine-readable: protocol
#: front ends choose their reply from it, never from the text): the queue is full (HTTP 429),
#: the shard has no quorum or is not serving (503), an earlier submission of the same item
#: is still being committed, or the outcome is not known in time
RETRY_REASONS = ("queue_full", "no_quorum", "not_serving", "pending_commit", "timeout")


def retryable_error(text: str, *, reason: str, unknown: bool = False) -> dict[str, Any]:
    """An answer that says "try again" (with the same ids: a retry is answered as a
    duplicate if this attempt did commit), with its ``reason`` (:data:`RETRY_REASONS`)."""
    if reason not in RETRY_REASONS:
        raise ValueError(f"retry reason {reason!r} is not one of {RETRY_REASONS}")
    out: dict[str, Any] = {"error": text, "retryable": True, "reason": reason}
    if unknown:
        out["unknown"] = True
    return out


def _refuse(text: str) -> dict[str, Any]:
    return {"error": text, "retryable": False}


class Limits:
    """The queue limits an intake enforces (read once per call from the config)."""

    __slots__ = ("max_messages", "max_bytes", "max_message_size", "default_max_age",
                 "suppressed")

    def __init__(self, max_messages: int, max_bytes: int, max_message_size: int,
                 default_max_age: float, suppressed: str = "refuse") -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_message_size = max_message_size
        self.default_max_age = default_max_age
        #: a suppressed recipient: "refuse" it (the message goes to the others, and is
        #: refused if none is left) or "drop" it (accepted, then finished as "suppressed")
        self.suppressed = suppressed


def _address_error(value: Any, field: str, utf8: bool, *, allow_empty: bool) -> str | None:
    if type(value) is str and canonical_plain_domain(value) is not None:
        return None
    if type(value) is not str:
        return f"{field}: must be a string, not {type(value).__name__}"
    if not value:
        return None if allow_empty else f"{field}: must not be empty"
    if len(value) > _MAX_ADDRESS:
        return f"{field}: {len(value)} characters, over the limit of {_MAX_ADDRESS}"
    bad = _CONTROL.search(value)
    if bad is not None:
        return (f"{field}: contains control character U+{ord(bad.group()):04X} at "
                f"{bad.start()} ({value!r})")
    if " " in value and not value.lstrip("<").startswith('"'):
        return f"{field}: contains a space outside a quoted local part ({value!r})"
    try:
        addr = parse_address(value, field=field, allow_smtputf8=utf8, allow_empty=allow_empty)
    except AddressError as e:
        return str(e)
    if str(addr) != value:
        return f"{field}: not in canonical form ({value!r}; expected {str(addr)!r})"
    return None


def check_item(it: Any, shard: int, shards: int, max_size: int, now: float | None = None,
               good_senders: set[tuple[str, bool]] | None = None) -> str | None:
    """Everything about one wire item that does not depend on the queue's state; None when
    good, else ``"field: reason"``. (The ids' freshness and the limits are checked by
    :meth:`Intake.admit`.) ``good_senders``: (sender, smtputf8) pairs this call already
    found good (the items of one call mostly share a sender): checked once, then added."""
    if type(it) is not list or len(it) != len(ITEM_FIELDS):
        return (f"item: must be a list of {len(ITEM_FIELDS)} fields "
                f"({', '.join(ITEM_FIELDS)}), not {type(it).__name__}"
                + (f" of {len(it)}" if isinstance(it, (list, tuple)) else ""))
    body_id, body, sender, rcpts, tags, meta, idem, not_before, max_age, utf8 = it
    if type(utf8) is not bool:
        return f"smtputf8: must be true or false, not {type(utf8).__name__}"
    if type(body) is not bytes:
        return f"body: must be bytes, not {type(body).__name__}"
    if not body:
        return "body: must not be empty"
    if len(body) > max_size:
        return f"body: {len(body)} bytes exceeds the limit of {max_size}"
    if good_senders is None or type(sender) is not str or (sender, utf8) not in good_senders:
        err = _address_error(sender, "sender", utf8, allow_empty=True)
        if err:
            return err
        if good_senders is not None:
            good_senders.add((sender, utf8))   # (a str: _address_error passed it)
    if type(rcpts) is not list or not rcpts:
        return "recipients: must be a non-empty list of [id, address, domain]"
    if len(rcpts) > MAX_RECIPIENTS:
        return f"recipients: {len(rcpts)}, over the limit of {MAX_RECIPIENTS} per message"
    seen: set[str] = set()
    crc = zlib.crc32
    for k, r in enumerate(rcpts):
        where = f"recipients[{k}]"
        if type(r) is not list or len(r) != 3:
            return f"{where}: must be [id, address, domain]"
        mid, rcpt, domain = r
        if type(mid) is not str or not _ULID.match(mid):
            return f"{where}.id: not a message id (a ULID of 26 characters): {mid!r}"
        if crc(mid.encode("ascii")) % shards != shard:
            return f"{where}.id: {mid} belongs to shard {crc(mid.encode()) % shards}, not {shard}"
        if mid in seen:
            return f"{where}.id: {mid} appears twice in the message"
        seen.add(mid)
        plain = canonical_plain_domain(rcpt) if type(rcpt) is str else None
        if plain is None:
            err = _address_error(rcpt, where, utf8, allow_empty=False)
            if err:
                return err
        if type(domain) is not str or \
                domain != plain and (
                    not domain.isascii() or
                    parse_address(rcpt, allow_smtputf8=utf8).ascii_domain != domain):
            return (f"{where}.domain: {domain!r} is not the IDNA (A-label) form of the "
                    f"address's domain")
    if body_id != rcpts[0][0]:
        return f"body_id: must be the first recipient's id ({rcpts[0][0]}), not {body_id!r}"
    try:
        if tags is not None:
            if not tags:
                return "tags: an empty dict is sent as none"
            if _tags(tags) != tags:
                return "tags: not in canonical form"
        if meta is not None:
            if type(meta) is not dict or not meta:
                return "metadata: must be a non-empty dict or none"
            check_metadata(meta)
        if idem is not None:
            _idempotency_key(idem)
    except ValidationError as e:
        return str(e)
    for name, v, lo in (("not_before", not_before, 0.0), ("max_age", max_age, None)):
        if v is None:
            continue
        if type(v) not in (int, float) or not math.isfinite(v) or \
                (v < lo if lo is not None else v <= 0):
            return f"{name}: must be a finite {'time' if lo is not None else 'duration > 0'}" \
                   f", not {v!r}"
    if max_age is not None and max_age > MAX_QUEUE_LIFETIME:
        return f"max_age: {max_age!r} s is over the limit of {MAX_QUEUE_LIFETIME:g} s"
    if not_before is not None and now is not None and not_before > now + MAX_QUEUE_LIFETIME:
        return f"not_before: {not_before!r} is more than {MAX_QUEUE_LIFETIME:g} s ahead"
    return None


def dkim_required_check(cfg: Any) -> Callable[[bytes], str | None] | None:
    """The leader's check for DKIM's ``sign = "required"`` policy (a message From a domain
    that must be signed but has no key is refused, naming the domain), or None when no domain
    requires it (then nothing is parsed on the submit path)."""
    from cluster.core.dkim import DkimError, dkim_refusal, from_domain, parse_headers, \
        split_message
    d = getattr(cfg, "dkim", None)
    if d is None or (d.sign != "required" and
                     not any(p == "required" for _, p in d.policy)):
        return None

    def check(body: bytes) -> str | None:
        try:
            dom = from_domain(parse_headers(split_message(body)[0])) or ""
        except DkimError:
            dom = ""
        return dkim_refusal(dom, cfg)
    return check


class Intake:
    """What one shard leader has been sent and not yet committed, and the admission of new
    items against it and against the queue."""

    def __init__(self, shard: int, shards: int,
                 body_check: Callable[[bytes], str | None] | None = None) -> None:
        self.shard = shard
        self.shards = shards
        #: a check of the message itself that policy asks for (e.g. DKIM ``sign =
        #: "required"``: the From domain must have a key); None when nothing asks
        self.body_check = body_check
        self.pending_ids: set[str] = set()
        self.pending_idem: dict[str, list[str]] = {}
        self.pending_msgs = 0
        self.counters = {"refused": 0, "suppressed": 0}

    def admit(self, items: Any, state: q.QueueState, limits: Limits, now: float,
              full: Callable[[int], str] | None = None
              ) -> tuple[list[dict[str, Any]], list[list[Any]]]:
        """One answer per item and the records to commit for the admitted ones (their ids
        and keys are marked pending until :meth:`settle`)."""
        if type(items) is not list:
            return [_refuse(f"payload: must be a list of items, not {type(items).__name__}")], []
        messages, finished, bodies = state.messages, state.finished, state.bodies
        pending_ids = self.pending_ids
        results: list[dict[str, Any]] = []
        records: list[list[Any]] = []
        added_bytes = 0
        call_ids: set[str] = set()
        good_senders: set[tuple[str, bool]] = set()
        for it in items:
            err = check_item(it, self.shard, self.shards, limits.max_message_size, now,
                             good_senders)
            if err is not None:
                self.counters["refused"] += 1
                results.append(_refuse(err))
                continue
            body_id, body, sender, rcpts, tags, meta, idem, not_before, max_age, utf8 = it
            if self.body_check is not None:
                why = self.body_check(body)
                if why is not None:
                    self.counters["refused"] += 1
                    results.append(_refuse(why))
                    continue
            ids = [rcpts[0][0]] if len(rcpts) == 1 else [r[0] for r in rcpts]
            if idem:
                prev = state.lookup_idempotency(idem, now)
                if prev:
                    results.append({"ids": prev, "duplicate": True})
                    continue
                if idem in self.pending_idem:
                    # the first submission is not durable yet: only its answer may say so
                    results.append({**retryable_error(
                        f"idempotency_key: the first submission with key {idem!r} is still "
                        "being committed; retry", reason="pending_commit"), "pending": True})
                    continue
            if not call_ids.isdisjoint(ids):
                self.counters["refused"] += 1
                results.append(_refuse("recipients: a message id is used twice in this call"))
                continue
            if not pending_ids.isdisjoint(ids):
                results.append({**retryable_error(
                    "recipients: these message ids are still being committed by an earlier "
                    "call; retry", reason="pending_commit"), "pending": True})
                continue
            known = [i for i in ids if i in messages or i in finished]
            if known:
                if len(known) == len(ids) or self._suppressed_rest(
                        rcpts, set(known), sender, state, now):
                    results.append({"ids": known, "duplicate": True})   # a retried call
                else:
                    self.counters["refused"] += 1
                    results.append(_refuse(f"recipients: ids {', '.join(known[:3])} belong to "
                                           "messages already queued, the others do not"))
                continue
            if body_id in bodies:
                self.counters["refused"] += 1
                results.append(_refuse(f"body_id: {body_id} is the body of a queued message"))
                continue
            live = len(messages) + self.pending_msgs
            if live + len(ids) > limits.max_messages or \
                    state.body_bytes + added_bytes + len(body) > limits.max_bytes:
                results.append(retryable_error(
                    full(live) if full else
                    f"queue full ({live} messages, {state.body_bytes + added_bytes} body "
                    "bytes): retry later", reason="queue_full"))
                continue
            supp = state.suppression
            blocked: list[tuple[list[Any], dict[str, Any]]] = []
            if len(supp):
                sdom = sender.rpartition("@")[2]
                for r in rcpts:
                    e = supp.find(normalize_address(r[1]), sdom, now)
                    if e is not None:
                        blocked.append((r, e))
            notes = [suppressed_note(r[1], e) for r, e in blocked]
            if blocked and limits.suppressed != "drop":
                if len(blocked) == len(rcpts):
                    self.counters["suppressed"] += len(blocked)
                    results.append(_refuse(f"recipients: {notes[0]['error']}" +
                                           (f" (and {len(notes) - 1} more)"
                                            if len(notes) > 1 else "")) | {
                                               "suppressed": notes})
                    continue
                skip = {id(r) for r, _ in blocked}
                rcpts = [r for r in rcpts if id(r) not in skip]
                ids = [r[0] for r in rcpts]
                body_id = rcpts[0][0] if len(rcpts) == 1 else body_id
                self.counters["suppressed"] += len(blocked)
            expires_at = now + (max_age if max_age else limits.default_max_age)
            added_bytes += len(body)
            if len(rcpts) == 1:   # one record, the body in it (stored under the id)
                mid, rcpt, domain = rcpts[0]
                records.append(q.message_record(mid, body, sender, rcpt, domain, now,
                                                not_before, expires_at, tags, meta, idem, utf8))
            else:
                records.append(q.body_record(body_id, body))
                records.extend(q.accept_record(mid, body_id, sender, rcpt, domain, now,
                                               not_before, expires_at, tags, meta, idem, utf8)
                               for mid, rcpt, domain in rcpts)
            if blocked and limits.suppressed == "drop":
                # accepted, then finished at once: the event stream says why
                records.extend(q.final_record(r[0], 0, "suppressed", None, None,
                                              e["error"], "", "suppressed", now)
                               for (r, _), e in zip(blocked, notes))
            call_ids.update(ids)
            pending_ids.update(ids)
            self.pending_msgs += len(ids)
            if idem:
                self.pending_idem[idem] = ids
            results.append({"ids": ids, "suppressed": notes} if notes else {"ids": ids})
        return results, records

    @staticmethod
    def _suppressed_rest(rcpts: list[list[Any]], known: set[str], sender: str,
                         state: q.QueueState, now: float) -> bool:
        """Are the recipients of a retried call that were not queued all suppressed (left out
        the first time)?"""
        sdom = sender.rpartition("@")[2]
        return all(r[0] in known or
                   state.suppression.find(normalize_address(r[1]), sdom, now) is not None
                   for r in rcpts)

    def mark(self, ids: list[str]) -> None:
        """Ids queued by another path (a restore) that are pending like admitted ones."""
        self.pending_ids.update(ids)
        self.pending_msgs += len(ids)

    def settle(self, records: list[list[Any]]) -> None:
        """The records' ids and keys are committed (or were dropped): no longer pending."""
        for r in records:
            # (only ids marked pending count: a DSN's record, made by the leader, never was,
            # and counting it drove pending_msgs below zero, so wait_until_idle never ended)
            if (r[0] == q.REC_ACCEPT or r[0] == q.REC_MESSAGE) and r[1] in self.pending_ids:
                self.pending_ids.discard(r[1])
                self.pending_msgs -= 1
                if r[11]:
                    self.pending_idem.pop(r[11], None)
