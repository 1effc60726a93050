"""DKIM configuration: [dkim] / [[dkim.key]] parsing, key file checks that name the file, the
``sign = "required"`` policy (dkim_refusal and the client's refusal), and key rotation."""

from __future__ import annotations

import logging
import subprocess
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from cluster.adapters.dkim_keys import signer_from_config
from cluster.client import _check_dkim_policy
from cluster.config import ConfigError, check_dkim_keys, load_config, parse_config
from cluster.core.dkim import dkim_refusal
from cluster.core.message import ValidationError, validate_batch
from tests.dkim_helpers import dkimpy_verify_all, write_key


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(65537, 2048)


def _key(**kw):
    k = {"domain": "example.com", "selector": "s1", "key_file": "/nonexistent.pem"}
    k.update(kw)
    return k


@pytest.mark.parametrize("dkim,key,problem", [
    ({"key": [_key(selector="bad_sel")]}, "dkim.key[0].selector", "not a DNS name"),
    ({"key": [_key(selector="a..b")]}, "dkim.key[0].selector", "not a DNS name"),
    ({"key": [_key(algorithm="dsa")]}, "dkim.key[0].algorithm", "rsa or ed25519"),
    ({"key": [_key(domain="nodot")]}, "dkim.key[0].domain", "domain name"),
    ({"key": [{"domain": "example.com", "selector": "s"}]}, "dkim.key[0].key_file", "missing"),
    ({"key": [_key(), _key()]}, "dkim.key[1].selector", "listed twice"),
    ({"key": [_key(identity="@other.com")]}, "dkim.key[0].identity", "RFC 6376 §3.5"),
    ({"key": [_key(headers=["to", "subject"])]}, "dkim.key[0].headers", "must include From"),
    ({"headers": ["from", "dkim-signature"]}, "dkim.headers", "cannot be signed"),
    ({"sign": "always"}, "dkim.sign", "if-key"),
    ({"policy": {"example.com": "maybe"}}, "dkim.policy.example.com", "required"),
    ({"expire_after": "soon"}, "dkim.expire_after", "soon"),
    ({"keys": []}, "dkim.keys", "unknown key"),
])
def test_bad_dkim_config_names_the_key(dkim, key, problem):
    with pytest.raises(ConfigError) as e:
        parse_config({"dkim": dkim})
    assert e.value.key == key and problem in str(e.value)


def test_good_dkim_config_round_trip():
    cfg = parse_config({"dkim": {
        "sign": "if-key", "parent_domains": False, "expire_after": "7d",
        "policy": {"Example.COM": "required", "b.test": {"sign": "if-key"}},
        "key": [_key(), _key(selector="e1", algorithm="ed25519", identity="@news.example.com",
                             expire_after="1h", headers=["From", "To", "Subject"])]}})
    dk = cfg.dkim
    assert dk.policies == {"example.com": "required", "b.test": "if-key"}
    assert dk.expire_after == 7 * 86400 and dk.parent_domains is False
    assert dk.keys[1].headers == ("from", "to", "subject") and dk.keys[1].expire_after == 3600
    assert dk.keys[0].headers is None and dk.keys[0].algorithm == "rsa"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_key_files_are_checked_when_the_config_is_loaded(tmp_path, rsa_key, caplog):
    good = write_key(tmp_path / "good.pem", rsa_key)
    notkey = tmp_path / "notkey.pem"
    notkey.write_text("not a key at all\n")
    enc = tmp_path / "enc.pem"
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-aes128",
             "-pass", "pass:x", "-out", str(enc))
    small = tmp_path / "small.pem"
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:512", "-out",
             str(small))
    mid = tmp_path / "mid.pem"
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-out", str(mid))

    def cfg_file(key_file: str, alg: str = "rsa") -> str:
        p = tmp_path / "raymta.toml"
        p.write_text(f'[[dkim.key]]\ndomain = "example.com"\nselector = "s1"\n'
                     f'algorithm = "{alg}"\nkey_file = "{key_file}"\n')
        return str(p)

    assert load_config(cfg_file(str(good))).dkim.keys[0].key_file == str(good)
    for f, msg in ((notkey, "not a PEM private key"), (enc, "encrypted"),
                   (small, "RSA key of 512 bits"), (tmp_path / "missing.pem", "cannot read")):
        with pytest.raises(ConfigError) as e:
            load_config(cfg_file(str(f)))
        assert e.value.key == "dkim.key[0].key_file"
        assert str(f) in str(e.value) and msg in str(e.value) and "example.com/s1" in str(e.value)
        assert "MII" not in str(e.value)          # never a piece of the key
    with pytest.raises(ConfigError, match="holds an rsa key, configured as ed25519"):
        load_config(cfg_file(str(good), "ed25519"))
    with caplog.at_level(logging.WARNING, logger="raymta.config"):
        load_config(cfg_file(str(mid)))
    assert "1024 bits" in caplog.text and "2048" in caplog.text


def test_key_directory_keys_join_the_config_and_sign(tmp_path, rsa_key):
    d = tmp_path / "dkim" / "example.com"
    d.mkdir(parents=True)
    write_key(d / "r2026.rsa.pem", rsa_key)
    ek = ed25519.Ed25519PrivateKey.generate()
    write_key(d / "e2026.ed25519.pem", ek)
    cfg, warnings = check_dkim_keys(parse_config({"dkim": {"key_directory": str(tmp_path /
                                                                               "dkim")}}))
    assert warnings == []
    assert sorted(k.selector for k in cfg.dkim.keys) == ["e2026", "r2026"]
    assert all(k.from_directory for k in cfg.dkim.keys)
    signer = signer_from_config(cfg.dkim)
    assert signer is not None
    out = signer.sign(b"From: a@example.com\r\nSubject: x\r\n\r\nhello\r\n", time.time())
    from cluster.adapters.dkim_keys import dns_record
    recs = {"r2026._domainkey.example.com": dns_record(rsa_key),
            "e2026._domainkey.example.com": dns_record(ek)}
    assert sorted(dkimpy_verify_all(out, recs)) == [True, True]
    (d / "x_y.rsa.pem").write_text("")
    with pytest.raises(ConfigError, match="x_y.rsa.pem: selector"):
        check_dkim_keys(parse_config({"dkim": {"key_directory": str(tmp_path / "dkim")}}))


def test_no_keys_means_no_signer():
    assert signer_from_config(parse_config({}).dkim) is None


@pytest.mark.parametrize("domain,refused", [
    ("example.com", False),            # has a key
    ("news.example.com", False),       # parent's key signs (parent_domains on)
    ("strict.test", True),             # required, no key
    ("sub.strict.test", True),         # strict.test's policy covers subdomains
    ("relaxed.test", False),           # if-key (the default)
])
def test_dkim_refusal(domain, refused):
    cfg = parse_config({"dkim": {"policy": {"strict.test": "required",
                                            "example.com": "required"},
                                 "key": [_key()]}})
    why = dkim_refusal(domain, cfg)
    assert (why is not None) is refused
    if refused:
        assert domain in why and "required" in why


def test_required_everywhere_refuses_domains_without_keys_at_submission():
    cfg = parse_config({"dkim": {"sign": "required", "key": [_key()]}})
    subs = [{"sender": "b@example.com", "recipients": ["x@y.test"],
             "raw": b"From: ann@example.com\r\nSubject: ok\r\n\r\nhi\r\n"},
            {"sender": "b@other.test", "recipients": ["x@y.test"],
             "raw": b"From: Bob <bob@other.test>\r\nSubject: no key\r\n\r\nhi\r\n"},
            {"sender": "b@example.com", "recipients": ["x@y.test"], "from": "c@nokey.test",
             "subject": "s", "text": "t"}]
    got = [_check_dkim_policy(p, cfg, i)
           for i, p in enumerate(validate_batch(subs, now=time.time()))]
    assert not isinstance(got[0], ValidationError)
    assert isinstance(got[1], ValidationError) and got[1].field == "from"
    assert "'other.test' requires a DKIM signature" in str(got[1]) and got[1].index == 1
    assert isinstance(got[2], ValidationError) and "nokey.test" in str(got[2])


def test_relative_key_paths_are_relative_to_the_config_file(tmp_path, rsa_key, monkeypatch):
    conf = tmp_path / "etc"
    (conf / "dkim" / "example.com").mkdir(parents=True)
    write_key(conf / "k.pem", rsa_key)
    write_key(conf / "dkim" / "example.com" / "d1.rsa.pem", rsa_key)
    (conf / "raymta.toml").write_text('[dkim]\nkey_directory = "dkim"\n[[dkim.key]]\n'
                                      'domain = "example.org"\nselector = "s1"\n'
                                      'key_file = "k.pem"\n')
    monkeypatch.chdir(tmp_path)          # elsewhere: relays run with other working dirs too
    dk = load_config(str(conf / "raymta.toml")).dkim
    assert dk.keys[0].key_file == str(conf / "k.pem")
    assert dk.key_directory == str(conf / "dkim")
    assert {k.selector for k in dk.keys} == {"s1", "d1"}


def test_the_leader_checks_the_required_policy_again():
    """What a client sends is checked again where it is trusted: a submit item whose From
    domain must be signed but has no key is refused by the shard leader's intake too (a
    client that skipped its own check gets no further)."""
    from cluster.core import queue as q
    from cluster.core.intake import Intake, Limits, dkim_required_check, wire_item
    from cluster.core.message import new_message_ids, prepare
    assert dkim_required_check(parse_config({})) is None          # nothing parsed then
    cfg = parse_config({"dkim": {"sign": "required", "key": [_key()]}})
    now = time.time()
    items = [wire_item(prepare(s, now=now), new_message_ids(now, 1)) for s in (
        {"sender": "b@example.com", "recipients": ["x@y.test"],
         "raw": b"From: ann@example.com\r\nSubject: ok\r\n\r\nhi\r\n"},
        {"sender": "b@other.test", "recipients": ["x@y.test"],
         "raw": b"From: Bob <bob@other.test>\r\nSubject: no key\r\n\r\nhi\r\n"})]
    intake = Intake(0, 1, dkim_required_check(cfg))
    res, recs = intake.admit(items, q.QueueState(), Limits(100, 1 << 30, 1 << 20, 3600), now)
    assert "ids" in res[0] and len(recs) == 1
    assert res[1]["retryable"] is False and "'other.test' requires a DKIM signature" in \
        res[1]["error"]
