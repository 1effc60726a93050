"""Webhooks survive the loss of the node the dispatcher runs on.

Real parts: a two-node ``ray.cluster_utils.Cluster`` (the queue on the head; the webhook
dispatcher placed on the worker, with the head as its fallback, the way shard copies are
placed), the loopback DNS and SMTP sinks, and the aiohttp receiver of
tests/test_webhooks_cluster.py (failing every 4th request, answering every 7th too late).
Mid-run the worker node is removed: Ray restarts the dispatcher on the head, it resumes from
the cursor committed in the shard, and the receiver gets every selected event at least once;
the event ids de-duplicate to exactly the selected events the shard holds.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest

from tests.conftest import multinode, pipeline_config, pipeline_zone, raw_message, wait_for
from tests.test_webhooks_cluster import HOOK_HOST, SECRET, SELECTED, Receiver

# own_ray: a ray.cluster_utils.Cluster of its own
pytestmark = [pytest.mark.timeout(120), pytest.mark.own_ray]



def _node_of(hook: object) -> str:
    import ray
    return ray.get(hook.stats.remote(), timeout=60)["node"]   # type: ignore[attr-defined]


def test_dispatcher_node_removed_every_selected_event_arrives(tmp_path, dns_server, sinks):
    import ray

    from actors.remote import _affinity
    from actors.webhooks import WEBHOOKS_NAME, RemoteWebhookDispatcher
    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.deploy import deploy

    rx = Receiver().start()
    hooks = parse_config({"webhooks": [{
        "name": "crm", "url": f"http://{HOOK_HOST}:{rx.port}/hook", "secret": SECRET,
        "events": ["accepted", "delivered", "bounced"], "batch_size": 20, "timeout": "500ms",
        "retry_initial": "100ms", "retry_max_delay": "400ms"}]}).webhooks
    domains = pipeline_zone(dns_server)
    base = pipeline_config(str(tmp_path / "spool"), dns_server.port, sinks.port)
    cfg = replace(base, webhooks=hooks, queue=replace(base.queue, shards=1))
    ns = cfg.cluster.namespace
    stack = contextlib.ExitStack()
    try:
        cluster = stack.enter_context(multinode(ns, head_cpus=2))
        handles = deploy(cfg)           # everything on the head, the dispatcher too
        mc = MailCluster(cfg, [handles["coordinator:0"]], handles=handles)
        head = ray.get_runtime_context().get_node_id()
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        # the dispatcher moves to the worker (fallback: anywhere else, i.e. the head)
        ray.kill(handles[WEBHOOKS_NAME], no_restart=True)
        wait_for(lambda: WEBHOOKS_NAME not in {a["name"] for a in
                                               ray.util.list_named_actors(all_namespaces=True)},
                 30, "the first dispatcher gone")
        hook = RemoteWebhookDispatcher.options(
            name=WEBHOOKS_NAME, namespace=ns, **_affinity(worker.node_id)).remote(cfg)
        ray.get(hook.start.remote(), timeout=60)
        assert _node_of(hook) == worker.node_id

        def submit(start: int, n: int) -> list[str]:
            rcpts = [f"n{i}@{domains[i % 5]}" for i in range(start, start + n)]
            res = mc.submit([{"sender": "sender@origin.test", "recipients": [r],
                              "raw": raw_message(i, r, size=300)}
                             for i, r in zip(range(start, start + n), rcpts, strict=True)])
            assert all(r.accepted for r in res), [r.error for r in res if not r.accepted][:3]
            return [i for r in res for i in r.ids]
        ids = submit(0, 60)
        wait_for(lambda: len(rx.ids()) >= 20, 30, "the first webhook batches")
        cluster.remove_node(worker)
        ids += submit(100, 60)
        wait_for(lambda: all(s is not None and s["state"] == "delivered"
                             for s in mc.status(ids)), 60, "every message delivered")
        want = {f"0:{e['seq']}" for e in mc.events({0: 0}, 100_000) if e["type"] in SELECTED}
        assert len(want) >= 2 * len(ids)          # a Reception and a Delivery each
        wait_for(lambda: want <= rx.ids(), 60, "every selected event at the receiver",
                 poll=0.5)
        assert rx.ids() == want and rx.bad_signatures == 0
        assert _node_of(hook) == head   # restarted on the node that is left
        print(f"\nnode loss: {len(want)} selected events, {len(rx.received)} received "
              f"({len(rx.received) - len(want)} repeats), {rx.requests} requests, "
              f"{rx.failed} failed")
    finally:
        stack.close()      # Ray and every node
        rx.stop()
