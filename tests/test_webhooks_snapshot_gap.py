"""A shard leader rebuilt without its event files (as on another node after its node is lost)
reports exactly the events its snapshot could not carry, never passing them silently
(cluster/core/event_holes.py, EventLog.hole_before / install_holes, actors/webhooks.py).

Real parts: a local Ray with one shard whose snapshots carry at most 2 KiB of events (4 KiB
while a webhook endpoint is behind, ``spool.snapshot_held_events_bytes``), the webhook
dispatcher, and the aiohttp receiver of tests/test_webhooks_cluster.py (which fails some
requests). The dispatcher is stopped with its cursor committed; 200 messages due in an hour
(one event each, a Reception) are submitted; the shard compacts (its log now starts at the
snapshot); the leader's event directory is deleted and the leader SIGKILLed — Ray restarts it
with only its copy of the log, as a leader rebuilt on another node has. What must hold: the new
leader has the newest events (the snapshot's) and every one after; a new dispatcher, resuming
from the committed cursor, delivers every one of those and reports the rest as skipped —
exactly how many and which seqs — and ``GET /v1/events`` at that cursor says the same.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.test_webhooks_rotation import (
    _get_events,
    _stop_dispatcher,
    _submit_later,
    _wait_acknowledged,
    webhook_env,
)

pytestmark = pytest.mark.timeout(180)

N = 200
HELD = 4096


@pytest.fixture
def env(tmp_path, dns_server, sinks):
    yield from webhook_env(str(tmp_path / "spool"), dns_server, sinks,
                           snapshot_events_bytes=2048, snapshot_held_events_bytes=HELD)


def test_a_leader_without_its_event_files_reports_what_its_snapshot_left_out(env):
    import ray

    from actors.replica_log import copy_directory
    from actors.webhooks import ensure_webhooks
    mc, rx = env["mc"], env["rx"]
    leader = mc.coordinators[0]
    _submit_later(mc, 10, "a")
    c1 = _wait_acknowledged(mc, leader)
    _stop_dispatcher(mc)
    _submit_later(mc, N, "b")
    old = [e["seq"] for e in mc.events({0: c1}, 100_000)]
    assert len(old) == N
    snap = ray.get(leader.compact.remote(), timeout=60)
    assert snap["lsn"] >= old[-1]
    # the node's event files are gone; the leader comes back with its copy of the log only
    pid = ray.get(leader.ping.remote(), timeout=60)
    shutil.rmtree(copy_directory(mc.cfg, 0, 0).parent / "events")
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        try:
            return ray.get(leader.ping.remote(), timeout=60) != pid
        except ray.exceptions.RayActorError:     # the call met the dying process: again
            return False
    wait_for(restarted, 60, "the leader restarted")
    new = [e["seq"] for e in mc.events({0: c1}, 100_000)]
    first = new[0]
    lost = [s for s in old if s < first]
    # the newest events came with the snapshot (<= 4 KiB of ~200-byte lines), the rest not
    assert new == old[len(lost):] and 10 <= len(new) <= HELD // 150 and len(lost) >= N - 30
    hook = ensure_webhooks(mc.cfg)
    ray.get(hook.start.remote(), timeout=60)
    kept = {f"0:{s}" for s in new}
    before = rx.ids()

    def reported() -> dict[str, Any] | None:
        st = ray.get(hook.stats.remote())["endpoints"]["crm"]
        return st if st["skipped_events"] and st["backlog"] == 0 and \
            kept <= rx.ids() else None
    st = wait_for(reported, 60, "the hole reported and the carried events delivered",
                  poll=0.3)
    gap = st["skipped"][0]
    assert gap == {"first_seq": c1 + 1, "last_seq": first - 1, "events": len(lost),
                   "exact": True}
    assert st["skipped_events"] == len(lost)
    assert rx.ids() - before == kept and rx.bad_signatures == 0
    # the events API at the same cursor: the same gap; past it, none
    assert mc.skipped({0: c1}) == {0: gap}
    assert mc.skipped({0: first - 1}) == {}
    code, page = _get_events(mc, f"0:{c1}")
    assert code == 200 and page["skipped"] == {"0": gap}
    print(f"\nsnapshot hole: {N} events after the cursor, {len(new)} carried and delivered, "
          f"{len(lost)} reported skipped exactly (seq {c1 + 1}-{first - 1}); receiver "
          f"requests {rx.requests}")
