"""raymta failover under load: a shard leader dies while mail flows; how long until it serves again.

A fresh three-node ``ray.cluster_utils.Cluster`` per scenario (one raylet per region, labels
region=us/eu/ap, Ray's node health checks tuned to notice a dead node in ~3 s), raymta deployed
with 2 queue shards x 3 copies and one spool directory per node (``spool.per_node``), unthrottled
sites, Postfix's ``smtp-sink`` as the receiver (it appends every message to a dump file, so each
recipient is counted, with the time it was read back). Submitting threads send the workload in
batches of 100 (a refused message is submitted again, as a new submission, the way a sender
would); a sampler records each copy's replication lag every 0.25 s. At ~30 % acknowledged, with
deliveries flowing, the leader of a shard dies:

- ``leader-kill``: SIGKILL of coordinator:0's process (Ray restarts it on the same node, where
  its copy of the log is);
- ``node-loss``: the (non-head) node holding a shard leader is removed abruptly
  (``remove_node(allow_graceful=False)``: raylet and workers killed), a replacement node joins in
  the same region and raymta is redeployed (a relay for it; the leader restarts on another node,
  with an empty local copy, and adopts a replica's log).

Measured from the kill: the first acknowledged submission for the killed shard (two probe
threads submit one message per call from the kill on, so a call is waiting on the new leader
when it starts serving), deliveries of that shard resuming, every acknowledged recipient received (lost must be 0) and duplicates;
replication lag before the kill (steady full load) and overall.

    python bench/failover.py [--messages 20000] [--scenario both] [--timeout 300]

Writes ``bench/results/failover-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c

__all__ = ["main", "run_scenario"]

#: Ray records the last head it started here; ``address="auto"`` reads it. Put it back after.
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")
#: node health checks every 1 s, 1 s timeout, dead after 3 misses (Ray's defaults: ~30 s)
from cluster.deploy import NODE_HEALTH as HEALTH  # noqa: E402 - what `raymta up` runs with
HEAD_REGION, WORKER_REGIONS = "us", ("eu", "ap")
SHARDS, REPLICAS, BATCH = 2, 3, 100
FAILOVER_TARGET_S = 5.0
LAG_TARGET_S = 1.0
SAMPLE_EVERY = 0.25
SCENARIOS = ("leader-kill", "node-loss")
LAG_NOTE = (
    "lag = the worst streaming replica's lag_seconds / lag_records (coordinator.replication()),"
    " sampled every 0.25 s, max and p99 over samples of both shards; quorum lag = the best "
    "replica's (it completes the majority that acknowledges a batch); 'steady' = before the "
    "kill. A replica on a dead node still shows as 'streaming', its lag growing, until Ray "
    "declares the node dead: that is in 'overall'.")

#: answers this long after the kill cannot come from the killed leader (SIGKILL is immediate;
#: remove_node kills the node's processes in ~0.1 s)
NEW_LEADER_GUARD = 0.5
RESUME_NOTE = (
    "deliveries resume = first receipt, at the sink, of a killed-shard message acknowledged in "
    "a batch SENT after the kill: only the new leader can have dispatched it (deliveries right "
    "after the kill are batches the old leader had already handed to relays). It includes the "
    "wait behind the shard's backlog; 'stall end' (end of the longest pause in the killed "
    "shard's deliveries after the kill) is shown too.")
ACK_NOTE = (
    "first ack = end of the first submit call SENT after the kill that the killed shard "
    "accepted once its new epoch could exist (after the sampler last saw the shard without "
    "it): only the new leader can have answered it. A leader on a lost node can outlive its "
    "raylet for a moment and still answer with a quorum: such answers are counted apart. "
    "From the kill on, two probe threads "
    "submit one message per call besides the batches of 100: a call on the killed shard waits "
    "for the new leader, so the probe times the failover to within one small commit. "
    "'reachable' = the restarted leader answered the sampler (Ray's restart done; claim, "
    "replay and the epoch record still to come).")


# ====================================================================== what the sink received
class RcptLog:
    """Every recipient the receiver accepted, as ``[(time.time(), rcpt)]`` (append-only), read
    by a polling thread every 50 ms (so times are late by up to ~50 ms)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rcpt-log", daemon=True)

    def _poll(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - keep reading; shown once
                traceback.print_exc()
            self._stop.wait(0.05)

    def start(self) -> RcptLog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._poll()

    def count(self) -> int:
        return len(self.events)


class DumpRcptLog(RcptLog):
    """Tails smtp-sink's ``-D`` dump file: one ``X-Rcpt-Args: <rcpt>`` line per recipient of
    every message it accepted (the file is appended at the end of each transaction)."""

    _RCPT = re.compile(rb"^X-Rcpt-Args: *<([^>\r\n]*)>", re.M)

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fh: Any = None
        self._tail = b""

    def _poll(self) -> None:
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            except FileNotFoundError:
                return
        data = self._fh.read()
        if not data:
            return
        now = time.time()
        buf = self._tail + data
        cut = buf.rfind(b"\n") + 1
        self._tail = buf[cut:]
        for m in self._RCPT.finditer(buf, 0, cut):
            self.events.append((now, m.group(1).decode(errors="replace")))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class AiosmtpdRcptLog(RcptLog):
    """Reads the aiosmtpd sink's record list (exact times)."""

    def __init__(self, receiver: c.AiosmtpdReceiver) -> None:
        super().__init__()
        self.receiver = receiver
        self._seen = 0

    def _poll(self) -> None:
        sink = self.receiver.sink
        if sink is None:
            return
        rec = sink.received
        n = len(rec)
        for r in rec[self._seen:n]:
            self.events.append((r.at, r.rcpt_to))
        self._seen = n

    def close(self) -> None:
        pass


class DumpingSmtpSink(c.SmtpSinkProcess):
    """common's smtp-sink, also appending every message to a dump file (``-D``)."""

    def __init__(self, dump: Path) -> None:
        super().__init__()
        self.dump = dump

    def start(self) -> DumpingSmtpSink:
        if self.proc is not None:
            raise RuntimeError("smtp-sink already started")
        self.port = self.port or c.free_port(self.host)
        cmd = [c.SMTP_SINK, "-c", "-4", "-m", str(self.max_sessions), "-t", "30",
               "-D", str(self.dump)]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]   # required when run as root: the dump dir is writable
        cmd += [f"inet:{self.host}:{self.port}", "1024"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, args=(self.proc,),
                                        name="smtp-sink-reader", daemon=True)
        self._reader.start()
        try:
            c.wait_listening(self.host, self.port, timeout=10)
        except BaseException:  # noqa: BLE001 - stop the child whatever interrupted us
            self.stop()
            raise RuntimeError("smtp-sink did not start: "
                               + self._stderr.decode(errors="replace")) from None
        return self


def make_receiver(prefer: str, workdir: Path) -> tuple[c.Receiver, RcptLog]:
    base = c.make_receiver(prefer)
    if isinstance(base, c.SmtpSinkProcess):
        # its own directory, writable by "nobody" (smtp-sink's user when we are root); the
        # work directory is 0700
        d = Path(tempfile.mkdtemp(prefix="sink-", dir=workdir))
        workdir.chmod(0o711)
        d.chmod(0o777)
        dump = d / "dump"
        return DumpingSmtpSink(dump), DumpRcptLog(dump)
    assert isinstance(base, c.AiosmtpdReceiver)
    return base, AiosmtpdRcptLog(base)


# ====================================================================== submitting
@dataclass
class Batch:
    t_sent: float
    t_done: float
    size: int
    accepted: int
    #: accepted ids per shard
    shards: dict[int, int]
    #: an exception (nothing known accepted) or the first refusal's text
    error: str | None = None
    #: a one-message call of the probe started at the kill
    probe: bool = False


class Submitter:
    """Submits ``messages`` from ``threads`` threads in batches until every one is accepted.

    A refused message (or a whole batch whose call raised) is put back and submitted again
    later as a new submission (new ids), as a sender would; refusals are counted per message.
    """

    def __init__(self, mc: Any, messages: list[dict[str, Any]], *, threads: int,
                 batch: int = BATCH, call_timeout: float = 120.0) -> None:
        self.mc = mc
        self.messages = messages
        self.threads = threads
        self.batch = batch
        self.call_timeout = call_timeout
        self.lock = threading.Lock()
        self.todo = collections.deque(range(len(messages)))
        self.retry: collections.deque[int] = collections.deque()
        self.inflight = 0
        #: message index -> (t_done, id, shard, t_sent)
        self.acked: dict[int, tuple[float, str, int, float]] = {}
        self.refusals: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.batches: list[Batch] = []
        self.crashed: list[str] = []
        self.deadline = float("inf")
        #: messages from this index on wait for :meth:`release` (kept for after the kill)
        self.limit = len(messages)
        self._stop = threading.Event()
        self._pool: list[threading.Thread] = []

    def start(self, deadline: float) -> Submitter:
        self.deadline = deadline
        self._pool = [threading.Thread(target=self._worker, name=f"failover-submit-{k}",
                                       daemon=True) for k in range(self.threads)]
        for t in self._pool:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._pool:
            t.join(timeout=self.call_timeout + 10)

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._pool)

    def done(self) -> bool:
        return len(self.acked) == len(self.messages)

    def _take(self, n: int) -> list[int]:
        with self.lock:
            out: list[int] = []
            while len(out) < n and self.retry:
                out.append(self.retry.popleft())
            while len(out) < n and self.todo and self.todo[0] < self.limit:
                out.append(self.todo.popleft())
            if out:
                self.inflight += 1
            return out

    def hold_from(self, index: int) -> None:
        self.limit = index

    def release(self) -> None:
        self.limit = len(self.messages)

    def _finished(self) -> bool:
        with self.lock:
            return not self.inflight and not self.retry and not self.todo

    def _worker(self) -> None:
        while not self._stop.is_set() and time.time() < self.deadline:
            idx = self._take(self.batch)
            if not idx:
                if self._finished():
                    return
                time.sleep(0.05)
                continue
            self._submit(idx)

    def probe(self, shard: int, threads: int = 2) -> None:
        """From now on, ``threads`` more threads submit ONE message per call until one of them
        is accepted by ``shard``. A call that lands on a shard whose leader is down waits for
        the new leader, so its answer times the failover to within one small commit (the
        batches of 100 in flight at the kill can only say when the whole batch was answered,
        and part of it may have been answered by the old leader before the kill)."""
        hit = threading.Event()

        def run() -> None:
            while not (hit.is_set() or self._stop.is_set()) and time.time() < self.deadline:
                idx = self._take(1)
                if not idx:
                    return
                if self._submit(idx, probe=True).get(shard):
                    hit.set()

        for k in range(threads):
            t = threading.Thread(target=run, name=f"failover-probe-{k}", daemon=True)
            t.start()
            self._pool.append(t)

    def _submit(self, idx: list[int], probe: bool = False) -> dict[int, int]:
        """One submit call for these messages; returns accepted ids per shard."""
        from cluster.client import shard_of
        per_shard: collections.Counter[int] = collections.Counter()
        t_sent = time.time()
        try:
            try:
                res = self.mc.submit([self.messages[i] for i in idx],
                                     timeout=self.call_timeout)
            except Exception as e:  # noqa: BLE001 - a sender retries the whole batch
                err = f"{type(e).__name__}: {e}"[:300]
                with self.lock:
                    self.batches.append(Batch(t_sent, time.time(), len(idx), 0, {}, err, probe))
                    self.errors[err] += 1
                    for i in idx:
                        self.refusals[i] += 1
                    self.retry.extend(idx)
                time.sleep(0.25)
                return {}
            t_done = time.time()
            first_err = None
            with self.lock:
                for i, r in zip(idx, res):
                    if r.accepted:
                        mid = r.ids[0]
                        s = shard_of(mid, SHARDS)
                        per_shard[s] += 1
                        self.acked[i] = (t_done, mid, s, t_sent)
                    else:
                        self.refusals[i] += 1
                        self.retry.append(i)
                        self.errors[str(r.error)[:300]] += 1
                        first_err = first_err or str(r.error)[:300]
                self.batches.append(Batch(t_sent, t_done, len(idx), sum(per_shard.values()),
                                          dict(per_shard), first_err, probe))
            if first_err:
                time.sleep(0.25)   # back off a little, as a sender would
        except Exception:  # noqa: BLE001 - never lose the batch to a bug here
            with self.lock:
                self.crashed.append(traceback.format_exc()[-1500:])
                self.retry.extend(i for i in idx if i not in self.acked)
            time.sleep(0.25)
        finally:
            with self.lock:
                self.inflight -= 1
        return dict(per_shard)


# ====================================================================== sampling
class LagSampler:
    """Every 0.25 s: each shard's epoch and its copies' lag (records, seconds), and how many
    recipients the sink has received. A shard that does not answer within 1 s is recorded as
    unreachable (its leader is restarting)."""

    def __init__(self, mc: Any, rcpts: RcptLog, t0: float) -> None:
        self.mc = mc
        self.rcpts = rcpts
        self.t0 = t0
        #: (t, shard, epoch, lag s, lag records, quorum lag s, quorum lag records, copy
        #: states): lag = the worst streaming replica, quorum lag = the best one (with the
        #: leader's own copy, it makes the majority of 3 that acknowledges a batch)
        self.lag: list[tuple[Any, ...]] = []
        self.delivered: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="failover-sampler", daemon=True)

    def _run(self) -> None:
        import ray
        while not self._stop.is_set():
            t = time.time()
            self.delivered.append((round(t - self.t0, 3), self.rcpts.count()))
            refs = {s: h.replication.remote() for s, h in enumerate(self.mc.coordinators)}
            try:
                ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=1.0)
            except Exception:  # noqa: BLE001 - Ray going away at the end
                ready = []
            for s, ref in refs.items():
                ts = round(t - self.t0, 3)
                if ref not in ready:
                    self.lag.append((ts, s, None, None, None, None, None, ["unreachable"]))
                    continue
                try:
                    rep = ray.get(ref, timeout=1.0)
                except Exception as e:  # noqa: BLE001 - the leader died under the call
                    self.lag.append((ts, s, None, None, None, None, None,
                                     [type(e).__name__]))
                    continue
                copies = [cp for cp in rep["copies"] if cp["slot"] != 0]
                live = [cp for cp in copies if cp["state"] == "streaming"]
                self.lag.append((ts, s, rep["epoch"],
                                 max((cp["lag_seconds"] for cp in live), default=None),
                                 max((cp["lag_records"] for cp in live), default=None),
                                 min((cp["lag_seconds"] for cp in live), default=None),
                                 min((cp["lag_records"] for cp in live), default=None),
                                 [cp["state"] for cp in copies]))
            self._stop.wait(max(0.0, SAMPLE_EVERY - (time.time() - t)))

    def start(self) -> LagSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# ====================================================================== one scenario
def _restore(path: Path, content: bytes | None) -> None:
    try:
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)
    except OSError:
        pass


def _wait(cond: Any, deadline: float, poll: float = 0.1) -> bool:
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(poll)
    return bool(cond())


def _p99(values: list[float]) -> float | None:
    return c.percentiles(values, (99,))["p99"] if values else None


def _lag_summary(samples: list[Any], t_from: float, t_to: float) -> dict[str, Any]:
    sel = [s for s in samples if t_from <= s[0] < t_to and s[3] is not None]
    out: dict[str, Any] = {"samples": len(sel), "window_s": [round(t_from, 3), round(t_to, 3)]}
    for key, k_s, k_r in (("", 3, 4), ("quorum_", 5, 6)):
        secs = [s[k_s] for s in sel]
        recs = [float(s[k_r]) for s in sel]
        p99r = _p99(recs)
        out.update({f"{key}max_s": max(secs) if secs else None, f"{key}p99_s": _p99(secs),
                    f"{key}max_records": int(max(recs)) if recs else None,
                    f"{key}p99_records": int(p99r) if p99r is not None else None})
    return out


def _stats(h: Any, timeout: float = 60.0) -> dict[str, Any]:
    import ray
    return ray.get(h.stats.remote(), timeout=timeout)


def _start_cluster(attempts: int = 2) -> Any:
    """Three raylets, one per region, health checks tuned. On a busy machine a raylet can
    time out while starting: then everything started is stopped and it is tried once more."""
    from ray.cluster_utils import Cluster

    from cluster.deploy import RAY_SYSTEM_CONFIG
    for attempt in range(1, attempts + 1):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 1, "include_dashboard": False, "labels": {"region": HEAD_REGION},
                "_system_config": {**RAY_SYSTEM_CONFIG, **HEALTH}})
            for region in WORKER_REGIONS:
                cluster.add_node(num_cpus=1, labels={"region": region})
            cluster.wait_for_nodes()
            return cluster
        except Exception as e:  # noqa: BLE001 - Ray raises plain Exception here
            if cluster is not None:
                try:
                    cluster.shutdown()
                except Exception:  # noqa: BLE001 - best effort before the retry
                    pass
            if attempt == attempts:
                raise
            print(f"the Ray cluster did not start ({type(e).__name__}: {e}); trying again",
                  file=sys.stderr, flush=True)
            time.sleep(5.0)
    raise AssertionError("unreachable")


def _totals(mc: Any, timeout: float = 60.0) -> dict[str, Any]:
    """``MailCluster.stats()``'s totals, bounded in time ({} when a shard does not answer)."""
    import ray
    try:
        per = ray.get([h.stats.remote() for h in mc.coordinators], timeout=timeout)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        return {}
    total: dict[str, Any] = {"serving": all(st.get("serving") for st in per)}
    for st in per:
        for k, v in st.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total


def _placement(handles: dict[str, Any]) -> dict[str, str]:
    """``{actor: "region/node"}`` for every copy of every shard."""
    import ray
    region_of = {nd["NodeID"]: (nd.get("Labels") or {}).get("region", "")
                 for nd in ray.nodes() if nd.get("Alive")}
    out = {}
    for name in sorted(handles):
        if name.startswith(("coordinator:", "replica:")):
            # by name, not the handle deploy returned: a leader's rebalancing may have moved
            # the copy meanwhile (a new, detached actor under the same name)
            nid = _stats(ray.get_actor(name))["node"]   # the driver's namespace
            out[name] = f"{region_of.get(nid, '?')}/{nid[:8]}"
    return out


def _shared_nodes(placement: dict[str, str]) -> list[str]:
    """Copies of one shard that sit on the same node (one node failure takes both)."""
    by: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for name, where in placement.items():
        by[(name.split(":")[1], where)].append(name)
    return [f"{' + '.join(v)} on {where}" for (_, where), v in sorted(by.items()) if len(v) > 1]


def run_scenario(kind: str, n: int, *, receiver: str = "auto", timeout: float = 300.0,
                 threads: int = 4, kill_at: float = 0.3, progress: bool = True
                 ) -> dict[str, Any]:
    """One fresh cluster, one failure of ``kind`` during an ``n``-message run."""
    import ray

    from cluster.client import MailCluster
    from cluster.deploy import deploy

    assert kind in SCENARIOS
    workload = c.make_workload(n)
    work = Path(tempfile.mkdtemp(prefix="raymta-failover-"))
    spool = work / "spool"
    recv, rcpts = make_receiver(receiver, work)
    dns = cluster = sampler = sub = None
    saved_address = RAY_ADDRESS_FILE.read_bytes() if RAY_ADDRESS_FILE.exists() else None
    out: dict[str, Any] = {"scenario": kind, "messages": n, "receiver": recv.kind,
                           "loadavg_at_start": os.getloadavg(),
                           "submit_threads": threads, "batch": BATCH, "shards": SHARDS,
                           "replicas": REPLICAS, "health_checks": HEALTH, "ok": False}
    notes: list[str] = []
    try:
        recv.start()
        rcpts.start()
        dns = c.start_dns(workload.domains, recv.host)
        base = c.raymta_config(str(spool), dns.port, recv.port)
        cfg = replace(base, queue=replace(base.queue, shards=SHARDS),
                      cluster=replace(base.cluster, replicas=REPLICAS),
                      spool=replace(base.spool, per_node=True))
        out["replication_config"] = {"ack_timeout": cfg.replication.ack_timeout,
                                     "claim_timeout": cfg.replication.claim_timeout}
        t = time.time()
        cluster = _start_cluster()
        ray.init(address=cluster.address, namespace=cfg.cluster.namespace, log_to_driver=False)
        handles = deploy(cfg)
        coords = [handles[f"coordinator:{s}"] for s in range(SHARDS)]
        mc = MailCluster(cfg, coords, handles=handles)   # mc.handles IS handles: keep them
        out["startup_seconds"] = round(time.time() - t, 2)
        region_of = {nd["NodeID"]: (nd.get("Labels") or {}).get("region", "")
                     for nd in ray.nodes() if nd.get("Alive")}
        placement = _placement(handles)
        out["placement_before"] = placement
        workers = {nd.node_id: nd for nd in cluster.worker_nodes}

        # which shard loses its leader
        victim_node = None
        if kind == "leader-kill":
            shard = 0
        else:
            shard = next((s for s in range(SHARDS)
                          if _stats(coords[s])["node"] in workers), -1)
            if shard < 0:
                raise RuntimeError(f"no shard leader on a worker node: {placement}")
            victim_node = workers[_stats(coords[shard])["node"]]
        out["killed_shard"] = shard
        before = _stats(coords[shard])

        # load
        t0 = time.time()
        hard_deadline = t0 + timeout + 120
        sampler = LagSampler(mc, rcpts, t0).start()
        sub = Submitter(mc, workload.messages, threads=threads)
        # keep at least half of the workload for after the kill, even when deliveries are
        # slow to start (small runs): then the submitters wait
        sub.hold_from(min(n, max(int(n * (kill_at + 0.2)), int(n * kill_at) + 1)))
        sub.start(hard_deadline)
        flowing = max(50, n // 100)

        def loaded() -> bool:
            if recv.count() >= 200 and not rcpts.count():
                raise RuntimeError(f"the sink received {recv.count()} messages but none was "
                                   "read back from its dump file")
            return len(sub.acked) >= kill_at * n and rcpts.count() >= flowing
        if not _wait(loaded, t0 + timeout):
            raise RuntimeError(f"load did not build up in {timeout:.0f}s: acked "
                               f"{len(sub.acked)}, received {rcpts.count()} (sink count "
                               f"{recv.count()}), raymta {_totals(mc)}")
        out["at_kill"] = {"acked": len(sub.acked), "received": rcpts.count(),
                          "epoch": before["epoch"], "pid": before["pid"],
                          "node": before["node"][:8], "seconds_into_run":
                          round(time.time() - t0, 3)}
        if progress:
            print(f"  [{kind}] {len(sub.acked):,} acked, {rcpts.count():,} received: "
                  f"killing the leader of shard {shard} ...", flush=True)

        # the failure
        if kind == "leader-kill":
            t_kill = time.time()
            os.kill(before["pid"], signal.SIGKILL)
            sub.release()
            sub.probe(shard)
        else:
            assert victim_node is not None
            region = region_of.get(victim_node.node_id, "")
            t_kill = time.time()
            cluster.remove_node(victim_node, allow_graceful=False)
            t_removed = time.time()
            sub.release()
            sub.probe(shard)
            new = cluster.add_node(num_cpus=1, labels={"region": region})
            t_added = time.time()
            try:
                # keep the handles that created the actors: for non-detached actors they are
                # what keeps them alive (deploy returns other handles for existing actors)
                for name, h in deploy(cfg).items():
                    handles.setdefault(name, h)
            except Exception as e:  # noqa: BLE001 - measured anyway; reported
                notes.append(f"redeploy after node loss failed: {type(e).__name__}: {e}")
            out["node_loss"] = {
                "removed_node": f"{region}/{victim_node.node_id[:8]}",
                "replacement_node": f"{region}/{new.node_id[:8]}",
                "remove_seconds": round(t_removed - t_kill, 3),
                "add_node_seconds": round(t_added - t_removed, 3),
                "redeploy_seconds": round(time.time() - t_added, 3)}
        out["kill_at_s"] = round(t_kill - t0, 3)

        # everything acknowledged, then everything acknowledged received and the queue empty
        end = t_kill + timeout
        _wait(lambda: sub.done() or not sub.alive(), end, 0.2)
        t_all_acked = time.time() if sub.done() else None

        def _drained() -> bool:
            acked = {workload.messages[i]["recipients"][0] for i in sub.acked}
            got = {r for _, r in rcpts.events}
            if not acked <= got:
                return False
            st = _totals(mc, timeout=10.0)
            return bool(st.get("serving")) and st.get("live", 1) == 0 and \
                st.get("pending_commit", 1) == 0
        drained = _wait(_drained, end, 1.0)
        time.sleep(1.0)   # let the sink's last appends be read
        timed_out = not (sub.done() and drained)
        t_end = time.time()
        sub.stop()
        sampler.stop()
        rcpts.stop()

        # ------------------------------------------------------------- figures
        after = _stats(coords[shard])
        st = _totals(mc)
        out["placement_after"] = _placement(handles)
        out["copies_sharing_a_node_after"] = _shared_nodes(out["placement_after"])
        rcpt_of = [m["recipients"][0] for m in workload.messages]
        acked_rcpt = {rcpt_of[i]: v for i, v in sub.acked.items()}
        refused_rcpt = {rcpt_of[i]: k for i, k in sub.refusals.items()}
        received = collections.Counter(r for _, r in rcpts.events)
        first_at: dict[str, float] = {}
        for t_r, r in rcpts.events:
            first_at.setdefault(r, t_r)
        lost = sorted(r for r in acked_rcpt if received[r] == 0)
        dup_rcpts = {r: k - 1 for r, k in received.items() if k > 1}
        dup_retry = sum(k for r, k in dup_rcpts.items() if r in refused_rcpt)
        dups = sum(dup_rcpts.values())
        known = set(rcpt_of)
        unknown = sum(k for r, k in received.items() if r not in known)
        never_acked_but_received = sum(1 for r in received if r in known
                                       and r not in acked_rcpt)

        b_new = [b for b in sub.batches if b.t_sent >= t_kill and b.shards.get(shard)]
        b_any = [b for b in sub.batches if b.t_done >= t_kill and b.shards.get(shard)]
        new_epoch_seen = next((s[0] for s in sampler.lag if s[1] == shard and s[2] is not None
                               and s[2] > before["epoch"] and s[0] >= t_kill - t0), None)
        # A call answered before the new epoch existed was answered by the old leader: on a
        # lost node its process can outlive its raylet for a moment and still have a quorum.
        # The new epoch came after the sampler's last sight of the shard without it.
        without = [s[0] for s in sampler.lag if s[1] == shard and new_epoch_seen is not None
                   and t_kill - t0 <= s[0] < new_epoch_seen]
        epoch_not_before = t0 + max(without) if without else t_kill
        old_answers = [b for b in b_new if b.t_done < epoch_not_before]
        b_new = [b for b in b_new if b.t_done >= epoch_not_before]
        first_ack = min((b.t_done for b in b_new), default=None)
        first_ack_batch = min((b.t_done for b in b_new if not b.probe), default=None)
        first_ack_any = min((b.t_done for b in b_any), default=None)
        probes = [b for b in sub.batches if b.probe]
        reachable = next((s[0] for s in sampler.lag if s[1] == shard and s[2] is not None
                          and s[0] >= t_kill - t0 + NEW_LEADER_GUARD), None)
        # deliveries of the killed shard
        shard_rcpt = {r for r, v in acked_rcpt.items() if v[2] == shard}
        post_rcpt = {r for r, v in acked_rcpt.items() if v[2] == shard and v[3] >= t_kill}
        resume = min((first_at[r] for r in post_rcpt if r in first_at), default=None)
        times = sorted(t_r for t_r, r in rcpts.events if r in shard_rcpt and t_r >= t_kill)
        stall_from, stall_to, prev = t_kill, (times[0] if times else None), t_kill
        for t_r in times:
            if stall_to is None or t_r - prev > stall_to - stall_from:
                stall_from, stall_to = prev, t_r
            prev = t_r
        drained_before_stall = sum(1 for t_r in times if t_r <= stall_from)
        # duplicates: which shard, and when each copy arrived (relative to the kill)
        all_at: dict[str, list[float]] = collections.defaultdict(list)
        for t_r, r in rcpts.events:
            if r in dup_rcpts:
                all_at[r].append(t_r)
        dup_killed = sum(k for r, k in dup_rcpts.items() if r in shard_rcpt)
        t_claimed = t0 + new_epoch_seen if new_epoch_seen is not None else None
        early = [r for r in dup_rcpts if r in shard_rcpt and t_claimed is not None
                 and all_at[r][0] < t_claimed]
        # when the first copy of each killed-shard duplicate arrived: before the kill (its
        # result died with the old leader), while the leader was down (its result was sent to
        # the restarting leader), or after the new leader had its epoch
        dup_first = collections.Counter(
            "before kill" if all_at[r][0] < t_kill else
            "kill -> new epoch" if t_claimed is None or all_at[r][0] < t_claimed else
            "after new epoch" for r in dup_rcpts if r in shard_rcpt)
        # the killed shard's backlog at the kill: acked before it, not received before it;
        # those received before the new leader even had its epoch were out at relays
        backlog = [r for r in shard_rcpt if acked_rcpt[r][0] < t_kill
                   and first_at.get(r, t_end + 1) >= t_kill]
        inflight_min = sum(1 for r in backlog if t_claimed is not None
                           and first_at.get(r, t_end + 1) < t_claimed)
        other_times = sorted(t_r for t_r, r in rcpts.events
                             if r in acked_rcpt and r not in shard_rcpt and t_r >= t_kill)
        gap_other, prev = 0.0, t_kill
        for t_r in other_times:
            gap_other = max(gap_other, t_r - prev)
            prev = t_r
        # deliveries of the killed shard around the kill, per 0.25 s
        timeline = collections.Counter(int((t_r - t_kill) // 0.25) for t_r, r in rcpts.events
                                       if r in shard_rcpt and -5 <= t_r - t_kill < 30)

        def rel(x: float | None) -> float | None:
            return round(x - t_kill, 3) if x is not None else None

        first_ack_s, resume_s = rel(first_ack), rel(resume)
        lag_steady = _lag_summary(sampler.lag, 0.0, t_kill - t0)
        lag_after = _lag_summary(sampler.lag, t_kill - t0, t_end - t0)
        # full load again: from the first ack after the kill until everything was acked
        lag_reloaded = _lag_summary(sampler.lag, (first_ack or t_end) - t0,
                                    (t_all_acked or t_end) - t0)
        lag_all = _lag_summary(sampler.lag, 0.0, t_end - t0)
        not_streaming = collections.Counter(
            st_ for s in sampler.lag if s[0] >= t_kill - t0 for st_ in s[7]
            if st_ != "streaming")
        out.update({
            "t_first_ack_s": first_ack_s, "t_first_ack_full_batch_s": rel(first_ack_batch),
            "t_first_answer_any_s": rel(first_ack_any),
            "old_leader_answers_after_kill": len(old_answers),
            "t_last_old_leader_answer_s": rel(max((b.t_done for b in old_answers),
                                                  default=None)),
            "probe_calls": [[round(b.t_sent - t_kill, 3), round(b.t_done - t_kill, 3), b.shards,
                             b.error] for b in probes],
            "t_leader_reachable_s": round(reachable - (t_kill - t0), 3)
            if reachable is not None else None,
            "t_deliveries_resume_s": resume_s,
            "stall": {"from_s": rel(stall_from), "to_s": rel(stall_to),
                      "seconds": round(stall_to - stall_from, 3) if stall_to else None,
                      "killed_shard_deliveries_before_stall": drained_before_stall},
            "other_shard_longest_gap_s": round(gap_other, 3),
            "t_new_epoch_seen_s": round(new_epoch_seen - (t_kill - t0), 3)
            if new_epoch_seen is not None else None,
            "t_all_acked_s": rel(t_all_acked), "t_drained_s": round(t_end - t_kill, 3),
            "epoch_before": before["epoch"], "epoch_after": after["epoch"],
            "leader_node_before": before["node"][:8], "leader_node_after": after["node"][:8],
            "recovered": after.get("recovered"),
            "acked": len(acked_rcpt), "acked_killed_shard": len(shard_rcpt),
            "acked_killed_shard_after_kill": len(post_rcpt),
            "received_unique": len(received), "received_total": len(rcpts.events),
            "sink_count": recv.count(),
            "lost": len(lost), "lost_sample": lost[:20],
            "duplicates": dups, "duplicates_of_resubmitted": dup_retry,
            "duplicate_recipients": len(dup_rcpts),
            "duplicates_killed_shard": dup_killed,
            "duplicates_other_shard": dups - dup_killed,
            "duplicates_first_copy_before_new_epoch": len(early),
            "killed_shard_duplicates_by_first_copy": dict(dup_first),
            "killed_shard_backlog_at_kill": len(backlog),
            "killed_shard_received_before_new_epoch": inflight_min,
            "duplicate_arrivals_s": {r: [round(x - t_kill, 3) for x in all_at[r]]
                                     for r in sorted(dup_rcpts)[:50]},
            "received_unacked": never_acked_but_received, "received_unknown": unknown,
            "resubmitted_messages": len(refused_rcpt),
            "refusals": sum(refused_rcpt.values()),
            "refusal_errors": dict(sub.errors.most_common(10)),
            "submit_crashes": sub.crashed[:5],
            "batches": len(sub.batches),
            "raymta_stats": {k: st.get(k, 0) for k in ("delivered", "bounced", "expired",
                                                        "live", "pending_commit",
                                                        "requeued_after_relay_loss")},
            "lag_steady": lag_steady, "lag_after_kill": lag_after, "lag_overall": lag_all,
            "lag_loaded_after_failover": lag_reloaded,
            "copy_states_after_kill": dict(not_streaming),
            "timed_out": timed_out, "notes": notes,
            "killed_shard_deliveries_per_250ms": {str(k * 0.25): v
                                                  for k, v in sorted(timeline.items())},
            "batch_log": [[round(b.t_sent - t0, 3), round(b.t_done - t0, 3), b.size,
                           b.accepted, b.shards, b.error, b.probe] for b in sub.batches],
            "lag_samples": sampler.lag, "delivered_series": sampler.delivered,
        })
        out["targets"] = {
            "failover_under_5s": first_ack_s is not None and first_ack_s < FAILOVER_TARGET_S,
            "deliveries_resume_under_5s": resume_s is not None
            and resume_s < FAILOVER_TARGET_S,
            "lag_under_1s_at_load": lag_steady["max_s"] is not None
            and max(lag_steady["max_s"], lag_reloaded["max_s"] or 0.0) < LAG_TARGET_S,
            "no_loss": not lost and not timed_out}
        out["ok"] = not lost and not timed_out and not sub.crashed
        return out
    except Exception as e:  # noqa: BLE001 - the caller reports it with what was measured
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-3000:]
        return out
    finally:
        if sub is not None:
            sub.stop()
        if sampler is not None:
            sampler.stop()
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            try:
                cluster.shutdown()
            except Exception as e:  # noqa: BLE001 - go on cleaning up
                print(f"cluster shutdown: {type(e).__name__}: {e}", file=sys.stderr)
        _restore(RAY_ADDRESS_FILE, saved_address)
        if dns is not None:
            dns.stop()
        rcpts.stop()
        recv.stop()
        rcpts.close()
        shutil.rmtree(work, ignore_errors=True)


# ====================================================================== report
def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def print_table(results: list[dict[str, Any]]) -> None:
    rows: list[tuple[str, ...]] = []
    for r in results:
        if "t_first_ack_s" not in r:
            rows.append((r["scenario"], "FAILED: " + r.get("error", "?")[:90]))
            continue
        ls, la, lr = r["lag_steady"], r["lag_overall"], r["lag_loaded_after_failover"]
        rows += [
            (r["scenario"], f"shard {r['killed_shard']}: epoch {r['epoch_before']} -> "
                            f"{r['epoch_after']}, leader {r['leader_node_before']} -> "
                            f"{r['leader_node_after']}"),
            ("  first ack after kill", f"{_f(r['t_first_ack_s'])} s  (first batch of 100 sent "
                                       f"after the kill: {_f(r['t_first_ack_full_batch_s'])} s)"
                                       + (f"; {r['old_leader_answers_after_kill']} call(s) "
                                          f"answered by the old leader, the last at "
                                          f"{_f(r['t_last_old_leader_answer_s'])} s"
                                          if r.get("old_leader_answers_after_kill") else "")),
            ("  restart", f"leader reachable {_f(r['t_leader_reachable_s'])} s, new epoch "
                          f"{_f(r['t_new_epoch_seen_s'])} s, its own start (claim, replay, "
                          f"epoch record) {_f((r['recovered'] or {}).get('seconds'))} s"),
            ("  deliveries resume", f"{_f(r['t_deliveries_resume_s'])} s  (stall of the shard's "
                                    f"deliveries: {_f(r['stall']['from_s'])} -> "
                                    f"{_f(r['stall']['to_s'])} s)"),
            ("  other shard max gap", f"{_f(r['other_shard_longest_gap_s'])} s"),
            ("  all acked / drained", f"{_f(r['t_all_acked_s'])} s / {_f(r['t_drained_s'])} s"),
            ("  acked / received", f"{r['acked']:,} / {r['received_unique']:,} unique "
                                   f"({r['received_total']:,} total, sink -c {r['sink_count']:,})"),
            ("  LOST", f"{r['lost']}"),
            ("  duplicates", f"{r['duplicates']}: killed shard {r['duplicates_killed_shard']}"
                             f", other shard {r['duplicates_other_shard']}; of resubmitted "
                             f"messages {r['duplicates_of_resubmitted']}"),
            ("  killed-shard dups' 1st copy", ", ".join(
                f"{k} {v}" for k, v in r["killed_shard_duplicates_by_first_copy"].items())
             or "-"),
            ("  killed shard at kill", f"backlog {r['killed_shard_backlog_at_kill']:,} (acked, "
                                       f"not yet received), of which "
                                       f"{r['killed_shard_received_before_new_epoch']:,} "
                                       "received before the new leader had its epoch "
                                       "(out at relays)"),
            ("  resubmitted", f"{r['resubmitted_messages']} messages, {r['refusals']} refusals"),
            ("  lag steady max/p99", f"{_f(ls['max_s'], 3)} / {_f(ls['p99_s'], 3)} s, "
                                     f"{_f(ls['max_records'])} / {_f(ls['p99_records'])} "
                                     f"records ({ls['samples']} samples)"),
            ("  quorum lag steady", f"{_f(ls['quorum_max_s'], 3)} / "
                                    f"{_f(ls['quorum_p99_s'], 3)} s, "
                                    f"{_f(ls['quorum_max_records'])} / "
                                    f"{_f(ls['quorum_p99_records'])} records"),
            ("  lag loaded, after", f"{_f(lr['max_s'], 3)} / {_f(lr['p99_s'], 3)} s, "
                                  f"{_f(lr['max_records'])} / {_f(lr['p99_records'])} "
                                  f"records ({lr['samples']} samples, first ack after the "
                                  "kill -> all acked)"),
            ("  lag overall max/p99", f"{_f(la['max_s'], 3)} / {_f(la['p99_s'], 3)} s, "
                                      f"{_f(la['max_records'])} / {_f(la['p99_records'])} "
                                      "records"),
            ("  load average at start", " ".join(f"{x:.1f}" for x in r["loadavg_at_start"])
             + f" ({os.cpu_count()} cores; other work on the machine inflates every time)"),
            ("  targets", ", ".join(f"{k} {'MET' if v else 'NOT MET'}"
                                    for k, v in r["targets"].items())),
        ]
        if r.get("node_loss"):
            nl = r["node_loss"]
            rows.append(("  node replaced", f"{nl['removed_node']} -> {nl['replacement_node']}"
                                            f" (remove {nl['remove_seconds']} s, add "
                                            f"{nl['add_node_seconds']} s, redeploy "
                                            f"{nl['redeploy_seconds']} s)"))
        for shared in r.get("copies_sharing_a_node_after", []):
            rows.append(("  after: same node", shared))
        for note in r.get("notes", []):
            rows.append(("  note", note))
    w = max(len(a) for a, *_ in rows)
    print("\nraymta failover (3 nodes, 2 shards x 3 copies, one machine)")
    for a, b in rows:
        print(f"{a:<{w}}  {b}")
    print(f"\n{ACK_NOTE}\n{RESUME_NOTE}\n{LAG_NOTE}")
    done = [r for r in results if "targets" in r]
    if done:
        def verdict(r: dict[str, Any], key: str, fig: Any) -> str:
            return f"{r['scenario']} {'MET' if r['targets'][key] else 'NOT MET'} ({fig})"
        print(f"\ntargets: failover < {FAILOVER_TARGET_S:g} s (first ack after the kill): "
              + "; ".join(verdict(r, "failover_under_5s", f"{_f(r['t_first_ack_s'])} s")
                          for r in done))
        print(f"         deliveries resume < {FAILOVER_TARGET_S:g} s: "
              + "; ".join(verdict(r, "deliveries_resume_under_5s",
                                  f"{_f(r['t_deliveries_resume_s'])} s") for r in done))
        print(f"         replication lag < {LAG_TARGET_S:g} s at full load (worst replica, "
              "before the kill and after recovery): "
              + "; ".join(verdict(r, "lag_under_1s_at_load", "max " + _f(max(
                  r["lag_steady"]["max_s"] or 0.0,
                  r["lag_loaded_after_failover"]["max_s"] or 0.0), 3) + " s") for r in done))
        print("         no acknowledged message lost: " + "; ".join(
            verdict(r, "no_loss", f"{r['lost']} lost") for r in done))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=20_000)
    ap.add_argument("--scenario", choices=["leader-kill", "node-loss", "both"], default="both")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="per scenario: for load to build up, and from the kill until every "
                         "acknowledged message is received (s)")
    ap.add_argument("--threads", type=int, default=4, help="concurrent submitting threads")
    ap.add_argument("--kill-at", type=float, default=0.3,
                    help="fraction of the messages acknowledged before the kill")
    ap.add_argument("--receiver", choices=["auto", "smtp-sink", "aiosmtpd"], default="auto")
    ap.add_argument("--no-install", action="store_true",
                    help="do not install Postfix (for smtp-sink) when it is missing")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.receiver != "aiosmtpd":
        c.ensure_postfix(install=not args.no_install)
    machine = c.machine_info()
    kinds = SCENARIOS if args.scenario == "both" else (args.scenario,)
    results = []
    for kind in kinds:
        print(f"\n=== {kind}: {args.messages:,} messages ===", flush=True)
        t = time.time()
        r = run_scenario(kind, args.messages, receiver=args.receiver, timeout=args.timeout,
                         threads=args.threads, kill_at=args.kill_at, progress=not args.quiet)
        r["wall_seconds"] = round(time.time() - t, 1)
        if "error" in r:
            print(c.banner(f"{kind} FAILED: {r['error']}"), file=sys.stderr, flush=True)
            print(r.get("traceback", ""), file=sys.stderr)
        elif not r["ok"]:
            print(c.banner(f"{kind}: {r['lost']} acknowledged messages LOST"
                           f"{', TIMED OUT' if r['timed_out'] else ''}"), file=sys.stderr)
        results.append(r)
    print_table(results)
    path = c.write_result("failover", {
        "machine": machine, "messages": args.messages, "kill_at": args.kill_at,
        "targets": {"failover_s": FAILOVER_TARGET_S, "lag_s": LAG_TARGET_S},
        "definitions": {"first_ack": ACK_NOTE, "deliveries_resume": RESUME_NOTE,
                        "lag": LAG_NOTE},
        "results": results})
    print(f"results: {path}")
    return 0 if results and all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
