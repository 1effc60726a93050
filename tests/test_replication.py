"""Replicated queue shards on a real three-node Ray cluster, one region per node.

``ray.cluster_utils.Cluster`` starts three raylets on this machine (labels region=us/eu/ap),
with Ray's node health checks tuned so that a removed node is noticed in seconds. The spool
is one directory with ``per_node`` set, so every node has its own sub-directory, as if it had
its own disk: a copy that Ray restarts on another node starts empty there.

Each test disturbs the cluster while mail flows (SIGKILL a leader, remove a node, kill a
majority of a shard's replicas, drive an old epoch by hand) and then checks, at the SMTP
sinks, that every acknowledged message arrived, counting duplicates.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray

from cluster.core.throttle import max_inflight
from cluster.deploy import RAY_SYSTEM_CONFIG
from tests.conftest import MAIN_SINKS, pipeline_config, raw_message, wait_for

# own_ray: a ray.cluster_utils.Cluster of its own
pytestmark = [pytest.mark.timeout(900), pytest.mark.own_ray]

RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")
from cluster.deploy import NODE_HEALTH as HEALTH   # noqa: E402 - as `raymta up` runs


@pytest.fixture(scope="module")
def regions(tmp_path_factory, dns_server):
    from ray.cluster_utils import Cluster

    from cluster.client import MailCluster
    from cluster.core.ratespec import RateSpec
    from cluster.deploy import deploy
    from cluster.devservers import SinkGroup
    saved = RAY_ADDRESS_FILE.read_bytes() if RAY_ADDRESS_FILE.exists() else None
    sinks = SinkGroup(MAIN_SINKS).start()
    cluster = None
    try:
        for i, a in enumerate(MAIN_SINKS):
            dns_server.add_a(f"mx{i + 1}.repl.test", a)
        domains = [f"r{i}.test" for i in range(12)]
        for i, d in enumerate(domains):
            dns_server.add_mx(d, [(10, f"mx{i % 3 + 1}.repl.test")])
        base = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port,
                               sinks.port)
        cfg = replace(
            base,
            queue=replace(base.queue, shards=2),
            cluster=replace(base.cluster, replicas=3),
            spool=replace(base.spool, per_node=True, compact_bytes=1_500_000),
            # rebalancing is driven by its test (below), not by a timer under the others
            replication=replace(base.replication, ack_timeout=3.0, claim_timeout=90.0,
                                rebalance_interval=0),
            site_defaults=replace(base.site_defaults, rates=(RateSpec.parse("400/s"),)))
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "labels": {"region": "us"},
            "_system_config": {**RAY_SYSTEM_CONFIG, **HEALTH}})
        for region in ("eu", "ap"):
            cluster.add_node(num_cpus=1, labels={"region": region})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=cfg.cluster.namespace, log_to_driver=False)
        handles = deploy(cfg)
        mc = MailCluster(cfg, [handles[f"coordinator:{s}"] for s in range(2)], handles=handles)
        yield {"mc": mc, "cluster": cluster, "cfg": cfg, "sinks": sinks, "domains": domains}
    finally:
        for f in list(_FOLLOWERS):   # a failed test's: before Ray stops under them
            f.stop()
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            RAY_ADDRESS_FILE.unlink(missing_ok=True)
        else:
            RAY_ADDRESS_FILE.write_bytes(saved)
        sinks.stop()


# ---------------------------------------------------------------------------- helpers
def _on_every_shard(mc: Any, msgs: list[dict[str, Any]], retry_for: float = 15.0
                    ) -> tuple[list[list[Any]], list[float]]:
    """Submit ``msgs`` in one call per shard: a client's calls take turns over the shards, so
    consecutive calls land on every one. Returns each call's results and its duration."""
    n = len(mc.coordinators)
    size = -(-len(msgs) // n)
    out, took = [], []
    for k in range(n):
        t = time.time()
        out.append(mc.submit(msgs[k * size:(k + 1) * size], retry_for=retry_for))
        took.append(time.time() - t)
    return out, took


def _submit_all(mc: Any, msgs: list[dict[str, Any]], acked: dict[str, list[str]],
                chunk: int = 500, deadline: float = 180.0) -> int:
    """Submit until every message is acknowledged (errors are retried as new submissions,
    as a sender would); returns how many submissions were answered with an error."""
    errors = 0
    todo = list(msgs)
    end = time.time() + deadline
    while todo:
        assert time.time() < end, f"{len(todo)} messages still not accepted"
        nxt = []
        for k in range(0, len(todo), chunk):
            part = todo[k:k + chunk]
            for m, r in zip(part, mc.submit(part)):
                if r.accepted:
                    acked[m["recipients"][0]] = r.ids
                else:
                    errors += 1
                    nxt.append(m)
        todo = nxt
        if todo:
            time.sleep(0.5)
    return errors


def _messages(tag: str, n: int, domains: list[str]) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        r = f"{tag}{i}@{domains[i % len(domains)]}"
        out.append({"sender": "s@origin.test", "recipients": [r],
                    "raw": raw_message(i, r, size=300)})
    return out


def _delivered(sinks: Any, want: set[str]) -> Counter:
    return Counter(r.rcpt_to for r in sinks.received if r.rcpt_to in want)


def _wait_all_delivered(mc: Any, sinks: Any, want: set[str], timeout: float) -> Counter:
    wait_for(lambda: len(_delivered(sinks, want)) == len(want), timeout,
             f"all {len(want)} acknowledged messages delivered")
    return _delivered(sinks, want)


def _dup_bound(cfg: Any) -> int:
    # what can be out at relays when a process dies: the sites' in-flight caps (3 sites)
    return 3 * max_inflight(cfg.site_defaults)


def _node_of(mc: Any, name: str) -> str:
    return ray.get(mc.handles[name].stats.remote(), timeout=120)["node"]


def _non_head(cluster: Any) -> dict[str, Any]:
    return {n.node_id: n for n in cluster.worker_nodes}


def _replace_node(regions: dict[str, Any], node: Any) -> None:
    """Add a fresh node in the region of ``node``, then remove ``node`` abruptly (as an
    autoscaler replacing a failed machine would), and redeploy (a relay for the new node).
    The new node is up first, so the lost node's actors restart on a node without a sibling
    copy: with no spare node, two copies of a shard would share a node until moved."""
    from cluster.deploy import deploy
    cluster = regions["cluster"]
    region = next((n["Labels"].get("region", "") for n in ray.nodes()
                   if n["NodeID"] == node.node_id), "")
    cluster.add_node(num_cpus=1, labels={"region": region})
    cluster.wait_for_nodes()
    cluster.remove_node(node, allow_graceful=False)
    wait_for(lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node.node_id),
             60, "Ray to see the removed node dead")
    # keep the handles that created the actors: for non-detached actors they are what keeps
    # them alive (the ones deploy returns for actors that exist already are not)
    for name, h in deploy(regions["cfg"]).items():
        regions["mc"].handles.setdefault(name, h)


_FOLLOWERS: list["_Follower"] = []


class _Follower:
    """A consumer of the event stream in a thread of its own, following by cursor
    (``MailCluster.follow``) through whatever the test does to the cluster; it can be held
    (it then asks for nothing, so its cursor falls behind)."""

    def __init__(self, mc: Any) -> None:
        self.mc = mc
        self.since = {s: ray.get(c.stats.remote(), timeout=120)["lsn"]
                      for s, c in enumerate(mc.coordinators)}
        self.seen: list[dict[str, Any]] = []
        self.running = threading.Event()
        self.running.set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        _FOLLOWERS.append(self)

    def _run(self) -> None:
        for ev in self.mc.follow(self.since, poll=0.2, until=time.time() + 900,
                                 stop=lambda: self._stop):
            self.seen.append(ev)
            while not self.running.is_set() and not self._stop:
                time.sleep(0.05)
            if self._stop:
                return

    def cursor(self) -> dict[int, int]:
        return self.mc.next_cursor(list(self.seen), dict(self.since))

    def stop(self) -> None:
        self._stop = True
        self.running.set()
        self._thread.join(30)
        if self in _FOLLOWERS:
            _FOLLOWERS.remove(self)
        assert not self._thread.is_alive(), "the follower did not stop"

    def check(self, acked: dict[str, list[str]]) -> None:
        """Every acknowledged message's Delivery was seen, and each shard's events came in
        order (the sinks have them all: the callers waited for that)."""
        for s in range(len(self.mc.coordinators)):
            seqs = [e["seq"] for e in self.seen if e["shard"] == s]
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), f"shard {s} order"
        missing = self.missing(acked)
        assert not missing, f"{len(missing)} deliveries never seen by the follower: {missing[:5]}"

    def missing(self, acked: dict[str, list[str]]) -> list[str]:
        delivered = {e["id"] for e in list(self.seen) if e["type"] == "Delivery"}
        return [i for ids in acked.values() for i in ids if i not in delivered]


def _copies(mc: Any, shard: int) -> list[dict[str, Any]]:
    return mc.replication()[shard]["copies"]


# ---------------------------------------------------------------------------- the tests
def test_copies_are_spread_over_nodes_and_regions(regions):
    mc = regions["mc"]
    region_of = {n["NodeID"]: n["Labels"].get("region") for n in ray.nodes() if n["Alive"]}
    for shard in range(2):
        names = [f"coordinator:{shard}", f"replica:{shard}:1", f"replica:{shard}:2"]
        nodes = [_node_of(mc, n) for n in names]
        assert len(set(nodes)) == 3, (shard, nodes)
        assert {region_of[n] for n in nodes} == {"us", "eu", "ap"}
        rep = mc.replication()[shard]
        assert rep["epoch"] >= 1
        assert [c["state"] for c in rep["copies"]] == ["leader", "streaming", "streaming"]


def test_leader_sigkill_during_10k_run_loses_nothing(regions):
    mc, sinks, cfg = regions["mc"], regions["sinks"], regions["cfg"]
    msgs = _messages("lk", 10_000, regions["domains"])
    want = {m["recipients"][0] for m in msgs}
    acked: dict[str, list[str]] = {}
    follower = _Follower(mc)
    _submit_all(mc, msgs[:5000], acked)
    wait_for(lambda: len(_delivered(sinks, want)) >= 1500, 120, "1,500 delivered")
    st = ray.get(mc.handles["coordinator:0"].stats.remote())
    epoch0 = st["epoch"]
    os.kill(st["pid"], signal.SIGKILL)
    killed = time.time()
    errors = _submit_all(mc, msgs[5000:], acked)     # while shard 0 fails over
    first_ack = time.time() - killed
    counts = _wait_all_delivered(mc, sinks, set(acked), 300)
    st = ray.get(mc.handles["coordinator:0"].stats.remote())
    dups = sum(c - 1 for c in counts.values())
    print(f"\nleader of shard 0 SIGKILLed: epoch {epoch0} -> {st['epoch']}, recovered "
          f"{st['recovered']}; all 10,000 acked in {first_ack:.1f}s after the kill "
          f"({errors} submissions refused and retried); duplicates {dups} "
          f"(bound {_dup_bound(cfg)})")
    assert len(acked) == 10_000
    assert st["epoch"] > epoch0
    assert dups <= _dup_bound(cfg)
    # the sinks have every message; the relays' last results reach the shards a moment later
    assert mc.wait_until_idle(timeout=60), "the shards to record every result"
    states = Counter(s["state"] for s in mc.status([i for ids in acked.values() for i in ids]))
    assert states == {"delivered": 10_000}, states
    wait_for(lambda: not follower.missing(acked), 60, "the follower to see every delivery")
    follower.stop()
    follower.check(acked)


def test_leader_node_removed_restarts_elsewhere_and_recovers(regions):
    mc, sinks, cfg, cluster = regions["mc"], regions["sinks"], regions["cfg"], regions["cluster"]
    workers = _non_head(cluster)
    me = ray.get_runtime_context().get_node_id()
    print(f"\ndriver on {me[:8]}, head {cluster.head_node.node_id[:8]}, workers "
          f"{[w[:8] for w in workers]}, leaders "
          f"{[_node_of(mc, f'coordinator:{s}')[:8] for s in range(2)]}")
    shard = next(s for s in range(2) if _node_of(mc, f"coordinator:{s}") in workers)
    victim_id = _node_of(mc, f"coordinator:{shard}")
    before = ray.get(mc.handles[f"coordinator:{shard}"].stats.remote())
    msgs = _messages("ln", 3000, regions["domains"])
    want = {m["recipients"][0] for m in msgs}
    acked: dict[str, list[str]] = {}
    follower = _Follower(mc)
    _submit_all(mc, msgs[:1500], acked)
    wait_for(lambda: len(_delivered(sinks, want)) >= 300, 120, "300 delivered")
    # the consumer falls behind; the leader's snapshot then lies past its cursor, and the
    # copy the leader is rebuilt from on its new node starts at that snapshot
    follower.running.clear()
    wait_for(lambda: len(_delivered(sinks, want)) >= 1000, 120, "1,000 delivered")
    compacted = ray.get(mc.handles[f"coordinator:{shard}"].compact.remote(), timeout=120)
    assert compacted["lsn"] > follower.cursor()[shard]
    t0 = time.time()
    _replace_node(regions, workers[victim_id])
    follower.running.set()
    _submit_all(mc, msgs[1500:], acked)
    counts = _wait_all_delivered(mc, sinks, set(acked), 300)
    assert mc.wait_until_idle(timeout=60), "the shards to record every result"
    wait_for(lambda: not follower.missing(acked), 60, "the follower to see every delivery")
    follower.stop()
    follower.check(acked)
    after = ray.get(mc.handles[f"coordinator:{shard}"].stats.remote())
    dups = sum(c - 1 for c in counts.values())
    print(f"\nnode of coordinator:{shard} removed: now on {after['node'][:8]} (was "
          f"{victim_id[:8]}), epoch {before['epoch']} -> {after['epoch']}, recovered "
          f"{after['recovered']}; done {time.time() - t0:.1f}s after; duplicates {dups}")
    assert after["node"] != victim_id
    assert after["epoch"] > before["epoch"]
    # the new node's copy started empty: the leader adopted a replica's log
    assert after["recovered"]["best"] != 0
    assert len(acked) == 3000 and dups <= 2 * _dup_bound(cfg)


def test_replica_node_removed_writes_go_on_and_replacement_catches_up(regions):
    mc, sinks, cluster = regions["mc"], regions["sinks"], regions["cluster"]
    workers = _non_head(cluster)
    # a replica on a worker node (that node may also hold the other shard's leader); every
    # shard keeps its three copies on three nodes, so one node's loss costs each one copy
    where = {(s, k): _node_of(mc, f"replica:{s}:{k}" if k else f"coordinator:{s}")
             for s in range(2) for k in range(3)}
    for s in range(2):
        assert len({where[(s, k)] for k in range(3)}) == 3, where
    shard, slot = next((s, k) for s in range(2) for k in (1, 2) if where[(s, k)] in workers)
    victim_id = _node_of(mc, f"replica:{shard}:{slot}")
    old = next(c for c in _copies(mc, shard) if c["slot"] == slot)
    msgs = _messages("rn", 3000, regions["domains"])
    want = {m["recipients"][0] for m in msgs}
    acked: dict[str, list[str]] = {}
    _submit_all(mc, msgs[:1000], acked)
    _replace_node(regions, workers[victim_id])
    _submit_all(mc, msgs[1000:], acked)      # two copies of three are a majority

    def caught_up() -> dict[str, Any] | None:
        c = next(c for c in _copies(mc, shard) if c["slot"] == slot)
        return c if c["state"] == "streaming" and c["lag_records"] == 0 and \
            c["uuid"] != old["uuid"] else None
    new = wait_for(caught_up, 180, f"replica:{shard}:{slot} replaced and caught up", poll=0.5)
    _wait_all_delivered(mc, sinks, set(acked), 300)
    rep = mc.replication()[shard]
    print(f"\nreplica:{shard}:{slot} node removed: copy {old['uuid']} -> {new['uuid']} "
          f"(installs {new['installs']}), lag {new['lag_records']} records / "
          f"{new['lag_seconds']}s; shard counters {rep}")
    assert new["member"]
    assert ray.get(mc.handles[f"replica:{shard}:{slot}"].stats.remote())["node"] != victim_id


def test_old_epoch_leader_is_refused(regions):
    from cluster.adapters.spool import encode_frame
    mc = regions["mc"]
    # fail shard 0 over once: the old leader's epoch is the one a zombie would still hold
    st = ray.get(mc.handles["coordinator:0"].stats.remote())
    os.kill(st["pid"], signal.SIGKILL)
    calls, _ = _on_every_shard(mc, _messages("zy", 20, regions["domains"]))
    assert all(r.accepted for call in calls for r in call)
    assert ray.get(mc.handles["coordinator:0"].stats.remote())["epoch"] > st["epoch"]
    h = mc.handles["replica:0:1"]
    rep = ray.get(h.stats.remote())
    epoch, end = rep["promised"], rep["end"]
    assert epoch > st["epoch"]
    frame = encode_frame(epoch - 1, end + 1, ["e", epoch - 1, 0.0])
    r1 = ray.get(h.append.remote(epoch - 1, "zombie", end + 1, frame))
    r2 = ray.get(h.claim.remote(epoch - 1, "zombie"))
    # same epoch, another leader instance: a zombie that kept the epoch number is no better
    r3 = ray.get(h.append.remote(epoch, "zombie", end + 1, encode_frame(epoch, end + 1,
                                                                        ["e", epoch, 0.0])))
    r4 = ray.get(h.sync.remote(epoch - 1, "zombie", 0, [[0, 0], []]))
    for r in (r1, r2, r3, r4):
        assert r[0] == "refused" and r[1] == "stale", r
    after = ray.get(h.stats.remote())
    assert after["promised"] == epoch and after["end"] >= end
    # the real leader goes on committing
    calls, _ = _on_every_shard(mc, _messages("zz", 20, regions["domains"]))
    assert all(r.accepted for call in calls for r in call)


def test_minority_of_copies_refuses_clearly_then_recovers(regions):
    from actors.remote import ensure_replica
    mc, cfg = regions["mc"], regions["cfg"]
    shard = 1
    homes = {k: _node_of(mc, f"replica:{shard}:{k}") for k in (1, 2)}
    pids = [ray.get(mc.handles[f"replica:{shard}:{k}"].stats.remote())["pid"] for k in (1, 2)]
    for k in (1, 2):
        ray.kill(mc.handles[f"replica:{shard}:{k}"], no_restart=True)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    # ray.kill returns before the process has exited; until then it still answers appends on
    # its stream (and they are durable on its disk): the minority starts when both are gone
    wait_for(lambda: all(gone(p) for p in pids), 30, "both replica processes to exit")
    from cluster.client import shard_of
    # what one call is answered (submit's own retries of "retryable" are turned off here)
    both_shards = functools.partial(_on_every_shard, mc, retry_for=0)
    msgs = _messages("mn", 40, regions["domains"])
    calls, took_each = both_shards(msgs)
    res = [r for call in calls for r in call]
    took = max(took_each)
    on_shard = [r for r in res if not r.accepted]
    ok = [r for r in res if r.accepted]
    assert len(on_shard) == 20 and len(ok) == 20   # shard 1's call refused, shard 0's accepted
    assert {shard_of(r.ids[0], 2) for r in ok} == {0}
    for r in on_shard:
        assert "not durable on a quorum" in r.error and f"shard {shard}" in r.error, r.error
    # while stalled, refusals come at once, not after another timeout
    calls2, took2 = both_shards(msgs[:10])
    refused2 = [r for call in calls2 for r in call if not r.accepted]
    assert len(refused2) == 5 and all("quorum" in r.error for r in refused2)
    fast = max(took2)
    print(f"\nminority: refused after {took:.1f}s (ack_timeout {cfg.replication.ack_timeout}s),"
          f" then in {fast:.2f}s: {on_shard[0].error}")
    assert took < cfg.replication.ack_timeout + 10 and fast < 2.0
    # the two replicas come back where they were, with their disks (two copies of three
    # coming back empty at once could not rejoin: see docs/replication.md)
    for k in (1, 2):
        mc.handles[f"replica:{shard}:{k}"] = ensure_replica(cfg, shard, k, homes[k])

    # retryable: a sender keeps the message (SMTP 451), never bounces it; those refused while
    # the shard is known to be stalled were not written at all
    assert all(r.retryable for r in on_shard), on_shard
    assert all(r.retryable and not r.outcome_unknown for r in refused2)

    def accepted_again() -> bool:
        calls, _ = both_shards(_messages("mr", 20, regions["domains"]))
        return all(r.accepted for call in calls for r in call)
    wait_for(accepted_again, 120, "shard 1 to accept again", poll=1.0)


def test_idempotency_key_survives_leader_failover(regions):
    from cluster.client import shard_of
    mc = regions["mc"]
    key = "invoice-2026-11-29-0001"
    m = {"sender": "s@origin.test", "recipients": ["idem@r1.test"], "from": "s@origin.test",
         "text": "once", "idempotency_key": key, "not_before": time.time() + 3600}
    a = mc.submit([m])[0]
    assert a.accepted and not a.duplicate
    shard = shard_of(key, 2)
    h = mc.handles[f"coordinator:{shard}"]
    st = ray.get(h.stats.remote())
    os.kill(st["pid"], signal.SIGKILL)
    b = mc.submit([m])[0]
    st2 = ray.get(h.stats.remote())
    assert st2["epoch"] > st["epoch"]
    assert b.accepted and b.duplicate and b.ids == a.ids, (a, b)
    assert mc.status(a.ids[0])["state"] in ("deferred", "queued")
    assert mc.cancel(a.ids) == ["cancelled"]


def test_crowded_copy_moves_to_a_free_node_and_catches_up(regions):
    """Two copies of a shard on one node (what Ray does when it restarts a copy after its node
    died and no node without a sibling is left): once a node without a copy is alive, the
    leader moves one there and it catches up. The crowding is made directly (the copy started
    on its leader's node), so the test does not depend on where Ray restarts things."""
    from actors.remote import ensure_replica
    mc, sinks, cfg = regions["mc"], regions["sinks"], regions["cfg"]
    ns = cfg.cluster.namespace
    shard, slot = 0, 2

    def node(name: str) -> str:
        return ray.get(ray.get_actor(name, namespace=ns).stats.remote(), timeout=120)["node"]

    def copies_of() -> list[str]:
        return [node(f"coordinator:{shard}")] + [node(f"replica:{shard}:{k}") for k in (1, 2)]

    def caught_up(k: int) -> bool:
        c = next(c for c in _copies(mc, shard) if c["slot"] == k)
        return c["state"] == "streaming" and c["lag_records"] == 0 and c["member"]
    leader = ray.get_actor(f"coordinator:{shard}", namespace=ns)
    # the failovers above may have left two copies on one node (Ray restarted one before the
    # replacement node could take it): the leader spreads them first
    moves = []
    for _ in range(3):
        wait_for(lambda: all(caught_up(k) for k in (1, 2)), 180, "shard 0's copies caught up",
                 poll=0.5)
        did = ray.get(leader.rebalance.remote(), timeout=120)
        if did == "nothing to move":
            break
        moves.append(did)
    before = copies_of()
    assert len(set(before)) == 3, (before, moves)
    # crowd it: replica 2 starts again on the leader's node
    h = ray.get_actor(f"replica:{shard}:{slot}", namespace=ns)
    pid = ray.get(h.stats.remote())["pid"]
    ray.kill(h, no_restart=True)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the replica process to exit")
    regions["keep"] = ensure_replica(cfg, shard, slot, before[0], [])
    wait_for(lambda: caught_up(slot), 180, f"replica:{shard}:{slot} back and caught up",
             poll=0.5)
    crowded = copies_of()
    assert crowded[2] == crowded[0] and len(set(crowded)) == 2, crowded
    # before[2]'s node now holds no copy of shard 0: the leader moves the crowded one there
    did = ray.get(leader.rebalance.remote(), timeout=120)
    assert did == (f"moved replica:{shard}:{slot} from {before[0][:12]} to {before[2][:12]}"), did
    wait_for(lambda: caught_up(slot), 180, f"replica:{shard}:{slot} moved and caught up",
             poll=0.5)
    spread = copies_of()
    assert len(set(spread)) == 3 and spread[2] == before[2], spread
    region_of = {n["NodeID"]: n["Labels"].get("region") for n in ray.nodes() if n["Alive"]}
    assert {region_of[n] for n in spread} == {"us", "eu", "ap"}, spread
    assert ray.get(leader.rebalance.remote(), timeout=60) == "nothing to move"
    msgs = _messages("mv", 300, regions["domains"])
    acked: dict[str, list[str]] = {}
    _submit_all(mc, msgs, acked)
    assert len(acked) == 300
    _wait_all_delivered(mc, sinks, set(acked), 300)
    print(f"\nfirst {moves or 'no moves'}; then {did}; copies of shard {shard}: {crowded} -> "
          f"{spread}")
