"""The HTTP API's retry answers and its long-poll, against a real cluster (one shard of three
copies, ``queue.max_messages = 4``) with a real HTTP client (urllib).

- A full queue is 429 with ``Retry-After`` and ``reason`` "queue_full"; no quorum (both
  replicas SIGSTOPped) is 503 with ``Retry-After`` and ``reason`` "no_quorum" — the same
  reasons :class:`cluster.client.SubmitResult` carries, set where the leader and client make
  them, not matched from text.
- ``GET /v1/events?cursor=…&wait=S``: at once when events exist after the cursor; otherwise
  it answers when the first one comes, or with none after S seconds; S outside 0-30 is 400.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import pytest

from tests.conftest import pipeline_config, wait_for

pytestmark = pytest.mark.timeout(300)

SINK = "127.0.0.3"
KEY = "rmta_test_ops_key_0123456789abcdefghijklmnopqrstuv"
LIMIT = 4
RAW = (b"From: news@a.test\r\nTo: x@api.test\r\nSubject: x\r\nMessage-ID: <x@a.test>\r\n"
       b"Date: Sat, 05 Dec 2026 01:00:00 +0000\r\n\r\nbody\r\n")


@pytest.fixture(scope="module")
def api(tmp_path_factory, dns_server):
    import ray

    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.core.submission import hash_api_key
    from cluster.devservers import SmtpSink

    tmp = tmp_path_factory.mktemp("http")
    sink = SmtpSink(SINK).start()
    dns_server.add_a("mx.api.test", SINK)
    dns_server.add_mx("api.test", [(10, "mx.api.test")])
    base = pipeline_config(str(tmp / "spool"), dns_server.port, sink.port)
    ingress = parse_config({"ingress": {
        "hostname": "api.raymta.test", "http": ["127.0.0.1:0"],
        "api_key": [{"name": "ops", "key_hash": hash_api_key(KEY), "domains": ["a.test"],
                     "events": True}]}}).ingress
    cfg = replace(base, queue=replace(base.queue, shards=1, max_messages=LIMIT),
                  replication=replace(base.replication, ack_timeout=2.0), ingress=ingress)
    mc = MailCluster.connect(config=cfg, num_cpus=2)
    try:
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("ingress:"))
        actor = ray.get_actor(name, namespace=cfg.cluster.namespace)
        (host, port, _mode), = ray.get(actor.addresses.remote())
        yield {"url": f"http://{host}:{port}", "mc": mc, "cfg": cfg}
    finally:
        mc.close()
        sink.stop()


def call(api, method: str, path: str, body: object = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(api["url"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {KEY}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def msg(to: str, **kw: object) -> dict:
    return {"from": "News <news@a.test>", "recipients": [to], "subject": "hi",
            "text": "body\n", **kw}


def cursor_now(api) -> str:
    """The cursor after every event, once every message so far has finished (no more come)."""
    wait_for(lambda: all(s and s["state"] in ("delivered", "cancelled")
                         for s in api["mc"].status([e["id"] for e in api["mc"].events(0, 100_000)
                                                    if e["type"] == "Reception"])),
             60, "the messages so far finished")
    return ",".join(f"{s}:{q}" for s, q in sorted(api["mc"].next_cursor(
        api["mc"].events(0, 100_000), {0: 0}).items()))


def test_long_poll_returns_at_once_when_events_exist(api):
    code, out, _ = call(api, "POST", "/v1/messages", {"messages": [msg("lp0@api.test")]})
    assert code == 200
    t = time.monotonic()
    code, out, _ = call(api, "GET", "/v1/events?cursor=0:0&wait=20")
    assert code == 200 and out["events"] and time.monotonic() - t < 3.0


def test_long_poll_waits_for_the_next_event(api):
    cur = cursor_now(api)
    got: dict = {}

    def poll() -> None:
        t = time.monotonic()
        got["answer"] = call(api, "GET", f"/v1/events?cursor={cur}&wait=20")
        got["seconds"] = time.monotonic() - t
    th = threading.Thread(target=poll)
    th.start()
    time.sleep(1.5)
    assert "answer" not in got                   # still waiting: nothing new yet
    code, out, _ = call(api, "POST", "/v1/messages", {"messages": [msg("lp1@api.test")]})
    assert code == 200
    th.join(30)
    code, body, _ = got["answer"]
    assert code == 200 and 1.4 < got["seconds"] < 15, got["seconds"]
    assert any(e["type"] == "Reception" and e["id"] == out["results"][0]["ids"][0]
               for e in body["events"])
    assert body["cursor"] != cur


def test_long_poll_without_events_answers_empty_after_wait(api):
    cur = cursor_now(api)
    t = time.monotonic()
    code, out, _ = call(api, "GET", f"/v1/events?cursor={cur}&wait=1.5")
    took = time.monotonic() - t
    assert code == 200 and out["events"] == [] and out["cursor"] == cur
    assert 1.4 < took < 8, took


@pytest.mark.parametrize("query, field", [
    ("cursor=0:0&wait=31", "wait"), ("cursor=0:0&wait=-1", "wait"),
    ("cursor=0:0&wait=soon", "wait"), ("cursor=7:0", "cursor"), ("cursor=x", "cursor")])
def test_bad_long_poll_is_400_naming_the_field(api, query, field):
    code, out, _ = call(api, "GET", f"/v1/events?{query}")
    assert code == 400 and out["error"]["field"] == field


def test_full_queue_is_429_with_retry_after_and_reason(api):
    from cluster.client import MailCluster  # noqa: F401 - SubmitResult's home
    mc = api["mc"]
    later = time.time() + 3600        # deferred: they stay in the queue
    code, out, _ = call(api, "POST", "/v1/messages", {"messages": [
        msg(f"hold{i}@api.test", not_before=later) for i in range(LIMIT)]})
    assert code == 200, out
    held = [i for r in out["results"] for i in r["ids"]]
    try:
        code, out, headers = call(api, "POST", "/v1/messages",
                                  {"messages": [msg("full@api.test")]})
        assert code == 429 and headers.get("Retry-After") == "5", (code, out)
        err = out["results"][0]["error"]
        assert err["retryable"] and err["reason"] == "queue_full"
        r, = mc.submit([{"sender": "news@a.test", "recipients": ["full2@api.test"],
                         "raw": RAW}], retry_for=0)
        assert r.retryable and r.reason == "queue_full" and not r.accepted
    finally:
        mc.cancel(held)
    wait_for(lambda: call(api, "POST", "/v1/messages",
                          {"messages": [msg("roomagain@api.test")]})[0] == 200, 30,
             "room in the queue again")


def test_no_quorum_is_503_with_retry_after_and_reason(api):
    """Stops both replicas of the shard, then lets them go on."""
    import ray
    mc = api["mc"]
    ns = api["cfg"].cluster.namespace
    stopped: list[int] = []
    try:
        for k in (1, 2):
            pid = ray.get(ray.get_actor(f"replica:0:{k}", namespace=ns).ping.remote())
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        code, out, headers = call(api, "POST", "/v1/messages",
                                  {"messages": [msg("nq@api.test")]})
        assert code == 503 and headers.get("Retry-After") == "1", (code, out)
        err = out["results"][0]["error"]
        assert err["retryable"] and err["reason"] == "no_quorum", err
        r, = mc.submit([{"sender": "news@a.test", "recipients": ["nq2@api.test"],
                         "raw": RAW}], retry_for=0)
        assert r.retryable and r.reason == "no_quorum", r
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    wait_for(lambda: call(api, "POST", "/v1/messages",
                          {"messages": [msg("after@api.test")]})[0] == 200, 90,
             "the API to take mail again", poll=1.0)
