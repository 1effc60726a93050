"""A DNSSEC-validating resolver on loopback for the DANE tests: Debian's ``nsd`` serves test
zones authoritatively, some of them signed (``ldns-signzone``, ECDSA P-256, NSEC), and
``unbound`` in front of it validates with a trust anchor for each signed zone (no root
anchor, no internet: every other name is insecure, as it has no anchor). raymta asks unbound
only, as a production MTA asks the validating resolver on its own host.

Not a fixture: tests build the zones, call :meth:`SignedDns.start` and :meth:`SignedDns.stop`.
Both servers run in the foreground as children of this process, bound to 127.0.0.1 on free
unprivileged ports, with their files in a temporary directory (bench/common.py's RealDns
starts them).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.common import NSD, UNBOUND, RealDns

__all__ = ["NSD", "UNBOUND", "SignedDns", "have_signed_dns"]

LDNS_KEYGEN = "/usr/bin/ldns-keygen"
LDNS_SIGNZONE = "/usr/bin/ldns-signzone"
HOST = "127.0.0.1"


def have_signed_dns() -> bool:
    return all(Path(p).exists() for p in (NSD, UNBOUND, LDNS_KEYGEN, LDNS_SIGNZONE))


def _signed(origin: str, text: str, d: Path, stem: str) -> tuple[str, str]:
    """(signed zone text, the KSK as a DNSKEY trust-anchor line): keys from ``ldns-keygen``
    (ECDSA P-256), signed with ``ldns-signzone`` (NSEC), both from Debian's ldnsutils."""
    (d / f"{stem}.unsigned").write_text(text)
    keys = []
    for ksk in (True, False):
        out = subprocess.run([LDNS_KEYGEN, "-a", "ECDSAP256SHA256", *(["-k"] if ksk else []),
                              origin], cwd=d, check=True, capture_output=True, text=True)
        keys.append(out.stdout.strip())
    subprocess.run([LDNS_SIGNZONE, "-i", time.strftime("%Y%m%d%H%M%S",
                                                       time.gmtime(time.time() - 3600)),
                    "-f", f"{stem}.zone", f"{stem}.unsigned", *keys],
                   cwd=d, check=True, capture_output=True, text=True)
    anchor = (d / f"{keys[0]}.key").read_text().strip().replace("\t", " ")
    return (d / f"{stem}.zone").read_text(), anchor


class SignedDns(RealDns):
    """``zones``: origin -> (zone text without SOA/NS, signed?). Each zone gets an SOA and an
    NS (``ns.<origin>`` on 127.0.0.1) added. ``tamper``: origin -> (owner, old, new): after
    signing, ``old`` becomes ``new`` in that owner's records, whose signatures then fail
    (a bogus answer, as an attacker on the path would give). nsd and unbound are started as
    the bench starts them (:class:`bench.common.RealDns`), unbound validating."""

    kind = "nsd+validating unbound"

    def __init__(self, zones: dict[str, tuple[str, bool]],
                 tamper: dict[str, tuple[str, str, str]] | None = None) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.zones = {o.rstrip(".") + ".": z for o, z in zones.items()}
        self.tamper = {o.rstrip(".") + ".": t for o, t in (tamper or {}).items()}

    def _start(self, d: str) -> None:
        anchors, files = [], {}
        for i, (origin, (body, signed)) in enumerate(self.zones.items()):
            text = (f"$TTL 300\n{origin} SOA ns.{origin} admin.{origin} 1 3600 600 86400 300\n"
                    f"{origin} NS ns.{origin}\nns.{origin} A {HOST}\n{body}\n")
            if signed:
                text, anchor = _signed(origin, text, Path(d), f"z{i}")
                anchors.append(f'  trust-anchor: "{anchor}"\n')
                if origin in self.tamper:
                    text = _tampered(text, *self.tamper[origin])
            Path(d, f"z{i}.zone").write_text(text)
            files[origin] = f"{d}/z{i}.zone"
        probe = f"ns.{next(iter(self.zones))}"
        self.start_nsd(HOST, files, probe)
        # answers cached 5 s at most: a test sees a changed zone soon
        self.start_unbound(HOST, list(files), '  module-config: "validator iterator"\n'
                           "  cache-max-ttl: 5\n  cache-max-negative-ttl: 5\n"
                           + "".join(anchors), probe)


def _tampered(text: str, owner: str, old: str, new: str) -> str:
    lines = text.splitlines()
    hit = [n for n, ln in enumerate(lines)
           if ln.split()[:1] == [owner] and old in ln and "RRSIG" not in ln]
    if not hit:
        raise ValueError(f"tamper: no record of {owner} holds {old!r}")
    for n in hit:
        lines[n] = lines[n].replace(old, new)
    return "\n".join(lines) + "\n"
