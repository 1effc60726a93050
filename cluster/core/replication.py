"""The rules of a replicated queue shard: fencing, quorums, membership and log agreement.

Owns the decisions of the replication protocol (docs/replication.md), as plain functions and
one small state machine, so that every corner case is a table test and the actors only do I/O:

- :class:`Fence` — what one copy of a shard's log promises and refuses (epochs, leader ids).
- :func:`plan_claim` — whether a starting leader has a quorum, which copies vote, whose log
  it must adopt.
- :func:`agreement` — how much of a copy's log agrees with the leader's (the rest is cut off).
- :func:`can_replace` — when a copy that came back empty (or stale) may take its slot's place.
- :func:`place_copies` — which node each copy of a shard should run on (distinct nodes, then
  distinct regions).
- :func:`compaction_due` — when the log since the last snapshot is worth compacting.
- :func:`group_take` — how many of the calls waiting to commit the next group commit carries.

Pure: no I/O, no clock, no Ray.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

__all__ = ["majority", "LogShape", "CopyInfo", "ClaimPlan", "Fence", "Refused", "plan_claim",
           "agreement", "can_replace", "place_copies", "plan_move", "Members", "compaction_due",
           "group_take"]


def majority(r: int) -> int:
    return r // 2 + 1


def group_take(waiting: Iterable[tuple[int, int]], max_records: int, max_bytes: int) -> int:
    """How many of the waiting calls the next group commit takes, in arrival order.

    ``waiting``: ``(records, bytes)`` of each call whose records wait for a commit (read
    lazily, only as far as needed). A commit takes calls while their records and bytes stay
    within ``max_records`` and ``max_bytes`` (so one commit is one bounded log append, fsync
    and replication round, and the records it applies hold the event loop a bounded time);
    the first call is always taken, however big, so nothing waits forever. The rest wait for
    the next commit, which starts as soon as this one is durable. 0 when nothing waits."""
    if max_records < 1 or max_bytes < 1:
        raise ValueError(f"group_take: max_records ({max_records}) and max_bytes "
                         f"({max_bytes}) must be at least 1")
    n = records = size = 0
    for recs, nbytes in waiting:
        if n and (records + recs > max_records or size + nbytes > max_bytes):
            break
        n += 1
        records += recs
        size += nbytes
    return n


def compaction_due(since_snapshot: int, threshold: int, last_snapshot: int,
                   queued_body_bytes: int) -> bool:
    """Whether a leader should snapshot, given the log bytes written since the last snapshot.

    Past ``threshold`` (``spool.compact_bytes``), twice the last snapshot (a snapshot, which
    every copy receives, costs at most half the log writes) and the bytes of the bodies still
    queued. A snapshot walks every queued message: with a fixed threshold its cost per message
    written grows with the queue (3.3 queued messages walked per message written at 330,000
    queued, 1M-message run); waiting for as many log bytes as the queued bodies keeps that at
    about one, whatever the queue's size. The log then holds at most about twice the queued
    bodies (kept anyway: snapshots refer to them in the log) plus the threshold."""
    return since_snapshot > max(threshold, 2 * last_snapshot, queued_body_bytes)


class Refused(Exception):
    """A copy refuses a leader's request. ``reason``: "stale" (a newer epoch was promised: the
    caller is a superseded leader), "unclaimed" (the epoch was never claimed here) or
    "unsynced" (the leader must sync this copy first), "gap" (not contiguous), "corrupt"
    (appended frames failed their checksum on the way: nothing was written), "unresolved"
    (a snapshot to compact at refers to frames the copy does not hold: send it whole)."""

    def __init__(self, reason: str, promised: int, detail: str = "") -> None:
        self.reason = reason
        self.promised = promised
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def to_wire(self) -> list[Any]:
        return ["refused", self.reason, self.promised, str(self)]


# ---------------------------------------------------------------------------- log shape
@dataclass(frozen=True)
class LogShape:
    """What a copy's log holds: a snapshot up to ``snap_lsn`` (written in ``snap_epoch``) and
    frames ``snap_lsn+1 .. end``, as runs ``[(epoch, first lsn), ...]`` of equal epoch."""
    snap_lsn: int = 0
    snap_epoch: int = 0
    runs: tuple[tuple[int, int], ...] = ()
    end: int = 0

    @property
    def last_epoch(self) -> int:
        return self.runs[-1][0] if self.runs else self.snap_epoch

    def epoch_at(self, lsn: int) -> int | None:
        """The epoch of the frame at ``lsn``; None where only the snapshot covers it."""
        if lsn <= self.snap_lsn or lsn > self.end or not self.runs:
            return None
        i = bisect.bisect_right([r[1] for r in self.runs], lsn) - 1
        return self.runs[i][0] if i >= 0 else None

    def key(self) -> tuple[int, int]:
        """Log order for choosing whom to adopt: last epoch first, then length."""
        return (self.last_epoch, self.end)

    def to_wire(self) -> list[Any]:
        return [self.snap_lsn, self.snap_epoch, [list(r) for r in self.runs], self.end]

    @classmethod
    def from_wire(cls, w: Sequence[Any]) -> "LogShape":
        return cls(int(w[0]), int(w[1]), tuple((int(a), int(b)) for a, b in w[2]), int(w[3]))


def agreement(leader: LogShape, copy: LogShape) -> int | None:
    """The highest lsn up to which ``copy`` holds exactly the leader's frames.

    The copy keeps its frames up to that lsn and gets the leader's after it. ``None``: the copy
    ends before the leader's snapshot, or its frame at the leader's snapshot lsn is not the
    leader's (an uncommitted tail of an old epoch reaching under that snapshot), so it needs
    the snapshot installed first.

    Relies on two invariants the protocol keeps: one leader per epoch writes each lsn once
    (so equal epochs at an lsn mean equal frames up to it), and a snapshot covers committed
    frames only (so anything under either side's snapshot is in both logs)."""
    if copy.snap_lsn > leader.end:
        raise ValueError(f"copy snapshot at lsn {copy.snap_lsn} is past the leader's log end "
                         f"{leader.end}: the leader is missing committed records")
    if copy.end < leader.snap_lsn:
        return None
    lo = max(leader.snap_lsn, copy.snap_lsn)
    hi = min(leader.end, copy.end)
    # boundaries where either side's epoch may change, inside (lo, hi]
    cuts = sorted({lo + 1} | {s for _, s in leader.runs if lo < s <= hi}
                  | {s for _, s in copy.runs if lo < s <= hi})
    ends = cuts[1:] + [hi + 1]
    for start, nxt in reversed(list(zip(cuts, ends))):
        if start > hi:
            continue
        a, b = leader.epoch_at(start), copy.epoch_at(start)
        if a is not None and a == b:
            return nxt - 1
    if lo > copy.snap_lsn and copy.epoch_at(lo) != leader.snap_epoch:
        # lo is the leader's snapshot and the copy's own frame there is another epoch's: the
        # frames under that snapshot can't be compared, so the copy takes the snapshot
        return None
    return lo


# ---------------------------------------------------------------------------- membership
@dataclass(frozen=True)
class Members:
    """Which physical copy (uuid) holds each slot, and the version of that assignment."""
    version: tuple[int, int] = (0, 0)   # (epoch, change within the epoch)
    uuids: tuple[str, ...] = ()

    def to_wire(self) -> list[Any]:
        return [list(self.version), list(self.uuids)]

    @classmethod
    def from_wire(cls, w: Sequence[Any] | None) -> "Members":
        if not w:
            return cls()
        return cls((int(w[0][0]), int(w[0][1])), tuple(w[1]))

    def replace(self, slot: int, uuid: str, epoch: int) -> "Members":
        u = list(self.uuids)
        u[slot] = uuid
        ver = (epoch, self.version[1] + 1 if self.version[0] == epoch else 1)
        return Members(ver, tuple(u))


@dataclass(frozen=True)
class CopyInfo:
    """A copy's answer to a claim: who it is, what it promised, what it holds."""
    slot: int
    uuid: str
    promised: int
    members: Members
    shape: LogShape
    granted: bool = True

    def to_wire(self) -> list[Any]:
        return [self.slot, self.uuid, self.promised, self.members.to_wire(),
                self.shape.to_wire(), self.granted]

    @classmethod
    def from_wire(cls, w: Sequence[Any]) -> "CopyInfo":
        return cls(int(w[0]), w[1], int(w[2]), Members.from_wire(w[3]),
                   LogShape.from_wire(w[4]), bool(w[5]))


@dataclass(frozen=True)
class ClaimPlan:
    ok: bool
    reason: str = ""
    members: Members = field(default_factory=Members)
    voters: tuple[int, ...] = ()       # slots whose copies count
    best: int = -1                     # slot of the copy whose log the leader adopts
    bootstrap: bool = False


def plan_claim(replies: Iterable[CopyInfo], r: int) -> ClaimPlan:
    """Decide whether a leader that has claimed an epoch from ``replies`` may serve.

    The membership in force is the newest one any granting copy knows; only copies that are the
    members of their slot vote (a copy that came back empty or from an old disk is not, until
    the leader has synced it and made it a member). A quorum is a majority of ``r`` voters; the
    leader adopts the log that is furthest ahead among them. A shard never seen before (every
    copy answered, none ever a member) starts empty."""
    granted = [c for c in replies if c.granted]
    need = majority(r)
    known = [c for c in granted if c.members.uuids]
    if not known:
        if len(granted) == r and all(c.shape.end == 0 and c.shape.snap_lsn == 0
                                     for c in granted):
            return ClaimPlan(True, "new shard", Members((0, 0), tuple(
                c.uuid for c in sorted(granted, key=lambda c: c.slot))),
                tuple(sorted(c.slot for c in granted)), min(c.slot for c in granted), True)
        if len(granted) < r:
            return ClaimPlan(False, f"{len(granted)} of {r} copies answered and none has been "
                                    f"a member yet: waiting for all {r} to start a new shard")
        return ClaimPlan(False, "no copy knows the shard's membership but some hold records: "
                                "refusing to guess which copies are current")
    members = max(known, key=lambda c: c.members.version).members
    if len(members.uuids) != r:
        return ClaimPlan(False, f"the shard has {len(members.uuids)} copies on disk but the "
                                f"config says {r}: changing the replica count needs "
                                "`raymta backup` and `raymta restore` into a new cluster")
    voters = [c for c in granted if members.uuids[c.slot] == c.uuid]
    if len(voters) < need:
        missing = [s for s in range(r) if s not in {c.slot for c in voters}]
        return ClaimPlan(False, f"only {len(voters)} of {r} copies are reachable members "
                                f"(need {need}); slots {missing} are down or came back "
                                "without their data", members)
    best = max(voters, key=lambda c: (c.shape.key(), -c.slot))
    return ClaimPlan(True, "", members, tuple(sorted(c.slot for c in voters)), best.slot)


def can_replace(members: Members, slot: int, persisted_on: Iterable[int], r: int) -> bool:
    """May the copy now in ``slot`` (a new uuid) count, given that the new membership is
    persisted on the copies of ``persisted_on`` (slots, the new copy's own excluded)?

    Only if a majority of the *old* membership, not counting the copy being replaced, holds the
    new one: then every quorum a later leader can form under the old membership meets a copy
    that knows of the replacement, so the stale copy can never vote again."""
    others = {s for s in persisted_on if s != slot and 0 <= s < len(members.uuids)}
    return len(others) >= majority(r)


# ---------------------------------------------------------------------------- fencing
class Fence:
    """What one copy has promised, and what it therefore accepts.

    ``promised``/``leader``: the highest epoch claimed here and the leader instance that
    claimed it (persisted before a claim is answered). ``synced``: the epoch whose leader has
    made this copy's log a prefix of its own (in memory: a restarted copy is synced again)."""

    def __init__(self, promised: int = 0, leader: str = "") -> None:
        self.promised = promised
        self.leader = leader
        self.synced = 0

    def claim(self, epoch: int, leader: str) -> bool:
        """True if granted (the caller must persist ``promised``/``leader`` before replying).
        A repeated claim by the same leader instance for the same epoch is granted again."""
        if epoch > self.promised:
            self.promised, self.leader, self.synced = epoch, leader, 0
            return True
        if epoch == self.promised and leader == self.leader:
            return True
        raise Refused("stale", self.promised,
                      f"epoch {epoch} claimed but {self.promised} was already promised")

    def _check_leader(self, epoch: int, leader: str) -> None:
        if epoch < self.promised or (epoch == self.promised and leader != self.leader):
            raise Refused("stale", self.promised,
                          f"write from epoch {epoch}; epoch {self.promised} owns this copy")
        if epoch > self.promised:
            raise Refused("unclaimed", self.promised, f"epoch {epoch} was never claimed here")

    def check_sync(self, epoch: int, leader: str) -> None:
        self._check_leader(epoch, leader)

    def synced_by(self, epoch: int) -> None:
        self.synced = epoch

    def check_append(self, epoch: int, leader: str, first: int, end: int) -> int:
        """May frames from ``first`` on be appended to a log ending at ``end``? Returns how
        many leading frames to skip (a repeated append of frames this copy already has)."""
        self._check_leader(epoch, leader)
        if self.synced != epoch:
            raise Refused("unsynced", self.promised, "the leader has not synced this copy")
        if first > end + 1:
            raise Refused("gap", self.promised, f"frames start at {first}; log ends at {end}")
        return end + 1 - first


# ---------------------------------------------------------------------------- placement
def place_copies(nodes: Sequence[tuple[str, str]], shard: int, r: int) -> list[str | None]:
    """Nodes for copies 0..r-1 of a shard (copy 0 is the leader): distinct nodes while there
    are enough, and distinct regions first while there are enough regions. ``nodes``:
    ``[(node id, region or "")]`` of the live nodes. Shards rotate, so leaders spread."""
    if not nodes:
        return [None] * r
    by_region: dict[str, list[str]] = {}
    for nid, region in sorted(nodes):
        by_region.setdefault(region, []).append(nid)
    regions = sorted(by_region)
    # interleave regions: r0n0, r1n0, r2n0, r0n1, ...
    order: list[str] = []
    depth = max(len(v) for v in by_region.values())
    for i in range(depth):
        for reg in regions:
            if i < len(by_region[reg]):
                order.append(by_region[reg][i])
    start = shard % len(order)
    rot = order[start:] + order[:start]
    # keep the region interleave after rotating: pick greedily, new regions first
    region_of = dict(nodes)
    picked: list[str] = []
    used_regions: set[str] = set()
    for _ in range(min(r, len(rot))):
        cand = next((n for n in rot if n not in picked and region_of[n] not in used_regions),
                    None) or next(n for n in rot if n not in picked)
        picked.append(cand)
        used_regions.add(region_of[cand])
        if len(used_regions) == len(regions):
            used_regions = set()
    return [picked[i % len(picked)] for i in range(r)]


def plan_move(copies: Sequence[tuple[int, str]], nodes: Sequence[tuple[str, str]]
              ) -> tuple[int, str] | None:
    """One replica to move so that a shard's copies sit on more distinct nodes, or None.

    ``copies``: ``[(slot, node id)]`` of the copies that run (slot 0 is the leader: never
    moved, moving it is a failover); ``nodes``: ``[(node id, region)]`` of the live nodes.
    When two copies share a node (Ray restarted one next to a sibling after its node died) and
    a live node holds no copy of the shard, the replica on the crowded node moves there, to a
    region the shard does not use yet when there is one. One move at a time: the moved copy
    must catch up before it counts, so a shard never has two copies in flight."""
    on: dict[str, list[int]] = {}
    for slot, node in copies:
        on.setdefault(node, []).append(slot)
    crowded = sorted((slots for slots in on.values() if len(slots) > 1), key=lambda s: s[0])
    free = sorted((nid, region) for nid, region in nodes if nid not in on)
    if not crowded or not free:
        return None
    region_of = dict(nodes)
    used = {region_of.get(node, "") for node in on}
    target = next((nid for nid, region in free if region not in used), free[0][0])
    return max(crowded[0]), target   # two slots share the node: at most one is the leader
