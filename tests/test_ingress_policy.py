"""Submission policy as tables: password hashes, sender domains, From/Sender checks, hops, the
Received field, connection and rate limits, and the ``[ingress]`` config's errors (each names
its key, none shows a password or its hash). Pure: no sockets, no Ray."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, parse_config
from cluster.core.ratespec import RateSpec
from cluster.core.submission import (LimitBook, PasswordHashError, SubmissionUser, UserTable,
                                     count_hops, domain_allowed, hash_password,
                                     header_sender_problem, received_header, verify_password)

FAST = {"ln": 8}   # cheap scrypt for tests (the default is ln=14)
H_ALICE = hash_password("correct horse", **FAST)


@pytest.mark.parametrize("password,ok", [
    ("correct horse", True), ("correct horse ", False), ("", False), ("Correct horse", False)])
def test_a_password_matches_its_hash_only(password, ok):
    assert verify_password(password, H_ALICE) is ok


@pytest.mark.parametrize("stored", [
    "correct horse", "$scrypt$ln=14,r=8,p=1$c2FsdA$", "$argon2id$v=19$m=65536,t=3,p=4$x$y",
    "$scrypt$ln=30,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    "$scrypt$ln=14,r=8,p=1$c2E$aGFzaGhhc2hoYXNoaGFzaA"])
def test_a_bad_hash_is_refused_without_repeating_it(stored):
    with pytest.raises(PasswordHashError) as e:
        verify_password("x", stored)
    assert stored not in str(e.value)


def test_the_hash_hides_in_reprs():
    u = SubmissionUser("alice", H_ALICE, ("a.test",))
    assert H_ALICE not in repr(u) and "alice" in repr(u)
    assert H_ALICE not in repr(UserTable([u]))


def test_unknown_user_and_wrong_password_both_fail():
    t = UserTable([SubmissionUser("alice", H_ALICE, ("a.test",))])
    assert t.authenticate(b"alice", b"correct horse").name == "alice"
    assert t.authenticate("alice", "wrong") is None
    assert t.authenticate("mallory", "correct horse") is None
    assert t.authenticate(b"\xff\xfe", b"correct horse") is None


@pytest.mark.parametrize("domain,allowed,ok", [
    ("a.test", ["a.test"], True),
    ("A.Test.", ["a.test"], True),
    ("b.a.test", ["a.test"], False),
    ("b.a.test", ["*.a.test"], True),
    ("a.test", ["*.a.test"], False),
    ("evila.test", ["*.a.test"], False),
    ("bücher.test", ["xn--bcher-kva.test"], True),
    ("xn--bcher-kva.test", ["bücher.test"], True),    # both sides compared as A-labels
    ("other.test", ["a.test", "b.test"], False),
    ("", ["a.test"], False),
])
def test_sender_domains(domain, allowed, ok):
    allowed = SubmissionUser("u", H_ALICE, tuple(allowed)).domains
    assert domain_allowed(domain, allowed) is ok


@pytest.mark.parametrize("head,problem", [
    (b"From: A <a@a.test>\r\n", None),
    (b"From: a@a.test, b@sub.a.test\r\n", "domain 'sub.a.test'"),
    (b"From: a@a.test\r\nSender: s@a.test\r\n", None),
    (b"From: a@a.test\r\nSender: s@evil.test\r\n", "Sender: domain 'evil.test'"),
    (b"From: x@evil.test\r\n", "From: domain 'evil.test'"),
    (b"From: a@a.test\r\nFrom: x@evil.test\r\n", "2 From header fields"),
    (b"To: r@b.test\r\n", "0 From header fields"),
    (b"From: Mallory <x@evil.test> (a@a.test)\r\n", "evil.test"),
    (b"From: \"a@a.test\" <x@evil.test>\r\n", "evil.test"),
    (b"From: a@a.test\r\n\tx@evil.test\r\n", "From: "),          # folded second address
    (b"From: a@a.test\rBcc: x@evil.test\r\n", "bare CR at line 1"),   # a field hidden
    (b"From: undisclosed\r\n", "not an address"),
])
def test_from_and_sender_fields_name_only_allowed_domains(head, problem):
    raw = head + b"Subject: s\r\n\r\nFrom: x@evil.test in the body is not a header\r\n"
    got = header_sender_problem(raw, ("a.test",))
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got, got


@pytest.mark.parametrize("raw,hops", [
    (b"From: a@a.test\r\n\r\nReceived: in the body\r\n", 0),
    (b"Received: from x\r\nreceived : from y\r\nFrom: a@a.test\r\n\r\nb\r\n", 2),
    (b"X-Received: no\r\nReceived: from z\r\n\r\n", 1),
])
def test_hops_count_received_fields_in_the_header_only(raw, hops):
    assert count_hops(raw) == hops


def test_the_received_field_follows_rfc5321_and_cannot_be_injected():
    r = received_header(helo="client.test\r\nX-Injected: yes", peer_ip="127.0.0.9",
                        by="mx.raymta.test", queue_id="ABC", now=0.0, tls_version="TLSv1.3",
                        cipher="TLS_AES_256_GCM_SHA384", user="alice", for_rcpt="r@b.test")
    text = r.decode()
    assert text.startswith("Received: from client.test??X-Injected:?yes ([127.0.0.9])\r\n")
    assert "by mx.raymta.test (raymta) with ESMTPSA id ABC" in text
    assert "(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384)" in text
    assert "(authenticated user alice)" in text
    assert text.endswith("for <r@b.test>; Thu, 01 Jan 1970 00:00:00 +0000\r\n")
    # every line after the first is a continuation (folded), so it is one field
    assert all(line.startswith("\t") for line in text.split("\r\n")[1:-1])
    plain = received_header(helo="", peer_ip="::1", by="h", queue_id="Q", now=0.0).decode()
    assert " with ESMTP id Q; " in plain and "for <" not in plain


@pytest.mark.parametrize("head,added", [
    (b"From: a@a.test\r\nDate: x\r\nMessage-ID: <m@a>\r\n", []),
    (b"From: a@a.test\r\nMessage-ID: <m@a>\r\n", ["Date: Thu, 01 Jan 1970 00:00:00 +0000"]),
    (b"From: a@a.test\r\ndate: x\r\n", ["Message-ID: <T@mx.test>"]),
    (b"From: a@a.test\r\n", ["Date: Thu, 01 Jan 1970 00:00:00 +0000",
                              "Message-ID: <T@mx.test>"]),
])
def test_completion_adds_only_missing_date_and_message_id(head, added):
    from cluster.core.submission import completion_fields
    raw = head + b"\r\nDate: in the body does not count\r\n"
    out = completion_fields(raw, now=0.0, token="T", domain="mx.test").decode()
    assert out == "".join(a + "\r\n" for a in added)


def test_connection_limits_per_ip_and_user():
    book = LimitBook(per_ip_connections=2, per_user_connections=1, ip_rate=None, user_rate=None)
    assert book.open_ip("127.0.0.9") is None and book.open_ip("127.0.0.9") is None
    refused = book.open_ip("127.0.0.9")
    assert refused is not None and "127.0.0.9" in refused.reason
    assert book.open_ip("127.0.0.10") is None
    book.close_ip("127.0.0.9")
    assert book.open_ip("127.0.0.9") is None
    u = SubmissionUser("alice", H_ALICE, ("a.test",))
    assert book.login(u) is None and book.login(u) is not None
    book.logout("alice")
    assert book.login(u) is None
    roomy = SubmissionUser("bob", H_ALICE, ("b.test",), max_connections=3)
    assert [book.login(roomy) for _ in range(4)][:3] == [None] * 3


def test_message_rates_per_ip_and_user_charge_both_or_neither():
    book = LimitBook(per_ip_connections=9, per_user_connections=9,
                     ip_rate=RateSpec.parse("3/s"), user_rate=RateSpec.parse("2/s"))
    u = SubmissionUser("alice", H_ALICE, ("a.test",))
    fast = SubmissionUser("carol", H_ALICE, ("c.test",), rate=RateSpec.parse("100/s"))
    now = 1000.0
    assert book.take_message("ip1", u, now) is None
    assert book.take_message("ip1", u, now) is None
    r = book.take_message("ip1", u, now)
    assert r is not None and "alice" in r.reason and 0 < r.retry_after <= 0.5
    # the refused message did not use the IP's third slot
    assert book.take_message("ip1", fast, now) is None
    r = book.take_message("ip1", fast, now)
    assert r is not None and "ip1" in r.reason
    assert book.take_message("ip1", u, now + 1.0) is None


USER = {"name": "alice", "password_hash": H_ALICE, "domains": ["a.test"]}


def ingress(**kw):
    base = {"submission": ["127.0.0.1:2587"], "cert_file": "/c.pem", "key_file": "/k.pem",
            "user": [dict(USER)]}
    base.update(kw)
    return {"ingress": {k: v for k, v in base.items() if v is not None}}


@pytest.mark.parametrize("raw,key,words", [
    (ingress(submission=None), "ingress.submission", "at least one listener"),
    (ingress(submission=["0.0.0.0"]), "ingress.submission[0]", "host:port"),
    (ingress(submission=["mx.example:587"]), "ingress.submission[0]", "IP address"),
    (ingress(cert_file=None, key_file=None), "ingress.cert_file", "only over TLS"),
    (ingress(key_file=None), "ingress.key_file", "go together"),
    (ingress(user=None), "ingress.user", "no users"),
    (ingress(auth=False, submission=["0.0.0.0:2525"]), "ingress.auth", "open relay"),
    (ingress(auth=False, submission=["192.0.2.7:2525"], cert_file=None, key_file=None),
     "ingress.auth", "not a loopback"),
    (ingress(user=[{**USER, "password_hash": "hunter2"}]), "ingress.user[0].password_hash",
     "not a scrypt hash"),
    (ingress(user=[{**USER, "password_hash": 12345}]), "ingress.user[0].password_hash",
     "expected a string"),
    (ingress(user=[{**USER, "domains": []}]), "ingress.user[0].domains", "at least one"),
    (ingress(user=[{**USER, "domains": ["not a domain"]}]), "ingress.user[0].domains",
     "not a domain"),
    (ingress(user=[{k: v for k, v in USER.items() if k != "domains"}]),
     "ingress.user[0].domains", "missing"),
    (ingress(user=[USER, USER]), "ingress.user[1].name", "twice"),
    (ingress(user=[{**USER, "rate": "fast"}]), "ingress.user[0].rate", "invalid rate"),
    (ingress(user=[{**USER, "password": "hunter2"}]), "ingress.user[0].password",
     "unknown key"),
    (ingress(max_recipients=5000), "ingress.max_recipients", "at most 1000"),
    (ingress(max_recipients=0), "ingress.max_recipients", ">= 1"),
    (ingress(message_rate_per_ip="lots"), "ingress.message_rate_per_ip", "invalid rate"),
    (ingress(batch_window="soon"), "ingress.batch_window", ""),
    (ingress(submissions=["127.0.0.1:2465"], cert_file=None, key_file=None, auth=False),
     "ingress.submissions", "implicit TLS"),
    (ingress(max_message_size="1GB"), "ingress.max_message_size", "queue.max_message_size"),
    (ingress(http=["127.0.0.1:8080"]), "ingress.api_key", "at least one"),
    (ingress(http=["0.0.0.0:8080"], cert_file=None, key_file=None, submission=[], user=[],
             api_key=[{"name": "k", "key_hash": "sha256:" + "0" * 64, "domains": ["a.test"]}]),
     "ingress.http", "clear text"),
    (ingress(http=["127.0.0.1:8080"],
             api_key=[{"name": "k", "key_hash": "hunter2", "domains": ["a.test"]}]),
     "ingress.api_key[0].key_hash", "sha256:"),
    (ingress(http=["127.0.0.1:8080"],
             api_key=[{"name": "k", "key_hash": "sha256:" + "0" * 64, "domains": []}]),
     "ingress.api_key[0].domains", "at least one"),
    (ingress(http=["127.0.0.1:8080"],
             api_key=[{"name": "k", "key_hash": "sha256:" + "0" * 64, "domains": ["a.test"],
                       "key": "hunter2"}]), "ingress.api_key[0].key", "unknown key"),
])
def test_ingress_config_errors_name_the_key(raw, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert e.value.key == key, str(e.value)
    assert words in e.value.problem
    assert "hunter2" not in str(e.value) and H_ALICE not in str(e.value)


def test_a_good_ingress_config_and_loopback_without_auth():
    cfg = parse_config(ingress(submissions=["127.0.0.1:2465"], max_recipients=50,
                               message_rate_per_user="100/s", batch_window="5ms",
                               user=[{**USER, "domains": ["A.test", "*.b.test"],
                                      "rate": "10/s", "max_connections": 3}]))
    ing = cfg.ingress
    assert ing.enabled and ing.auth and ing.max_recipients == 50
    assert ing.users[0].domains == ("a.test", "*.b.test") and ing.users[0].max_connections == 3
    assert ing.batch_window == 0.005 and str(ing.message_rate_per_user) == "100/s"
    assert H_ALICE not in repr(cfg)
    local = parse_config({"ingress": {"auth": False, "submission": ["127.0.0.1:2525"]}})
    assert local.ingress.enabled and not local.ingress.auth
    assert not parse_config({}).ingress.enabled


def test_api_keys_are_stored_hashed_and_looked_up_by_hash():
    from cluster.core.submission import ApiKey, ApiKeyTable, hash_api_key, new_api_key
    key = new_api_key()
    assert key.startswith("rmta_") and len(key) > 40 and new_api_key() != key
    ak = ApiKey("crm", hash_api_key(key), ("Example.com",))
    assert ak.domains == ("example.com",) and hash_api_key(key) not in repr(ak)
    table = ApiKeyTable([ak])
    assert table.lookup(key) is ak and table.lookup(key + "x") is None
    cfg = parse_config(ingress(submission=[], user=[], cert_file=None, key_file=None,
                               http=["127.0.0.1:8080"],
                               api_key=[{"name": "crm", "key_hash": hash_api_key(key),
                                         "domains": ["a.test"], "events": True}]))
    assert cfg.ingress.http == ("127.0.0.1:8080",) and cfg.ingress.api_keys[0].events


def test_users_file(tmp_path):
    from cluster.config import load_users_file
    f = tmp_path / "users.toml"
    f.write_text(f'[[user]]\nname = "bob"\npassword_hash = "{H_ALICE}"\ndomains = ["b.test"]\n')
    assert [u.name for u in load_users_file(f)] == ["bob"]
    f.write_text('[[user]]\nname = "bob"\npassword_hash = "hunter2"\ndomains = ["b.test"]\n')
    with pytest.raises(ConfigError) as e:
        load_users_file(f)
    assert "user[0].password_hash" in e.value.key and "hunter2" not in str(e.value)


def test_the_readme_ingress_example_parses_and_its_password_matches():
    import re
    import tomllib
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## SMTP submission", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    cfg = parse_config(tomllib.loads(block))
    assert cfg.ingress.submission == ("10.0.0.5:587",) and cfg.ingress.auth
    (crm,) = cfg.ingress.users
    assert verify_password("a long random password", crm.password_hash)
    assert domain_allowed("news.example.com", crm.domains)


@pytest.mark.parametrize("raw,want", [
    (b"From: a@b.test\r\n\r\nbody\r\n", (0, False, False)),
    (b"Received: x\r\nreceived : y\r\nDate: d\r\nMessage-Id: <m@h>\r\n\r\n", (2, True, True)),
    # a field named like one only when the name is whole and at the start of a line
    (b"X-Date: d\r\nDate-Sent: d\r\nX: a\r\n Received: folded\r\n\r\n", (0, False, False)),
    (b"DATE\t: d\r\n\r\nReceived: in the body\r\nMessage-ID: <m@h>\r\n", (0, True, False)),
    (b"Received: a header-only message\r\n", (1, False, False)),
])
def test_scan_header_reads_hops_date_and_message_id_in_one_pass(
        raw: bytes, want: tuple[int, bool, bool]) -> None:
    from cluster.core.submission import completion_fields, scan_header
    assert tuple(scan_header(raw)) == want
    assert count_hops(raw) == want[0]
    added = completion_fields(raw, now=0.0, token="T", domain="d.test")
    assert (b"Date:" in added, b"Message-ID:" in added) == (not want[1], not want[2])


def test_rfc5322_date_is_the_second_it_is_given() -> None:
    from cluster.core.submission import rfc5322_date
    assert rfc5322_date(0.0) == "Thu, 01 Jan 1970 00:00:00 +0000"
    assert rfc5322_date(0.999) == "Thu, 01 Jan 1970 00:00:00 +0000"   # from the cache
    assert rfc5322_date(1.0) == "Thu, 01 Jan 1970 00:00:01 +0000"
    assert rfc5322_date(1_700_000_000.5) == "Tue, 14 Nov 2023 22:13:20 +0000"
