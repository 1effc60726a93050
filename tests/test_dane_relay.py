"""DANE end to end on loopback, through the relay's connection path (RelayPool._connection, no
Ray): zones served by nsd, one signed (ldns-signzone) and validated by unbound with a trust
anchor, one unsigned; raymta asks unbound only, with DO/AD. STARTTLS sinks (aiosmtpd) with a
certificate from a test CA.
- a signed MX host whose TLSA ``3 1 1`` matches the sink's key: delivered over TLS, counted
  as a DANE connection;
- a signed MX host whose TLSA digest is wrong: deferred 4.7.5 (auth-failure, rule dane), the
  sink gets nothing;
- a signed MX host with TLSA records whose sink offers no STARTTLS: deferred 4.7.5, nothing sent
  in plaintext;
- an unsigned (insecure) zone with the same wrong TLSA: DANE does not apply, delivered with
  opportunistic TLS;
- a signed MX host whose TLSA RRset is bogus (changed after signing): unbound answers
  SERVFAIL, the host is not contacted (deferred);
- DANE-TA ``2 0 1`` naming the CA a sink sends after its leaf: delivered under the leaf's
  name, deferred under a name the leaf does not carry;
- DANE wins over MTA-STS: a recipient domain whose enforced policy no MX host matches is
  deferred by MTA-STS without DANE, delivered to the DANE host with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cluster.devservers import SmtpSink
from tests.conftest import pipeline_config
from tests.dane_dns import SignedDns, have_signed_dns
from tests.ingress_certs import make_ca
from tests.mta_sts_helpers import PolicyServer, policy_text

HOST = "127.0.0.1"

if not have_signed_dns():
    pytest.fail("nsd, unbound and ldnsutils are needed (apt-get install nsd unbound "
                "ldnsutils; .ci/run installs them)", pytrace=False)


def _spki_sha256(cert_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("dane")
    ca = make_ca(d / "ca")
    cert, key = ca.server_cert("mx.sec.test", [HOST], also=["bad.sec.test", "mx.plain.test"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tls_sink = SmtpSink(HOST, tls_context=ctx, name="tls").start()
    bare_sink = SmtpSink(HOST, name="bare").start()
    # a sink sending its chain (leaf, then the CA) for DANE-TA: 2 0 1 names the CA
    ta_cert, ta_key = ca.server_cert("ta.sec.test", [HOST], stem="ta")
    chain_file = d / "ta-chain.pem"
    chain_file.write_bytes(ta_cert.read_bytes() + ca.ca_file.read_bytes())
    ta_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ta_ctx.load_cert_chain(chain_file, ta_key)
    ta_sink = SmtpSink(HOST, tls_context=ta_ctx, name="ta").start()
    ca_sha256 = hashlib.sha256(ca.cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    good = _spki_sha256(cert)
    wrong = hashlib.sha256(b"not the key").hexdigest()
    p, q, r = tls_sink.port, bare_sink.port, ta_sink.port
    signed = (f"mx.sec.test. A {HOST}\n_{p}._tcp.mx.sec.test. TLSA 3 1 1 {good}\n"
              f"bad.sec.test. A {HOST}\n_{p}._tcp.bad.sec.test. TLSA 3 1 1 {wrong}\n"
              f"nostarttls.sec.test. A {HOST}\n_{q}._tcp.nostarttls.sec.test. TLSA 3 1 1 {good}\n"
              f"bogus.sec.test. A {HOST}\n_{p}._tcp.bogus.sec.test. TLSA 3 1 1 {good}\n"
              f"ta.sec.test. A {HOST}\n_{r}._tcp.ta.sec.test. TLSA 2 0 1 {ca_sha256}\n"
              # the same chain under a name its certificate does not carry
              f"taname.sec.test. A {HOST}\n_{r}._tcp.taname.sec.test. TLSA 2 0 1 {ca_sha256}\n")
    # sts.plain.test publishes an MTA-STS policy in mode enforce that none of the MX hosts
    # here matches
    sts_cert, sts_key = ca.server_cert("mta-sts.sts.plain.test", [], stem="sts")
    sts = PolicyServer(HOST, sts_cert, sts_key).start()
    sts.serve("sts.plain.test", policy_text("enforce", ["*.nowhere.test"]))
    unsigned = (f"mx.plain.test. A {HOST}\n_{p}._tcp.mx.plain.test. TLSA 3 1 1 {wrong}\n"
                f'_mta-sts.sts.plain.test. TXT "v=STSv1; id=1"\n'
                f"mta-sts.sts.plain.test. A {HOST}\n")
    dns = SignedDns({"sec.test": (signed, True), "plain.test": (unsigned, False)},
                    tamper={"sec.test": (f"_{p}._tcp.bogus.sec.test.", good, wrong)}).start()
    try:
        yield {"dns": dns, "tls": tls_sink, "bare": bare_sink, "ta": ta_sink,
               "spool": d / "spool", "ca_file": str(ca.ca_file), "sts_port": sts.port}
    finally:
        dns.stop()
        sts.stop()
        ta_sink.stop()
        tls_sink.stop()
        bare_sink.stop()


def _relay(world: dict[str, Any], dane: bool) -> Any:
    from actors.relay_pool import RelayPool
    cfg = pipeline_config(str(world["spool"]), world["dns"].port, 25)
    cfg = dataclasses.replace(
        cfg, dns=dataclasses.replace(cfg.dns, ipv6=False),
        delivery=dataclasses.replace(cfg.delivery, dane=dane, idle_timeout=0.05,
                                     mta_sts_port=world["sts_port"],
                                     tls_ca_file=world["ca_file"]))
    return RelayPool(cfg, "relay:test:default", cfg.egress[0])


@pytest.fixture
def relay(world):
    return _relay(world, dane=True)


async def _one(relay: Any, host: str, port: int, rcpt: str) -> list[Any]:
    """One message to ``rcpt`` through a connection to ``host``: the relay's result."""
    from actors.relay_pool import _Call
    from cluster.core.sites import SiteLimits, limits_to_wire
    s = relay._site(host, {"hosts": [[10, host, [HOST]]], "port": port,
                           "limits": limits_to_wire(SiteLimits()),
                           "throttle": "throttle:pool:0", "items": []})
    assert relay._guard(s) is None
    call = _Call(relay, "coordinator:0")
    call.expected = 1
    s.queue.append((["m-" + rcpt, 1, "sender@origin.test", rcpt,
                     b"Subject: dane\r\n\r\nhello\r\n", False], call))
    await asyncio.wait_for(relay._connection(s, 1), 30)
    return relay._outboxes["coordinator:0"].pop()


def _deliver(relay: Any, host: str, port: int, *rcpts: str) -> Any:
    """The results of one message per recipient, one connection each, in one event loop
    (the relay's state is bound to it): one result, or a list of them."""
    async def run() -> list[list[Any]]:
        return [await _one(relay, host, port, r) for r in rcpts]

    out = asyncio.run(run())
    return out[0] if len(out) == 1 else out


def _got(sink: SmtpSink, rcpt: str) -> list[Any]:
    return [r for r in sink.received if r.rcpt_to == rcpt]


def test_matching_tlsa_delivers_over_tls(world, relay) -> None:
    res, res2 = _deliver(relay, "mx.sec.test", world["tls"].port, "a@good.test",
                         "a2@good.test")
    assert res[1] == "delivered", res
    got = _got(world["tls"], "a@good.test")
    assert len(got) == 1 and got[0].tls
    # the second connection used the cached status (kept for the answers' TTL)
    assert res2[1] == "delivered", res2
    st = relay.dane.stats()
    assert (st["dane_connections"], st["dane_lookups"], st["dane_hosts"],
            st["dane_failures"]) == (2, 1, 1, 0)
    assert relay.tls_sites["mx.sec.test"]["dane"] == 2


def test_wrong_tlsa_digest_defers_4_7_5(world, relay) -> None:
    res = _deliver(relay, "bad.sec.test", world["tls"].port, "b@bad.test")
    _id, outcome, _code, enhanced, text, category, _host = res
    assert (outcome, enhanced, category) == ("transient", "4.7.5", "auth-failure"), res
    assert text.startswith("DANE: certificate of bad.sec.test [127.0.0.1] does not match "
                           "its TLSA records (3 1 1 ")
    assert "matches no TLSA record" in text
    assert not _got(world["tls"], "b@bad.test")
    assert relay.dane.stats()["dane_failures"] == 1


def test_no_starttls_under_dane_defers_never_plaintext(world, relay) -> None:
    res = _deliver(relay, "nostarttls.sec.test", world["bare"].port, "c@bare.test")
    assert res[1:4] == ["transient", None, "4.7.5"], res
    assert "publishes TLSA records but does not offer STARTTLS" in res[4]
    assert not _got(world["bare"], "c@bare.test")


def test_unsigned_zone_is_opportunistic(world, relay) -> None:
    res = _deliver(relay, "mx.plain.test", world["tls"].port, "d@plain.test")
    assert res[1] == "delivered", res
    got = _got(world["tls"], "d@plain.test")
    assert len(got) == 1 and got[0].tls      # opportunistic TLS: encrypted, not verified
    st = relay.dane.stats()
    assert (st["dane_connections"], st["dane_insecure"]) == (0, 1)


def test_bogus_tlsa_is_not_contacted(world, relay) -> None:
    res = _deliver(relay, "bogus.sec.test", world["tls"].port, "e@bogus.test")
    assert res[1:4] == ["transient", None, "4.7.5"], res
    port = world["tls"].port
    assert f"TLSA lookup for _{port}._tcp.bogus.sec.test failed (servfail)" in res[4]
    assert not _got(world["tls"], "e@bogus.test")
    assert relay.dane.stats()["dane_lookup_failures"] == 1


def test_dane_ta_checks_the_chain_and_the_name(world, relay) -> None:
    """2 0 1 names the CA the sink sends after its leaf: the leaf it issued, valid and named
    ta.sec.test, is accepted; the same chain reached as taname.sec.test is not (§3.2.3)."""
    res = _deliver(relay, "ta.sec.test", world["ta"].port, "f@ta.test")
    assert res[1] == "delivered", res
    got = _got(world["ta"], "f@ta.test")
    assert len(got) == 1 and got[0].tls
    res = _deliver(relay, "taname.sec.test", world["ta"].port, "g@ta.test")
    assert res[1:4] == ["transient", None, "4.7.5"], res
    assert "the certificate names (ta.sec.test) do not include taname.sec.test" in res[4]
    assert not _got(world["ta"], "g@ta.test")
    assert relay.dane.stats()["dane_connections"] == 1


def test_dane_wins_over_mta_sts(world) -> None:
    """RFC 8461 §2: sts.plain.test enforces an MTA-STS policy no MX host here matches. Without
    DANE its mail to mx.sec.test is deferred by MTA-STS; with DANE, mx.sec.test's secure TLSA
    records decide, and it is delivered."""
    off = _deliver(_relay(world, dane=False), "mx.sec.test", world["tls"].port,
                   "h@sts.plain.test")
    assert off[1:4] == ["transient", None, "4.7.5"], off
    assert off[4].startswith("MTA-STS: no MX host of sts.plain.test matches")
    on = _relay(world, dane=True)
    res = _deliver(on, "mx.sec.test", world["tls"].port, "i@sts.plain.test")
    assert res[1] == "delivered", res
    assert len(_got(world["tls"], "i@sts.plain.test")) == 1
    assert on.dane.stats()["dane_connections"] == 1
    assert on.sts.stats()["sts_lookups"] == 0      # MTA-STS not even consulted
