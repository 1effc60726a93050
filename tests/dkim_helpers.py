"""Helpers for the DKIM tests: keys, DNS records, and three independent verifiers.

- :func:`dkimpy_verify_all`: dkimpy verifies every DKIM-Signature of a message, its key
  records coming from a dict or from a loopback DNS server (never the system resolver).
- :func:`perl_verify`: Perl's Mail::DKIM::Verifier, its resolver pointed at a loopback DNS
  server (``Mail::DKIM::DNS::resolver`` given a ``Net::DNS::Resolver`` on 127.0.0.1:port).
- :func:`check_with_own_canon`: recompute a signature's data with ``cluster.core.dkim`` and
  check it with ``cryptography`` (proves our canonicalisation on others' signed vectors).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from cluster.core import dkim as core

__all__ = [
    "check_with_own_canon",
    "dkimpy_verify_all",
    "have_perl_dkim",
    "loopback_dnsfunc",
    "perl_verify",
    "publish",
    "txt_strings",
    "write_key",
]


def txt_strings(record: str) -> str:
    """A TXT record's text as zone-file strings of at most 255 characters each."""
    parts = [record[i:i + 255] for i in range(0, len(record), 255)]
    return " ".join(f'"{p}"' for p in parts)


def publish(dns_server: Any, selector: str, domain: str, record: str) -> None:
    dns_server.add_record(f"{selector}._domainkey.{domain}", "TXT", txt_strings(record))


def loopback_dnsfunc(port: int, host: str = "127.0.0.1") -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` that asks the loopback DNS server only."""
    def get_txt(name: Any, timeout: float = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        q = dns.message.make_query(qname, dns.rdatatype.TXT)
        r = dns.query.udp(q, host, port=port, timeout=timeout)
        if r.flags & dns.flags.TC:
            r = dns.query.tcp(q, host, port=port, timeout=timeout)
        for rrset in r.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                for rd in rrset:
                    return b"".join(rd.strings)
        return None
    return get_txt


def dkimpy_verify_all(msg: bytes, records: dict[str, str] | Callable[..., Any]) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature in ``msg`` (top first)."""
    if callable(records):
        dnsfunc = records
    else:
        def dnsfunc(name: Any, timeout: float = 5) -> bytes | None:
            n = (name.decode() if isinstance(name, bytes) else name).rstrip(".")
            v = records.get(n)
            return v.encode() if v is not None else None
    d = dkim.DKIM(msg)
    n = sum(1 for k, _ in d.headers if k.lower() == b"dkim-signature")
    return [bool(d.verify(idx=i, dnsfunc=dnsfunc)) for i in range(n)]


_PERL = r'''
use strict; use warnings;
use Mail::DKIM::Verifier; use Mail::DKIM::DNS; use Net::DNS::Resolver;
my $port = shift @ARGV;
my $res = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port,
                                  recurse => 0, tcp_timeout => 5, udp_timeout => 5,
                                  searchlist => [], defnames => 0, dnsrch => 0);
Mail::DKIM::DNS::resolver($res);
binmode STDIN;
local $/; my $data = <STDIN>;
my $v = Mail::DKIM::Verifier->new();
$v->PRINT($data); $v->CLOSE;
foreach my $sig ($v->signatures) {
    print $sig->algorithm, " ", $sig->domain, " ", $sig->result, "\n";
}
'''


def have_perl_dkim() -> bool:
    if shutil.which("perl") is None:
        return False
    return subprocess.run(["perl", "-MMail::DKIM::Verifier", "-MNet::DNS", "-e", "1"],
                          capture_output=True, check=False).returncode == 0


def perl_verify(msg: bytes, dns_port: int) -> list[tuple[str, str]]:
    """Mail::DKIM's (algorithm, result) for each signature, keys from the loopback DNS."""
    out = subprocess.run(["perl", "-e", _PERL, str(dns_port)], input=msg,
                         capture_output=True, timeout=60, check=False)
    if out.returncode != 0:
        raise AssertionError(f"perl verifier failed: {out.stderr.decode(errors='replace')}")
    rows = []
    for line in out.stdout.decode().splitlines():
        alg, _d, result = line.split(" ", 2)
        rows.append((alg, result))
    return rows


def _tags(value: bytes) -> dict[str, bytes]:
    out = {}
    for part in value.split(b";"):
        if b"=" in part:
            k, v = part.split(b"=", 1)
            out[k.strip().decode()] = v.strip()
    return out


def check_with_own_canon(msg: bytes, index: int, dns_txt: str) -> None:
    """Check signature number ``index`` of ``msg`` with our canonicalisation and the public
    key in ``dns_txt``; raises AssertionError on a mismatch."""
    msg = core.wire_form(msg)
    section, body = core.split_message(msg)
    headers = core.parse_headers(section)
    sigs = [h for h in headers if h[0].lower() == b"dkim-signature"]
    _name, value = sigs[index]
    tags = _tags(re.sub(rb"\s+", b"", value).replace(b";", b"; "))
    hc, _, bc = tags["c"].decode().partition("/")
    bc = bc or "simple"
    bh = hashlib.sha256(core.body_canon(body, bc)).digest()
    assert base64.b64encode(bh) == tags["bh"], "body hash differs"
    include = [h.strip().lower() for h in tags["h"].split(b":")]
    # the signature field with its b= value emptied (RFC 6376 §3.7), everything else as is
    # (anchored on a tag start, so it does not hit bh=)
    unsigned = re.sub(rb"(^|;)(\s*b\s*=)[^;]*", rb"\1\2", value)
    data = core.header_hash_input(headers, include, hc, unsigned)
    sig = base64.b64decode(re.sub(rb"\s+", b"", tags["b"]))
    p = base64.b64decode(_tags(dns_txt.encode())["p"])
    if tags["a"] == b"ed25519-sha256":
        ed25519.Ed25519PublicKey.from_public_bytes(p).verify(sig, hashlib.sha256(data).digest())
    else:
        pub = serialization.load_der_public_key(p)
        pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())   # type: ignore[union-attr]


def write_key(path: Path, key: Any) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path
