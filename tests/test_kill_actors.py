"""Every actor can die at any moment: SIGKILL each kind mid-run, nothing accepted is lost.

Three runs of 5,000 messages on one local Ray; in each, one actor process is killed with
SIGKILL once a share of the run is delivered. Ray restarts it; hard state comes back from the
spool, soft state is rebuilt. Every message must arrive; duplicates are counted, reported and
bounded by what can be in flight (the sites' in-flight caps).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest
import ray

from cluster.core.throttle import max_inflight
from tests.conftest import MAIN_SINKS, pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(600)

N = 5000


@pytest.fixture(scope="module")
def killable(tmp_path_factory, dns_server):
    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.devservers import SinkGroup
    sinks = SinkGroup(MAIN_SINKS).start()
    try:
        for i, a in enumerate(MAIN_SINKS):
            dns_server.add_a(f"mx{i + 1}.kill.test", a)
        domains = [f"k{i}.test" for i in range(20)]
        for i, d in enumerate(domains):
            dns_server.add_mx(d, [(10, f"mx{i % 3 + 1}.kill.test")])
        base = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port,
                               sinks.port)
        # slow enough that a kill lands mid-run: 3 sites × 300/s
        from dataclasses import replace

        from cluster.core.ratespec import RateSpec
        # small compaction threshold: the coordinator snapshots several times per run, so a
        # restart recovers from a snapshot plus the log tail
        cfg = replace(base, site_defaults=replace(base.site_defaults,
                                                  rates=(RateSpec.parse("300/s"),)),
                      spool=replace(base.spool, compact_bytes=2_000_000))
        del parse_config
        mc = MailCluster.connect(config=cfg, num_cpus=2)
        try:
            yield {"mc": mc, "sinks": sinks, "domains": domains, "cfg": cfg}
        finally:
            mc.close()
    finally:
        sinks.stop()


def _pid(handle) -> int:
    return ray.get(handle.ping.remote(), timeout=60)


@pytest.mark.parametrize("victim", ["relay", "throttle", "coordinator"])
def test_sigkill_mid_run_loses_nothing(killable, victim):
    mc, sinks, domains, cfg = (killable["mc"], killable["sinks"], killable["domains"],
                               killable["cfg"])
    handles = mc.handles
    name = {"relay": next(n for n in handles if n.startswith("relay:")),
            "throttle": "throttle:pool:0", "coordinator": "coordinator:0"}[victim]
    h = handles[name]
    old_pid = _pid(h)
    rcpts = [f"{victim}{i}@{domains[i % len(domains)]}" for i in range(N)]
    want = set(rcpts)
    msgs = [{"sender": "s@origin.test", "recipients": [r], "raw": raw_message(i, r, size=300)}
            for i, r in enumerate(rcpts)]
    ids = []
    for k in range(0, N, 1000):
        res = mc.submit(msgs[k:k + 1000])
        assert all(r.accepted for r in res)
        ids += [i for r in res for i in r.ids]

    def delivered() -> int:
        return sum(1 for r in sinks.received if r.rcpt_to in want)

    wait_for(lambda: delivered() >= N * 0.3, 120, "30% delivered before the kill")
    inflight_before = mc.stats()["inflight"]
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.time()
    at_kill = delivered()
    new_pid = wait_for(lambda: _pid(h), 120, f"{name} to restart")
    assert new_pid != old_pid
    progress = []
    deadline = time.time() + 240
    while time.time() < deadline:
        st = mc.stats()
        progress.append((round(time.time() - killed_at, 1), delivered(), st["live"],
                         st["inflight"], st["ready"], st["deferred"]))
        # a restarted leader answers before it has replayed its log: its counts mean nothing
        # until it serves (this test once stopped waiting there and found 1,686 "missing")
        if st["serving"] and st["live"] == 0:
            break
        time.sleep(1)
    print("\nprogress after kill (s, delivered, live, inflight, ready, deferred):", progress)
    counts = Counter(r.rcpt_to for r in sinks.received if r.rcpt_to in want)
    missing = want - set(counts)
    dups = sum(c - 1 for c in counts.values())
    st = mc.stats()
    cap = len({d % 3 for d in range(20)}) * max_inflight(cfg.site_defaults)
    print(f"\nSIGKILL {name} (pid {old_pid} -> {new_pid}) with {at_kill}/{N} delivered, "
          f"{inflight_before} in flight just before: missing={len(missing)} duplicates={dups} "
          f"(bound {cap}); recovered={st['shards'][0]['recovered']}; "
          f"done {time.time() - killed_at:.1f}s after the kill")
    assert not missing, f"{len(missing)} accepted messages never arrived"
    assert dups <= cap
    if victim == "coordinator":
        # results the dead leader had been sent but not committed are kept by the relays and
        # taken by its successor before it hands anything out again: no message twice
        assert dups == 0, f"{dups} duplicates after a leader SIGKILL"
    states = Counter(s["state"] for s in mc.status(ids))
    assert states == {"delivered": N}, states
    shard = st["shards"][0]
    if victim == "coordinator":
        assert shard["recovered"]["snapshot_lsn"] > 0   # restarted from snapshot + tail
    # disk follows the queue, not the history: ~45 MB of records were written in all. What
    # stays: the snapshot (its events tail), the segments since it (a snapshot taken while
    # the log goes on closes the segment it shares with later frames: up to two of them) and
    # those holding live bodies it refers to
    assert shard["disk_bytes"] < 4 * cfg.spool.compact_bytes + 1_000_000, shard["disk_bytes"]
