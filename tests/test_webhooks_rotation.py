"""A webhook endpoint that falls behind event-file rotation is told what it lost, never
skipped silently (actors/webhooks.py, EventLog.gap in cluster/adapters/eventlog.py).

Real parts: a local Ray with one shard whose event files rotate at 4 KB with two kept, the
webhook dispatcher, and a real aiohttp receiver on loopback (tests/test_webhooks_cluster.py's,
which fails some requests). The dispatcher is stopped, 150 messages are submitted with
``not_before`` an hour ahead (so each makes exactly one event, its Reception), in six commits
that rotate most of them out of the files (within the 4 × 2 seq lists that keep the count
exact); a new dispatcher resumes from the endpoint's committed cursor.
What must hold: it reports, for the endpoint, exactly the number of events that are gone and
the seqs they spanned; the receiver gets exactly the events still in the files; and a reader
of ``GET /v1/events`` at the same cursor gets the same count as ``skipped``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest

from tests.conftest import pipeline_config, raw_message, wait_for
from tests.test_webhooks_cluster import HOOK_HOST, SECRET, Receiver

pytestmark = pytest.mark.timeout(120)

N = 150


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server, sinks):
    from cluster.client import MailCluster
    from cluster.config import parse_config
    rx = Receiver().start()
    hooks = parse_config({"webhooks": [{
        "name": "crm", "url": f"http://{HOOK_HOST}:{rx.port}/hook", "secret": SECRET,
        "events": ["accepted"], "batch_size": 25, "timeout": "500ms",
        "retry_initial": "100ms", "retry_max_delay": "400ms"}]}).webhooks
    cfg = replace(pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port,
                                  sinks.port), webhooks=hooks)
    cfg = replace(cfg, queue=replace(cfg.queue, shards=1),
                  spool=replace(cfg.spool, event_file_bytes=4096, event_files_kept=2))
    mc = MailCluster.connect(config=cfg, num_cpus=2)
    try:
        yield {"mc": mc, "rx": rx}
    finally:
        mc.close()
        rx.stop()


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


def test_an_endpoint_behind_rotation_gets_the_gap_reported_exactly(env):
    import ray

    from actors.webhooks import WEBHOOKS_NAME, ensure_webhooks
    mc, rx = env["mc"], env["rx"]
    ns = mc.cfg.cluster.namespace
    leader = mc.coordinators[0]
    # the endpoint's cursor is committed at the end of the log when the dispatcher first runs
    c0 = wait_for(lambda: ray.get(leader.webhook_cursors.remote()).get("crm"), 30,
                  "the endpoint's first cursor")
    ray.kill(ray.get_actor(WEBHOOKS_NAME, namespace=ns), no_restart=True)
    later = time.time() + 3600
    msgs = [{"sender": "sender@origin.test", "recipients": [f"r{i}@later.test"],
             "raw": raw_message(i, f"r{i}@later.test", size=300), "not_before": later}
            for i in range(N)]
    for k in range(0, N, 25):      # six commits: the event files rotate between them
        res = mc.submit(msgs[k:k + 25])
        assert all(r.accepted for r in res), [r.error for r in res if not r.accepted][:3]
    evs = mc.events({0: c0}, 100_000)
    assert {e["type"] for e in evs} == {"Reception"}
    kept = {f"0:{e['seq']}" for e in evs}
    assert 0 < len(kept) < N // 2, len(kept)       # most were rotated out
    first_kept = min(e["seq"] for e in evs)
    # a new dispatcher resumes from the committed cursor c0: the events after it are gone
    hook = ensure_webhooks(mc.cfg)
    ray.get(hook.start.remote(), timeout=60)

    def reported() -> dict[str, Any] | None:
        st = ray.get(hook.stats.remote())["endpoints"]["crm"]
        return st if st["skipped_events"] and st["backlog"] == 0 and \
            kept <= rx.ids() else None
    st = wait_for(reported, 60, "the gap reported and the kept events delivered", poll=0.3)
    assert st["skipped_events"] == N - len(kept)
    gap = st["skipped"][0]
    assert (gap["first_seq"], gap["events"], gap["exact"]) == (c0 + 1, N - len(kept), True)
    assert c0 < gap["last_seq"] < first_kept
    assert rx.ids() == kept and rx.bad_signatures == 0
    # a reader of the events API at the same cursor is told the same, a reader past it nothing
    assert mc.skipped({0: c0}) == {0: gap}
    assert mc.skipped({0: first_kept - 1}) == {}
    code, page = _get_events(mc, f"0:{c0}")
    assert code == 200 and page["skipped"] == {"0": gap}
    assert [e["seq"] for e in page["events"]][:1] == [first_kept]
    print(f"\nrotation: {N} events after the cursor, {len(kept)} kept and delivered, "
          f"{st['skipped_events']} reported skipped (seq {c0 + 1}-{gap['last_seq']}); receiver requests {rx.requests}")
