"""SMTP ingress behind HAProxy: two ingress nodes, the PROXY protocol, and a node's listener
SIGKILLed while mail flows.

Real parts: a two-node ``ray.cluster_utils.Cluster`` (both nodes ``role=ingress``, one
labelled ``ingress-address=127.0.0.21``, the other ``127.0.0.22``: one ``[ingress]`` config,
each node's listener on its own address and the same port), one shard of three copies,
Debian's HAProxy in TCP mode on 127.0.0.20 with ``send-proxy-v2`` and SMTP health checks
(which arrive as PROXY v2 LOCAL), smtplib submitters on 127.0.0.31-33, the loopback DNS and an
SMTP sink on 127.0.0.2 receiving what raymta delivers.

What must hold: through HAProxy, with one node's ingress actor SIGKILLed mid-run, the
submitter sees only 4xx replies or dropped connections (which it retries), never a 5xx, and
the sink receives every message the submitter was told 250 for; the Received field names the
submitter's own address from the PROXY header, not HAProxy's. Directly against a PROXY
listener: a connection from outside ``proxy_networks``, garbage instead of a header and a
silent client are closed without a greeting; per-IP connection limits count the address the
header names.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import pipeline_config, wait_for

# own_ray: a ray.cluster_utils.Cluster of its own
pytestmark = [pytest.mark.timeout(180), pytest.mark.own_ray]

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LB = "127.0.0.20"                       # HAProxy: its frontend and its source address
NODES = ["127.0.0.21", "127.0.0.22"]    # the two ingress nodes' listener addresses
CLIENTS = ["127.0.0.31", "127.0.0.32", "127.0.0.33"]
SINK = "127.0.0.2"
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")
MESSAGES = 240
PER_IP = 3
API_KEY = "rmta_lbtest_0123456789abcdef0123456789"


def _free_port(*hosts: str) -> int:
    """A port free on every one of ``hosts``."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for h in hosts[1:]:
                with socket.socket() as s:
                    s.bind((h, port))
            return port
        except OSError:
            continue
    raise AssertionError(f"no port free on all of {hosts}")


def _haproxy_config(front: int, port: int, stats: str, hfront: int, hport: int) -> str:
    servers = "\n".join(
        f"    server n{i + 1} {a}:{port} check inter 300ms fall 2 rise 2 "
        "send-proxy-v2 check-send-proxy" for i, a in enumerate(NODES))
    hservers = "\n".join(f"    server h{i + 1} {a}:{hport} check inter 300ms fall 2 rise 2"
                          for i, a in enumerate(NODES))
    return f"""global
    maxconn 256
    stats socket {stats} level admin
defaults
    mode tcp
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 2
    option redispatch
frontend smtp
    bind {LB}:{front}
    default_backend ingress
backend ingress
    balance roundrobin
    source {LB}
    option smtpchk EHLO haproxy.test
{servers}
frontend api
    mode http
    bind {LB}:{hfront}
    default_backend api
backend api
    mode http
    balance roundrobin
    source {LB}
    option forwardfor
    option httpchk GET /readyz
    http-check expect status 200
{hservers}
"""


def _servers_up(stats: str, backend: str = "ingress") -> set[str]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(stats)
        s.sendall(f"show servers state {backend}\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    # columns: be_id be_name srv_id srv_name srv_addr srv_op_state (2 = running) ...
    return {f[3] for f in (line.split() for line in out.decode().splitlines())
            if len(f) > 5 and f[1] == backend and f[5] == "2"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, dns_server):
    import ray
    from ray.cluster_utils import Cluster

    from cluster.config import parse_config
    from cluster.deploy import NODE_HEALTH, RAY_SYSTEM_CONFIG, deploy
    from cluster.core.submission import hash_api_key
    from cluster.devservers import SmtpSink

    assert os.path.exists(HAPROXY), "HAProxy is not installed (apt-get install haproxy)"
    tmp = tmp_path_factory.mktemp("haproxy")
    port, front = _free_port(*NODES), _free_port(LB)
    hport, hfront = _free_port(*NODES), _free_port(LB)
    saved = RAY_ADDRESS_FILE.read_bytes() if RAY_ADDRESS_FILE.exists() else None
    sink = SmtpSink(SINK).start()
    cluster = proxy = None
    try:
        dns_server.add_a("mx.lb.test", SINK)
        dns_server.add_mx("lb.test", [(10, "mx.lb.test")])
        base = pipeline_config(str(tmp / "spool"), dns_server.port, sink.port)
        ingress = parse_config({"ingress": {
            "hostname": "mx.raymta.test", "auth": False,
            # one config for both nodes: each binds its ingress-address label instead
            "submission": [f"127.0.0.1:{port}"],
            "proxy_protocol": True, "proxy_networks": [f"{LB}/32"], "proxy_timeout": "1s",
            "max_connections_per_ip": PER_IP,
            "http": [f"127.0.0.1:{hport}"],
            "api_key": [{"name": "lb", "key_hash": hash_api_key(API_KEY),
                         "domains": ["origin.test"]}]}}).ingress
        cfg = replace(base, queue=replace(base.queue, shards=1),
                      replication=replace(base.replication, ack_timeout=2.0), ingress=ingress)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False,
            "labels": {"role": "ingress", "ingress-address": NODES[0]},
            "_system_config": {**RAY_SYSTEM_CONFIG, **NODE_HEALTH}})
        cluster.add_node(num_cpus=1, labels={"role": "ingress", "ingress-address": NODES[1]})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=cfg.cluster.namespace, log_to_driver=False)
        handles = deploy(cfg)
        labels = {n["NodeID"]: (n.get("Labels") or {}).get("ingress-address")
                  for n in ray.nodes() if n["Alive"]}
        actors = {labels[nid]: h for name, h in handles.items() if name.startswith("ingress:")
                  for nid in labels if name == f"ingress:{nid[:12]}"}
        assert set(actors) == set(NODES), actors
        for a, h in actors.items():
            assert ray.get(h.addresses.remote()) == [(a, port, "plain"), (a, hport, "http")]
        stats = str(tmp / "haproxy.sock")
        conf = tmp / "haproxy.cfg"
        conf.write_text(_haproxy_config(front, port, stats, hfront, hport))
        check = subprocess.run([HAPROXY, "-c", "-f", str(conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(conf)], stdout=subprocess.DEVNULL,
                                 stderr=open(tmp / "haproxy.log", "wb"))
        wait_for(lambda: os.path.exists(stats) and _servers_up(stats) == {"n1", "n2"} and
                 _servers_up(stats, "api") == {"h1", "h2"}, 30,
                 "HAProxy to see both ingress nodes up")
        yield {"cfg": cfg, "sink": sink, "actors": actors, "port": port, "front": front,
               "hfront": hfront,
               "stats": stats, "ray": ray, "log": tmp / "haproxy.log",
               "ray_logs": Path(cluster.head_node.get_session_dir_path()) / "logs"}
    finally:
        if proxy is not None:
            proxy.terminate()
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            RAY_ADDRESS_FILE.unlink(missing_ok=True)
        else:
            RAY_ADDRESS_FILE.write_bytes(saved)
        sink.stop()


def _message(i: int) -> tuple[str, bytes]:
    rcpt = f"m{i}@lb.test"
    return rcpt, (f"From: <s@origin.test>\r\nTo: <{rcpt}>\r\nSubject: lb {i}\r\n"
                  f"Message-ID: <lb{i}@origin.test>\r\n\r\nmessage {i}\r\n").encode()


def test_haproxy_in_front_a_killed_node_costs_only_retries(env):
    ray = env["ray"]
    acked: set[str] = set()
    permanent: list[tuple[str, int, bytes]] = []
    retries = {"4xx": 0, "dropped": 0}
    lock = threading.Lock()
    deadline = time.time() + 60

    def submitter(k: int) -> None:
        todo = list(range(k, MESSAGES, len(CLIENTS)))
        c: smtplib.SMTP | None = None
        sent_here = 0
        while todo:
            assert time.time() < deadline, f"{len(todo)} messages never accepted"
            rcpt, data = _message(todo[0])
            try:
                if c is None:
                    c = smtplib.SMTP(LB, env["front"], timeout=15,
                                     source_address=(CLIENTS[k], 0))
                    c.ehlo("submitter.test")
                    sent_here = 0
                code, text = c.mail("s@origin.test")
                if code == 250:
                    code, text = c.rcpt(rcpt)
                if code == 250:
                    code, text = c.data(data)
                else:
                    c.rset()
            except (smtplib.SMTPServerDisconnected, ConnectionError, OSError) as e:
                # a 421 on connect shows up here too (smtplib closes and raises)
                with lock:
                    retries["dropped"] += 1
                code, text, c = -1, str(e).encode(), None
            if code == 250:
                with lock:
                    acked.add(rcpt)
                todo.pop(0)
                sent_here += 1
                if sent_here >= 5 and c is not None:   # new sessions spread over the nodes
                    try:
                        c.quit()
                    except smtplib.SMTPException:
                        pass
                    c = None
            elif code >= 500:
                with lock:
                    permanent.append((rcpt, code, text))
                todo.pop(0)
            else:
                if code >= 400:
                    with lock:
                        retries["4xx"] += 1
                    c = None      # a 421 closed it; anything else: start afresh
                time.sleep(0.05)
        if c is not None:
            try:
                c.quit()
            except smtplib.SMTPException:
                pass

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(len(CLIENTS))]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= MESSAGES // 3, 40, "a third of the messages accepted")
    before = {a: ray.get(h.stats.remote()) for a, h in env["actors"].items()}
    victim = env["actors"][NODES[1]]
    pid = ray.get(victim.ping.remote())
    os.kill(pid, signal.SIGKILL)
    killed_at = len(acked)
    for t in threads:
        t.join(70)
    assert not any(t.is_alive() for t in threads)
    assert not permanent, f"5xx replies through the load balancer: {permanent[:5]}"
    assert len(acked) == MESSAGES and killed_at < MESSAGES
    # both nodes took mail before the kill (round robin over sessions)
    assert all(s.get("accepted", 0) > 0 for s in before.values()), before
    sink = env["sink"]
    want = {f"m{i}@lb.test" for i in range(MESSAGES)}
    wait_for(lambda: want <= {r.rcpt_to for r in sink.received}, 60,
             "every acknowledged message at the sink")
    got = [r for r in sink.received if r.rcpt_to in want]
    assert {r.rcpt_to for r in got} == acked     # exactly the set, at least once
    # the Received field names the submitter (from the PROXY header), never HAProxy
    for r in got:
        first = r.data.decode().split("\r\n", 1)[0]
        assert any(f"([{c}])" in first for c in CLIENTS), first
    # Ray restarted the killed listener on its node: HAProxy sees it up again
    wait_for(lambda: _servers_up(env["stats"]) == {"n1", "n2"}, 30, "the node back up")
    print(f"killed after {killed_at} acks; retries {retries}; "
          f"{len(got) - len(acked)} duplicates delivered")


# ------------------------------------------------------------------- PROXY listener, directly
def _connect(src: str, dst: str, port: int) -> socket.socket:
    s = socket.create_connection((dst, port), timeout=5, source_address=(src, 0))
    return s


def _reply(s: socket.socket, timeout: float = 5.0) -> bytes:
    """The first line the server sends, b'' when it closes without one (a close with our
    bytes still unread reaches us as a reset: also a close without a greeting)."""
    s.settimeout(timeout)
    out = b""
    while not out.endswith(b"\n"):
        try:
            chunk = s.recv(1024)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def test_only_the_trusted_balancer_may_send_a_header_and_it_must_be_valid(env):
    ray, port = env["ray"], env["port"]
    node = NODES[0]
    actor = env["actors"][node]
    refused = ray.get(actor.stats.remote()).get("proxy_refused", 0)
    # from outside proxy_networks, even with a well-formed header: closed, no greeting
    with _connect("127.0.0.1", node, port) as s:
        s.sendall(f"PROXY TCP4 192.0.2.1 {node} 1000 {port}\r\n".encode())
        assert _reply(s) == b""
    # from the balancer's address: garbage, a header cut short, a silent client
    with _connect(LB, node, port) as s:
        s.sendall(b"EHLO client.test\r\n")
        assert _reply(s) == b""
    with _connect(LB, node, port) as s:
        s.sendall(b"PROXY TCP4 192.0.2.1 ")
        t = time.time()
        assert _reply(s) == b""
        assert time.time() - t < 4      # proxy_timeout is 1 s
    with _connect(LB, node, port) as s:
        t = time.time()
        assert _reply(s) == b""
        assert 0.8 < time.time() - t < 4
    got = wait_for(lambda: ray.get(actor.stats.remote()).get("proxy_refused", 0) - refused
                   >= 4 or None, 10, "four refusals counted")
    assert got
    # each refusal is a log line of the ingress actor saying who and why
    where = f"PROXY listener {node}:{port}: connection from"
    want = [f"{where} 127.0.0.1 refused: not in ingress.proxy_networks",
            f"{where} {LB} refused: not a PROXY protocol header",
            f"{where} {LB} refused: PROXY header incomplete after 21 bytes within 1 s",
            f"{where} {LB} refused: no PROXY header within 1 s"]

    def logged() -> bool:
        text = "".join(f.read_text(errors="replace")
                       for f in env["ray_logs"].glob("worker-*.err"))
        return all(w in text for w in want)
    wait_for(logged, 10, f"the refusals in the ingress actor's log: {want}")
    # a v2 LOCAL header (a health check) is served
    local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    with _connect(LB, node, port) as s:
        s.sendall(local)
        assert _reply(s).startswith(b"220 ")


def test_per_ip_limits_count_the_address_the_header_names(env):
    port, node = env["port"], NODES[0]

    def session(client: str) -> tuple[socket.socket, bytes]:
        s = _connect(LB, node, port)
        s.sendall(f"PROXY TCP4 {client} {node} 40000 {port}\r\n".encode())
        return s, _reply(s)

    held = []
    try:
        for _ in range(PER_IP):
            s, greeting = session("192.0.2.9")
            held.append(s)
            assert greeting.startswith(b"220 "), greeting
        s, greeting = session("192.0.2.9")
        held.append(s)
        assert greeting.startswith(b"421 4.7.0") and b"192.0.2.9" in greeting, greeting
        # another client behind the same balancer is not held back
        s, greeting = session("192.0.2.10")
        held.append(s)
        assert greeting.startswith(b"220 "), greeting
    finally:
        for s in held:
            s.close()


# ----------------------------------------------------------------------------- the HTTP API
def test_http_api_behind_haproxy_a_killed_node_costs_only_retries(env):
    """The HTTP half: HAProxy in HTTP mode polling /readyz; batches of 10 POSTed with an
    Idempotency-Key. One node's ingress actor SIGKILLed mid-run: the client sees 200s and, for
    the requests caught by the kill, 502/503/504 or a dropped connection, which it retries
    with the same key; never another error. Every message of a 200 is delivered, and a retried
    request that had in fact been queued is not queued twice."""
    import json
    import urllib.error
    import urllib.request

    ray = env["ray"]
    url = f"http://{LB}:{env['hfront']}/v1/messages"
    n_req, per = 30, 10
    acked: set[str] = set()
    bad: list[tuple[int, str]] = []
    retried = {"5xx": 0, "dropped": 0}
    lock = threading.Lock()
    deadline = time.time() + 60

    def post(k: int) -> None:
        body = json.dumps({"messages": [
            {"from": "<s@origin.test>", "recipients": [f"h{k}-{j}@lb.test"],
             "subject": f"api {k}", "text": f"request {k} message {j}\n"}
            for j in range(per)]}).encode()
        while True:
            assert time.time() < deadline, f"request {k} never accepted"
            req = urllib.request.Request(url, data=body, method="POST", headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
                "Idempotency-Key": f"lb-{k}"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    out = json.loads(r.read())
                res = out.get("results", [])
                if r.status != 200 or len(res) != per or not all(x.get("ids") for x in res):
                    with lock:
                        bad.append((r.status, json.dumps(out)[:300]))
                    return
                with lock:
                    acked.update(f"h{k}-{j}@lb.test" for j in range(per))
                return
            except urllib.error.HTTPError as e:
                if e.code in (502, 503, 504):
                    with lock:
                        retried["5xx"] += 1
                else:
                    with lock:
                        bad.append((e.code, e.read()[:300].decode(errors="replace")))
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                with lock:
                    retried["dropped"] += 1
            time.sleep(0.1)

    def worker(ks: list[int]) -> None:
        for k in ks:
            post(k)
            # paced (10 requests a second each): the API answers a request of 10 in a few ms,
            # and unpaced the whole run ended before the kill landed (CI, 15:51)
            time.sleep(0.1)

    threads = [threading.Thread(target=worker, args=(list(range(i, n_req, 3)),))
               for i in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= per * n_req // 3, 40, "a third of the requests accepted")
    victim = env["actors"][NODES[0]]
    os.kill(ray.get(victim.ping.remote()), signal.SIGKILL)
    killed_at = len(acked)
    for t in threads:
        t.join(70)
    assert not any(t.is_alive() for t in threads)
    assert not bad, f"errors other than a retry through the load balancer: {bad[:5]}"
    want = {f"h{k}-{j}@lb.test" for k in range(n_req) for j in range(per)}
    assert acked == want and killed_at < len(want)
    sink = env["sink"]
    wait_for(lambda: want <= {r.rcpt_to for r in sink.received}, 60,
             "every acknowledged message at the sink")
    got = [r.rcpt_to for r in sink.received if r.rcpt_to in want]
    # a retried request queues nothing twice (the Idempotency-Key); only a delivery caught
    # in flight by a process's death could arrive twice, and no relay died here
    assert len(got) == len(want), f"{len(got) - len(want)} messages queued twice"
    wait_for(lambda: _servers_up(env["stats"], "api") == {"h1", "h2"}, 30,
             "the node's API back up")
    print(f"HTTP: killed after {killed_at} acks; retries {retried}")
