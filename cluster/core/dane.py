"""DANE for SMTP (RFC 7672, RFC 7671, RFC 6698): TLSA records and what they ask of a connection.

Role: the pure half of DANE (``cluster.adapters.dane`` asks the validating resolver and reads
the certificates, the relay applies the result). An MX host publishes ``_25._tcp.<mxhost>
TLSA`` records in a DNSSEC-signed zone; raymta trusts a DNS answer as secure only when its
resolver set the AD flag (the resolver validated it: raymta must be pointed at a validating
resolver on its own host or loopback, as Postfix requires).
Owns:
- the TLSA record (:func:`parse_tlsa`, :class:`Tlsa`): usages 2 (DANE-TA) and 3 (DANE-EE) are
  usable; selectors 0 (full certificate) and 1 (SubjectPublicKeyInfo); matching types 0
  (exact), 1 (SHA-256) and 2 (SHA-512). PKIX usages 0 and 1 are unusable for SMTP (RFC 7672
  §3.1.3), as are unknown values (RFC 7671 §4.1);
- when DANE applies to an MX host (:func:`dane_status`, RFC 7672 §2.1, §2.2): its address
  records and its TLSA RRset are DNSSEC-secure and at least one TLSA record is usable; then TLS
  is mandatory and the certificate must match. A secure host whose TLSA lookup failed
  (SERVFAIL, bogus, timeout) is not contacted (§2.2: deferred); insecure or unusable only: as
  opportunistic TLS;
- whether a certificate chain meets the records (:func:`check_chain`, RFC 7672 §3.1):
  DANE-EE matches the leaf and ignores its names and dates (§3.1.1); DANE-TA matches a
  certificate of the chain the server sent, which must issue the chain down to the leaf, and
  the leaf must be valid now and carry the MX host name (§3.1.2, §3.2.3).
Pure: no sockets, no DNS, no X.509 parser (the adapter hands :class:`CertFacts`), no clock
(``now`` is an argument), no Ray.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cluster.core.mta_sts import mx_matches

__all__ = ["CertFacts", "DaneStatus", "Tlsa", "TlsaError", "check_chain", "dane_status",
           "parse_tlsa", "tlsa_name"]

#: usage values (RFC 6698 §2.1.1, RFC 7218 names)
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
_DIGEST_LEN = {1: 32, 2: 64}


class TlsaError(ValueError):
    """A TLSA record text that is not ``usage selector mtype hex``; the text says what."""


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 §3.1.3: only DANE-TA(2) and DANE-EE(3) apply to SMTP; RFC 7671 §4.1:
        records with unknown selectors or matching types (or a digest of the wrong length)
        are unusable and ignored."""
        return (self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1)
                and self.mtype in (0, 1, 2)
                and (self.mtype == 0 or len(self.data) == _DIGEST_LEN[self.mtype]))

    def matches(self, cert: CertFacts) -> bool:
        content = cert.der if self.selector == 0 else cert.spki
        if self.mtype == 0:
            return content == self.data
        h = hashlib.sha256 if self.mtype == 1 else hashlib.sha512
        return h(content).digest() == self.data

    def __str__(self) -> str:
        hx = self.data.hex()
        return f"{self.usage} {self.selector} {self.mtype} " + (hx[:16] + "..." if len(hx) > 16
                                                              else hx)


def parse_tlsa(text: str) -> Tlsa:
    """``"3 1 1 <hex>"`` (the presentation form; the hex may be split by spaces)."""
    parts = text.split()
    if len(parts) < 4:
        raise TlsaError(f"TLSA {text[:60]!r}: expected 'usage selector mtype hex'")
    nums = []
    for what, p in zip(("usage", "selector", "matching type"), parts[:3]):
        if not p.isdigit() or int(p) > 255:
            raise TlsaError(f"TLSA {text[:60]!r}: {what} {p!r} is not a number 0-255")
        nums.append(int(p))
    try:
        data = bytes.fromhex("".join(parts[3:]))
    except ValueError:
        raise TlsaError(f"TLSA {text[:60]!r}: association data is not hex") from None
    return Tlsa(nums[0], nums[1], nums[2], data)


def tlsa_name(host: str, port: int = 25) -> str:
    """RFC 6698 §3: the TLSA records of ``host`` port ``port`` are at ``_port._tcp.host``."""
    return f"_{port}._tcp.{host.lower().rstrip('.')}"


@dataclass(frozen=True)
class CertFacts:
    """What DANE needs of one certificate of the chain a server sent (the adapter reads it)."""

    der: bytes
    #: the DER SubjectPublicKeyInfo
    spki: bytes
    #: DNS names of the subjectAltName (the CN when there is none), lowercased
    names: tuple[str, ...]
    not_before: float
    not_after: float
    #: whether the next certificate of the chain signed this one
    issued_by_next: bool


@dataclass(frozen=True)
class DaneStatus:
    """What DANE asks of connections to one MX host: ``none`` (DANE does not apply: TLS as
    the site's policy says), ``dane`` (TLS mandatory, the chain must meet ``records``) or
    ``defer`` (do not contact the host now: its TLSA records could not be had securely)."""

    mode: Literal["none", "dane", "defer"]
    records: tuple[Tlsa, ...] = ()
    #: why (for logs, stats and the deferral text)
    reason: str = ""


def dane_status(host: str, *, address_secure: bool, tlsa_error: str | None,
                tlsa_secure: bool, records: Sequence[Tlsa], port: int = 25) -> DaneStatus:
    """RFC 7672 §2.1-§2.2 for one MX host. ``address_secure``: its A/AAAA answer carried AD;
    ``tlsa_error``: None (answered, maybe with no records), "nxdomain", "servfail" (which a
    validating resolver also gives for a bogus answer) or "timeout"; ``tlsa_secure``: the
    TLSA answer carried AD."""
    name = tlsa_name(host, port)
    if not address_secure:
        # §2.2.2: TLSA records are looked up only for hosts whose addresses are secure
        return DaneStatus("none", reason=f"{host}: address records not DNSSEC-secure")
    if tlsa_error not in (None, "nxdomain"):
        # §2.2: a failed lookup for a secure host may hide TLSA records an attacker
        # suppressed; the host must not be used without them
        return DaneStatus("defer", reason=f"DANE: TLSA lookup for {name} failed "
                          f"({tlsa_error}); {host} is DNSSEC-signed, so it is not contacted "
                          "without its TLSA answer (RFC 7672 §2.2)")
    if not records:
        return DaneStatus("none", reason=f"{name}: no TLSA records")
    if not tlsa_secure:
        return DaneStatus("none", reason=f"{name}: TLSA records not DNSSEC-secure")
    usable = tuple(r for r in records if r.usable)
    if not usable:
        # §3.1.3: e.g. only PKIX-TA/PKIX-EE records: as if there were none (opportunistic)
        return DaneStatus("none", reason=f"{name}: no usable TLSA record "
                          f"({', '.join(str(r) for r in records[:3])})")
    return DaneStatus("dane", usable, f"{name}: {len(usable)} usable TLSA record(s)")


def check_chain(records: Sequence[Tlsa], chain: Sequence[CertFacts], host: str,
                now: float) -> str | None:
    """None when the chain the server sent (leaf first) meets one of ``records``; else why
    not, in words for the deferral text."""
    if not chain:
        return "the server sent no certificate"
    leaf = chain[0]
    if any(r.usage == DANE_EE and r.matches(leaf) for r in records):
        return None     # §3.1.1: the key is the identity: no name, no expiry check
    why = ""
    for ta in (r for r in records if r.usage == DANE_TA):
        for j, cert in enumerate(chain):
            if not ta.matches(cert):
                continue
            # §3.1.2: the TA must issue the chain down to the leaf, and the leaf (and what
            # lies between) must be valid now; the TA's own dates do not matter
            if not all(c.issued_by_next for c in chain[:j]):
                why = f"the chain does not lead from the leaf to the TLSA {ta} trust anchor"
                continue
            if any(not c.not_before <= now <= c.not_after for c in chain[:j] or chain[:1]):
                why = "the certificate is expired or not yet valid"
                continue
            # §3.2.3: the reference identifier is the MX host name (the TLSA base domain)
            if not any(mx_matches(n, host) for n in leaf.names):
                why = (f"the certificate names ({', '.join(leaf.names[:3]) or 'none'}) do "
                       f"not include {host}")
                continue
            return None
    return why or "the certificate matches no TLSA record"
