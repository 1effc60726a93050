"""The HTTP API, spoken to with a real HTTP client (urllib) against a real cluster.

Real parts: a local Ray with one shard of three copies and the ingress actor ``deploy`` starts
for an ``[ingress]`` section with ``http = ["127.0.0.1:0"]``, the loopback DNS, and an SMTP sink
on 127.0.0.3 that receives what is delivered. Asserted: keys (401/403), bad input named by
field (400), size (413), templates per recipient (a bad one fails only its message, with the
line), idempotency, status, cancel, events, health, the OpenAPI document, and 503 with
Retry-After while the shard has no quorum.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import pipeline_config, wait_for

pytestmark = pytest.mark.timeout(300)

SINK = "127.0.0.3"
KEY_CRM = "rmta_test_crm_key_0123456789abcdefghijklmnopqrstuv"
KEY_OPS = "rmta_test_ops_key_0123456789abcdefghijklmnopqrstuv"


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
        "hostname": "api.raymta.test", "http": ["127.0.0.1:0"], "http_max_body": "300KB",
        "api_key": [{"name": "crm", "key_hash": hash_api_key(KEY_CRM), "domains": ["a.test"]},
                    {"name": "ops", "key_hash": hash_api_key(KEY_OPS), "domains": ["a.test"],
                     "events": True}]}}).ingress
    cfg = replace(base, queue=replace(base.queue, shards=1),
                  replication=replace(base.replication, ack_timeout=2.0), ingress=ingress)
    mc = MailCluster.connect(config=cfg, num_cpus=2)
    try:
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("ingress:"))
        actor = ray.get_actor(name, namespace=cfg.cluster.namespace)
        (host, port, mode), = ray.get(actor.addresses.remote())
        assert mode == "http"
        yield {"url": f"http://{host}:{port}", "mc": mc, "sink": sink, "cfg": cfg}
    finally:
        mc.close()
        sink.stop()


def call(api, method: str, path: str, body: object = None, key: str | None = KEY_CRM,
         headers: dict[str, str] | None = None, raw: bytes | None = None
         ) -> tuple[int, dict, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                        else None)
    req = urllib.request.Request(api["url"] + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def msg(to: str, subject: str = "hello", **kw: object) -> dict:
    return {"from": "News <news@a.test>", "recipients": [to], "subject": subject,
            "text": "plain body\n", **kw}


def test_health_and_readiness(api):
    assert call(api, "GET", "/healthz", key=None)[:2] == (200, {"status": "ok"})
    code, body, _ = call(api, "GET", "/readyz", key=None)
    assert code == 200 and body["ready"] and body["shards"][0]["serving"]


@pytest.mark.parametrize("key,status,field", [
    (None, 401, "Authorization"), ("rmta_wrong", 401, "Authorization")])
def test_keys_are_required(api, key, status, field):
    code, body, headers = call(api, "POST", "/v1/messages", {"messages": [msg("x@api.test")]},
                               key=key)
    assert code == status and body["error"]["field"] == field
    assert headers.get("WWW-Authenticate") == "Bearer"


@pytest.mark.parametrize("body,raw,status,field", [
    (None, b"{not json", 400, "body"),
    ({"msgs": []}, None, 400, "messages"),
    ({"messages": []}, None, 400, "messages"),
    ({"messages": [msg("x@api.test")] * 1001}, None, 413, "messages"),
    (None, b'{"messages": [' + b'"' + b"x" * 400_000 + b'"]}', 413, "body"),
    ({"messages": [{**msg("x@api.test"), "from": "Boss <ceo@b.test>"}]}, None, 403,
     "messages[0].from"),
    ({"messages": [msg("x@api.test", sender="bounce@b.test")]}, None, 403,
     "messages[0].sender"),
])
def test_bad_requests_name_the_field(api, body, raw, status, field):
    code, out, _ = call(api, "POST", "/v1/messages", body, raw=raw)
    assert code == status and out["error"]["field"] == field, (code, out)


def test_a_batch_with_templates_and_bad_messages(api):
    messages = [
        {"from": "News <news@a.test>", "template": True,
         "recipients": [{"address": "t1@api.test", "variables": {"name": "Ann"}},
                        {"address": "t2@api.test", "variables": {"name": "Bob"}}],
         "subject": "Hello {{ name }}", "text": "Dear {{ name }},\nyour code\n",
         "html": "<p>Dear {{ name }}</p>"},
        msg("p1@api.test", "plain one"),
        {"from": "news@a.test", "template": True, "recipients": [
            {"address": "bad@api.test", "variables": {}}],
         "subject": "ok", "text": "line one\n{{ missing }}\n"},
        {"from": "news@a.test", "template": True, "recipients": [
            {"address": "inj@api.test", "variables": {"s": "hi\r\nBcc: victim@api.test"}}],
         "subject": "{{ s }}", "text": "x"},
        {"from": "news@a.test", "template": True, "recipients": [
            {"address": "esc@api.test", "variables": {}}],
         "subject": "x", "text": "{{ ''.__class__.__mro__ }}"},
        {"from": "news@a.test", "recipients": "not-a-list@api.test", "text": "x"},
        {"from": "news@a.test", "recipients": ["bad address"], "text": "x"},
        {"from": "news@a.test", "recipients": ["x@api.test"], "text": "x", "colour": "red"},
    ]
    code, out, _ = call(api, "POST", "/v1/messages", {"messages": messages})
    assert code == 200, out
    res = out["results"]
    assert [r["index"] for r in res] == list(range(len(messages)))
    assert len(res[0]["ids"]) == 2 and len(res[1]["ids"]) == 1 and not res[0]["duplicate"]
    errs = {r["index"]: r["error"] for r in res if "error" in r}
    assert set(errs) == {2, 3, 4, 5, 6, 7}, res
    assert (errs[2]["field"], errs[2]["line"]) == ("messages[2].text", 2)
    assert "undefined" in errs[2]["message"]
    assert errs[3]["field"] == "messages[3].subject" and "line break" in errs[3]["message"]
    assert errs[4]["field"] == "messages[4].text" and "sandbox" in errs[4]["message"]
    assert errs[5]["field"] == "messages[5].recipients"
    assert errs[6]["field"].startswith("messages[6].recipients") and not errs[6]["retryable"]
    assert errs[7]["field"] == "messages[7].colour"
    got = wait_for(lambda: {r.rcpt_to: r for r in api["sink"].received}
                   if {"t1@api.test", "t2@api.test", "p1@api.test"} <=
                   {r.rcpt_to for r in api["sink"].received} else None, 60, "delivery")
    assert b"Subject: Hello Ann" in got["t1@api.test"].data
    assert b"Subject: Hello Bob" in got["t2@api.test"].data
    assert b"Dear Bob," in got["t2@api.test"].data
    assert not {"bad@api.test", "inj@api.test", "esc@api.test"} & \
        {r.rcpt_to for r in api["sink"].received}


def test_idempotency_key_status_and_cancel(api):
    body = {"messages": [msg("idem@api.test")]}
    held = {"messages": [msg("held@api.test")]}
    first = call(api, "POST", "/v1/messages", body, headers={"Idempotency-Key": "order-17"})
    again = call(api, "POST", "/v1/messages", body, headers={"Idempotency-Key": "order-17"})
    assert first[0] == again[0] == 200
    assert first[1]["results"][0]["ids"] == again[1]["results"][0]["ids"]
    assert again[1]["results"][0]["duplicate"] and not first[1]["results"][0]["duplicate"]
    mid = first[1]["results"][0]["ids"][0]
    code, st, _ = call(api, "GET", f"/v1/messages/{mid}")
    assert code == 200 and st["state"], st
    assert call(api, "GET", "/v1/messages/not-an-id")[0] == 400
    assert call(api, "GET", "/v1/messages/01ARZ3NDEKTSV4RRFFQ69G5FAV")[0] == 404
    assert call(api, "GET", f"/v1/messages/{mid}", key=None)[0] == 401
    # a message held for an hour can be cancelled
    import time
    held["messages"][0]["not_before"] = time.time() + 3600
    code, out, _ = call(api, "POST", "/v1/messages", held)
    hid = out["results"][0]["ids"][0]
    code, out, _ = call(api, "DELETE", f"/v1/messages/{hid}")
    assert (code, out["result"]) == (200, "cancelled"), out
    assert call(api, "DELETE", "/v1/messages/01ARZ3NDEKTSV4RRFFQ69G5FAV")[0] == 404


def test_events_need_the_events_scope_and_follow_a_cursor(api):
    code, out, _ = call(api, "GET", "/v1/events")
    assert code == 403 and out["error"]["field"] == "Authorization"
    code, out, _ = call(api, "GET", "/v1/events?cursor=0:0&limit=5", key=KEY_OPS)
    assert code == 200 and 1 <= len(out["events"]) <= 5 and out["cursor"].startswith("0:")
    code, more, _ = call(api, "GET", f"/v1/events?cursor={out['cursor']}", key=KEY_OPS)
    assert code == 200 and all(e["seq"] > out["events"][-1]["seq"] for e in more["events"])
    assert call(api, "GET", "/v1/events?cursor=zero", key=KEY_OPS)[0] == 400


def test_the_openapi_document_is_served_and_committed(api):
    code, doc, _ = call(api, "GET", "/v1/openapi.json", key=None)
    committed = json.loads((Path(__file__).resolve().parents[1] / "docs" /
                            "openapi.json").read_text())
    assert code == 200 and doc == committed
    assert {"/v1/messages", "/v1/messages/{id}", "/v1/events", "/healthz", "/readyz"} <= \
        set(doc["paths"])


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_the_readme_curl_commands(api):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme.split("## HTTP API", 1)[1], re.S).group(1)
    groups: list[list[str]] = []
    for line in block.splitlines():   # a command, and its indented continuation lines
        if line.startswith(" ") and groups:
            groups[-1].append(line)
        else:
            groups.append([line])
    commands = ["\n".join(g).replace("https://10.0.0.5:8443", api["url"])
                .replace("example.com", "a.test").replace("example.net", "api.test")
                for g in groups if g[0].startswith("curl ")]
    assert len(commands) == 4
    env = dict(os.environ, RAYMTA_KEY=KEY_OPS)

    def run(cmd: str) -> dict:
        p = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)
    posted = run(commands[0])
    ids = posted["results"][0]["ids"]
    assert len(ids) == 2, posted
    env["MESSAGE_ID"] = ids[0]
    assert run(commands[1])["state"]
    assert "events" in run(commands[2])
    assert run(commands[3])["ready"] is True
    got = wait_for(lambda: [r for r in api["sink"].received if r.rcpt_to == "bob@api.test"],
                   60, "the README's message delivered")
    assert b"Subject: Hello Bob" in got[0].data and b"this is our news." in got[0].data


def test_the_readme_events_long_poll_runs_as_written(api, tmp_path):
    """The README's "Webhooks and the events endpoint" block, as written (only its base URL
    is this listener's): the first call prints the events kept, the second long-polls from
    the cursor the first returned and answers with the event of a message submitted while
    it waits."""
    import threading
    import time
    for tool in ("curl", "jq"):
        assert shutil.which(tool), f"{tool} is not installed (apt-get install {tool})"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Webhooks and the events endpoint", 1)[1]
    script = re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)
    assert "$(jq -r .cursor page.json)&wait=25" in script
    script = script.replace("https://10.0.0.5:8443", api["url"])
    code, out, _ = call(api, "POST", "/v1/messages", {"messages": [msg("poll1@api.test")]})
    assert code == 200, out
    id1 = out["results"][0]["ids"][0]
    mc = api["mc"]
    wait_for(lambda: (mc.status(id1) or {}).get("state") == "delivered", 60, "poll1 delivered")
    assert len(mc.events({0: 0}, 100_000)) < 900, "the first page (limit 1000) holds them all"
    before = mc.events({0: 0}, 100_000)[-1]["seq"]
    page = tmp_path / "page.json"
    id2: list[str] = []

    def submit_while_it_waits() -> None:
        wait_for(lambda: page.exists() and page.stat().st_size > 0, 30, "the first page")
        time.sleep(1.0)             # the second call is waiting by now
        id2.extend(call(api, "POST", "/v1/messages",
                        {"messages": [msg("poll2@api.test")]})[1]["results"][0]["ids"])
    t = threading.Thread(target=submit_while_it_waits)
    t.start()
    t0 = time.monotonic()
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, timeout=60,
                       env=dict(os.environ, RAYMTA_KEY=KEY_OPS), capture_output=True,
                       text=True, check=False)
    took = time.monotonic() - t0
    t.join(30)
    assert p.returncode == 0, p.stderr
    *listed, last = p.stdout.strip().splitlines()
    first = [json.loads(line) for line in listed]
    assert any(e["type"] == "Delivery" and e["id"] == id1 for e in first), first[-3:]
    assert first[-1]["seq"] == before
    polled = json.loads(last)
    assert [(e["type"], e["id"]) for e in polled["events"]][:1] == [("Reception", id2[0])]
    assert all(e["seq"] > before for e in polled["events"])
    assert polled["cursor"] == f"0:{polled['events'][-1]['seq']}"
    assert 1.0 < took < 20, took       # it waited for the event, and not for all 25 s


def test_no_quorum_is_503_with_retry_after(api):
    """Runs last: stops both replicas, then lets them go on."""
    import ray
    ns = api["cfg"].cluster.namespace
    stopped: list[int] = []
    try:
        for k in (1, 2):
            pid = ray.get(ray.get_actor(f"replica:0:{k}", namespace=ns).ping.remote())
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        code, out, headers = call(api, "POST", "/v1/messages", {"messages": [msg("nq@api.test")]})
        assert code == 503 and headers.get("Retry-After") == "1", (code, out)
        assert out["results"][0]["error"]["retryable"]
        code, out, _ = call(api, "GET", "/readyz", key=None)
        assert code in (200, 503)    # readiness follows the leader's own view of its copies
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    wait_for(lambda: call(api, "POST", "/v1/messages",
                          {"messages": [msg("after@api.test")]})[0] == 200, 90,
             "the API to take mail again", poll=1.0)
