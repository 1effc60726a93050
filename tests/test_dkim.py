"""DKIM signing: canonicalisation tables, RFC vectors, dkimpy-identical output, and awkward
messages that dkimpy and Perl's Mail::DKIM (keys from a loopback DNS server) both verify."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import subprocess
import time
from pathlib import Path

import dkim
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from cluster.adapters.dkim_keys import (
    DkimKey,
    KeyFileError,
    KeyRing,
    KeySource,
    Signer,
    dns_record,
    load_private_key,
    scan_key_directory,
)
from cluster.core import dkim as core
from tests.conftest import corpus
from tests.dkim_helpers import (
    check_with_own_canon,
    dkimpy_verify_all,
    have_perl_dkim,
    loopback_dnsfunc,
    perl_verify,
    publish,
    write_key,
)


def DK(*parts: str) -> Path:
    """A file of the shared DKIM corpus (the test is skipped, or fails in CI, without it)."""
    return corpus("dkim", *parts)
T_8463 = 1528637909


# ------------------------------------------------------------------ canonicalisation tables
@pytest.mark.parametrize("name,value,simple,relaxed", [
    (b"Subject", b" Hello\r\n", b"Subject: Hello\r\n", b"subject:Hello\r\n"),
    # RFC 6376 §3.4.5 example
    (b"A", b" X\r\n", b"A: X\r\n", b"a:X\r\n"),
    (b"B ", b" Y\t\r\n\tZ  \r\n", b"B : Y\t\r\n\tZ  \r\n", b"b:Y Z\r\n"),
    (b"SUBJECT", b"\t  many   spaces\t\there \r\n", b"SUBJECT:\t  many   spaces\t\there \r\n",
     b"subject:many spaces here\r\n"),
    (b"X-Empty", b"\r\n", b"X-Empty:\r\n", b"x-empty:\r\n"),
    (b"X-Folded", b" a\r\n b\r\n  c\r\n", b"X-Folded: a\r\n b\r\n  c\r\n", b"x-folded:a b c\r\n"),
    (b"X-Utf8", " Grüße  \r\n".encode(), " X-Utf8: Grüße  \r\n".encode()[1:],
     "x-utf8:Grüße\r\n".encode()),
])
def test_header_canonicalisation(name, value, simple, relaxed):
    assert core.canon_header(name, value, "simple") == simple
    assert core.canon_header(name, value, "relaxed") == relaxed


@pytest.mark.parametrize("body,simple,relaxed", [
    (b"", b"\r\n", b""),
    (b"\r\n", b"\r\n", b""),
    (b"\r\n\r\n\r\n", b"\r\n", b""),
    # RFC 6376 §3.4.5 example body
    (b" C \r\nD \t E\r\n\r\n\r\n", b" C \r\nD \t E\r\n", b" C\r\nD E\r\n"),
    (b"no final crlf", b"no final crlf\r\n", b"no final crlf\r\n"),
    (b"a\t\tb  \t\r\n\r\n", b"a\t\tb  \t\r\n", b"a b\r\n"),
    (b"line\r\n \r\n", b"line\r\n \r\n", b"line\r\n"),
    ("Grüße \r\n".encode(), "Grüße \r\n".encode(), "Grüße\r\n".encode()),
    (b"\xff\xfe 8bit\r\n", b"\xff\xfe 8bit\r\n", b"\xff\xfe 8bit\r\n"),
])
def test_body_canonicalisation(body, simple, relaxed):
    assert core.body_canon(body, "simple") == simple
    assert core.body_canon(body, "relaxed") == relaxed


@pytest.mark.parametrize("raw,wire", [
    (b"A: 1\n\nbody\n", b"A: 1\r\n\r\nbody\r\n"),
    (b"A: 1\r\n\r\nbody", b"A: 1\r\n\r\nbody\r\n"),
    (b"A: 1\r\n\r\nx\ry\r\n", b"A: 1\r\n\r\nx\r\ny\r\n"),
    (b"A: 1\r\n\r\nok\r\n", b"A: 1\r\n\r\nok\r\n"),
])
def test_wire_form_matches_what_the_smtp_adapter_sends(raw, wire):
    from cluster.adapters.smtp import _dot_stuff
    assert core.wire_form(raw) == wire
    assert _dot_stuff(raw) == wire + b".\r\n"   # the same rule (no leading dots here)


def test_parse_headers_keeps_folding_and_odd_names():
    sec, body = core.split_message(b"Subject: a\r\n b\r\nX-ODD-case : v\r\nTo:x\r\n\r\nB\r\n")
    h = core.parse_headers(sec)
    assert h == [(b"Subject", b" a\r\n b\r\n"), (b"X-ODD-case ", b" v\r\n"), (b"To", b"x\r\n")]
    assert body == b"B\r\n"
    with pytest.raises(core.DkimError, match="line 1"):
        core.parse_headers(b"not a header\r\n")
    assert core.split_message(b"A: 1\r\n") == (b"A: 1\r\n", b"")
    assert core.split_message(b"\r\nbody\r\n") == (b"", b"body\r\n")


def test_choose_headers_oversigns_each_listed_field_once_more_than_it_occurs():
    h = [(b"From", b""), (b"To", b""), (b"Received", b""), (b"to", b""), (b"Subject", b"")]
    got = core.choose_headers(h, ("from", "to", "subject", "reply-to"))
    assert got == [b"from", b"to", b"to", b"subject", b"from", b"to", b"subject", b"reply-to"]
    assert got.count(b"to") == 3 and got.count(b"reply-to") == 1
    with pytest.raises(core.DkimError, match="From"):
        core.choose_headers(h, ("to",))


def test_select_headers_takes_occurrences_bottom_up():
    h = [(b"From", b"1"), (b"X", b"a"), (b"x", b"b"), (b"Subject", b"s")]
    assert core.select_headers(h, [b"x", b"x", b"x", b"from"]) == \
        [(b"x", b"b"), (b"X", b"a"), (b"From", b"1")]


@pytest.mark.parametrize("value,domain", [
    (b" Joe <joe@Example.COM>\r\n", "example.com"),
    (b" joe@sub.example.org\r\n", "sub.example.org"),
    (b' "a, b" <x@d.test>,\r\n y@e.test\r\n', "d.test"),
    (" <j@bücher.example>\r\n".encode(), "xn--bcher-kva.example"),
    (b" undisclosed\r\n", None),
])
def test_from_domain(value, domain):
    assert core.from_domain([(b"To", b" t@x.test\r\n"), (b"FROM", value)]) == domain


@pytest.mark.parametrize("sel,ok", [("s1", True), ("2026-01.reg", True), ("a" * 63, True),
                                    ("a" * 64, False), ("-x", False), ("x-", False),
                                    ("sel_1", False), ("a..b", False), ("", False),
                                    ("sé", False), ("a b", False)])
def test_selector_labels(sel, ok):
    assert core.is_valid_selector(sel) is ok


# ------------------------------------------------------------------ vectors
def _rfc8463_keys():
    d = DK("rfc8463")
    seed = base64.b64decode((d / "ed25519_brisbane_seed.b64").read_text())
    ek = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    rk, _, _, _ = load_private_key(d / "rsa_test_private.pem")
    return ek, rk


def _tag(header: bytes, tag: bytes) -> bytes:
    text = b"".join(header.split())
    for part in text.split(b";"):
        k, _, v = part.partition(b"=")
        if k.split(b":")[-1] == tag:
            return v
    raise KeyError(tag)


def test_rfc8463_signatures_reproduce_byte_for_byte():
    d = DK("rfc8463")
    ek, rk = _rfc8463_keys()
    msg = core.wire_form((d / "appendix_a3_unsigned.eml").read_bytes())
    signed = core.wire_form((d / "appendix_a3_signed.eml").read_bytes())
    theirs = [v for n, v in core.parse_headers(core.split_message(signed)[0])
              if n == b"DKIM-Signature"]
    include = [b"from", b"to", b"subject", b"date", b"message-id", b"from", b"subject", b"date"]
    sec, body = core.split_message(msg)
    headers = core.parse_headers(sec)
    bh = hashlib.sha256(core.body_canon(body, "relaxed")).digest()
    ours = [
        core.build_signature(headers, bh, core.SignatureSpec("football.example.com", "brisbane",
                                                             "ed25519-sha256"), T_8463,
                             lambda x: ek.sign(hashlib.sha256(x).digest()), include),
        core.build_signature(headers, bh, core.SignatureSpec("football.example.com", "test",
                                                             "rsa-sha256"), T_8463,
                             lambda x: rk.sign(x, padding.PKCS1v15(), hashes.SHA256()), include),
    ]
    for mine, ref in zip(ours, theirs):
        for tag in (b"v", b"a", b"c", b"d", b"i", b"q", b"s", b"t", b"h", b"bh", b"b"):
            assert _tag(mine, tag) == _tag(ref, tag), tag
        # the whole field is the same but for where lines are folded
        assert b"".join(mine.split()) == b"".join((b"DKIM-Signature:" + ref).split())
    # and the signed message verifies with dkimpy, both signatures
    records = json.loads((d / "dns.json").read_text())
    assert dkimpy_verify_all(ours[0] + ours[1] + msg, records) == [True, True]


@pytest.mark.parametrize("path,dns_file,index", [
    ("rfc6376/appendix_a2_signed.eml", "rfc6376/dns.json", 0),
    ("rfc8463/appendix_a3_signed.eml", "rfc8463/dns.json", 0),
    ("rfc8463/appendix_a3_signed.eml", "rfc8463/dns.json", 1),
    ("dkimpy/rfc6376.signed.msg", "rfc8463/dns.json", 0),
    ("dkimpy/rfc6376.signed.msg", "rfc8463/dns.json", 1),
    ("dkimpy/ed25519test2.msg", "dkimpy/eximtest.dns", 0),
])
def test_corpus_signatures_check_out_with_our_canonicalisation(path, dns_file, index):
    msg = DK(path).read_bytes()
    if dns_file.endswith(".json"):
        records = json.loads(DK(dns_file).read_text())
        sigs = [v for n, v in core.parse_headers(core.split_message(core.wire_form(msg))[0])
                if n.lower() == b"dkim-signature"]
        s = _tag(sigs[index], b"s").decode()
        d = _tag(sigs[index], b"d").decode()
        txt = records[f"{s}._domainkey.{d}"]
        # and dkimpy agrees these vectors verify
        assert dkimpy_verify_all(msg, records)[index] is True
    else:
        txt = DK(dns_file).read_text().strip()
    check_with_own_canon(msg, index, txt)
    # a changed body must not pass
    with pytest.raises((AssertionError, InvalidSignature)):
        check_with_own_canon(msg.replace(b"Joe.", b"Jim.").replace(b"test", b"tost"), index, txt)


# ------------------------------------------------------------------ our signer vs dkimpy
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    rk = rsa.generate_private_key(65537, 2048)
    ek = ed25519.Ed25519PrivateKey.generate()
    return {"rsa": rk, "ed25519": ek, "rsa_file": write_key(d / "s1.rsa.pem", rk),
            "ed_file": write_key(d / "e1.ed25519.pem", ek), "dir": d}


def _ring(keys, domain="example.com", **kw):
    srcs = [KeySource(domain, "s1", "rsa", str(keys["rsa_file"]), **kw),
            KeySource(domain, "e1", "ed25519", str(keys["ed_file"]), **kw)]
    return KeyRing(lambda: srcs)


def _records(keys, domain="example.com"):
    return {f"s1._domainkey.{domain}": dns_record(keys["rsa"]),
            f"e1._domainkey.{domain}": dns_record(keys["ed25519"])}


def test_output_is_identical_to_dkimpys(keys, monkeypatch):
    msg = core.wire_form(b"From: Ann <ann@example.com>\r\nTo: b@x.test\r\nSubject: hi\r\n"
                         b"Date: Sat, 28 Nov 2026 05:00:00 +0000\r\nMessage-ID: <1@example.com>"
                         b"\r\n\r\nHello  there \r\n\r\n")
    ring = _ring(keys)
    now = 1_790_000_000
    monkeypatch.setattr(dkim.time, "time", lambda: now)
    pem = keys["rsa_file"].read_bytes()
    seed = base64.b64encode(keys["ed25519"].private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption()))
    for canon in (("relaxed", "relaxed"), ("simple", "simple"), ("relaxed", "simple")):
        for k, priv, alg in ((ring.by_domain["example.com"][0], pem, b"rsa-sha256"),
                             (ring.by_domain["example.com"][1], seed, b"ed25519-sha256")):
            k.spec = k.spec._replace(header_canon=canon[0], body_canon=canon[1])
            sec, _ = core.split_message(msg)
            include = core.choose_headers(core.parse_headers(sec), k.spec.headers)
            ours = Signer(ring).signatures(msg, now, keys=[k])
            theirs = dkim.sign(msg, k.spec.selector.encode(), b"example.com", priv,
                               canonicalize=(canon[0].encode(), canon[1].encode()),
                               include_headers=include, signature_algorithm=alg)
            assert ours == theirs, (canon, alg)


AWKWARD = {
    "folded_long": b"From: A Very Long Display Name That Goes On <ann@example.com>\r\n"
                   b"To: one@x.test,\r\n two@x.test,\r\n\tthree@x.test\r\nSubject: " +
                   b"word " * 150 + b"\r\n Continued\r\nDate: Sat, 28 Nov 2026 05:00:00 +0000\r\n"
                   b"Message-ID: <f@example.com>\r\n\r\nBody\r\n",
    "duplicates": b"From: ann@example.com\r\nTo: a@x.test\r\nTo: b@x.test\r\nSubject: one\r\n"
                  b"Subject: two\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\nbody\r\n",
    "odd_case": b"fROM: ann@example.com\r\nsUbJeCt: Case\r\nMESSAGE-ID: <o@example.com>\r\n"
                b"CONTENT-type: text/plain\r\n\r\nbody  with   spaces\t\r\n",
    "utf8": ("From: Ännchen <ann@example.com>\r\nTo: jürgen@bücher.example\r\n"
             "Subject: Grüße aus Köln\r\nContent-Type: text/plain; charset=utf-8\r\n"
             "Content-Transfer-Encoding: 8bit\r\n\r\nSchöne Grüße \t\r\n😀 ünïcödé\r\n"
             ).encode(),
    "8bit_latin1": b"From: ann@example.com\r\nSubject: latin-1\r\nContent-Type: text/plain; "
                   b"charset=iso-8859-1\r\n\r\nGr\xfc\xdfe \xa0\xff\r\n",
    "empty_body": b"From: ann@example.com\r\nSubject: empty\r\n\r\n",
    "no_body_at_all": b"From: ann@example.com\r\nSubject: headers only\r\n",
    "bare_lf": b"From: ann@example.com\nSubject: lf\nTo: x@y.test\n\nline 1\nline 2  \n\n\n",
    "already_signed": b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=other.test;"
                      b" s=x; h=from; bh=AAAA; b=AAAA\r\nFrom: ann@example.com\r\n"
                      b"Subject: forwarded\r\n\r\nbody\r\n",
    "trailing_blank_lines": b"From: ann@example.com\r\n\r\nbody\r\n\r\n\r\n \r\n",
    "dot_lines": b"From: ann@example.com\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n",
}


@pytest.mark.parametrize("name", sorted(AWKWARD))
def test_awkward_messages_verify_with_dkimpy(keys, name):
    signer = Signer(_ring(keys))
    out = signer.sign(AWKWARD[name], time.time())
    assert out.startswith(b"DKIM-Signature: v=1; a=rsa-sha256")
    n = 3 if name == "already_signed" else 2
    got = dkimpy_verify_all(out, _records(keys))
    assert got[:2] == [True, True] and len(got) == n   # the old one (bogus) stays below
    # any change to a signed part breaks both signatures
    tampered = out.replace(b"ann@example.com", b"eve@example.com", 1)
    assert dkimpy_verify_all(tampered, _records(keys))[:2] == [False, False]


perl = pytest.mark.skipif(not have_perl_dkim(), reason="Mail::DKIM not installed "
                          "(apt-get install libmail-dkim-perl; .ci/run installs it)")


@perl
def test_awkward_messages_verify_with_perl_mail_dkim(keys, dns_server):
    for sel, rec in _records(keys).items():
        publish(dns_server, sel.split(".")[0], "example.com", rec)
    signer = Signer(_ring(keys))
    signed = {name: signer.sign(raw, time.time()) for name, raw in AWKWARD.items()}
    for name, msg in signed.items():
        rows = perl_verify(msg, dns_server.port)
        rsa_rows = [r for a, r in rows if a == "rsa-sha256" and r != "invalid"]
        assert rsa_rows[0] == "pass", (name, rows)
        # Mail::DKIM 1.20230212 (Debian 12) does not know ed25519-sha256 for DKIM: it calls
        # such a signature "invalid" (unsupported), never "fail"; dkimpy checks those
        assert all(r in ("pass", "invalid") for a, r in rows if a == "ed25519-sha256"), rows
    # a tampered message fails there too
    bad = signed["utf8"].replace("Köln".encode(), b"Koeln")
    assert perl_verify(bad, dns_server.port)[0] == ("rsa-sha256", "fail")


def test_dkimpy_verifies_through_the_loopback_dns(keys, dns_server):
    for sel, rec in _records(keys, "dnsverify.test").items():
        publish(dns_server, sel.split(".")[0], "dnsverify.test", rec)
    out = Signer(_ring(keys, "dnsverify.test")).sign(
        b"From: x@dnsverify.test\r\nSubject: s\r\n\r\nb\r\n", time.time())
    assert dkimpy_verify_all(out, loopback_dnsfunc(dns_server.port)) == [True, True]
    assert dns_server.query_count("s1._domainkey.dnsverify.test", "TXT") >= 1


# ------------------------------------------------------------------ the signer
def test_a_body_for_several_recipients_is_hashed_once(keys):
    signer = Signer(_ring(keys))
    body = b"Same body for everyone\r\n" * 80
    now = time.time()
    for i in range(5):
        # personalised headers, one body: hashed once
        raw = bytes(f"From: ann@example.com\r\nTo: user{i}@x.test\r\n\r\n".encode() + body)
        out = signer.sign(raw, now)
        assert dkimpy_verify_all(out, _records(keys)) == [True, True]
    assert signer.counters["body_hashes"] == 1       # relaxed body, both keys share it
    assert signer.counters["body_hash_hits"] == 9
    assert signer.counters["signatures"] == 10
    # what the relay gets for one message to several recipients: a separate bytes object
    # per recipient, same content: signed once per second, the same bytes each time
    raw = b"From: ann@example.com\r\nTo: list@x.test\r\n\r\n" + body
    outs = {signer.sign(bytes(bytearray(raw)), now) for _ in range(4)}
    assert len(outs) == 1 and signer.counters["signature_reuses"] == 3
    assert dkimpy_verify_all(outs.pop(), _records(keys)) == [True, True]


def test_no_key_for_the_domain_leaves_the_message_as_is(keys):
    signer = Signer(_ring(keys))
    raw = b"From: ann@elsewhere.test\r\n\r\nhi\r\n"
    assert signer.sign(raw, time.time()) == raw
    assert signer.counters["unsigned_no_key"] == 1


def test_parent_domain_key_signs_subdomain_mail_only_when_enabled(keys):
    srcs = [KeySource("example.com", "s1", "rsa", str(keys["rsa_file"]))]
    raw = b"From: ann@news.mail.example.com\r\n\r\nhi\r\n"
    on = Signer(KeyRing(lambda: srcs, parent_domains=True)).sign(raw, 1e9)
    assert b"d=example.com" in on
    assert dkimpy_verify_all(on, {"s1._domainkey.example.com": dns_record(keys["rsa"])}) == [True]
    off = Signer(KeyRing(lambda: srcs, parent_domains=False)).sign(raw, 1e9)
    assert off == raw


def test_expiry_and_identity_tags(keys):
    srcs = [KeySource("example.com", "s1", "rsa", str(keys["rsa_file"]), expire_after=3600,
                      identity="bounces@example.com")]
    now = int(time.time())
    out = Signer(KeyRing(lambda: srcs)).sign(b"From: a@example.com\r\n\r\nx\r\n", now)
    assert _tag(out, b"x") == str(now + 3600).encode()
    assert _tag(out, b"i") == b"bounces@example.com"
    assert dkimpy_verify_all(out, {"s1._domainkey.example.com": dns_record(keys["rsa"])}) == [True]


def test_keys_never_show_in_reprs_or_pickles(keys):
    ring = _ring(keys)
    k = ring.by_domain["example.com"][0]
    pem = keys["rsa_file"].read_text()
    secret_line = pem.splitlines()[3]
    for text in (repr(k), str(k), repr(ring), repr(Signer(ring)), json.dumps(ring.describe())):
        assert secret_line not in text and "PRIVATE" not in text
    assert "key hidden" in repr(k)
    with pytest.raises(TypeError, match="not serialisable"):
        pickle.dumps(k)


# ------------------------------------------------------------------ key files
def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def test_bad_key_files_are_refused_naming_the_file(tmp_path):
    notkey = tmp_path / "notkey.pem"
    notkey.write_text("hello\n")
    with pytest.raises(KeyFileError, match="notkey.pem: not a PEM private key"):
        load_private_key(notkey)
    enc = tmp_path / "enc.pem"
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024",
             "-aes256", "-pass", "pass:secret", "-out", str(enc))
    with pytest.raises(KeyFileError, match="enc.pem: the key is encrypted"):
        load_private_key(enc)
    small = tmp_path / "small.pem"
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:768", "-out",
             str(small))
    with pytest.raises(KeyFileError, match="small.pem: RSA key of 768 bits.*RFC 8301"):
        load_private_key(small)
    ed448 = tmp_path / "ed448.pem"
    _openssl("genpkey", "-algorithm", "ED448", "-out", str(ed448))
    with pytest.raises(KeyFileError, match="Ed448 key"):
        load_private_key(ed448)
    mid = tmp_path / "mid.pem"
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-out", str(mid))
    _, alg, bits, warnings = load_private_key(mid)
    assert (alg, bits) == ("rsa", 1024) and "2048" in warnings[0]
    with pytest.raises(KeyFileError, match="missing.pem: cannot read"):
        load_private_key(tmp_path / "missing.pem")
    # the error text never carries key material
    try:
        load_private_key(mid, data=mid.read_bytes()[:200])
    except KeyFileError as e:
        assert "MII" not in str(e)


def test_key_directory_layout(tmp_path, keys):
    d = tmp_path / "keys" / "example.com"
    d.mkdir(parents=True)
    write_key(d / "s2026.rsa.pem", keys["rsa"])
    write_key(d / "e2026.ed25519.pem", keys["ed25519"])
    (d / "README").write_text("ignored")
    srcs = scan_key_directory(str(tmp_path / "keys"))
    assert sorted((s.domain, s.selector, s.algorithm) for s in srcs) == \
        [("example.com", "e2026", "ed25519"), ("example.com", "s2026", "rsa")]
    write_key(d / "bad_sel.rsa.pem", keys["rsa"])
    with pytest.raises(KeyFileError, match="bad_sel.rsa.pem: selector 'bad_sel'"):
        scan_key_directory(str(tmp_path / "keys"))


def test_keyring_reloads_a_rotated_file_and_keeps_the_old_key_on_a_bad_one(tmp_path):
    f = tmp_path / "s1.rsa.pem"
    k1 = rsa.generate_private_key(65537, 2048)
    write_key(f, k1)
    src = [KeySource("example.com", "s1", "rsa", str(f))]
    ring = KeyRing(lambda: src, interval=0.0)
    first = ring.by_domain["example.com"][0]
    assert ring.reload() == []                       # unchanged file: nothing re-read
    k2 = ed25519.Ed25519PrivateKey.generate()
    f.unlink()
    f.write_text("garbage")
    os.utime(f, (time.time() + 5, time.time() + 5))
    ring.maybe_reload()
    assert ring.by_domain["example.com"][0] is first and "not a PEM" in ring.errors[0]
    k2 = rsa.generate_private_key(65537, 2048)
    f.unlink()
    write_key(f, k2)
    os.utime(f, (time.time() + 10, time.time() + 10))
    gen = ring.generation
    changed = ring.reload()
    assert changed == ["example.com/s1 (rsa-sha256, 2048 bits) reloaded"]
    assert ring.generation == gen + 1 and ring.errors == []
    now_key: DkimKey = ring.by_domain["example.com"][0]
    assert now_key is not first
    assert now_key.public_key_b64() == dns_record(k2).split("p=")[1]
