"""A DNSSEC-validating resolver on loopback for the DANE tests: Debian's ``nsd`` serves test
zones authoritatively, some of them signed (``ldns-signzone``, ECDSA P-256, NSEC), and
``unbound`` in front of it validates with a trust anchor for each signed zone (no root anchor, no internet: every other name is insecure, as it has no anchor). raymta asks
unbound only, as a production MTA asks the validating resolver on its own host.

Not a fixture: tests build the zones, call :meth:`SignedDns.start` and :meth:`SignedDns.stop`.
Both servers run in the foreground as children of this process, bound to 127.0.0.1 on free
unprivileged ports, with their files in a temporary directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query

__all__ = ["NSD", "UNBOUND", "SignedDns", "have_signed_dns"]

NSD = "/usr/sbin/nsd"
UNBOUND = "/usr/sbin/unbound"
LDNS_KEYGEN = "/usr/bin/ldns-keygen"
LDNS_SIGNZONE = "/usr/bin/ldns-signzone"
HOST = "127.0.0.1"


def have_signed_dns() -> bool:
    return all(Path(p).exists() for p in (NSD, UNBOUND, LDNS_KEYGEN, LDNS_SIGNZONE))


def _free_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((HOST, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no port free for both UDP and TCP on {HOST}")


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


class SignedDns:
    """``zones``: origin -> (zone text without SOA/NS, signed?). Each zone gets an SOA and an
    NS (``ns.<origin>`` on 127.0.0.1) added. ``tamper``: origin -> (owner, old, new): after
    signing, ``old`` becomes ``new`` in that owner's records, whose signatures then fail
    (a bogus answer, as an attacker on the path would give)."""

    def __init__(self, zones: dict[str, tuple[str, bool]],
                 tamper: dict[str, tuple[str, str, str]] | None = None) -> None:
        self.zones = {o.rstrip(".") + ".": z for o, z in zones.items()}
        self.tamper = {o.rstrip(".") + ".": t for o, t in (tamper or {}).items()}
        self.port = 0
        self.nsd_port = 0
        self.dir = ""
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> SignedDns:
        self.dir = tempfile.mkdtemp(prefix="raymta-dane-dns-")
        try:
            self._start(Path(self.dir))
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, d: Path) -> None:
        anchors, nsd_zones, stubs = [], [], []
        self.nsd_port = _free_port()
        for i, (origin, (body, signed)) in enumerate(self.zones.items()):
            text = (f"$TTL 300\n{origin} SOA ns.{origin} admin.{origin} 1 3600 600 86400 300\n"
                    f"{origin} NS ns.{origin}\nns.{origin} A {HOST}\n{body}\n")
            if signed:
                text, anchor = _signed(origin, text, d, f"z{i}")
                anchors.append(f'  trust-anchor: "{anchor}"')
                if origin in self.tamper:
                    owner, old, new = self.tamper[origin]
                    lines = text.splitlines()
                    hit = [n for n, ln in enumerate(lines)
                           if ln.split()[:1] == [owner] and old in ln and "RRSIG" not in ln]
                    if not hit:
                        raise ValueError(f"tamper: no record of {owner} holds {old!r}")
                    for n in hit:
                        lines[n] = lines[n].replace(old, new)
                    text = "\n".join(lines) + "\n"
            (d / f"z{i}.zone").write_text(text)
            nsd_zones.append(f'zone:\n  name: "{origin}"\n  zonefile: "{d}/z{i}.zone"\n')
            stubs.append(f'stub-zone:\n  name: "{origin}"\n  stub-addr: {HOST}@{self.nsd_port}\n')
        (d / "nsd.conf").write_text(f"""server:
  ip-address: {HOST}@{self.nsd_port}
  port: {self.nsd_port}
  do-ip6: no
  username: ""
  chroot: ""
  zonesdir: "{d}"
  database: ""
  zonelistfile: "{d}/zone.list"
  xfrdfile: "{d}/xfrd.state"
  xfrdir: "{d}"
  pidfile: "{d}/nsd.pid"
  logfile: "{d}/nsd.log"
  server-count: 1
  verbosity: 1
remote-control:
  control-enable: no
""" + "".join(nsd_zones))
        self._spawn([NSD, "-d", "-c", f"{d}/nsd.conf"])
        first = next(iter(self.zones))
        self._wait(self.nsd_port, f"ns.{first}", "nsd")
        self.port = _free_port()
        (d / "unbound.conf").write_text(f"""server:
  interface: {HOST}@{self.port}
  port: {self.port}
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  username: ""
  chroot: ""
  directory: "{d}"
  pidfile: "{d}/unbound.pid"
  use-syslog: no
  logfile: "{d}/unbound.log"
  verbosity: 1
  num-threads: 1
  do-not-query-localhost: no
  qname-minimisation: no
  module-config: "validator iterator"
  local-zone: "test." nodefault
  val-log-level: 2
  cache-max-ttl: 5
  cache-max-negative-ttl: 5
{chr(10).join(anchors)}
remote-control:
  control-enable: no
""" + "".join(stubs))
        self._spawn([UNBOUND, "-d", "-c", f"{d}/unbound.conf"])
        self._wait(self.port, f"ns.{first}", "unbound")

    def _spawn(self, argv: list[str]) -> None:
        self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE))

    def _wait(self, port: int, name: str, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            p = self.procs[-1]
            if p.poll() is not None:
                err = (p.stderr.read() if p.stderr else b"").decode(errors="replace")
                log = Path(self.dir, f"{what}.log")
                if log.exists():
                    err += log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{what} exited ({p.returncode}): {err[-2000:]}")
            try:
                r = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=port,
                                  timeout=1.0)
                if r.answer:
                    return
            except (dns.exception.DNSException, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} on {HOST}:{port} did not answer for {name} "
                                   f"within {timeout}s")
            time.sleep(0.1)

    def log(self) -> str:
        p = Path(self.dir, "unbound.log")
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self.procs = []
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""
