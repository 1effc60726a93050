"""One-click unsubscribe without Ray: tokens (cluster.core.unsubscribe) as tables of genuine,
rotated, forged and altered cases; the header fields and where they go; ``[[unsubscribe]]``
config errors; the HTTP endpoint (cluster.adapters.unsub_http) on loopback with a fake shard:
200 only once recorded, 400 for a bad token, 503 when recording fails, GET changes nothing."""

from __future__ import annotations

import http.client
import socket

import pytest

from cluster.config import ConfigError, parse_config
from cluster.core.unsubscribe import (add_header_fields, header_fields, make_token, read_token,
                                      token_from_mail)
from cluster.core.verp import VerpKeys

K1 = VerpKeys("u1", {"u1": b"a" * 32})
ROTATED = VerpKeys("u2", {"u2": b"b" * 32, "u1": b"a" * 32})
OTHER = VerpKeys("u1", {"u1": b"c" * 32})
KEYS_FOR = {"news.example": ROTATED}
TOK = make_token("Ann@X.test", "news.example", K1)


def _alter(token: str, i: int) -> str:
    return token[:i] + ("a" if token[i] != "a" else "b") + token[i + 1:]


TOKENS = [
    # (name, token, recipient or None, reason fragment)
    ("genuine (signed before rotation)", TOK, "ann@x.test", ""),
    ("signed by the new key", make_token("ann@x.test", "news.example", ROTATED),
     "ann@x.test", ""),
    ("upper case", TOK.upper(), "ann@x.test", ""),
    ("altered mac", _alter(TOK, 4), None, "bad token"),
    ("altered payload", _alter(TOK, len(TOK) - 3), None, ""),
    ("another key's signature", make_token("ann@x.test", "news.example", OTHER), None,
     "bad token"),
    ("another domain", make_token("ann@x.test", "other.example", K1), None,
     "no unsubscribe configured"),
    ("payload swapped", TOK.split("-")[0] + "-" +
     make_token("bob@x.test", "news.example", K1).split("-")[1], None, "bad token"),
    ("unknown key id", "u9" + TOK[2:], None, "unknown key"),
    ("garbage", "hello", None, "malformed"),
    ("empty", "", None, "malformed"),
    ("huge", "u1" + "a" * 2000, None, "malformed"),
]


@pytest.mark.parametrize("name,token,rcpt,why", TOKENS, ids=[t[0] for t in TOKENS])
def test_tokens(name, token, rcpt, why):
    r = read_token(token, KEYS_FOR)
    assert r.recipient == rcpt and why in (r.reason or "")
    if rcpt:
        assert r.domain == "news.example"


def test_header_fields_url_first_then_mailto_and_the_post_field():
    f = dict(header_fields("a@x.test", "news.example", K1, url_base="https://n.example/u/",
                           mail_domain="b.example"))
    tok = make_token("a@x.test", "news.example", K1)
    assert f["List-Unsubscribe"] == (f"<https://n.example/u/{tok}>,\r\n "
                                     f"<mailto:unsub-{tok}@b.example>")
    assert f["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    long = dict(header_fields("a.very.long.local.part.indeed@x.test", "news.example", K1,
                              url_base="", mail_domain="b.example"))
    assert "List-Unsubscribe-Post" not in long          # RFC 8058: only with an HTTPS URI
    assert long["List-Unsubscribe"].startswith("<mailto:unsub@b.example?subject=unsub-")
    assert header_fields("a@x.test", "news.example", K1, url_base="", mail_domain="") == []


@pytest.mark.parametrize("message,added", [
    (b"From: a@x\r\nSubject: hi\r\n\r\nbody\r\n", True),
    (b"From: a@x\r\nList-Unsubscribe: <mailto:own@x>\r\n\r\nbody\r\n", False),
    (b"From: a@x\r\nlist-unsubscribe:<mailto:own@x>\r\n\r\nbody\r\n", False),
    (b"From: a@x\r\n\r\nList-Unsubscribe: in the body\r\n", True),
])
def test_fields_go_in_front_unless_the_sender_has_its_own(message, added):
    out = add_header_fields(message, [("List-Unsubscribe", "<https://u/1>")])
    assert (out == b"List-Unsubscribe: <https://u/1>\r\n" + message) is added
    assert (out == message) is not added


@pytest.mark.parametrize("local,subject,want", [
    ("unsub-u1abc-xyz", None, "u1abc-xyz"), ("UNSUB-U1ABC-XYZ", None, "u1abc-xyz"),
    ("unsub", "unsub-u1abc-xyz", "u1abc-xyz"), ("unsub", "please remove me", None),
    ("unsub", None, None), ("postmaster", "unsub-x", None)])
def test_token_from_mail(local, subject, want):
    assert token_from_mail(local, subject) == want


BOUNCE = {"domain": "b.example.com", "keys": [{"id": "k1", "secret": "v" * 32}]}
SECRET = "Zq7-hidden-token-key-0123456789"


@pytest.mark.parametrize("raw,key", [
    ({"unsubscribe": [{"url_base": "https://n/u/", "keys": [{"id": "u1", "secret": SECRET}]}]},
     "unsubscribe[0].domain"),
    ({"unsubscribe": [{"domain": "n.example", "url_base": "http://n/u/", "mailto": False,
                       "keys": [{"id": "u1", "secret": SECRET}]}]}, "unsubscribe[0].url_base"),
    ({"unsubscribe": [{"domain": "n.example", "keys": [{"id": "u1", "secret": SECRET}]}]},
     "unsubscribe[0].mailto"),                  # mailto needs [bounce]
    ({"bounce": BOUNCE, "unsubscribe": [{"domain": "n.example"}]}, "unsubscribe[0].keys"),
    ({"bounce": BOUNCE, "unsubscribe": [{"domain": "n.example", "keys": [
        {"id": "u1", "secret": SECRET[:8]}]}]}, "unsubscribe[0].keys[0].secret"),
    ({"bounce": BOUNCE, "unsubscribe": {"domain": "n.example"}}, "unsubscribe"),
])
def test_bad_unsubscribe_config(raw, key):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert e.value.key == key and SECRET not in str(e.value) and SECRET[:8] not in str(e.value)


def test_unsubscribe_config_parses():
    c = parse_config({"bounce": BOUNCE, "unsubscribe": [
        {"domain": "News.Example", "url_base": "https://n.example/u/",
         "keys": [{"id": "u1", "secret": SECRET}]}]})
    u = c.unsubscribe[0]
    assert (u.domain, u.url_base, u.mailto, u.keys.current) == (
        "news.example", "https://n.example/u/", True, "u1")
    assert SECRET not in repr(c)


# ---------------------------------------------------------------------------- HTTP endpoint

HOST = "127.0.0.61"


@pytest.fixture()
def endpoint():
    from cluster.adapters.unsub_http import UnsubscribeHttp
    done: list[tuple[str, str, str]] = []
    state = {"fail": False}

    def unsubscribe(rcpt: str, domain: str, cause: str) -> None:
        if state["fail"]:
            raise ConnectionError("shard unreachable")
        done.append((rcpt, domain, cause))
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    srv = UnsubscribeHttp(HOST, port, KEYS_FOR, unsubscribe).start()
    try:
        yield srv, done, state
    finally:
        srv.stop()


def _req(port: int, method: str, path: str) -> int:
    c = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        c.request(method, path, body="List-Unsubscribe=One-Click" if method == "POST" else None)
        return c.getresponse().status
    finally:
        c.close()


def test_endpoint_post_get_forged_and_failing(endpoint):
    srv, done, state = endpoint
    assert _req(srv.port, "GET", f"/u/{TOK}") == 200 and done == []
    assert _req(srv.port, "POST", f"/u/{_alter(TOK, 4)}") == 400 and done == []
    assert _req(srv.port, "POST", "/elsewhere") == 400 and done == []
    state["fail"] = True
    assert _req(srv.port, "POST", f"/u/{TOK}") == 503 and done == []
    state["fail"] = False
    assert _req(srv.port, "POST", f"/u/{TOK}") == 200
    assert done == [("ann@x.test", "news.example", "one-click unsubscribe (http)")]
    assert srv.counters == {"unsubscribed": 1, "refused": 2, "failed": 1}


def test_fields_added_before_signing_are_covered_by_dkim(tmp_path):
    """The relay adds the fields, then signs: DKIM's h= covers both (dkimpy verifies), and a
    List-Unsubscribe changed on the way breaks the signature."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from cluster.adapters.dkim_keys import KeyRing, KeySource, Signer, dns_record
    from tests.dkim_helpers import dkimpy_verify_all, write_key
    key = rsa.generate_private_key(65537, 2048)
    srcs = [KeySource("news.example", "s1", "rsa", str(write_key(tmp_path / "s1.pem", key)))]
    raw = b"From: letters@news.example\r\nTo: a@x.test\r\nSubject: hi\r\n\r\nhello\r\n"
    fields = header_fields("a@x.test", "news.example", K1, url_base="https://n.example/u/",
                           mail_domain="b.example")
    signed = Signer(KeyRing(lambda: srcs)).sign(add_header_fields(raw, fields), 1e9)
    records = {"s1._domainkey.news.example": dns_record(key)}
    assert dkimpy_verify_all(signed, records) == [True]
    h = signed.split(b"h=", 1)[1].split(b";", 1)[0].replace(b"\r\n", b"").replace(b" ", b"")
    assert b"list-unsubscribe" in h.split(b":") and b"list-unsubscribe-post" in h.split(b":")
    tampered = signed.replace(b"https://n.example/u/", b"https://evil.example/u/")
    assert dkimpy_verify_all(tampered, records) == [False]
