"""The PROXY protocol on the implicit-TLS SMTP listener (465) and the HTTP API, and
``X-Forwarded-For`` trusted only from the balancers (cluster/adapters/proxy_listen.py).

Real parts: the SMTP and HTTP listeners of one process on 127.0.0.x with TLS from a CA made at
test time, clients on real sockets that bind the balancer's source address (127.0.0.20, the
only one in ``proxy_networks``) or another, speaking PROXY v1/v2 and then TLS. No message is
submitted here (so no Ray): what is asserted is the address each listener takes for the
client — in the per-IP connection limit (SMTP) and in the log line of a refused API key (HTTP)
— and that a header from outside, a missing header, or a forged ``X-Forwarded-For`` changes
nothing. Last, Debian's HAProxy in front of all three (TCP mode with send-proxy-v2 and
send-proxy, HTTP mode with ``option forwardfor``). The submit path behind a PROXY listener
runs in tests/test_ingress_haproxy.py.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
import time
from types import SimpleNamespace

import pytest

from tests.ingress_certs import make_ca

pytestmark = pytest.mark.timeout(60)

LB = "127.0.0.20"            # the balancer: the one address in proxy_networks
OUTSIDER = "127.0.0.1"
SMTP_HOST, HTTP_PROXIED, HTTP_PLAIN = "127.0.0.41", "127.0.0.42", "127.0.0.43"
PER_IP = 2
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    body = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + \
        struct.pack("!HH", sport, dport)
    return V2_SIG + b"\x21\x11" + struct.pack("!H", len(body)) + body


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from cluster.config import parse_config
    from cluster.core.submission import hash_api_key
    from cluster.ingress_http import HttpIngress
    from cluster.ingress_smtp import SmtpIngress, tls_context

    tmp = tmp_path_factory.mktemp("proxy")
    ca = make_ca(tmp)
    cert, key = ca.server_cert("mx.raymta.test", [SMTP_HOST, HTTP_PROXIED, HTTP_PLAIN, LB])
    cfg = parse_config({"ingress": {
        "hostname": "mx.raymta.test", "auth": False,
        "cert_file": str(cert), "key_file": str(key),
        "submissions": [f"{SMTP_HOST}:0"],
        "http": [f"{HTTP_PROXIED}:0", f"{HTTP_PLAIN}:0"],
        "api_key": [{"name": "k", "key_hash": hash_api_key("rmta_k_0123456789abcdef0123"),
                     "domains": ["a.test"]}],
        "proxy_protocol": [f"{SMTP_HOST}:0", f"{HTTP_PROXIED}:0"],
        "proxy_networks": [f"{LB}/32"], "proxy_timeout": "1s",
        "max_connections_per_ip": PER_IP}})
    ing = cfg.ingress
    # the listeners only need the config from the cluster handle: nothing is submitted here
    mc = SimpleNamespace(cfg=cfg)
    smtp = SmtpIngress.from_config(mc, ing).start()
    http_ = HttpIngress(mc, ing, tls_context(str(cert), str(key))).start(
        [(HTTP_PROXIED, 0), (HTTP_PLAIN, 0)], proxy=[True, False])
    try:
        [li] = smtp.addresses
        assert (li.mode, li.proxy) == ("implicit", True)
        ctx = ssl.create_default_context(cafile=str(ca.ca_file))
        yield SimpleNamespace(smtp=smtp, http=http_, ctx=ctx, smtp_port=li.port,
                              http_ports=dict(http_.addresses), tmp=tmp)
    finally:
        smtp.stop()
        http_.stop()


def _connect(src: str, dst: str, port: int) -> socket.socket:
    return socket.create_connection((dst, port), timeout=5, source_address=(src, 0))


def _line(s: socket.socket) -> bytes:
    """The first line the server sends; b'' when it closes without one."""
    out = b""
    try:
        while not out.endswith(b"\n"):
            chunk = s.recv(1024)
            if not chunk:
                break
            out += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return out


def _smtps(env, header: bytes, src: str = LB) -> tuple[ssl.SSLSocket, bytes]:
    """A PROXY header in clear, then the TLS handshake, then the greeting."""
    raw = _connect(src, SMTP_HOST, env.smtp_port)
    raw.sendall(header)
    s = env.ctx.wrap_socket(raw, server_hostname="mx.raymta.test")
    return s, _line(s)


def test_implicit_tls_takes_the_header_before_the_handshake_and_limits_its_client(env):
    port = env.smtp_port
    held = []
    try:
        for hdr in (f"PROXY TCP4 192.0.2.9 {SMTP_HOST} 40000 {port}\r\n".encode(),
                    v2("192.0.2.9", SMTP_HOST, 40001, port)):
            s, greeting = _smtps(env, hdr)
            held.append(s)
            assert greeting.startswith(b"220 mx.raymta.test"), greeting
            assert s.version() in ("TLSv1.2", "TLSv1.3")
        # the third session of the client the headers name: over the per-IP limit
        s, greeting = _smtps(env, v2("192.0.2.9", SMTP_HOST, 40002, port))
        held.append(s)
        assert greeting.startswith(b"421 4.7.0") and b"192.0.2.9" in greeting, greeting
        # another client behind the same balancer is not held back
        s, greeting = _smtps(env, f"PROXY TCP4 192.0.2.10 {SMTP_HOST} 1 {port}\r\n".encode())
        held.append(s)
        assert greeting.startswith(b"220 "), greeting
        # a LOCAL header (a health check) keeps the connection's own address
        s, greeting = _smtps(env, V2_SIG + b"\x20\x00\x00\x00")
        held.append(s)
        assert greeting.startswith(b"220 "), greeting
        assert env.smtp.limits.ip_conns == {"192.0.2.9": 2, "192.0.2.10": 1, LB: 1}
    finally:
        for s in held:
            s.close()


def test_implicit_tls_refuses_outsiders_and_a_missing_header(env, caplog):
    caplog.set_level(logging.WARNING, "raymta.ingress")
    port = env.smtp_port
    before = env.smtp.counters.get("proxy_refused", 0)
    # a well-formed header from outside proxy_networks: closed before any TLS
    with _connect(OUTSIDER, SMTP_HOST, port) as raw:
        raw.sendall(f"PROXY TCP4 192.0.2.1 {SMTP_HOST} 1 {port}\r\n".encode())
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            env.ctx.wrap_socket(raw, server_hostname="mx.raymta.test")
    # TLS straight away from the balancer (no header): its ClientHello is not a header
    with _connect(LB, SMTP_HOST, port) as raw, \
            pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        env.ctx.wrap_socket(raw, server_hostname="mx.raymta.test")
    # silence: closed after proxy_timeout (1 s)
    with _connect(LB, SMTP_HOST, port) as raw:
        t = time.monotonic()
        assert _line(raw) == b""
        assert 0.8 < time.monotonic() - t < 4
    deadline = time.monotonic() + 5
    while env.smtp.counters.get("proxy_refused", 0) - before < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.smtp.counters.get("proxy_refused", 0) - before == 3
    where = f"PROXY listener {SMTP_HOST}:{port}: connection from"
    text = caplog.text
    for want in (f"{where} {OUTSIDER} refused: not in ingress.proxy_networks",
                 f"{where} {LB} refused: not a PROXY protocol header",
                 f"{where} {LB} refused: no PROXY header within 1 s"):
        assert want in text, text


def _https(env, host: str, src: str, method: str, path: str, headers: dict[str, str],
           header: bytes | None = None) -> int:
    raw = _connect(src, host, env.http_ports[host])
    if header is not None:
        raw.sendall(header)
    c = http.client.HTTPSConnection(host, env.http_ports[host], timeout=5, context=env.ctx)
    c.sock = env.ctx.wrap_socket(raw, server_hostname="mx.raymta.test")
    try:
        c.request(method, path, headers=headers)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


BAD_KEY = {"Authorization": "Bearer rmta_not_a_key"}


def _logged_from(caplog, ip: str) -> bool:
    return any("401 unknown API key" in r.getMessage() and r.getMessage().split(" from ")[1]
               .startswith(f"{ip}:") for r in caplog.records)


def test_http_api_behind_a_proxy_header_sees_the_client(env, caplog):
    caplog.set_level(logging.WARNING, "raymta.ingress")
    port = env.http_ports[HTTP_PROXIED]
    hdr = f"PROXY TCP4 192.0.2.7 {HTTP_PROXIED} 5000 {port}\r\n".encode()
    assert _https(env, HTTP_PROXIED, LB, "GET", "/healthz", {}, hdr) == 200
    assert _https(env, HTTP_PROXIED, LB, "GET", "/v1/events", BAD_KEY,
                  v2("192.0.2.8", HTTP_PROXIED, 5001, port)) == 401
    assert _logged_from(caplog, "192.0.2.8"), caplog.text
    # an outsider may not send a header: closed before TLS
    before = env.http.counters.get("proxy_refused", 0)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _https(env, HTTP_PROXIED, OUTSIDER, "GET", "/healthz", {}, hdr)
    # nor may the balancer skip it
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _https(env, HTTP_PROXIED, LB, "GET", "/healthz", {})
    assert env.http.counters.get("proxy_refused", 0) - before == 2
    assert not env.http._clients, "a closed connection's client is forgotten"


@pytest.mark.parametrize("src,xff,client", [
    # from the balancer: the address it appended (the last); the earlier ones are the
    # client's own word
    (LB, ["203.0.113.5, 198.51.100.4"], "198.51.100.4"),
    (LB, ["203.0.113.5", "198.51.100.6"], "198.51.100.6"),      # two header lines
    (LB, ["not-an-address"], LB),
    # from anyone else: ignored
    (OUTSIDER, ["198.51.100.4"], OUTSIDER),
])
def test_x_forwarded_for_is_believed_only_from_the_balancer(env, caplog, src, xff, client):
    caplog.set_level(logging.WARNING, "raymta.ingress")
    headers = dict(BAD_KEY)
    raw = _connect(src, HTTP_PLAIN, env.http_ports[HTTP_PLAIN])
    c = http.client.HTTPSConnection(HTTP_PLAIN, timeout=5, context=env.ctx)
    c.sock = env.ctx.wrap_socket(raw, server_hostname="mx.raymta.test")
    try:
        c.putrequest("GET", "/v1/events")
        for k, v in headers.items():
            c.putheader(k, v)
        for v in xff:
            c.putheader("X-Forwarded-For", v)
        c.endheaders()
        r = c.getresponse()
        r.read()
    finally:
        c.close()
    assert r.status == 401
    assert _logged_from(caplog, client), caplog.text


# ------------------------------------------------------------------------- through HAProxy
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CLIENT = "127.0.0.51"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_through_haproxy_every_listener_sees_the_client(env, caplog):
    """Debian's HAProxy on 127.0.0.20: TCP mode with send-proxy-v2 to the 465 listener and
    send-proxy (v1) to the HTTPS API listener, HTTP mode with ``option forwardfor`` to the
    other API listener; a client on 127.0.0.51 is the address each listener counts and logs."""
    import os
    assert os.path.exists(HAPROXY), "HAProxy is not installed (apt-get install haproxy)"
    caplog.set_level(logging.WARNING, "raymta.ingress")
    f_smtp, f_tcp, f_http = _free_port(LB), _free_port(LB), _free_port(LB)
    conf = env.tmp / "haproxy.cfg"
    conf.write_text(f"""global
    maxconn 64
defaults
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend smtps
    mode tcp
    bind {LB}:{f_smtp}
    default_backend smtps
backend smtps
    mode tcp
    source {LB}
    server s1 {SMTP_HOST}:{env.smtp_port} send-proxy-v2
frontend api_tcp
    mode tcp
    bind {LB}:{f_tcp}
    default_backend api_tcp
backend api_tcp
    mode tcp
    source {LB}
    server h1 {HTTP_PROXIED}:{env.http_ports[HTTP_PROXIED]} send-proxy
frontend api_http
    mode http
    bind {LB}:{f_http}
    default_backend api_http
backend api_http
    mode http
    source {LB}
    option forwardfor
    server h2 {HTTP_PLAIN}:{env.http_ports[HTTP_PLAIN]} ssl verify none
""")
    with open(env.tmp / "haproxy.log", "wb") as errors:
        proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(conf)],
                                 stdout=subprocess.DEVNULL, stderr=errors)
    try:
        for port in (f_smtp, f_tcp, f_http):
            def listening(port: int = port) -> bool:
                try:
                    socket.create_connection((LB, port), timeout=1).close()
                    return True
                except OSError:
                    return False
            deadline = time.monotonic() + 10
            while not listening() and time.monotonic() < deadline:
                time.sleep(0.05)
        # SMTP over implicit TLS: the PROXY v2 header, then the client's own handshake
        with smtplib.SMTP_SSL(LB, f_smtp, context=env.ctx, timeout=10,
                              source_address=(CLIENT, 0)) as c:
            code, _ = c.ehlo("client.test")
            assert code == 250
            assert env.smtp.limits.ip_conns.get(CLIENT) == 1, env.smtp.limits.ip_conns
            assert LB not in env.smtp.limits.ip_conns
        # the HTTPS API behind a TCP balancer: PROXY v1, then TLS
        raw = _connect(CLIENT, LB, f_tcp)
        c = http.client.HTTPSConnection(LB, f_tcp, timeout=10, context=env.ctx)
        c.sock = env.ctx.wrap_socket(raw, server_hostname=LB)
        c.request("GET", "/v1/events", headers=BAD_KEY)
        assert c.getresponse().status == 401
        c.close()
        assert _logged_from(caplog, CLIENT), caplog.text
        caplog.clear()
        # the API behind an HTTP-mode balancer: X-Forwarded-For from a trusted peer
        raw = _connect(CLIENT, LB, f_http)
        h = http.client.HTTPConnection(LB, f_http, timeout=10)
        h.sock = raw
        h.request("GET", "/v1/events", headers=BAD_KEY)
        assert h.getresponse().status == 401
        h.close()
        assert _logged_from(caplog, CLIENT), caplog.text
    finally:
        proxy.terminate()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
