"""Which DSNs a shard leader queues now, and the records that queue them.

Role: from the queue's debt of DSNs (:attr:`cluster.core.queue.QueueState.dsn_due`) decide
which failed recipients are reported together, and turn each such group into the records
that settle it: the DSN's own ``m`` record (from ``<>`` to the original envelope sender,
metadata ``raymta.dsn_of`` naming every original it reports on), or — when that sender is
suppressed — the same record followed at once by an ``f`` record of kind ``suppressed``, so
the debt is settled, nothing is sent, and the event stream says why (a ``Suppressed`` event
with ``dsn_of``).

Grouping (what Postfix does for the recipients of one queue file: one non-delivery report
per message and delivery pass, RFC 3464 §2.1 allows any number of per-recipient groups):
the failed recipients of one submission (they share a body id) to one envelope sender are
one DSN. A group is queued as soon as no recipient of its submission is left in the queue
(the submission's body is gone: everything that was going to fail in this pass has), or
``window`` seconds after its first failure, whichever comes first — so recipients that
fail in the same bounce or expiry batch, or within ``window`` of each other, share a DSN,
and a recipient still being retried never holds the others' DSN back for longer than the
window; it gets its own DSN if it fails later. Groups are cut at
:data:`MAX_RECIPIENTS_PER_DSN`.

Durable: a group is settled only by its record, so a leader killed before the record
commits leaves the whole debt to its successor, which regroups it (one DSN per group still:
a committed record settles every original it names, and a replayed one is never queued
again).

Pure: no I/O, no clock (``now`` is an argument), no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster.core import queue as q
from cluster.core.dsn_build import DSN_OF_KEY, dsn_for_entries, entry_group
from cluster.core.suppression import SuppressionList, normalize_address, suppressed_note

__all__ = ["MAX_RECIPIENTS_PER_DSN", "DsnPlan", "plan_dsns", "ready_groups"]

#: the most recipients one DSN lists (a submission has at most 1,000; bounded report size)
MAX_RECIPIENTS_PER_DSN = 500


def ready_groups(due: Mapping[str, list[Any]], *, queued: set[str] | frozenset[str],
                 body_live: Callable[[str], bool], now: float, window: float
                 ) -> list[list[str]]:
    """The originals to report now, one list per DSN, each in the order they failed.

    ``queued``: originals whose DSN record is already on its way (left out); ``body_live``:
    is the submission with this body id still in the queue (some recipient not finished)?"""
    groups: dict[tuple[str, str], list[str]] = {}
    for orig, entry in due.items():
        if orig not in queued:
            groups.setdefault((entry_group(orig, entry), entry[0]), []).append(orig)
    out: list[list[str]] = []
    for (gid, _), origs in groups.items():
        first = min(due[o][8] for o in origs)
        if body_live(gid) and now < first + window:
            continue   # a sibling may still fail in this pass: wait for it, a while
        origs.sort(key=lambda o: due[o][8])
        out.extend(origs[k:k + MAX_RECIPIENTS_PER_DSN]
                   for k in range(0, len(origs), MAX_RECIPIENTS_PER_DSN))
    return out


@dataclass
class DsnPlan:
    """What :func:`plan_dsns` decided: ``records`` to enqueue, ``queued`` originals they
    settle, ``suppressed`` originals among them whose DSN is not sent, and ``bad`` originals
    no DSN can be made for (with the reason: the caller drops their debt and logs it)."""
    records: list[list[Any]] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    suppressed: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)


def plan_dsns(groups: Iterable[list[str]], due: Mapping[str, list[Any]], ids: Iterable[str], *,
              suppression: SuppressionList, reporting_mta: str, now: float, max_age: float
              ) -> DsnPlan:
    """The records of one DSN per group, each under the next of ``ids`` (new ids of the
    shard). A DSN whose recipient (the original envelope sender) is suppressed — globally,
    or for mail from ``reporting_mta``, the domain DSNs come from — is recorded as accepted
    and finished as ``suppressed`` at once, never sent."""
    plan = DsnPlan()
    for origs, mid in zip(groups, ids):
        try:
            body, rcpt, domain, utf8 = dsn_for_entries(
                origs, [due[o] for o in origs], dsn_id=mid, reporting_mta=reporting_mta)
        except ValueError as e:
            plan.bad.extend((o, str(e)) for o in origs)
            continue
        meta = {DSN_OF_KEY: origs[0] if len(origs) == 1 else list(origs)}
        plan.records.append(q.message_record(mid, body, "", rcpt, domain, now, None,
                                             now + max_age, None, meta, None, utf8))
        plan.queued.extend(origs)
        hit = suppression.find(normalize_address(rcpt), reporting_mta, now) \
            if len(suppression) else None
        if hit is not None:
            plan.records.append(q.final_record(
                mid, 0, "suppressed", None, None,
                "DSN not sent: " + suppressed_note(rcpt, hit)["error"], "", "suppressed", now))
            plan.suppressed.extend(origs)
    return plan
