"""Shared benchmark plumbing: workload, loopback DNS, SMTP receivers, CPU accounting, reports.

Importing this module first makes the repository importable (the scripts run as
``python bench/<name>.py``) and sets the environment Ray must see before it is imported
(loopback-only cluster, no usage stats).

- :func:`make_workload`: N raw RFC 5322 messages (~2 KB) to 100 domains, skewed like real
  traffic: 3 big domains take 60 % of the mail, the other 97 share the rest Zipf-style.
- :func:`start_dns`: a :class:`cluster.devservers.LoopbackDNS`, in its own process, answering MX ``mx.<domain>``
  and A records for every workload domain, all pointing at the receiver's address (each
  domain is its own raymta *site*, as with real, distinct providers).
- :class:`Receiver`: where mail ends up. :class:`SmtpSinkProcess` is Postfix's C
  ``smtp-sink`` (fast, the default); :class:`AiosmtpdReceiver` the in-process Python sink,
  used when smtp-sink is missing (its ~3,500 msgs/s ceiling then bounds every figure).
- :func:`ensure_postfix`: installs Debian's ``postfix`` package when missing (as root), and
  makes sure no system Postfix is left running.
- :class:`CpuMeter`: CPU seconds (utime+stime, reaped children included) of process trees,
  read from ``/proc``.
- :class:`Sampler`: a background thread recording a counter over time (for charts).
- :func:`drive_raymta`: submit a workload to a running raymta from a few threads in batches,
  wait for the receiver to get it all, and measure latencies, rates, CPU and final counts.

Hard limits kept by every helper: traffic only to 127.0.0.0/8, no system resolver (numeric
addresses everywhere, names only through the loopback DNS server), bounded counts and times,
and every server or process started here has a ``stop()`` that callers use in ``finally``.
"""

from __future__ import annotations

import collections
import datetime as _dt
import gc
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# Ray reads these at import time: loopback-only cluster, nothing reported anywhere.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

RESULTS_DIR = REPO / "bench" / "results"
RECEIVER_HOST = "127.0.0.2"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
AIOSMTPD_CEILING = 3500  # msgs/s, measured ceiling of the Python sink on this class of machine

__all__ = [
    "RECEIVER_HOST",
    "REPO",
    "RESULTS_DIR",
    "AiosmtpdReceiver",
    "BenchZone",
    "RealDns",
    "CpuMeter",
    "ProcStat",
    "Receiver",
    "Sampler",
    "SelfCpu",
    "SmtpSinkProcess",
    "SubmitReport",
    "Workload",
    "banner",
    "check_counts",
    "drive_raymta",
    "ensure_postfix",
    "free_port",
    "have_smtp_sink",
    "intake_only",
    "machine_cpu_times",
    "machine_info",
    "make_receiver",
    "make_workload",
    "median",
    "percentiles",
    "raymta_config",
    "start_dns",
    "start_zone_dns",
    "have_real_dns",
    "probe_latency",
    "steady_rate",
    "submit_concurrently",
    "timestamp",
    "wait_listening",
    "write_result",
]


# ====================================================================== workload
@dataclass(frozen=True)
class Workload:
    """The messages of one run, in submission order, and the domains they go to."""

    messages: list[dict[str, Any]]
    domains: list[str]
    raw_bytes: int

    def __len__(self) -> int:
        return len(self.messages)

    def per_domain(self) -> collections.Counter[str]:
        return collections.Counter(m["recipients"][0].rsplit("@", 1)[1] for m in self.messages)


def domain_weights(domains: int, big: int = 3, big_share: float = 0.6) -> list[float]:
    """``big`` domains share ``big_share`` equally; the rest get 1/rank (Zipf, s=1)."""
    if domains <= big:
        return [1.0 / domains] * domains
    tail = [1.0 / (k + 1) for k in range(domains - big)]
    scale = (1.0 - big_share) / sum(tail)
    return [big_share / big] * big + [w * scale for w in tail]


def make_workload(n: int, *, domains: int = 100, size: int = 2048, seed: int = 1,
                  big: int = 3, big_share: float = 0.6, names: list[str] | None = None,
                  weights: Sequence[float] | None = None) -> Workload:
    """``n`` single-recipient messages of about ``size`` bytes, deterministic for a seed.
    ``names`` and ``weights`` (bench/longtail.py) replace the 100 ``d<i>.bench.test`` domains
    and their shares."""
    rng = random.Random(seed)
    if names is None:
        names = [f"d{i}.bench.test" for i in range(domains)]
        weights = domain_weights(domains, big, big_share)
    picks = rng.choices(names, weights=weights, k=n)
    line = b"The quick brown fox jumps over the lazy dog, benchmark line padding.\r\n"
    msgs: list[dict[str, Any]] = []
    total = 0
    for i, dom in enumerate(picks):
        rcpt = f"user{i}@{dom}"
        head = (f"From: Bench Sender <sender@origin.bench.test>\r\nTo: <{rcpt}>\r\n"
                f"Subject: raymta benchmark message {i}\r\n"
                f"Date: Sat, 28 Nov 2026 05:00:00 +0000\r\n"
                f"Message-ID: <bench-{i}-{seed}@origin.bench.test>\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
                ).encode()
        body = line * max(1, (size - len(head)) // len(line))
        raw = head + body
        total += len(raw)
        msgs.append({"sender": "bounces@origin.bench.test", "recipients": [rcpt], "raw": raw})
    return Workload(msgs, names, total)


# ====================================================================== network helpers
def free_port(host: str = RECEIVER_HOST) -> int:
    """A TCP port free on ``host`` right now (a loopback address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on ``host:port`` (loopback)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s")
            time.sleep(0.05)


_DNS_CHILD = """
import json, sys
from cluster.devservers import LoopbackDNS
spec = json.loads(sys.stdin.readline())
dns = LoopbackDNS("127.0.0.1", ttl=3600).start()
try:
    for d in spec.get("domains", ()):
        dns.add_mx(d, [(10, "mx." + d)])
        dns.add_a("mx." + d, spec["mx_address"])
    for d, mx in spec.get("mx", {}).items():
        dns.add_mx(d, [tuple(x) for x in mx])
    for h, a in spec.get("a", {}).items():
        dns.add_a(h, a)
    print(dns.port, flush=True)
    for line in sys.stdin:
        if line.strip() != "count":
            break
        print(dns.query_count(), flush=True)
finally:
    dns.stop()
"""

#: pids of helper processes the bench starts (DNS): not counted as raymta's CPU
HELPER_PIDS: set[int] = set()


class DnsProcess:
    """A LoopbackDNS in its own process: every domain has MX ``mx.<domain>`` whose A is
    ``mx_address`` (or, given ``zone``, exactly its MX and A records). In the bench driver's
    process its thread would wait for the GIL behind the submitting threads (measured:
    deliveries held back for seconds while MX lookups queued); a real resolver is never in the
    submitter's process either."""

    kind = "python"
    host = "127.0.0.1"

    def __init__(self, domains: Sequence[str], mx_address: str,
                 zone: BenchZone | None = None) -> None:
        self.domains = list(domains)
        self.mx_address = mx_address
        self.zone = zone
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> "DnsProcess":
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) +
                   os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-c", _DNS_CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        HELPER_PIDS.add(self.proc.pid)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        spec: dict[str, Any] = {"domains": self.domains, "mx_address": self.mx_address}
        if self.zone is not None:
            spec = {"mx": self.zone.mx, "a": self.zone.a}
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"bench DNS server did not start (said {line!r})")
        self.port = int(line)
        return self

    def query_count(self) -> int:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        HELPER_PIDS.discard(self.proc.pid)
        self.proc = None


def start_dns(domains: Sequence[str], mx_address: str) -> DnsProcess:
    """A started :class:`DnsProcess` answering for ``domains``."""
    return DnsProcess(domains, mx_address).start()


# ====================================================================== real DNS (nsd + unbound)
@dataclass
class BenchZone:
    """DNS data of a workload: MX records per domain and A records per host, all under
    ``origin`` (one zone: nsd serves it; every name in it is ``<label>.<origin>``)."""

    origin: str
    #: domain -> [[preference, MX host], ...]
    mx: dict[str, list[list[Any]]]
    #: host -> IPv4 address
    a: dict[str, str]

    def zone_text(self, ns_address: str, ttl: int = 3600) -> str:
        """The zone in master-file format (RFC 1035 §5), for nsd."""
        o = self.origin.rstrip(".") + "."
        lines = [f"$ORIGIN {o}", f"$TTL {ttl}",
                 f"@ IN SOA ns.{o} hostmaster.{o} 1 3600 600 86400 300",
                 f"@ IN NS ns.{o}", f"ns IN A {ns_address}"]
        for d, mx in self.mx.items():
            for pref, host in mx:
                lines.append(f"{d}. IN MX {int(pref)} {host}.")
        for h, addr in self.a.items():
            lines.append(f"{h}. IN A {addr}")
        return "\n".join(lines) + "\n"


NSD = "/usr/sbin/nsd"
UNBOUND = "/usr/sbin/unbound"
NSD_HOST = "127.0.0.53"
UNBOUND_HOST = "127.0.0.54"


def have_real_dns() -> bool:
    return os.access(NSD, os.X_OK) and os.access(UNBOUND, os.X_OK)


def _free_udp_tcp_port(host: str) -> int:
    for _ in range(50):
        port = free_port(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no port free for both UDP and TCP on {host}")


class RealDns:
    """Debian's ``nsd`` serving a :class:`BenchZone` authoritatively on 127.0.0.53, with
    ``unbound`` on 127.0.0.54 as the caching resolver in front (a stub zone to nsd), as a
    production MTA host would have: raymta asks unbound only. Both in the foreground as
    children of this process, on unprivileged ports, with their files in a temporary
    directory; :meth:`stop` ends both and removes it."""

    kind = "nsd+unbound"
    host = UNBOUND_HOST

    def __init__(self, zone: BenchZone) -> None:
        self.zone = zone
        self.port = 0
        self.nsd_host = NSD_HOST
        self.nsd_port = 0
        self.dir = ""
        self.procs: list[subprocess.Popen[bytes]] = []
        self.zone_seconds = 0.0

    def start(self) -> "RealDns":
        import tempfile
        self.dir = d = tempfile.mkdtemp(prefix="raymta-bench-dns-")
        try:
            self._start(d)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, d: str) -> None:
        origin = self.zone.origin.rstrip(".")
        t = time.time()
        Path(d, "bench.zone").write_text(self.zone.zone_text(NSD_HOST))
        self.start_nsd(NSD_HOST, {origin: f"{d}/bench.zone"}, f"ns.{origin}", timeout=120)
        self.zone_seconds = round(time.time() - t, 2)
        cache = "256m" if len(self.zone.mx) > 20_000 else "64m"
        self.start_unbound(UNBOUND_HOST, [origin], f"""  module-config: "iterator"
  msg-cache-size: {cache}
  rrset-cache-size: {cache}
  num-queries-per-thread: 4096
  outgoing-range: 8192
  domain-insecure: "{origin}"
""", f"ns.{origin}")

    def start_nsd(self, host: str, zones: dict[str, str], probe: str, *,
                  timeout: float = 30) -> None:
        """nsd on ``host`` (a free port), serving ``zones`` (origin -> zone file), in the
        foreground; returns once it answers ``probe`` (a name with an A record)."""
        d = self.dir
        self.nsd_host, self.nsd_port = host, _free_udp_tcp_port(host)
        Path(d, "nsd.conf").write_text(f"""server:
  ip-address: {host}@{self.nsd_port}
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
  verbosity: 0
  hide-version: yes
remote-control:
  control-enable: no
""" + "".join(f'zone:\n  name: "{o}"\n  zonefile: "{f}"\n' for o, f in zones.items()))
        self.procs.append(subprocess.Popen([NSD, "-d", "-c", f"{d}/nsd.conf"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        HELPER_PIDS.add(self.procs[-1].pid)
        self._wait_answers(host, self.nsd_port, probe, "nsd", timeout=timeout)

    def start_unbound(self, host: str, stubs: list[str], options: str, probe: str, *,
                      timeout: float = 30) -> None:
        """unbound on ``host`` (a free port), the zones ``stubs`` asked of the nsd started
        before, with ``options`` (lines of its server: clause) added; returns once it answers
        ``probe``."""
        d = self.dir
        self.host, self.port = host, _free_udp_tcp_port(host)
        Path(d, "unbound.conf").write_text(f"""server:
  interface: {host}@{self.port}
  port: {self.port}
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  username: ""
  chroot: ""
  directory: "{d}"
  pidfile: "{d}/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: 1
  do-not-query-localhost: no
  qname-minimisation: no
  local-zone: "test." nodefault
{options}remote-control:
  control-enable: no
""" + "".join(f'stub-zone:\n  name: "{o}"\n  stub-addr: {self.nsd_host}@{self.nsd_port}\n'
              for o in stubs))
        self.procs.append(subprocess.Popen([UNBOUND, "-d", "-c", f"{d}/unbound.conf"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        HELPER_PIDS.add(self.procs[-1].pid)
        self._wait_answers(host, self.port, probe, "unbound", timeout=timeout)

    def _wait_answers(self, host: str, port: int, name: str, what: str, timeout: float) -> None:
        import dns.exception
        import dns.message
        import dns.query
        deadline = time.time() + timeout
        while True:
            p = self.procs[-1]
            if p.poll() is not None:
                err = (p.stderr.read() if p.stderr else b"").decode(errors="replace")
                log = Path(self.dir, "nsd.log")
                if what == "nsd" and log.exists():
                    err += log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{what} exited ({p.returncode}): {err[-2000:]}")
            try:
                r = dns.query.udp(dns.message.make_query(name, "A"), host, port=port,
                                  timeout=1.0)
                if r.answer:
                    return
            except (dns.exception.DNSException, OSError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{what} on {host}:{port} did not answer for {name} "
                                   f"within {timeout}s")
            time.sleep(0.2)

    def query_count(self) -> int | None:
        return None   # neither keeps a count we can read without its control channel

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
            HELPER_PIDS.discard(p.pid)
        self.procs = []
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""


def start_zone_dns(zone: BenchZone, prefer: str = "auto") -> RealDns | DnsProcess:
    """DNS for a workload's zone: nsd + unbound (:class:`RealDns`) when installed (``prefer``
    "auto" or "real"), else, with a clear message, the Python server (:class:`DnsProcess`)."""
    if prefer in ("auto", "real"):
        if have_real_dns():
            return RealDns(zone).start()
        if prefer == "real":
            raise RuntimeError(f"{NSD} or {UNBOUND} not found: apt-get install -y nsd unbound")
        print(banner("nsd/unbound not installed (apt-get install -y nsd unbound): serving the "
                     "bench zone with the Python DNS server instead"), file=sys.stderr,
              flush=True)
    return DnsProcess([], RECEIVER_HOST, zone).start()


# ====================================================================== Postfix package
def have_smtp_sink() -> bool:
    return os.access(SMTP_SINK, os.X_OK)


def _system_postfix_running() -> bool:
    try:
        r = subprocess.run(["postfix", "status"], capture_output=True, text=True, timeout=20,
                           check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "is running" in (r.stdout + r.stderr)


def ensure_postfix(*, install: bool = True) -> bool:
    """Make Postfix's binaries available; True when smtp-sink (hence Postfix) is there.

    As root with the package missing, installs Debian's ``postfix`` non-interactively with
    "No configuration" (so it does not set itself up as this machine's mail server) while a
    policy-rc.d forbids starting services. Either way, a system Postfix found running
    afterwards is stopped: nothing may be left listening on port 25."""
    if not have_smtp_sink() and install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("postfix is not installed: installing Debian's package (apt-get) ...", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["debconf-set-selections"], check=False, timeout=60, input=(
            b"postfix postfix/main_mailer_type select No configuration\n"
            b"postfix postfix/mailname string bench.raymta.test\n"))
        policy = Path("/usr/sbin/policy-rc.d")
        made_policy = False
        if not policy.exists():
            policy.write_text("#!/bin/sh\n# raymta bench: do not start services\nexit 101\n")
            policy.chmod(0o755)
            made_policy = True
        try:
            cmd = ["apt-get", "install", "-y", "--no-install-recommends", "postfix"]
            r = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True,
                               check=False)
            if r.returncode != 0:  # package lists may be missing on a fresh machine
                subprocess.run(["apt-get", "update"], env=env, timeout=600,
                               capture_output=True, check=False)
                r = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True,
                                   check=False)
            if r.returncode != 0:
                print(f"apt-get install postfix failed ({r.returncode}):\n{r.stderr[-2000:]}",
                      file=sys.stderr)
        finally:
            if made_policy:
                policy.unlink(missing_ok=True)
    if shutil.which("postfix") and _system_postfix_running():
        print("a system Postfix is running: stopping it (benchmarks use private instances)")
        subprocess.run(["postfix", "stop"], check=False, timeout=60)
    return have_smtp_sink()


# ====================================================================== receivers
class Receiver:
    """The receiving SMTP side of a benchmark; everything it accepts counts as delivered."""

    kind = "abstract"
    #: msgs/s this receiver cannot exceed on this machine (None: well above what we measure)
    ceiling: int | None = None

    def __init__(self, host: str = RECEIVER_HOST) -> None:
        self.host = host
        self.port = 0

    def start(self) -> Receiver:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        """Messages received so far (end of DATA acknowledged)."""
        raise NotImplementedError

    def last_at(self) -> float:
        """time.time() of the most recent message received (0 if none)."""
        raise NotImplementedError

    def exclude_pids(self) -> set[int]:
        """Processes (and their trees) that are the receiver, not the system measured."""
        return set()

    def exclude_tids(self) -> set[int]:
        """Threads of this process that are the receiver."""
        return set()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SmtpSinkProcess(Receiver):
    """Postfix's ``smtp-sink`` in a subprocess, counting with ``-c``.

    ``-c`` prints ``sess=N quit=N mesg=N`` records (CR-separated) whenever a session ends, a
    QUIT is executed or a "." is received; a reader thread keeps the latest ``mesg`` count
    and the time it changed."""

    kind = "smtp-sink"
    _MESG = re.compile(rb"mesg=(\d+)")

    def __init__(self, host: str = RECEIVER_HOST, port: int = 0, *,
                 max_sessions: int = 1024) -> None:
        super().__init__(host)
        self.port = port
        self.max_sessions = max_sessions
        self.proc: subprocess.Popen[bytes] | None = None
        self._count = 0
        self._last_at = 0.0
        self._reader: threading.Thread | None = None
        self._stderr = b""

    def start(self) -> SmtpSinkProcess:
        if self.proc is not None:
            raise RuntimeError("smtp-sink already started")
        self.port = self.port or free_port(self.host)
        cmd = [SMTP_SINK, "-c", "-4", "-m", str(self.max_sessions), "-t", "30"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]   # required when run as root
        cmd += [f"inet:{self.host}:{self.port}", "1024"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, args=(self.proc,),
                                        name="smtp-sink-reader", daemon=True)
        self._reader.start()
        try:
            wait_listening(self.host, self.port, timeout=10)
        except BaseException:  # noqa: BLE001 - stop the child whatever interrupted us
            self.stop()
            raise RuntimeError("smtp-sink did not start: "
                               + self._stderr.decode(errors="replace")) from None
        return self

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        out = proc.stdout
        tail = b""
        while True:
            chunk = out.read1(65536)  # type: ignore[attr-defined]  # a BufferedReader
            if not chunk:
                break
            tail = (tail + chunk)[-256:]
            found = self._MESG.findall(tail)
            if found:
                n = int(found[-1])
                if n != self._count:
                    self._count = n
                    self._last_at = time.time()
        if proc.stderr is not None:
            self._stderr = proc.stderr.read() or b""

    def count(self) -> int:
        return self._count

    def last_at(self) -> float:
        return self._last_at

    def exclude_pids(self) -> set[int]:
        return {self.proc.pid} if self.proc is not None else set()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)


class AiosmtpdReceiver(Receiver):
    """raymta's in-process aiosmtpd sink (``cluster.devservers.SmtpSink``): the fallback."""

    kind = "aiosmtpd"
    ceiling = AIOSMTPD_CEILING

    def __init__(self, host: str = RECEIVER_HOST, port: int = 0) -> None:
        super().__init__(host)
        self.port = port
        self.sink: Any = None

    def start(self) -> AiosmtpdReceiver:
        from cluster.devservers import SmtpSink
        self.sink = SmtpSink(self.host, self.port).start()
        self.port = self.sink.port
        return self

    def stop(self) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.stop()

    def count(self) -> int:
        return len(self.sink.received) if self.sink is not None else 0

    def last_at(self) -> float:
        rec = self.sink.received if self.sink is not None else []
        return rec[-1].at if rec else 0.0

    def exclude_tids(self) -> set[int]:
        runner = getattr(self.sink, "_runner", None)
        t = getattr(runner, "_thread", None)
        return {t.native_id} if t is not None and t.native_id is not None else set()


_WARNED: set[str] = set()


def make_receiver(prefer: str = "auto") -> Receiver:
    """An unstarted receiver: smtp-sink when available (or asked), else the aiosmtpd sink
    with a loud warning that the figures are bounded by it."""
    if prefer in ("auto", "smtp-sink") and have_smtp_sink():
        return SmtpSinkProcess()
    if prefer == "smtp-sink":
        raise RuntimeError(f"{SMTP_SINK} not found: install Debian's postfix package")
    if "aiosmtpd" not in _WARNED:
        _WARNED.add("aiosmtpd")
        why = "as asked" if prefer == "aiosmtpd" else "smtp-sink not available"
        print(banner(f"WARNING ({why}): receiving with the Python aiosmtpd sink. Figures are "
                     f"SINK-BOUND (ceiling ~{AIOSMTPD_CEILING:,} msgs/s)."),
              file=sys.stderr, flush=True)
    return AiosmtpdReceiver()


# ====================================================================== CPU accounting
_CLK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    name: str
    #: utime + stime of the process itself, seconds
    own: float
    #: cutime + cstime: children it has reaped, seconds
    reaped: float


def _read_stat(path: str) -> ProcStat | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split at the last ')'
    lp, rp = data.find(b"("), data.rfind(b")")
    pid = int(data[:lp])
    name = data[lp + 1:rp].decode(errors="replace")
    f_ = data[rp + 2:].split()
    # fields after comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    return ProcStat(pid, int(f_[1]), name, (int(f_[11]) + int(f_[12])) / _CLK,
                    (int(f_[13]) + int(f_[14])) / _CLK)


def all_procs() -> dict[int, ProcStat]:
    out: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _read_stat(f"/proc/{entry}/stat")
            if st is not None:
                out[st.pid] = st
    return out


def tree(roots: Iterable[int], procs: dict[int, ProcStat],
         exclude: Iterable[int] = ()) -> set[int]:
    """``roots`` and all their descendants, without the ``exclude`` subtrees."""
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for p in procs.values():
        kids[p.ppid].append(p.pid)
    skip = set(exclude)
    out: set[int] = set()
    todo = [r for r in roots if r in procs and r not in skip]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(k for k in kids.get(pid, ()) if k not in skip)
    return out


def thread_cpu(tid: int, pid: int | None = None) -> float:
    st = _read_stat(f"/proc/{pid or os.getpid()}/task/{tid}/stat")
    return st.own if st is not None else 0.0


class CpuMeter:
    """CPU seconds used by process trees between :meth:`start` and :meth:`stop`.

    ``roots()`` gives the tree roots at each reading (process ids can appear during a run);
    ``exclude()`` pids whose subtrees are someone else's (the receiver). Each process counts
    utime+stime plus the children it reaped, so work done by short-lived children (Postfix's
    daemons) is not lost. Per-process-name totals show where the CPU went."""

    def __init__(self, roots: Callable[[], Iterable[int]],
                 exclude: Callable[[], Iterable[int]] = lambda: (),
                 skip_names: Iterable[str] = ("py-spy",)) -> None:
        self._roots = roots
        self._exclude = exclude
        self._skip_names = set(skip_names)
        self._start: dict[int, ProcStat] = {}
        self._last: dict[int, ProcStat] = {}
        self._gone: dict[int, ProcStat] = {}

    def _read(self) -> dict[int, ProcStat]:
        procs = all_procs()
        skip = set(self._exclude()) | {p.pid for p in procs.values()
                                       if p.name in self._skip_names}
        return {pid: procs[pid] for pid in tree(self._roots(), procs, skip)}

    def start(self) -> CpuMeter:
        self._start = self._last = self._read()
        return self

    def poll(self) -> None:
        """Read now; call during long runs so processes that exit are still counted."""
        now = self._read()
        for pid, st in self._last.items():
            if pid not in now:
                self._gone[pid] = st
        self._last = now

    def stop(self) -> dict[str, Any]:
        """``{"total_s", "by_process": {name: s}}``. A process that exited during the run is
        shown under its own name for what was seen of it; the rest of its time (and all of
        the time of children never seen) is in its parent's reaped time, under the parent."""
        self.poll()
        seen = {**self._gone, **self._last}
        by_name: dict[str, float] = collections.defaultdict(float)
        for pid, st in seen.items():
            b = self._start.get(pid)
            base = b.own + b.reaped if b is not None else 0.0
            by_name[st.name] += st.own + st.reaped - base
            parent = seen.get(st.ppid)
            if pid in self._gone and parent is not None:
                # reaped by a parent we measure: its whole life is in the parent's delta
                by_name[parent.name] -= st.own + st.reaped
        total = sum(by_name.values())
        return {"total_s": round(total, 3),
                "by_process": {k: round(v, 3) for k, v in
                               sorted(by_name.items(), key=lambda kv: -kv[1]) if v >= 0.01}}


def machine_cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (every core;
    iowait counts as idle)."""
    with open("/proc/stat") as fh:
        v = [float(x) for x in fh.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)
    return (sum(v[:8]) - idle) / hz, sum(v[:8]) / hz


class SelfCpu:
    """CPU seconds of this process, less some of its threads (in-process servers)."""

    def __init__(self, exclude_tids: Callable[[], Iterable[int]] = lambda: ()) -> None:
        self._exclude = exclude_tids
        self._t0 = 0.0

    def _now(self) -> float:
        me = _read_stat(f"/proc/{os.getpid()}/stat")
        own = me.own if me is not None else 0.0
        return own - sum(thread_cpu(t) for t in self._exclude())

    def start(self) -> SelfCpu:
        self._t0 = self._now()
        return self

    def stop(self) -> float:
        return round(self._now() - self._t0, 3)


# ====================================================================== sampling and stats
class Sampler:
    """Records ``fn()`` every ``interval`` seconds in a daemon thread: ``[(t, value)]``."""

    def __init__(self, fn: Callable[[], int], interval: float = 0.25,
                 t0: float | None = None) -> None:
        self.fn = fn
        self.interval = interval
        self.t0 = t0 if t0 is not None else time.time()
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((round(time.time() - self.t0, 3), self.fn()))
            self._stop.wait(self.interval)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append((round(time.time() - self.t0, 3), self.fn()))
        return self.samples


def percentiles(values: Sequence[float], ps: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds-ready form (values as given)."""
    if not values:
        return {f"p{p}": float("nan") for p in ps}
    s = sorted(values)
    out = {}
    for p in ps:
        k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
        out[f"p{p}"] = s[k]
    return out


def steady_rate(series: Sequence[tuple[float, int]], total: int, lo: float = 0.1,
                hi: float = 0.9) -> float | None:
    """Messages/s between the samples where ``lo`` and ``hi`` of ``total`` had arrived:
    the sustained rate, without start-up ramp and tail."""
    t_lo = next((t for t, v in series if v >= lo * total), None)
    t_hi = next((t for t, v in series if v >= hi * total), None)
    if t_lo is None or t_hi is None or t_hi <= t_lo:
        return None
    return round((hi - lo) * total / (t_hi - t_lo), 1)


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("nan")


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_result(prefix: str, data: dict[str, Any], ts: str | None = None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{prefix}-{ts or timestamp()}.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(), "loadavg_at_start": os.getloadavg()}
    try:
        import ray
        info["ray"] = ray.__version__
    except ImportError:
        pass
    if shutil.which("postconf"):
        r = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                           text=True, timeout=20, check=False)
        info["postfix"] = r.stdout.strip()
    return info


def banner(text: str) -> str:
    bar = "!" * min(100, max(40, len(text) + 4))
    return f"\n{bar}\n  {text}\n{bar}\n"


# ====================================================================== raymta
def raymta_config(spool: str, dns_port: int, smtp_port: int, *, max_connections: int = 10,
                  rate: str = "100000/s", fsync: bool = True,
                  dns_host: str = "127.0.0.1") -> Any:
    """A raymta Config for the benchmark: loopback DNS, fast retries, unthrottled sites."""
    from cluster.config import parse_config
    return parse_config({
        "spool": {"directory": spool, "fsync": fsync},
        "queue": {"retry_initial": "2s", "retry_max_delay": "10s", "dns_retry_initial": "1s",
                  "max_age": "30m", "inflight_timeout": "120s"},
        "dns": {"nameservers": [dns_host], "port": dns_port, "timeout": "2s"},
        # the sinks are on loopback: the MX address guard must be told so
        "delivery": {"smtp_port": smtp_port, "allow_networks": ["127.0.0.0/8"],
                     "connect_timeout": "5s", "command_timeout": "30s",
                     "idle_timeout": "2s", "site_backoff": "1s", "site_backoff_max": "5s"},
        "egress": [{"name": "default", "ehlo_name": "relay.bench.raymta.test"}],
        "site_defaults": {"rate": rate, "max_connections": max_connections},
    })


@dataclass
class SubmitReport:
    latencies: list[float] = field(default_factory=list)   # seconds per batch
    accepted: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    t_first: float = 0.0
    t_last: float = 0.0

    @property
    def seconds(self) -> float:
        return self.t_last - self.t_first


def submit_concurrently(mc: Any, messages: Sequence[dict[str, Any]], *, batch: int = 100,
                        threads: int = 4, deadline: float,
                        on_batch: Callable[[int], None] | None = None,
                        keep_ids: list[str] | None = None) -> SubmitReport:
    """Submit ``messages`` in batches from ``threads`` threads; per-batch latencies. The ids
    of accepted messages are added to ``keep_ids`` if given."""
    rep = SubmitReport()
    lock = threading.Lock()
    batches = iter(range(0, len(messages), batch))

    def worker() -> None:
        while time.time() < deadline:
            with lock:
                start = next(batches, None)
            if start is None:
                return
            chunk = messages[start:start + batch]
            t = time.time()
            try:
                res = mc.submit(chunk, timeout=max(1.0, deadline - t))
            except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                with lock:
                    rep.errors.append(f"{type(e).__name__}: {e}")
                    rep.refused += len(chunk)
                continue
            dt = time.time() - t
            ok = sum(1 for r in res if r.accepted)
            with lock:
                rep.latencies.append(dt)
                rep.accepted += ok
                rep.refused += len(chunk) - ok
                if keep_ids is not None:
                    keep_ids.extend(i for r in res for i in r.ids)
                for r in res:
                    if not r.accepted and len(rep.errors) < 20:
                        rep.errors.append(str(r.error))
            if on_batch is not None:
                on_batch(ok)

    rep.t_first = time.time()
    pool = [threading.Thread(target=worker, name=f"submit-{k}", daemon=True)
            for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(max(0.0, deadline - time.time()) + 5)
    rep.t_last = time.time()
    return rep


def probe_latency(mc: Any, messages: Sequence[dict[str, Any]], *, rate: float = 1000.0,
                  batch: int = 100, seconds: float = 5.0, timeout: float = 120.0
                  ) -> dict[str, Any]:
    """Submit latency at a steady offered load, not at saturation: one batch of ``batch``
    messages every ``batch / rate`` seconds for ``seconds`` (open loop: a slow answer does not
    slow the offered load; batches overlap), then wait until everything is delivered.

    The closed-loop run's latencies only restate Little's law (4 threads × 100 messages in
    flight ÷ the accept rate); this is what a sender submitting at ``rate`` sees."""
    period = batch / rate
    n_batches = max(1, int(seconds / period))
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(k: int) -> None:
        chunk = [messages[(k * batch + i) % len(messages)] for i in range(batch)]
        t = time.time()
        try:
            res = mc.submit(chunk, timeout=timeout)
            bad = [r.error for r in res if not r.accepted]
        except Exception as e:  # noqa: BLE001 - reported, the probe goes on
            bad = [f"{type(e).__name__}: {e}"]
        with lock:
            lat.append(time.time() - t)
            errors.extend(bad[:3])

    threads = []
    t0 = time.time()
    for k in range(n_batches):
        delay = t0 + k * period - time.time()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(k,), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(timeout)
    offered_s = time.time() - t0
    idle = mc.wait_until_idle(timeout=timeout)
    p = percentiles([x * 1000 for x in lat])
    return {"offered_msgs_per_s": rate, "batch": batch, "batches": n_batches,
            "answered": len(lat), "errors": errors[:10], "seconds": round(offered_s, 2),
            "latency_ms": {k: round(v, 1) for k, v in p.items()}, "drained": idle}


def intake_only(mc: Any, messages: Sequence[dict[str, Any]], *, receiver: Receiver,
                threads: int = 4, batch: int = 100, hold: float = 3600.0,
                timeout: float = 300.0) -> dict[str, Any]:
    """The accept path alone: submit ``messages`` held for ``hold`` seconds (``not_before``),
    so nothing is dispatched or delivered meanwhile, and time it until every batch is durable;
    then cancel them all (so none is ever delivered) and wait until the queue is empty.

    The main run's accepted rate is taken while the same cluster delivers, on the same cores;
    this is what intake alone can do (a burst into an idle cluster)."""
    until = time.time() + hold
    held = [dict(m, not_before=until) for m in messages]   # made before the CPU is counted
    if gc.get_freeze_count():
        # the run froze its workload out of the collector (run_raymta's gc_freeze): these
        # copies are workload too (unfrozen, full collections of them were ~0.4 s of the
        # client's CPU per 40,000 messages)
        gc.freeze()
    me = os.getpid()
    ray_cpu = CpuMeter(lambda: [p.pid for p in all_procs().values() if p.ppid == me],
                       lambda: set(receiver.exclude_pids()) | HELPER_PIDS).start()
    client_cpu = SelfCpu(receiver.exclude_tids).start()
    ids: list[str] = []
    base = receiver.count()
    rep = submit_concurrently(mc, held, batch=batch, threads=threads,
                              deadline=time.time() + timeout, keep_ids=ids)
    cpu = ray_cpu.stop()
    client_s = client_cpu.stop()
    cancelled = mc.cancel(ids) if ids else []
    drained = mc.wait_until_idle(timeout=timeout)
    n = max(1, rep.accepted)
    n_cancelled = sum(1 for x in cancelled if x == "cancelled")
    received = receiver.count() - base
    lat = percentiles([x * 1000 for x in rep.latencies])
    return {"messages": len(messages), "accepted": rep.accepted, "refused": rep.refused,
            "errors": rep.errors[:10], "seconds": round(rep.seconds, 3),
            "accepted_per_s": round(rep.accepted / rep.seconds, 1) if rep.seconds else None,
            "batch_latency_ms": {k: round(v, 1) for k, v in lat.items()},
            "cpu_ray_s_per_1000": round(cpu["total_s"] / n * 1000, 3),
            "cpu_client_s_per_1000": round(client_s / n * 1000, 3),
            "cpu_by_process": cpu["by_process"],
            "cancelled": n_cancelled, "received_by_sink": received, "drained": drained,
            "ok": rep.accepted == len(messages) == n_cancelled and received == 0 and drained}


def drive_raymta(mc: Any, workload: Workload, receiver: Receiver, *, threads: int = 4,
                 batch: int = 100, timeout: float = 600.0, progress: bool = True,
                 label: str = "raymta", during: Callable[[], None] | None = None
                 ) -> dict[str, Any]:
    """Submit ``workload`` to a deployed raymta and wait until it has all been delivered.

    Measures per-batch submit latency, accepted msgs/s (into the durable queue), delivered
    msgs/s end to end (first submit to last message at the receiver), and the CPU of every
    Ray process (the tree under this driver, less the receiver) and of this driver (less the
    receiver's threads). ``during`` is called once, in a thread, when delivery has
    started (profilers hook in there)."""
    from tqdm import tqdm

    n = len(workload)
    deadline = time.time() + timeout
    me = os.getpid()
    ray_cpu = CpuMeter(lambda: [p.pid for p in all_procs().values() if p.ppid == me],
                       lambda: set(receiver.exclude_pids()) | HELPER_PIDS).start()
    # the receiver and the bench's DNS servers: the far side, on the same cores here
    far_cpu = CpuMeter(lambda: set(receiver.exclude_pids()) | HELPER_PIDS).start()
    client_cpu = SelfCpu(receiver.exclude_tids).start()
    machine0 = machine_cpu_times()
    base = receiver.count()
    t0 = time.time()
    sampler = Sampler(lambda: receiver.count() - base, 0.25, t0).start()
    hook: threading.Thread | None = None
    if during is not None:
        hook = threading.Thread(target=during, name="bench-during", daemon=True)
        hook.start()
    bar = tqdm(total=n, desc=f"{label}: delivered", unit="msg", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    # submission runs in its own thread so the bar shows delivery while submitting
    sub_box: dict[str, SubmitReport] = {}
    sub_thread = threading.Thread(
        target=lambda: sub_box.setdefault("r", submit_concurrently(
            mc, workload.messages, batch=batch, threads=threads, deadline=deadline)),
        name="bench-submit", daemon=True)
    sub_thread.start()
    shown = 0
    stats: dict[str, Any] = {}
    last_stats = 0.0
    try:
        while time.time() < deadline:
            got = receiver.count() - base
            bar.update(got - shown)
            shown = got
            if time.time() - last_stats > 2.0 or got >= n:
                ray_cpu.poll()
                stats = mc.stats()
                last_stats = time.time()
                finished = stats.get("delivered", 0) + stats.get("bounced", 0) + \
                    stats.get("expired", 0)
                accepted = sub_box["r"].accepted if "r" in sub_box else n
                if not sub_thread.is_alive() and stats.get("serving") and \
                        stats.get("live", 1) == 0 and \
                        stats.get("pending_commit", 0) == 0 and finished >= accepted and \
                        got >= min(n, finished):
                    break
            time.sleep(0.1)
    finally:
        bar.update(receiver.count() - base - shown)
        bar.close()
        sub_thread.join(max(0.0, deadline - time.time()) + 5)
        series = sampler.stop()
    t_end_wait = time.time()
    cpu = ray_cpu.stop()
    far = far_cpu.stop()
    client_s = client_cpu.stop()
    machine1 = machine_cpu_times()
    stats = mc.stats()
    sub = sub_box.get("r", SubmitReport())
    received = receiver.count() - base
    t_last = receiver.last_at() or t_end_wait
    e2e = t_last - sub.t_first if received else float("nan")
    lat = percentiles([x * 1000 for x in sub.latencies])
    out = {
        "system": label, "messages": n, "receiver": receiver.kind,
        "submit_threads": threads, "batch": batch,
        "accepted": sub.accepted, "refused": sub.refused, "submit_errors": sub.errors[:20],
        "submit_seconds": round(sub.seconds, 3),
        "accepted_per_s": round(sub.accepted / sub.seconds, 1) if sub.seconds else None,
        "batch_latency_ms": {k: round(v, 1) for k, v in lat.items()},
        "delivered": stats.get("delivered", 0), "bounced": stats.get("bounced", 0),
        "expired": stats.get("expired", 0), "deferred_attempts": stats.get("transient", 0),
        "still_queued": stats.get("live", 0), "received_by_sink": received,
        "seconds_end_to_end": round(e2e, 3),
        "delivered_per_s": round(received / e2e, 1) if received and e2e > 0 else None,
        "delivered_per_s_10_90": steady_rate(series, n),
        "cpu_ray_s": cpu["total_s"],
        "cpu_ray_s_per_1000": round(cpu["total_s"] / n * 1000, 3) if n else None,
        "cpu_client_s": client_s,
        "cpu_client_s_per_1000": round(client_s / n * 1000, 3) if n else None,
        "cpu_by_process": cpu["by_process"],
        # what else ran on these cores from the first submit until all was delivered: the
        # receiver and DNS servers (by name), and the whole machine (busy core-seconds, and
        # busy cores on average: near the core count, the run was CPU-bound)
        "cpu_far_side_s": far["total_s"],
        "cpu_far_side_by_process": far["by_process"],
        "machine_busy_s": round(machine1[0] - machine0[0], 2),
        "machine_busy_cores": round((machine1[0] - machine0[0]) / (t_end_wait - t0), 2)
        if t_end_wait > t0 else None,
        "timed_out": time.time() >= deadline,
        "series": series,
    }
    if hook is not None:
        hook.join(timeout=120)
    out["ok"] = (out["accepted"] == n and out["delivered"] == n and received == n
                 and not out["timed_out"])
    return out


def check_counts(res: dict[str, Any]) -> bool:
    """Print loudly unless everything submitted was delivered exactly once."""
    io = res.get("intake_only")
    if io is not None and not io.get("ok"):
        print(banner(
            f"{res['system']}: INTAKE-ONLY PHASE DOES NOT ADD UP: submitted {io['messages']}, "
            f"accepted {io['accepted']}, cancelled {io['cancelled']}, received by sink "
            f"{io['received_by_sink']} (must be 0), drained {io['drained']}"),
            file=sys.stderr, flush=True)
        return False
    if res.get("ok"):
        return True
    print(banner(
        f"{res['system']}: COUNTS DO NOT ADD UP: submitted {res['messages']}, accepted "
        f"{res.get('accepted')}, delivered {res.get('delivered')}, bounced "
        f"{res.get('bounced')}, still queued {res.get('still_queued')}, received by sink "
        f"{res.get('received_by_sink')}{', TIMED OUT' if res.get('timed_out') else ''}"),
        file=sys.stderr, flush=True)
    return False
