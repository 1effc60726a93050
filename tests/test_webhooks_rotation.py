"""Event files are held back for a webhook endpoint that is behind, up to
``spool.event_retain_bytes``; past that it is told exactly what it lost, never skipped
silently (cluster/core/event_retention.py, actors/webhooks.py, EventLog in
cluster/adapters/eventlog.py).

Real parts: a local Ray with one shard whose event files rotate at 4 KB with two kept and at
most 32 KiB (8 files) held for endpoints, the webhook dispatcher, and a real aiohttp receiver
on loopback (tests/test_webhooks_cluster.py's, which fails some requests). Each phase stops
the dispatcher, submits messages with ``not_before`` an hour ahead (so each makes exactly one
event, its Reception) in commits of 25 that rotate the files between them, and starts a new
dispatcher, which resumes from the endpoint's committed cursor.
What must hold:
- 150 events behind (~6 files, within the cap): the files stay, the endpoint gets all 150 and
  nothing is skipped; once it has acknowledged them, the files held for it go at the next
  rotation (nothing else holds them: a reader of ``GET /v1/events`` has no committed cursor).
- 400 events behind (~16 files, past the cap): the oldest are deleted, the shard names the
  endpoint that held them (``stats()["event_retention"]``, an error in its log, a metric), the
  endpoint is told exactly how many events are gone and which seqs they spanned, the receiver
  gets exactly the events still in the files, and a reader of ``GET /v1/events`` at the same
  cursor gets the same count as ``skipped``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest

from tests.conftest import pipeline_config, raw_message, wait_for
from tests.test_webhooks_cluster import HOOK_HOST, SECRET, Receiver

pytestmark = pytest.mark.timeout(180)

N = 150              # phase 1: within the cap
N2 = 400             # phase 2: past it
FILE = 4096
CAP = 8 * FILE


def webhook_env(spool_dir: str, dns_server: Any, sinks: Any,
                **spool: Any) -> Iterator[dict[str, Any]]:
    """One shard on a local Ray, an endpoint ``crm`` selecting Receptions posting to a
    Receiver, ``spool`` settings replaced (shared by tests/test_webhooks_snapshot_gap.py)."""
    from cluster.client import MailCluster
    from cluster.config import parse_config
    rx = Receiver().start()
    hooks = parse_config({"webhooks": [{
        "name": "crm", "url": f"http://{HOOK_HOST}:{rx.port}/hook", "secret": SECRET,
        "events": ["accepted"], "batch_size": 25, "timeout": "500ms",
        "retry_initial": "100ms", "retry_max_delay": "400ms"}]}).webhooks
    cfg = replace(pipeline_config(spool_dir, dns_server.port, sinks.port), webhooks=hooks)
    cfg = replace(cfg, queue=replace(cfg.queue, shards=1), spool=replace(cfg.spool, **spool))
    mc = MailCluster.connect(config=cfg, num_cpus=2)
    try:
        yield {"mc": mc, "rx": rx}
    finally:
        mc.close()
        rx.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server, sinks):
    yield from webhook_env(str(tmp_path_factory.mktemp("spool")), dns_server, sinks,
                           event_file_bytes=FILE, event_files_kept=2, event_retain_bytes=CAP)


def _get_events(mc: Any, cursor: str) -> tuple[int, dict[str, Any]]:
    """GET /v1/events from an HTTP API listener of this process on the same cluster."""
    import json
    import urllib.request

    from cluster.config import parse_config
    from cluster.core.submission import hash_api_key
    from cluster.ingress_http import HttpIngress
    key = "rmta_rotation_0123456789abcdef0123"
    ing = parse_config({"ingress": {"http": ["127.0.0.1:0"], "api_key": [
        {"name": "ops", "key_hash": hash_api_key(key), "domains": ["a.test"],
         "events": True}]}}).ingress
    api = HttpIngress(mc, ing).start([("127.0.0.1", 0)])
    try:
        host, port = api.addresses[0]
        req = urllib.request.Request(f"http://{host}:{port}/v1/events?cursor={cursor}",
                                     headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    finally:
        api.stop()


def _stop_dispatcher(mc: Any) -> None:
    import ray

    from actors.webhooks import WEBHOOKS_NAME
    ray.kill(ray.get_actor(WEBHOOKS_NAME, namespace=mc.cfg.cluster.namespace), no_restart=True)


def _submit_later(mc: Any, n: int, tag: str) -> None:
    """``n`` messages due in an hour (one event each), in commits of 25."""
    later = time.time() + 3600
    msgs = [{"sender": "sender@origin.test", "recipients": [f"{tag}{i}@later.test"],
             "raw": raw_message(i, f"{tag}{i}@later.test", size=300), "not_before": later}
            for i in range(n)]
    for k in range(0, n, 25):      # the event files rotate between commits
        res = mc.submit(msgs[k:k + 25])
        assert all(r.accepted for r in res), [r.error for r in res if not r.accepted][:3]


def _wait_acknowledged(mc: Any, leader: Any) -> int:
    """Until the endpoint's committed cursor passes the shard's last event; returns it."""
    import ray
    last = mc.events({0: 0}, 100_000)[-1]["seq"]

    def cursor() -> int | None:
        c = ray.get(leader.webhook_cursors.remote()).get("crm")   # None: not opened yet
        return c if c is not None and c >= last else None
    return wait_for(cursor, 60, "the cursor past every event", poll=0.2)


def _retention(leader: Any) -> dict[str, Any]:
    import ray
    return ray.get(leader.stats.remote())["event_retention"]


def test_an_endpoint_behind_rotation_within_the_cap_gets_every_event(env):
    import ray

    from actors.webhooks import ensure_webhooks
    mc, rx = env["mc"], env["rx"]
    leader = mc.coordinators[0]
    # the endpoint's cursor is committed at the end of the log when the dispatcher first runs
    c0 = wait_for(lambda: ray.get(leader.webhook_cursors.remote()).get("crm"), 30,
                  "the endpoint's first cursor")
    _stop_dispatcher(mc)
    _submit_later(mc, N, "r")
    evs = mc.events({0: c0}, 100_000)
    assert [e["type"] for e in evs] == ["Reception"] * N      # all still in the files
    assert mc.skipped({0: c0}) == {}
    held = _retention(leader)
    assert held["held_files"] >= 2 and 0 < held["held_bytes"] <= CAP, held
    assert held["capped_files"] == 0
    from cluster.cli import retention_line  # what `raymta status` prints for the shard
    assert retention_line(held) == (f"  event files held for webhook endpoints: "
                                    f"{held['held_files']} ({held['held_bytes']} bytes of "
                                    f"spool.event_retain_bytes)")
    line_bytes = sum(len(orjson.dumps({k: v for k, v in e.items() if k != "shard"})) + 1
                     for e in evs) / len(evs)
    want = {f"0:{e['seq']}" for e in evs}
    # (kept in env: a dispatcher made by this driver lives while a handle to it does)
    hook = env["hook"] = ensure_webhooks(mc.cfg)
    ray.get(hook.start.remote(), timeout=60)
    last = max(e["seq"] for e in evs)
    wait_for(lambda: want <= rx.ids() and
             ray.get(leader.webhook_cursors.remote())["crm"] >= last, 60,
             "every event delivered and acknowledged", poll=0.3)
    st = ray.get(hook.stats.remote())["endpoints"]["crm"]
    assert st["skipped_events"] == 0 and st["skipped"] == {}
    assert rx.ids() == want and rx.bad_signatures == 0
    # acknowledged: the files held for it go at the next rotation (a commit or two of new
    # events, each acknowledged before the next, so that no new file is held for it)
    for k in range(4):
        _submit_later(mc, 25, f"s{k}-")
        _wait_acknowledged(mc, leader)
        if _retention(leader)["held_files"] == 0:
            break
    assert _retention(leader)["held_files"] == 0, _retention(leader)
    # ... while a reader of the events API still at c0 held nothing: it is told what it lost
    gone = mc.skipped({0: c0})[0]
    assert gone["first_seq"] == c0 + 1 and gone["events"] > 0, gone
    print(f"\nretention: {N} events behind (~{line_bytes:.0f} bytes a line), "
          f"{held['held_files']} files ({held['held_bytes']} bytes) held; all {len(want)} delivered, none skipped; receiver requests "
          f"{rx.requests}")


def test_an_endpoint_behind_the_cap_gets_the_gap_reported_exactly(env):
    import ray

    from actors.webhooks import ensure_webhooks
    mc, rx = env["mc"], env["rx"]
    leader = mc.coordinators[0]
    before = rx.ids()
    wait_for(lambda: ray.get(env["hook"].stats.remote())["endpoints"]["crm"]["backlog"] == 0,
             60, "the dispatcher caught up")
    c1 = _wait_acknowledged(mc, leader)
    _stop_dispatcher(mc)
    _submit_later(mc, N2, "t")
    evs = mc.events({0: c1}, 100_000)
    assert {e["type"] for e in evs} == {"Reception"}
    kept = {f"0:{e['seq']}" for e in evs}
    assert 0 < len(kept) < N2, len(kept)           # the oldest went at the cap
    first_kept = min(e["seq"] for e in evs)
    ret = _retention(leader)
    assert ret["capped_files"] > 0 and ret["last_capped"]["endpoints"] == ["crm"], ret
    assert 0 < ret["held_bytes"] <= CAP
    from cluster.cli import retention_line
    line = retention_line(mc.stats()["shards"][0]["event_retention"])
    assert line is not None and line.endswith(
        f"; {ret['capped_files']} deleted at the cap, the last before crm acknowledged them")
    # a new dispatcher resumes from the committed cursor c1: the events after it are gone
    hook = ensure_webhooks(mc.cfg)
    ray.get(hook.start.remote(), timeout=60)

    def reported() -> dict[str, Any] | None:
        st = ray.get(hook.stats.remote())["endpoints"]["crm"]
        return st if st["skipped_events"] and st["backlog"] == 0 and \
            kept <= rx.ids() else None
    st = wait_for(reported, 60, "the gap reported and the kept events delivered", poll=0.3)
    assert st["skipped_events"] == N2 - len(kept)
    gap = st["skipped"][0]
    assert (gap["first_seq"], gap["events"], gap["exact"]) == (c1 + 1, N2 - len(kept), True)
    assert c1 < gap["last_seq"] < first_kept
    assert rx.ids() - before == kept and rx.bad_signatures == 0
    # a reader of the events API at the same cursor is told the same, a reader past it nothing
    assert mc.skipped({0: c1}) == {0: gap}
    assert mc.skipped({0: first_kept - 1}) == {}
    code, page = _get_events(mc, f"0:{c1}")
    assert code == 200 and page["skipped"] == {"0": gap}
    assert [e["seq"] for e in page["events"]][:1] == [first_kept]
    print(f"\nretention cap: {N2} events after the cursor, {ret['held_bytes']} bytes held at "
          f"the {CAP}-byte cap, {len(kept)} kept and delivered, {st['skipped_events']} "
          f"reported skipped (seq {c1 + 1}-{gap['last_seq']}); receiver requests {rx.requests}")
