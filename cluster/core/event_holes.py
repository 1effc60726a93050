"""Events a shard snapshot could not carry: the hole a leader rebuilt on another node has.

Event files live on the shard leader's node only. A leader rebuilt elsewhere gets the events
from before its snapshot from the snapshot itself, which carries only the newest of them
(``spool.snapshot_events_bytes``, or ``spool.snapshot_held_events_bytes`` while a webhook
endpoint is behind). The events older than those are gone on the new node; nothing else records
their seqs, so without this a reader there would move past them silently.

A **hole** says what is gone: every event with ``after < seq <= through`` that the node's own
files do not hold (``after``: the node's last event when the hole was installed; the events up
to it are in its files, read before the hole is reached). ``points`` are ``(seq, events,
exact)``, seq ascending: how many events with ``seq < s <= through`` are gone, counted by the
old leader when it built the snapshot (exactly at the committed webhook cursors and at seqs of
its event files' line index; ``exact`` is False when the old leader itself knew only a lower
bound, e.g. for a cursor behind its own rotated-away files). A reader at a seq that is not a
point learns a lower bound (the count at the next point after it).

Owns the arithmetic, not the files (:mod:`cluster.adapters.eventlog` does the I/O). Bounded:
at most :data:`MAX_POINTS` thinned points plus one per cursor.

Pure: no I/O, no ray.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MAX_HOLES", "MAX_POINTS", "hole_gap", "make_hole", "merge_gaps", "thin_points"]

#: index points a snapshot's hole keeps at most (besides one per webhook cursor): a reader
#: between two points is told a lower bound at most ~hole/MAX_POINTS events short
MAX_POINTS = 1024
#: holes a node keeps (one is installed each time a leader is rebuilt on it from a snapshot
#: whose events its files lack; the oldest go first)
MAX_HOLES = 16

Point = tuple[int, int, bool]


def thin_points(points: Sequence[Point], limit: int) -> list[Point]:
    """At most ``limit`` of ``points`` (seq ascending), evenly spread, the first and the last
    kept (the last is nearest ``through``: the smallest counts)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if len(points) <= limit:
        return list(points)
    if limit == 1:
        return [points[-1]]
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def make_hole(through: int, cursor_points: Sequence[Point], index_points: Sequence[Point],
              limit: int = MAX_POINTS) -> dict[str, Any] | None:
    """The hole a snapshot records: the events up to ``through`` it does not carry, counted at
    the webhook cursors (all kept) and at thinned index points; None when ``through`` < 1
    (the caller knows whether anything before ``through`` ever existed)."""
    if through < 1:
        return None
    pts = {s: (s, n, ex) for s, n, ex in thin_points(
        sorted(p for p in index_points if p[0] < through), limit)}
    for s, n, ex in cursor_points:
        if s < through:
            pts[s] = (s, n, ex)
    return {"through": through, "points": [list(p) for p in sorted(pts.values())]}


def hole_gap(since: int, hole: Mapping[str, Any]) -> tuple[int, bool] | None:
    """(events gone after ``since``, exact) for a reader at ``since``, or None when the hole
    is not in its way: it is past it, or it will read the node's own events up to
    ``hole["after"]`` first."""
    through = int(hole["through"])
    if since >= through or since < int(hole.get("after", 0)):
        return None
    pts = hole["points"]
    seqs = [int(p[0]) for p in pts]
    i = bisect.bisect_left(seqs, since)
    if i < len(pts) and seqs[i] == since:
        return int(pts[i][1]), bool(pts[i][2])
    if i < len(pts):
        return int(pts[i][1]), False       # at least those after the next point
    return 0, False


def merge_gaps(since: int, parts: Sequence[tuple[int, int, bool]]) -> dict[str, Any] | None:
    """One reader-facing gap (``{"first_seq", "last_seq", "events", "exact"}``) from parts
    ``(last seq gone, events, exact)``: rotated-away events, holes. None without parts."""
    if not parts:
        return None
    return {"first_seq": since + 1, "last_seq": max(p[0] for p in parts),
            "events": sum(p[1] for p in parts), "exact": all(p[2] for p in parts)}
