"""Webhooks on a real local Ray with two shards, posting to a real aiohttp server on loopback
that fails some requests (500s, answers slower than the endpoint's timeout).

Messages are delivered to real SMTP sinks through the loopback DNS; meanwhile the webhook
dispatcher is SIGKILLed and then shard 0's leader is SIGKILLed. Every selected event the shards
hold arrives at the receiver at least once, every request's signature verifies, the received
``event_id`` values de-duplicate to exactly the set of selected events, events of other types
are never sent, and the backlog goes back to 0 with the cursors committed in the shards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from dataclasses import replace
from typing import Any

import pytest

from tests.conftest import faults_reply, pipeline_config, pipeline_zone, raw_message, wait_for

pytestmark = pytest.mark.timeout(300)

HOOK_HOST = "127.0.0.71"
SECRET = "webhook-test-secret-0123456789"
SELECTED = {"Reception", "Delivery", "Bounce"}


class Receiver:
    """An aiohttp server that records signed batches and fails every 4th request with a 500
    and every 7th by answering after the dispatcher's timeout."""

    def __init__(self) -> None:
        self.requests = 0
        self.failed = 0
        self.bad_signatures = 0
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._runner: Any = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        from cluster.core.webhooks import verify
        body = await request.read()
        with self.lock:
            self.requests += 1
            n = self.requests
        if n % 4 == 0:
            self.failed += 1
            return web.Response(status=500, text="try later")
        if n % 7 == 0:
            self.failed += 1
            await asyncio.sleep(1.5)          # past the 0.5 s timeout: counts as failed
        if not verify([SECRET.encode()], request.headers.get("X-Raymta-Signature", ""), body,
                      time.time()):
            self.bad_signatures += 1
            return web.Response(status=400)
        doc = json.loads(body)
        with self.lock:
            self.received.extend(doc["events"])
        return web.json_response({"ok": True})

    def start(self) -> "Receiver":
        from aiohttp import web

        async def up() -> None:
            app = web.Application()
            app.router.add_post("/hook", self.handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, HOOK_HOST, 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]

        self._thread.start()
        asyncio.run_coroutine_threadsafe(up(), self.loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def ids(self) -> set[str]:
        with self.lock:
            return {e["event_id"] for e in self.received}


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server, sinks):
    from cluster.client import MailCluster
    from cluster.config import parse_config
    rx = Receiver().start()
    hooks = parse_config({"webhooks": [{
        "name": "crm", "url": f"http://{HOOK_HOST}:{rx.port}/hook", "secret": SECRET,
        "events": ["accepted", "delivered", "bounced"], "batch_size": 25, "concurrency": 3,
        "timeout": "500ms", "retry_initial": "100ms", "retry_max_delay": "400ms",
        "retry_for": "10m"}]}).webhooks
    domains = pipeline_zone(dns_server)
    sinks.rcpt_reply = faults_reply      # unknown*@: 550 5.1.1, a bounce
    cfg = replace(pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port,
                                  sinks.port), webhooks=hooks)
    cfg = replace(cfg, queue=replace(cfg.queue, shards=2))
    mc = MailCluster.connect(config=cfg, num_cpus=2)
    try:
        yield {"mc": mc, "rx": rx, "domains": domains}
    finally:
        mc.close()
        rx.stop()


def _submit(mc: Any, domains: list[str], start: int, n: int, prefix: str = "w") -> list[str]:
    msgs = [{"sender": "sender@origin.test", "recipients": [f"{prefix}{i}@{domains[i % 5]}"],
             "raw": raw_message(i, f"{prefix}{i}@{domains[i % 5]}", size=300)}
            for i in range(start, start + n)]
    res = mc.submit(msgs)
    assert all(r.accepted for r in res), [r.error for r in res if not r.accepted][:3]
    return [i for r in res for i in r.ids]


def _pid(actor: Any) -> int:
    import ray
    return ray.get(actor.ping.remote(), timeout=60)


def test_every_selected_event_arrives_signed_through_dispatcher_and_leader_kills(env):
    import ray

    from actors.webhooks import WEBHOOKS_NAME
    mc, rx, domains = env["mc"], env["rx"], env["domains"]
    hook = ray.get_actor(WEBHOOKS_NAME, namespace=mc.cfg.cluster.namespace)
    ids = _submit(mc, domains, 0, 120)
    ids += [mid for mid in _submit(mc, domains, 120, 3, prefix="unknown")]   # bounced (550)
    # the dispatcher dies mid-run: Ray restarts it, it resumes from the committed cursors
    old = _pid(hook)
    wait_for(lambda: len(rx.ids()) > 20, 60, "the first webhook batches")
    os.kill(old, signal.SIGKILL)
    ids += _submit(mc, domains, 200, 120)
    wait_for(lambda: _pid(hook) != old, 60, "the dispatcher to be restarted")
    # then shard 0's leader dies mid-run
    leader = mc.coordinators[0]
    lpid = _pid(leader)
    os.kill(lpid, signal.SIGKILL)
    ids += _submit(mc, domains, 400, 120)
    wait_for(lambda: _pid(leader) != lpid, 60, "shard 0's leader to be restarted")

    def finished() -> bool:
        st = mc.status(ids)
        return all(s is not None and s["state"] in ("delivered", "bounced") for s in st)
    t0 = time.time()
    wait_for(finished, 120, "every message delivered or bounced")
    print(f"\nfinished after {time.time() - t0:.1f}s")

    def selected() -> set[str]:
        return {f"{e['shard']}:{e['seq']}" for e in mc.events({0: 0, 1: 0}, 100_000)
                if e["type"] in SELECTED}
    want = selected()
    wait_for(lambda: want <= rx.ids(), 120, "every selected event at the receiver", poll=0.5)
    print(f"all at the receiver after {time.time() - t0:.1f}s")
    got = rx.ids()
    assert got == want, (sorted(got - want)[:5], sorted(want - got)[:5])
    with rx.lock:
        types = {e["type"] for e in rx.received}
        by_msg = {(e["id"], e["type"]) for e in rx.received}
    assert types <= SELECTED and "Delivery" in types and "Bounce" in types
    for mid in ids:       # each message: its acceptance and its outcome
        assert (mid, "Reception") in by_msg
        assert (mid, "Delivery") in by_msg or (mid, "Bounce") in by_msg
    assert rx.bad_signatures == 0
    assert rx.failed > 5          # the faults did happen, and were retried
    # the backlog drains and the cursors are committed in the shards (their replicated state)

    def drained() -> dict[str, Any] | None:
        st = ray.get(hook.stats.remote())["endpoints"]["crm"]
        return st if st["backlog"] == 0 and st["behind_records"] == 0 else None
    st = wait_for(drained, 60, "the webhook backlog to drain", poll=0.5)
    for shard, c in enumerate(mc.coordinators):
        cur = ray.get(c.webhook_cursors.remote())["crm"]
        assert cur >= max(int(e.split(":")[1]) for e in want if e.startswith(f"{shard}:"))
    assert st["failures"] >= 1
    n = len(rx.received)
    print(f"\nwebhooks: {len(want)} selected events, {n} received "
          f"({n - len(got)} repeats), {rx.requests} requests of which {rx.failed} failed; "
          f"{len(ids)} messages")
