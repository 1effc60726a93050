"""The pure replication rules (cluster.core.replication): fencing, log agreement, claims,
membership and placement, as tables; plus a randomized check of agreement() against the
frame-by-frame truth over histories that follow the protocol."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from cluster.core.replication import (CopyInfo, Fence, LogShape, Members, Refused, agreement,
                                      compaction_due,
                                      can_replace, majority, place_copies, plan_claim)


def S(end: int = 0, runs=(), snap: int = 0, snap_epoch: int = 0) -> LogShape:
    return LogShape(snap, snap_epoch, tuple(tuple(r) for r in runs), end)


# ---------------------------------------------------------------------------- majority
@pytest.mark.parametrize("r,need", [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (7, 4)])
def test_majority(r, need):
    assert majority(r) == need


# ---------------------------------------------------------------------------- Fence
# Steps: ("claim", epoch, leader) | ("sync", epoch, leader) | ("append", epoch, leader, first,
# end). Expected: a value, or "!reason" for Refused(reason).
FENCE_CASES = {
    "claim higher epoch": [
        (("claim", 1, "A"), True), (("claim", 2, "B"), True), (("claim", 7, "A"), True)],
    "claim lower epoch is stale": [
        (("claim", 3, "A"), True), (("claim", 2, "B"), "!stale"), (("claim", 2, "A"), "!stale")],
    "claim equal epoch, same leader: granted again": [
        (("claim", 2, "A"), True), (("claim", 2, "A"), True)],
    "claim equal epoch, other leader: stale": [
        (("claim", 2, "A"), True), (("claim", 2, "B"), "!stale")],
    "append before any claim": [
        (("append", 1, "A", 1, 0), "!unclaimed")],
    "append of a claimed epoch before sync": [
        (("claim", 1, "A"), True), (("append", 1, "A", 1, 0), "!unsynced")],
    "append after sync": [
        (("claim", 1, "A"), True), (("sync", 1, "A"), None), (("append", 1, "A", 1, 0), 0),
        (("append", 1, "A", 4, 3), 0)],
    "sync of an epoch never claimed here": [
        (("claim", 1, "A"), True), (("sync", 2, "A"), "!unclaimed")],
    "append of an epoch never claimed here": [
        (("claim", 1, "A"), True), (("sync", 1, "A"), None), (("append", 2, "A", 1, 0),
                                                             "!unclaimed")],
    "same epoch, another leader instance: stale": [
        (("claim", 1, "A"), True), (("sync", 1, "A"), None), (("sync", 1, "B"), "!stale"),
        (("append", 1, "B", 1, 0), "!stale")],
    "zombie leader of an old epoch after a newer claim": [
        (("claim", 1, "A"), True), (("sync", 1, "A"), None), (("append", 1, "A", 1, 0), 0),
        (("claim", 2, "B"), True),
        (("append", 1, "A", 2, 1), "!stale"), (("sync", 1, "A"), "!stale"),
        (("claim", 1, "A"), "!stale")],
    "a newer claim needs a new sync": [
        (("claim", 1, "A"), True), (("sync", 1, "A"), None), (("claim", 2, "B"), True),
        (("append", 2, "B", 1, 0), "!unsynced"), (("sync", 2, "B"), None),
        (("append", 2, "B", 1, 0), 0)],
    "gap": [
        (("claim", 1, "A"), True), (("sync", 1, "A"), None),
        (("append", 1, "A", 5, 3), "!gap"), (("append", 1, "A", 2, 0), "!gap")],
    "retried append: skip what the copy has": [
        (("claim", 1, "A"), True), (("sync", 1, "A"), None),
        (("append", 1, "A", 1, 5), 5), (("append", 1, "A", 2, 5), 4),
        (("append", 1, "A", 5, 5), 1), (("append", 1, "A", 6, 5), 0)],
}


@pytest.mark.parametrize("steps", list(FENCE_CASES.values()), ids=list(FENCE_CASES))
def test_fence_sequences(steps):
    f = Fence()
    for step, expected in steps:
        op, epoch, leader, *rest = step
        before = (f.promised, f.leader, f.synced)
        try:
            if op == "claim":
                got = f.claim(epoch, leader)
            elif op == "sync":
                f.check_sync(epoch, leader)
                got = f.synced_by(epoch)
            else:
                got = f.check_append(epoch, leader, *rest)
        except Refused as r:
            assert expected == "!" + r.reason, (step, str(r))
            assert r.promised == f.promised
            assert r.to_wire()[:3] == ["refused", r.reason, f.promised]
            # a refusal changes nothing
            assert (f.promised, f.leader, f.synced) == before, step
            continue
        assert not (isinstance(expected, str) and expected.startswith("!")), \
            f"{step} succeeded ({got!r}) but {expected} was expected"
        assert got == expected, step


def test_fence_claim_state():
    f = Fence(3, "A")
    f.check_sync(3, "A")
    f.synced_by(3)
    assert f.claim(4, "B") is True
    assert (f.promised, f.leader, f.synced) == (4, "B", 0)


# ---------------------------------------------------------------------------- agreement
AGREEMENT_CASES = {
    "both empty": (S(), S(), 0),
    "identical": (S(10, [(1, 1)]), S(10, [(1, 1)]), 10),
    "identical, several epochs": (S(12, [(1, 1), (2, 4), (5, 9)]),
                                  S(12, [(1, 1), (2, 4), (5, 9)]), 12),
    "copy empty": (S(10, [(1, 1)]), S(), 0),
    "copy shorter": (S(10, [(1, 1), (2, 6)]), S(7, [(1, 1), (2, 6)]), 7),
    "copy shorter, ends inside an older run": (S(10, [(1, 1), (2, 6)]), S(4, [(1, 1)]), 4),
    "copy longer, same old epoch": (S(10, [(1, 1)]), S(15, [(1, 1)]), 10),
    "copy longer, divergent old-epoch tail": (S(12, [(1, 1), (3, 8)]),
                                             S(15, [(1, 1), (2, 8)]), 7),
    "copy longer, old epoch continues past the leader's new run": (
        S(10, [(1, 1), (2, 5)]), S(20, [(1, 1)]), 4),
    "diverges at the first frame": (S(5, [(2, 1)]), S(5, [(1, 1)]), 0),
    "diverges in the middle, several epochs": (
        S(15, [(1, 1), (2, 4), (4, 7), (6, 12)]), S(14, [(1, 1), (2, 4), (3, 6), (5, 9)]), 5),
    "copy switched epoch inside the leader's run": (
        S(12, [(1, 1), (2, 4), (5, 9)]), S(10, [(1, 1), (2, 4), (3, 7), (4, 8)]), 6),
    "leader switched epoch inside the copy's run": (
        S(10, [(1, 1), (2, 4), (3, 7), (4, 8)]), S(12, [(1, 1), (2, 4), (5, 9)]), 6),
    "copy ahead in a newer epoch than the leader's end": (
        S(6, [(1, 1), (2, 4)]), S(9, [(1, 1), (2, 4), (3, 7)]), 6),
    # snapshots on the leader's side
    "leader snapshot, copy agrees past it": (S(20, [(2, 11)], 10, 1),
                                             S(15, [(1, 1), (2, 11)]), 15),
    "leader snapshot, copy agrees up to it only": (S(20, [(2, 11)], 10, 1),
                                                   S(14, [(1, 1)]), 10),
    "copy ends exactly at the leader snapshot": (S(20, [(1, 11)], 10, 1), S(10, [(1, 1)]), 10),
    "copy ends before the leader snapshot": (S(20, [(1, 11)], 10, 1), S(9, [(1, 1)]), None),
    "empty copy, leader snapshot": (S(10, [], 10, 1), S(), None),
    "copy diverges under the leader snapshot, ends at it": (
        S(12, [], 12, 2), S(12, [(1, 1)]), None),
    "copy diverges under the leader snapshot, ends past it": (
        S(15, [(2, 13)], 12, 2), S(20, [(1, 1)]), None),
    # snapshots on the copy's side
    "copy snapshot, agrees past it": (S(20, [(1, 1), (2, 6)]), S(12, [(2, 9)], 8, 2), 12),
    "copy snapshot, diverges after it": (S(20, [(1, 1), (2, 6), (4, 11)]),
                                         S(12, [(2, 9)], 8, 2), 10),
    "copy snapshot, nothing after it agrees": (S(12, [(1, 1), (3, 9)]),
                                               S(11, [(2, 9)], 8, 1), 8),
    "copy snapshot at the leader's end": (S(8, [(1, 1)]), S(8, [], 8, 1), 8),
    "copy snapshot only": (S(20, [(1, 1)]), S(8, [], 8, 1), 8),
    "both snapshots at the same lsn": (S(10, [], 10, 2), S(10, [], 10, 2), 10),
    "both snapshots, copy's further": (S(20, [(2, 6)], 5, 1), S(18, [(2, 11)], 10, 2), 18),
    "both snapshots, leader's further, copy agrees at it": (
        S(20, [(3, 11)], 10, 2), S(14, [(2, 6), (3, 11)], 5, 1), 14),
    "both snapshots, leader's further, copy diverges under it": (
        S(20, [(3, 11)], 10, 3), S(14, [(2, 6)], 5, 1), None),
    "copy snapshot past the leader's end": (S(5, [(1, 1)]), S(8, [], 8, 1), ValueError),
    "copy snapshot past the leader's end, leader snapshot": (S(6, [], 6, 1), S(9, [], 9, 1),
                                                            ValueError),
}


@pytest.mark.parametrize("leader,copy,expected", list(AGREEMENT_CASES.values()),
                         ids=list(AGREEMENT_CASES))
def test_agreement(leader, copy, expected):
    if expected is ValueError:
        with pytest.raises(ValueError):
            agreement(leader, copy)
    else:
        assert agreement(leader, copy) == expected


@pytest.mark.parametrize("shape,at", [
    (S(10, [(1, 1), (3, 5)]), {0: None, 1: 1, 4: 1, 5: 3, 10: 3, 11: None}),
    (S(10, [(2, 6)], 5, 1), {5: None, 6: 2, 10: 2, 11: None}),
    (S(5, [], 5, 1), {5: None, 6: None}),
])
def test_epoch_at(shape, at):
    assert {lsn: shape.epoch_at(lsn) for lsn in at} == at


@pytest.mark.parametrize("shape,last_epoch", [
    (S(), 0), (S(5, [], 5, 3), 3), (S(9, [(1, 1), (4, 7)]), 4), (S(9, [(4, 7)], 6, 2), 4)])
def test_shape_last_epoch_key_and_wire(shape, last_epoch):
    assert shape.last_epoch == last_epoch
    assert shape.key() == (last_epoch, shape.end)
    assert LogShape.from_wire(shape.to_wire()) == shape


# ---------------------------------------------------------------------------- plan_claim
M1 = Members((1, 0), ("a", "b", "c"))
M2 = Members((2, 1), ("a", "b2", "c"))     # slot 1 was replaced in epoch 2


def C(slot, uuid, members=Members(), shape=S(), granted=True, promised=5):
    return CopyInfo(slot, uuid, promised, members, shape, granted)


PLAN_CASES = {
    "bootstrap: all answered, none a member, all empty": (
        [C(2, "z"), C(0, "x"), C(1, "y")], 3,
        dict(ok=True, bootstrap=True, voters=(0, 1, 2), best=0,
             members=Members((0, 0), ("x", "y", "z")))),
    "bootstrap refused: one copy missing": (
        [C(0, "x"), C(1, "y")], 3, dict(ok=False, reason_has=["2 of 3"])),
    "bootstrap refused: one copy refused the claim": (
        [C(0, "x"), C(1, "y"), C(2, "z", granted=False)], 3,
        dict(ok=False, reason_has=["2 of 3"])),
    "bootstrap refused: no membership but records": (
        [C(0, "x"), C(1, "y", shape=S(3, [(1, 1)])), C(2, "z")], 3,
        dict(ok=False, reason_has=["hold records"])),
    "bootstrap refused: no membership but a snapshot": (
        [C(0, "x"), C(1, "y", shape=S(3, [], 3, 1)), C(2, "z")], 3,
        dict(ok=False, reason_has=["hold records"])),
    "quorum of members": (
        [C(0, "a", M1, S(5, [(1, 1)])), C(2, "c", M1, S(7, [(1, 1)]))], 3,
        dict(ok=True, bootstrap=False, voters=(0, 2), best=2, members=M1)),
    "minority of members": (
        [C(0, "a", M1, S(5, [(1, 1)]))], 3,
        dict(ok=False, reason_has=["only 1 of 3", "need 2", "[1, 2]"], members=M1)),
    "refused replies do not vote": (
        [C(0, "a", M1), C(1, "b", M1, granted=False), C(2, "c", M1, granted=False)], 3,
        dict(ok=False, reason_has=["only 1 of 3", "need 2"])),
    "a copy with a new uuid is not counted": (
        [C(0, "a", M1, S(5, [(1, 1)])), C(1, "fresh", Members(), S()),
         C(2, "c", M1, S(4, [(1, 1)]))], 3,
        dict(ok=True, voters=(0, 2), best=0, members=M1)),
    "a copy with a new uuid does not make a quorum": (
        [C(0, "a", M1, S(5, [(1, 1)])), C(1, "fresh", Members(), S())], 3,
        dict(ok=False, reason_has=["only 1 of 3", "need 2"])),
    "a replaced copy (old membership, longest log) is not counted": (
        [C(0, "a", M2, S(5, [(2, 1)])), C(1, "b", M1, S(50, [(2, 1)])),
         C(2, "c", M2, S(4, [(2, 1)]))], 3,
        dict(ok=True, voters=(0, 2), best=0, members=M2)),
    "a replaced copy cannot complete a quorum": (
        [C(0, "a", M2, S(5, [(2, 1)])), C(1, "b", M1, S(50, [(2, 1)]))], 3,
        dict(ok=False, reason_has=["only 1 of 3"], members=M2)),
    "a member that missed the membership change still votes": (
        [C(0, "a", M2, S(5, [(2, 1)])), C(2, "c", M1, S(9, [(2, 1)]))], 3,
        dict(ok=True, voters=(0, 2), best=2, members=M2)),
    "best: highest last epoch beats a longer log": (
        [C(0, "a", M1, S(10, [(1, 1), (3, 5)])), C(1, "b", M1, S(20, [(1, 1), (2, 5)])),
         C(2, "c", M1, S(12, [(1, 1), (3, 5)]))], 3,
        dict(ok=True, voters=(0, 1, 2), best=2)),
    "best: a snapshot's epoch counts as the last epoch": (
        [C(0, "a", M1, S(10, [], 10, 3)), C(1, "b", M1, S(20, [(2, 1)]))], 3,
        dict(ok=True, voters=(0, 1), best=0)),
    "best: ties go to the lowest slot": (
        [C(2, "c", M1, S(10, [(2, 1)])), C(1, "b", M1, S(10, [(2, 1)]))], 3,
        dict(ok=True, voters=(1, 2), best=1)),
    "replica count mismatch": (
        [C(0, "a", M1), C(1, "b", M1), C(2, "c", M1)], 5,
        dict(ok=False, reason_has=["3 copies", "says 5"])),
    "single copy shard": (
        [C(0, "a", Members((1, 0), ("a",)), S(3, [(1, 1)]))], 1,
        dict(ok=True, voters=(0,), best=0)),
}


@pytest.mark.parametrize("replies,r,want", list(PLAN_CASES.values()), ids=list(PLAN_CASES))
def test_plan_claim(replies, r, want):
    plan = plan_claim(replies, r)
    assert plan.ok is want["ok"], plan.reason
    for k in ("bootstrap", "voters", "best", "members"):
        if k in want:
            assert getattr(plan, k) == want[k], k
    for s in want.get("reason_has", []):
        assert s in plan.reason
    if not plan.ok:
        assert plan.reason and plan.best == -1 and plan.voters == ()


def test_plan_claim_takes_a_generator_and_wire_infos():
    replies = [C(0, "a", M2, S(5, [(2, 1)]), promised=3), C(2, "c", M1, S(9, [(2, 1)]))]
    wire = [CopyInfo.from_wire(c.to_wire()) for c in replies]
    assert wire == replies
    plan = plan_claim((c for c in wire), 3)
    assert plan.ok and plan.voters == (0, 2) and plan.members == M2


# ---------------------------------------------------------------------------- Members
def test_members_replace_versions():
    m0 = Members((1, 0), ("a", "b", "c"))
    m1 = m0.replace(1, "b2", 1)
    assert m1 == Members((1, 1), ("a", "b2", "c"))
    m2 = m1.replace(2, "c2", 1)
    assert m2 == Members((1, 2), ("a", "b2", "c2"))
    m3 = m2.replace(0, "a2", 4)     # first change in a new epoch
    assert m3 == Members((4, 1), ("a2", "b2", "c2"))
    m4 = m3.replace(0, "a3", 4)
    assert m4.version == (4, 2)
    assert m0.version < m1.version < m2.version < m3.version < m4.version
    assert m0.uuids == ("a", "b", "c")      # replace makes a new value
    for m in (Members(), m0, m4):
        assert Members.from_wire(m.to_wire()) == m
    assert Members.from_wire(None) == Members() == Members.from_wire([])


@pytest.mark.parametrize("persisted_on,slot,r,ok", [
    ({0, 2}, 1, 3, True),
    ({0}, 1, 3, False),
    ({0, 1}, 1, 3, False),      # the replaced copy's own slot does not count
    ({0, 1, 2}, 1, 3, True),
    ({0, 7}, 1, 3, False),      # no such slot
    ({0, 2, 3}, 1, 5, True),
    ({0, 2}, 1, 5, False),
])
def test_can_replace(persisted_on, slot, r, ok):
    members = Members((1, 0), tuple("abcde"[:r]))
    assert can_replace(members, slot, persisted_on, r) is ok


# ---------------------------------------------------------------------------- placement
def test_place_three_regions_three_copies():
    nodes = [("n1", "eu"), ("n2", "us"), ("n3", "ap")]
    for shard in range(6):
        p = place_copies(nodes, shard, 3)
        assert len(set(p)) == 3
        assert {dict(nodes)[n] for n in p} == {"eu", "us", "ap"}


def test_place_one_node():
    assert place_copies([("only", "")], 4, 3) == ["only"] * 3


def test_place_no_nodes():
    assert place_copies([], 0, 3) == [None, None, None]


@pytest.mark.parametrize("nodes", [[("n1", ""), ("n2", "")], [("n1", "eu"), ("n2", "us")],
                                   [("n1", "eu"), ("n2", "eu")]])
def test_place_two_nodes_three_copies(nodes):
    for shard in range(4):
        p = place_copies(nodes, shard, 3)
        assert len(p) == 3 and set(p) == {"n1", "n2"}
        assert p[0] != p[1]      # distinct as far as possible: a copy's loss costs one vote


def test_place_prefers_distinct_regions_over_node_order():
    nodes = [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")]
    for shard in range(8):
        p = place_copies(nodes, shard, 3)
        assert len(set(p)) == 3
        assert "b1" in p         # the only node of region b always holds a copy


def test_place_six_nodes_three_regions_spreads_leaders():
    nodes = [(f"{reg}{i}", reg) for reg in "xyz" for i in (1, 2)]
    region = dict(nodes)
    leaders = Counter()
    for shard in range(12):
        p = place_copies(nodes, shard, 3)
        assert len(set(p)) == 3 and len({region[n] for n in p}) == 3
        leaders[p[0]] += 1
    assert set(leaders) == {n for n, _ in nodes} and set(leaders.values()) == {2}


def test_place_shards_rotate_leaders():
    nodes = [("n1", ""), ("n2", ""), ("n3", "")]
    assert [place_copies(nodes, s, 3)[0] for s in range(6)] == ["n1", "n2", "n3"] * 2
    # the order of the node list does not matter
    assert place_copies(list(reversed(nodes)), 1, 3) == place_copies(nodes, 1, 3)


# ---------------------------------------------------------------------------- agreement,
# randomized: histories of leaders writing, replicating, committing, compacting and dying
# (a deposed leader keeps writing to what still listens to it), every copy's log a list of
# (epoch, lsn, unique id) frames; agreement() on the shapes must equal the frame-by-frame
# longest common prefix.
class SimCopy:
    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self.full: list[tuple[int, int, int]] = []   # frames 1..end, incl. under the snapshot
        self.snap = 0
        self.promised = 0
        self.members = Members()

    def shape(self) -> LogShape:
        runs: list[tuple[int, int]] = []
        for e, lsn, _ in self.full[self.snap:]:
            if not runs or runs[-1][0] != e:
                runs.append((e, lsn))
        return LogShape(self.snap, self.full[self.snap - 1][0] if self.snap else 0,
                        tuple(runs), len(self.full))


def true_agreement(leader: SimCopy, copy: SimCopy) -> int | None:
    """What the copy may keep: the common prefix, unless the leader's snapshot covers part of
    the copy that differs or is missing (then the copy needs the snapshot: None)."""
    n = 0
    for a, b in zip(leader.full, copy.full):
        if a != b:
            break
        n += 1
    return n if n >= leader.snap else None


class History:
    def __init__(self, seed: int, r: int, stats: Counter) -> None:
        self.rng = random.Random(seed)
        self.r = r
        self.copies = [SimCopy(f"u{i}") for i in range(r)]
        self.members = Members()
        self.epoch = 0
        self.leader: int | None = None
        self.synced: set[int] = set()
        self.committed: list[tuple[int, int, int]] = []
        self.zombie: tuple[int, int, set[int]] | None = None
        self.uid = itertools.count()
        self.stats = stats

    def check_and_sync(self, src: SimCopy, dst: SimCopy, partial: bool) -> None:
        want = true_agreement(src, dst)
        got = agreement(src.shape(), dst.shape())
        assert got == want, (src.full, src.snap, dst.full, dst.snap)
        if want is None:
            self.stats["needs snapshot" if len(dst.full) < src.snap
                       else "diverges under snapshot"] += 1
            dst.full, dst.snap = list(src.full[:src.snap]), src.snap   # install
            keep = src.snap
        else:
            assert want >= dst.snap, "a copy's snapshot covered frames the leader lacks"
            self.stats["cut" if want < len(dst.full) else "kept"] += 1
            dst.full = dst.full[:want]
            keep = want
        dst.members = self.members
        upto = self.rng.randint(keep, len(src.full)) if partial else len(src.full)
        dst.full += src.full[keep:upto]

    def elect(self) -> None:
        old = (self.epoch, self.leader, set(self.synced)) if self.leader is not None else None
        self.epoch += 1
        # a new shard starts only with every copy answering
        q = self.rng.sample(range(self.r), self.rng.randint(majority(self.r), self.r)
                            if self.epoch > 1 else self.r)
        for i in q:
            assert self.copies[i].promised < self.epoch
            self.copies[i].promised = self.epoch
        replies = [CopyInfo(i, self.copies[i].uuid, self.epoch, self.copies[i].members,
                            self.copies[i].shape()) for i in q]
        plan = plan_claim(replies, self.r)
        assert plan.ok and plan.voters == tuple(sorted(q)) and plan.bootstrap == (self.epoch == 1)
        self.members = plan.members
        assert self.members.uuids == tuple(c.uuid for c in self.copies)
        best = self.copies[plan.best]
        # the election restriction: the adopted log holds everything committed
        assert best.full[:len(self.committed)] == self.committed
        lead = self.rng.choice(q)
        if lead != plan.best:
            self.check_and_sync(best, self.copies[lead], partial=False)
        self.leader, self.synced = lead, {lead}
        self.copies[lead].members = self.members
        # the leader syncs (and tells the membership to) at least a quorum before serving
        others = [i for i in q if i != lead]
        self.rng.shuffle(others)
        for n, i in enumerate(others):
            if n < majority(self.r) - 1 or self.rng.random() < 0.7:
                self.check_and_sync(self.copies[lead], self.copies[i], partial=True)
                self.synced.add(i)
        if old is not None and old[1] not in q:
            self.zombie = (old[0], old[1], {i for i in old[2] if i not in q})
        else:
            self.zombie = None

    def write(self) -> None:
        lead = self.copies[self.leader]
        for _ in range(self.rng.randint(1, 4)):
            lead.full.append((self.epoch, len(lead.full) + 1, next(self.uid)))
        for i in self.synced - {self.leader}:
            c = self.copies[i]
            assert lead.full[:len(c.full)] == c.full
            if self.rng.random() < 0.6:
                c.full += lead.full[len(c.full):self.rng.randint(len(c.full), len(lead.full))]
        # commit: the highest lsn of this epoch held by a majority of synced copies
        for lsn in range(len(lead.full), len(self.committed), -1):
            held = sum(len(self.copies[i].full) >= lsn for i in self.synced)
            if lead.full[lsn - 1][0] == self.epoch and held >= majority(self.r):
                assert lead.full[:len(self.committed)] == self.committed
                self.committed = lead.full[:lsn]
                break

    def zombie_write(self) -> None:
        ep, z, followers = self.zombie
        zc = self.copies[z]
        if zc.promised != ep:      # its own copy went over to a newer leader
            return
        for _ in range(self.rng.randint(1, 5)):
            zc.full.append((ep, len(zc.full) + 1, next(self.uid)))
        for i in followers:
            c = self.copies[i]
            if c.promised == ep and self.rng.random() < 0.7:   # the fence lets it through
                assert zc.full[:len(c.full)] == c.full
                c.full += zc.full[len(c.full):self.rng.randint(len(c.full), len(zc.full))]

    def compact(self) -> None:
        i = self.rng.choice(sorted(self.synced))
        c, lead = self.copies[i], self.copies[self.leader]
        if len(self.committed) > c.snap:
            lsn = self.rng.randint(c.snap + 1, len(self.committed))
            if lsn > len(c.full):          # a synced copy behind the snapshot jumps to it
                c.full = list(lead.full[:lsn])
            c.snap = lsn

    def sync_straggler(self) -> None:
        rest = [i for i in range(self.r) if i not in self.synced]
        if rest:
            i = self.rng.choice(rest)
            assert self.copies[i].promised <= self.epoch
            self.copies[i].promised = self.epoch
            self.check_and_sync(self.copies[self.leader], self.copies[i], partial=True)
            self.synced.add(i)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            x = self.rng.random()
            if self.leader is None or x < 0.15:
                self.elect()
            elif x < 0.55:
                self.write()
            elif x < 0.7 and self.zombie:
                self.zombie_write()
            elif x < 0.85:
                self.compact()
            else:
                self.sync_straggler()
            # every copy's snapshot is committed; every synced copy is a prefix of the leader
            for c in self.copies:
                assert c.full[:c.snap] == self.committed[:c.snap]
            for i in self.synced:
                lead = self.copies[self.leader]
                assert lead.full[:len(self.copies[i].full)] == self.copies[i].full


def test_agreement_matches_frame_by_frame_truth_over_random_histories():
    stats: Counter = Counter()
    for seed in range(300):
        History(seed, 3 if seed % 3 else 5, stats).run(60)
    # the histories reached every kind of outcome
    for k in ("kept", "cut", "needs snapshot", "diverges under snapshot"):
        assert stats[k] > 0, stats


# ------------------------------------------------------------------ moving a crowded copy
from cluster.core.replication import plan_move  # noqa: E402


@pytest.mark.parametrize("copies,nodes,want", [
    # spread already: nothing to do
    ([(0, "a"), (1, "b"), (2, "c")], [("a", "us"), ("b", "eu"), ("c", "ap"), ("d", "us")], None),
    # two copies share b, but no node is free: nothing to do (R copies need R nodes)
    ([(0, "a"), (1, "b"), (2, "b")], [("a", "us"), ("b", "eu")], None),
    # b is crowded and d is free: the higher replica slot moves there
    ([(0, "a"), (1, "b"), (2, "b")], [("a", "us"), ("b", "eu"), ("d", "us")], (2, "d")),
    # the leader shares a node with replica 1: replica 1 moves, never the leader
    ([(0, "a"), (1, "a"), (2, "c")], [("a", "us"), ("c", "eu"), ("d", "us")], (1, "d")),
    # a free node in a region the shard does not use wins over one in a used region
    ([(0, "a"), (1, "b"), (2, "b")],
     [("a", "us"), ("b", "eu"), ("d", "us"), ("e", "eu"), ("f", "ap")], (2, "f")),
    # all three on one node (a one-node cluster that grew): one move at a time
    ([(0, "a"), (1, "a"), (2, "a")], [("a", ""), ("b", ""), ("c", "")], (2, "b")),
])
def test_plan_move(copies, nodes, want):
    assert plan_move(copies, nodes) == want


@pytest.mark.parametrize("since,threshold,last,queued,due", [
    (100, 256, 0, 0, False),            # under the threshold
    (300, 256, 0, 0, True),             # past it, small snapshot, nothing queued
    (300, 256, 200, 0, False),          # not yet twice the last snapshot
    (401, 256, 200, 0, True),
    (600, 256, 0, 1000, False),         # the queued bodies are bigger: wait for them
    (1001, 256, 0, 1000, True),
])
def test_compaction_due(since, threshold, last, queued, due):
    assert compaction_due(since, threshold, last, queued) is due


@pytest.mark.parametrize("queued", [20_000, 100_000, 330_000, 1_000_000])
def test_compaction_walks_about_one_message_per_message_written(queued):
    # a steady queue of `queued` 2 KB messages (300 bytes of metadata each in a snapshot):
    # each snapshot walks the whole queue; count queued messages walked per message written.
    # With the old rule (threshold and twice the last snapshot only) a 1M queue walked ~4
    # per message written at a 256 MiB threshold.
    body, meta, threshold = 2_048, 300, 256 << 20
    written_bytes = 2_400                       # one message's log frames
    since, writes, walked = 0, 0, 0
    for _ in range(3_000_000):
        since += written_bytes
        writes += 1
        if compaction_due(since, threshold, queued * meta, queued * body):
            walked += queued
            since = 0
    assert walked > 0
    assert walked / writes <= 1.2, walked / writes     # (log bytes / body bytes: 1.17)
