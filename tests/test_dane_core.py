"""DANE's pure rules (cluster/core/dane.py), with certificates made here (cryptography) and read
by the adapter's cert_facts: TLSA parsing, usable records, when DANE applies (RFC 7672 §2.2),
and which chains meet which records (§3.1)."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster.adapters.dane import cert_facts
from cluster.core.dane import Tlsa, TlsaError, check_chain, dane_status, parse_tlsa, tlsa_name
from cluster.core.replies import Outcome, dane_failure

NOW = datetime.datetime.now(datetime.UTC)
HOST = "mx.sec.test"


@dataclass
class Made:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def spki(self) -> bytes:
        return self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def make(cn: str, issuer: Made | None = None, *, ca: bool = False, names: tuple[str, ...] = (),
         days: tuple[int, int] = (-1, 1)) -> Made:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer.cert.subject if issuer else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW + datetime.timedelta(days=days[0]))
         .not_valid_after(NOW + datetime.timedelta(days=days[1])))
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if names:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                            critical=False)
    return Made(b.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def rec(usage: int, selector: int, mtype: int, m: Made) -> Tlsa:
    content = m.der if selector == 0 else m.spki
    data = {0: content, 1: hashlib.sha256(content).digest(),
            2: hashlib.sha512(content).digest()}[mtype]
    return Tlsa(usage, selector, mtype, data)


ROOT = make("test root", ca=True)
INTER = make("test intermediate", ROOT, ca=True)
LEAF = make(HOST, INTER, names=(HOST,))
WILD = make("wild", INTER, names=("*.sec.test",))
OTHER_NAME = make("other", INTER, names=("mx.elsewhere.test",))
EXPIRED = make(HOST, INTER, names=(HOST,), days=(-10, -1))
SELF_EXPIRED = make("no name at all", days=(-10, -1))     # self-signed, expired, wrong name
STRANGER = make("stranger", ca=True)
FORGED = make(HOST, STRANGER, names=(HOST,))             # names right, issued by someone else
T = NOW.timestamp()


def chain(*ms: Made) -> list:
    return cert_facts([m.der for m in ms])


CHAIN_CASES = [
    # (name, records, chain, expected error substring or None)
    ("3 1 1 matches the leaf SPKI", [rec(3, 1, 1, LEAF)], chain(LEAF, INTER), None),
    ("3 0 1 matches the full leaf", [rec(3, 0, 1, LEAF)], chain(LEAF, INTER), None),
    ("3 1 2 SHA-512", [rec(3, 1, 2, LEAF)], chain(LEAF), None),
    ("3 1 0 exact SPKI", [rec(3, 1, 0, LEAF)], chain(LEAF), None),
    ("DANE-EE ignores name and expiry", [rec(3, 1, 1, SELF_EXPIRED)], chain(SELF_EXPIRED),
     None),
    ("3 1 1 of another key", [rec(3, 1, 1, OTHER_NAME)], chain(LEAF, INTER),
     "matches no TLSA record"),
    ("DANE-EE does not match an issuer", [rec(3, 1, 1, INTER)], chain(LEAF, INTER),
     "matches no TLSA record"),
    ("2 0 1 intermediate as TA", [rec(2, 0, 1, INTER)], chain(LEAF, INTER), None),
    ("2 1 1 root as TA, full chain sent", [rec(2, 1, 1, ROOT)], chain(LEAF, INTER, ROOT),
     None),
    ("DANE-TA: wildcard name", [rec(2, 0, 1, INTER)], chain(WILD, INTER), None),
    ("DANE-TA: wrong name", [rec(2, 0, 1, INTER)], chain(OTHER_NAME, INTER),
     "do not include mx.sec.test"),
    ("DANE-TA: expired leaf", [rec(2, 0, 1, INTER)], chain(EXPIRED, INTER),
     "expired or not yet valid"),
    ("DANE-TA: TA in the chain but did not issue the leaf", [rec(2, 0, 1, INTER)],
     chain(FORGED, INTER), "does not lead from the leaf"),
    ("DANE-TA: TA not sent", [rec(2, 1, 1, ROOT)], chain(LEAF, INTER),
     "matches no TLSA record"),
    ("one good record among bad ones", [rec(3, 1, 1, OTHER_NAME), rec(2, 0, 1, INTER)],
     chain(LEAF, INTER), None),
    ("no certificate", [rec(3, 1, 1, LEAF)], [], "no certificate"),
]


@pytest.mark.parametrize("name,records,facts,expected", CHAIN_CASES,
                         ids=[c[0] for c in CHAIN_CASES])
def test_check_chain(name: str, records: list[Tlsa], facts: list, expected: str | None) -> None:
    got = check_chain(records, facts, HOST, T)
    if expected is None:
        assert got is None
    else:
        assert got is not None and expected in got


def test_cert_facts_reads_links_and_names() -> None:
    f = chain(LEAF, INTER, ROOT)
    assert [x.issued_by_next for x in f] == [True, True, False]
    assert f[0].names == (HOST,) and f[0].spki == LEAF.spki
    assert chain(FORGED, INTER)[0].issued_by_next is False
    assert chain(SELF_EXPIRED)[0].names == ("no name at all",)   # the CN without a SAN


USABLE = [
    ("3 1 1", True), ("2 0 1", True), ("3 1 2", True), ("3 0 0", True),
    ("0 0 1", False),   # PKIX-TA: not for SMTP (RFC 7672 §3.1.3)
    ("1 1 1", False),   # PKIX-EE
    ("3 2 1", False),   # unknown selector
    ("3 1 3", False),   # unknown matching type
    ("3 1 1 short", False),   # a SHA-256 digest of the wrong length
]


@pytest.mark.parametrize("params,usable", USABLE, ids=[u[0] for u in USABLE])
def test_usable(params: str, usable: bool) -> None:
    u, s, m, *short = params.split()
    data = b"\x01" * (4 if short else {"0": 40, "1": 32, "2": 64, "3": 32}[m])
    assert Tlsa(int(u), int(s), int(m), data).usable is usable


def test_parse_tlsa() -> None:
    r = parse_tlsa("3 1 1 " + "ab" * 16 + " " + "cd" * 16)
    assert (r.usage, r.selector, r.mtype, r.data) == (3, 1, 1, bytes.fromhex("ab" * 16 + "cd" * 16))
    for bad, words in [("3 1", "expected"), ("3 x 1 ab", "selector 'x'"),
                       ("3 1 1 zz", "not hex"), ("300 1 1 ab", "usage '300'")]:
        with pytest.raises(TlsaError, match=words):
            parse_tlsa(bad)
    assert tlsa_name("MX.Sec.Test.", 25) == "_25._tcp.mx.sec.test"


GOOD = [rec(3, 1, 1, LEAF)]
PKIX_ONLY = [rec(1, 1, 1, LEAF), rec(0, 0, 1, ROOT)]
STATUS = [
    # (name, address_secure, tlsa_error, tlsa_secure, records, mode, reason substring)
    ("secure with usable records: DANE", True, None, True, GOOD, "dane", "1 usable"),
    ("insecure addresses: no DANE, TLSA not even looked at", False, None, True, GOOD, "none",
     "address records not DNSSEC-secure"),
    ("insecure TLSA", True, None, False, GOOD, "none", "TLSA records not DNSSEC-secure"),
    ("no TLSA records (secure denial)", True, None, True, [], "none", "no TLSA records"),
    ("no TLSA name", True, "nxdomain", True, [], "none", "no TLSA records"),
    ("PKIX usages only: opportunistic", True, None, True, PKIX_ONLY, "none",
     "no usable TLSA record"),
    ("TLSA SERVFAIL (bogus) for a signed host: defer", True, "servfail", False, [], "defer",
     "RFC 7672 §2.2"),
    ("TLSA timeout for a signed host: defer", True, "timeout", False, [], "defer",
     "(timeout)"),
    ("TLSA SERVFAIL for an unsigned host: no DANE", False, "servfail", False, [], "none",
     "address"),
    ("usable and unusable: only the usable kept", True, None, True, PKIX_ONLY + GOOD, "dane",
     "1 usable"),
]


@pytest.mark.parametrize("name,addr_secure,error,tlsa_secure,records,mode,reason", STATUS,
                         ids=[s[0] for s in STATUS])
def test_dane_status(name: str, addr_secure: bool, error: str | None, tlsa_secure: bool,
                     records: list[Tlsa], mode: str, reason: str) -> None:
    st = dane_status(HOST, address_secure=addr_secure, tlsa_error=error,
                     tlsa_secure=tlsa_secure, records=records)
    assert st.mode == mode
    assert reason in st.reason
    if mode == "dane":
        assert all(r.usable for r in st.records) and st.records


def test_dane_failure_is_transient_4_7_5() -> None:
    c = dane_failure("DANE: certificate of mx.sec.test [127.0.0.1] does not match")
    assert c.outcome == Outcome.TRANSIENT
    assert (c.enhanced, c.category, c.rule) == ("4.7.5", "auth-failure", "dane")
