"""The peers raymta is measured against: a throwaway Postfix, and smtp-source → smtp-sink.

- :class:`PostfixInstance`: a private Postfix (own ``config_directory``, ``queue_directory``
  and ``data_directory`` under a temporary directory, no chroot) listening on
  ``127.0.0.1:<free port>``, with no local domains, no DNS (``smtp_dns_support_level =
  disabled``, numeric ``relayhost = [127.0.0.2]:PORT``) and every message relayed to the same
  receiver raymta delivers to. Started with ``postfix -c DIR start`` and always stopped with
  ``postfix -c DIR stop`` (then its master is killed by pid if it lingers).
- :func:`run_postfix`: injects the benchmark workload over SMTP (aiosmtplib, several
  connections) and times until the receiver has every message and the queue is empty.
- :func:`run_physical`: ``smtp-source`` → ``smtp-sink`` with the same message size: the most
  SMTP this machine can move, with no queue at all.

    python bench/peer_postfix.py --messages 20000 [--which postfix|physical|both]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c

__all__ = ["PostfixInstance", "main", "run_physical", "run_postfix"]

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """A private Postfix relaying everything to ``relay_host:relay_port``; loopback only."""

    def __init__(self, relay_host: str, relay_port: int, *, concurrency: int = 20,
                 listen_host: str = "127.0.0.1", listen_port: int = 0,
                 log: bool = True) -> None:
        self.relay = (relay_host, relay_port)
        self.concurrency = concurrency
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.log = log
        self.base: Path | None = None
        self.started = False

    @property
    def config_dir(self) -> Path:
        assert self.base is not None
        return self.base / "etc"

    @property
    def queue_dir(self) -> Path:
        assert self.base is not None
        return self.base / "spool"

    def _main_cf(self) -> str:
        assert self.base is not None
        host, port = self.relay
        settings = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.base / "data"),
            "meta_directory": "/etc/postfix",
            "myhostname": "postfix.bench.raymta.test", "mydomain": "bench.raymta.test",
            "myorigin": "$mydomain", "mydestination": "", "relay_domains": "",
            "local_recipient_maps": "", "alias_maps": "", "alias_database": "",
            "inet_interfaces": self.listen_host, "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_peername_lookup": "no",
            # no DNS anywhere: a numeric next hop in brackets, DNS support off
            "relayhost": f"[{host}]:{port}",
            "smtp_dns_support_level": "disabled", "smtp_host_lookup": "native",
            "smtp_tls_security_level": "none", "smtpd_tls_security_level": "none",
            "smtp_destination_concurrency_limit": str(self.concurrency),
            "default_process_limit": str(max(100, self.concurrency + 50)),
            "biff": "no", "append_dot_mydomain": "no", "readme_directory": "no",
            "maillog_file": str(self.base / "maillog") if self.log else "",
            "maillog_file_prefixes": str(self.base),
            "notify_classes": "",
        }
        return "".join(f"{k} = {v}\n" for k, v in settings.items())

    def _postfix(self, *args: str, check: bool = True, timeout: float = 60
                 ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["postfix", "-c", str(self.config_dir), *args], capture_output=True,
                           text=True, timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed ({r.returncode}): "
                               f"{r.stdout}{r.stderr}{self.log_tail()}")
        return r

    def start(self) -> PostfixInstance:
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance needs root (postfix -c DIR start)")
        if not shutil.which("postfix"):
            raise RuntimeError("postfix is not installed")
        self.base = Path(tempfile.mkdtemp(prefix="raymta-postfix-"))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        assert self.base is not None
        self.base.chmod(0o755)            # Postfix's daemons run as the postfix user
        self.config_dir.mkdir()
        self.queue_dir.mkdir()
        (self.base / "data").mkdir()
        shutil.chown(self.base / "data", "postfix", "postfix")
        self.listen_port = self.listen_port or c.free_port(self.listen_host)
        (self.config_dir / "main.cf").write_text(self._main_cf())
        (self.config_dir / "master.cf").write_text(
            _MASTER_CF.format(listen=f"{self.listen_host}:{self.listen_port}"))
        # creates the queue sub-directories with their owners and modes
        self._postfix("set-permissions", "create-missing", timeout=120)
        self.started = True
        self._postfix("start", timeout=120)
        c.wait_listening(self.listen_host, self.listen_port, timeout=20)

    def log_tail(self, lines: int = 20) -> str:
        """The end of this instance's maillog (Postfix reports its errors only there)."""
        path = self.base / "maillog" if self.base is not None else None
        if path is None or not path.exists():
            return ""
        return "\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def queue_size(self) -> int:
        """Messages in the queue (``postqueue -p``); -1 if it could not be read."""
        r = subprocess.run(["postqueue", "-c", str(self.config_dir), "-p"],
                           capture_output=True, text=True, timeout=60, check=False)
        out = r.stdout.strip()
        if "Mail queue is empty" in out:
            return 0
        last = out.splitlines()[-1] if out else ""
        # "-- 12 Kbytes in 3 Requests."
        parts = last.split()
        if "Requests." in parts or "Request." in parts:
            return int(parts[-2])
        return -1

    def stop(self) -> None:
        base = self.base
        if base is None:
            return
        try:
            if self.started:
                pid = self.master_pid()
                self._postfix("stop", check=False, timeout=60)
                deadline = time.time() + 20
                while pid is not None and _alive(pid) and time.time() < deadline:
                    time.sleep(0.1)
                if pid is not None and _alive(pid):
                    self._postfix("abort", check=False, timeout=30)
                    time.sleep(0.5)
                    if _alive(pid):
                        os.kill(pid, 9)
                self.started = False
        finally:
            self.base = None
            shutil.rmtree(base, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _inject(host: str, port: int, messages: list[dict[str, Any]], connections: int,
                  deadline: float) -> dict[str, Any]:
    """Send every message over ``connections`` SMTP sessions; per-message latencies."""
    import aiosmtplib

    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)
    lat: list[float] = []
    errors: list[str] = []

    async def session() -> None:
        smtp = aiosmtplib.SMTP(hostname=host, port=port, local_hostname="injector.bench.test",
                               timeout=60, start_tls=False, use_tls=False)
        await smtp.connect()
        try:
            while not queue.empty() and time.time() < deadline:
                m = queue.get_nowait()
                t = time.time()
                try:
                    await smtp.sendmail(m["sender"], m["recipients"], m["raw"])
                    lat.append(time.time() - t)
                except aiosmtplib.SMTPException as e:
                    errors.append(str(e))
                    if not smtp.is_connected:
                        await smtp.connect()
        finally:
            if smtp.is_connected:
                await smtp.quit()

    t0 = time.time()
    await asyncio.gather(*(session() for _ in range(connections)))
    return {"latencies": lat, "errors": errors, "t_first": t0, "t_last": time.time()}


def _inject_smtp_source(host: str, port: int, n: int, size: int, connections: int,
                        deadline: float) -> dict[str, Any]:
    """``smtp-source`` (C) injects n messages of ``size`` bytes over ``connections`` reused
    sessions, each to a distinct recipient (``-N``): the lightest injector there is, so the
    Postfix figure is not held back by a Python client sharing its 2 cores."""
    import resource
    cmd = [c.SMTP_SOURCE, "-c", "-d", "-4", "-N", "-l", str(size), "-m", str(n),
           "-s", str(connections), "-M", "injector.bench.test", "-f", "bounces@origin.bench.test",
           "-t", "user@d0.bench.test", f"inet:{host}:{port}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, timeout=max(1.0, deadline - t0), check=False)
    t1 = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    errors = [] if r.returncode == 0 else [r.stderr.decode(errors="replace")[-300:]]
    return {"latencies": [], "count": n if r.returncode == 0 else 0, "errors": errors,
            "t_first": t0, "t_last": t1, "cpu_s": cpu, "command": " ".join(cmd)}


def run_postfix(n: int, *, domains: int = 100, connections: int = 8, concurrency: int = 20,
                timeout: float = 600.0, receiver: str = "auto", progress: bool = True,
                injector: str = "auto") -> dict[str, Any]:
    """Postfix relaying the workload to the receiver; times injection and end-to-end.

    injector: "smtp-source" (C; the default when installed), or "python" (aiosmtplib with
    the workload's own messages and per-message latencies)."""
    from tqdm import tqdm

    workload = c.make_workload(n, domains=domains)
    recv = c.make_receiver(receiver)
    pf: PostfixInstance | None = None
    try:
        recv.start()
        pf = PostfixInstance(recv.host, recv.port, concurrency=concurrency).start()
        deadline = time.time() + timeout
        master = pf.master_pid()
        cpu = c.CpuMeter(lambda: [master] if master else []).start()
        client_cpu = c.SelfCpu(recv.exclude_tids).start()
        t0 = time.time()
        sampler = c.Sampler(recv.count, 0.25, t0).start()
        box: dict[str, Any] = {}
        if injector == "auto":
            injector = "smtp-source" if os.access(c.SMTP_SOURCE, os.X_OK) else "python"
        if injector == "smtp-source":
            size = round(workload.raw_bytes / n)
            inj = threading.Thread(target=lambda: box.setdefault("r", _inject_smtp_source(
                pf.listen_host, pf.listen_port, n, size, connections, deadline)),
                name="bench-inject", daemon=True)
        else:
            inj = threading.Thread(target=lambda: box.setdefault("r", asyncio.run(_inject(
                pf.listen_host, pf.listen_port, workload.messages, connections, deadline))),
                name="bench-inject", daemon=True)
        inj.start()
        with tqdm(total=n, desc="postfix: delivered", unit="msg", disable=not progress,
                  dynamic_ncols=True, mininterval=0.5) as bar:
            shown = 0
            while time.time() < deadline:
                got = recv.count()
                bar.update(got - shown)
                shown = got
                if got >= n and not inj.is_alive():
                    break
                cpu.poll()
                time.sleep(0.1)
        inj.join(max(0.0, deadline - time.time()) + 5)
        series = sampler.stop()
        # Postfix removes the queue file after the receiver's 250: wait for that too
        qsize = pf.queue_size()
        while qsize != 0 and time.time() < deadline:
            time.sleep(0.2)
            qsize = pf.queue_size()
        used = cpu.stop()
        client_s = client_cpu.stop()
        inj_r = box.get("r", {"latencies": [], "errors": ["injector did not finish"],
                              "t_first": t0, "t_last": time.time()})
        received = recv.count()
        e2e = (recv.last_at() or time.time()) - inj_r["t_first"]
        inj_s = inj_r["t_last"] - inj_r["t_first"]
        lat = c.percentiles([x * 1000 for x in inj_r["latencies"]]) \
            if inj_r["latencies"] else {}
        accepted = inj_r.get("count", len(inj_r["latencies"]))
        client_s += inj_r.get("cpu_s", 0.0)
        res = {
            "system": "postfix", "messages": n, "receiver": recv.kind, "injector": injector,
            "injector_command": inj_r.get("command"),
            "injector_connections": connections, "smtp_destination_concurrency_limit":
                concurrency,
            "accepted": accepted, "inject_errors": inj_r["errors"][:20],
            "accepted_per_s": round(accepted / inj_s, 1) if inj_s else None,
            "message_latency_ms": {k: round(v, 2) for k, v in lat.items()},
            "received_by_sink": received, "still_queued": qsize,
            "seconds_end_to_end": round(e2e, 3),
            "delivered_per_s": round(received / e2e, 1) if received and e2e > 0 else None,
            "delivered_per_s_10_90": c.steady_rate(series, n),
            "cpu_postfix_s": used["total_s"],
            "cpu_postfix_s_per_1000": round(used["total_s"] / n * 1000, 3),
            "cpu_client_s_per_1000": round(client_s / n * 1000, 3),
            "cpu_by_process": used["by_process"],
            "timed_out": time.time() >= deadline, "series": series,
            "message_bytes": round(workload.raw_bytes / n), "domains": domains,
        }
        res["delivered"] = received   # the sink's 250 is the delivery
        res["ok"] = received == n and qsize == 0 and res["accepted"] == n
        return res
    finally:
        if pf is not None:
            pf.stop()
        recv.stop()


def run_physical(n: int, *, size: int = 2000, sessions: int = 20,
                 timeout: float = 600.0) -> dict[str, Any]:
    """``smtp-source`` → ``smtp-sink``: n messages of ``size`` bytes over ``sessions``
    parallel connections, each reused (``-d``). No queue, no disk: the SMTP ceiling here."""
    if not os.access(c.SMTP_SOURCE, os.X_OK) or not c.have_smtp_sink():
        return {"system": "physical", "skipped": "smtp-source/smtp-sink not installed",
                "ok": False}
    recv = c.SmtpSinkProcess()
    try:
        recv.start()
        cmd = [c.SMTP_SOURCE, "-c", "-d", "-4", "-l", str(size), "-m", str(n),
               "-s", str(sessions), "-M", "source.bench.test", "-f", "s@source.bench.test",
               "-t", "u@sink.bench.test", f"inet:{recv.host}:{recv.port}"]
        t0 = time.time()
        sampler = c.Sampler(recv.count, 0.1, t0).start()
        r = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        deadline = time.time() + 10
        while recv.count() < n and time.time() < deadline:
            time.sleep(0.05)
        series = sampler.stop()
        received = recv.count()
        e2e = (recv.last_at() or time.time()) - t0
        res = {"system": "physical", "messages": n, "receiver": recv.kind,
               "command": " ".join(cmd), "returncode": r.returncode,
               "stderr": r.stderr.decode(errors="replace")[-500:],
               "accepted": n, "delivered": received,
               "received_by_sink": received, "seconds_end_to_end": round(e2e, 3),
               "delivered_per_s": round(received / e2e, 1) if received and e2e > 0 else None,
               "delivered_per_s_10_90": c.steady_rate(series, n), "series": series, "message_bytes": size, "sessions": sessions}
        res["ok"] = received == n and r.returncode == 0
        return res
    finally:
        recv.stop()


def run_pipelined_ceiling(n: int, *, size: int = 2000, sessions: int = 20,
                          timeout: float = 600.0) -> dict[str, Any]:
    """A pipelining client → ``smtp-sink``: n messages of ``size`` bytes over ``sessions``
    reused connections, MAIL, RCPT and DATA in one write and the next envelope behind the
    previous body (RFC 2920, raymta's own client: cluster/adapters/smtp.py), one process on
    uvloop. The ceiling for a client that pipelines, which smtp-source does not."""
    import asyncio

    from cluster.adapters.smtp import connect_site
    if not c.have_smtp_sink():
        return {"system": "physical-pipelined", "skipped": "smtp-sink not installed",
                "ok": False}
    body = (b"From: s@source.bench.test\r\nTo: u@sink.bench.test\r\nSubject: x\r\n\r\n" +
            b"x" * max(0, size - 80) + b"\r\n")
    recv = c.SmtpSinkProcess()
    try:
        recv.start()
        counts = [n // sessions + (1 if k < n % sessions else 0) for k in range(sessions)]

        async def one(k: int) -> int:
            conn = await connect_site([(10, "sink", [recv.host])], recv.port,
                                      ehlo_name="source.bench.test", tls="disabled",
                                      connect_timeout=10, command_timeout=60)
            ok = 0
            for i in range(counts[k]):
                last = i == counts[k] - 1
                a = await conn.send("s@source.bench.test", "u@sink.bench.test", body,
                                    then=None if last else ("s@source.bench.test",
                                                            "u@sink.bench.test", False))
                ok += a.code == 250
            await conn.close()
            return ok

        async def all_of() -> list[int]:
            return await asyncio.gather(*(one(k) for k in range(sessions)))
        try:
            import uvloop
            run = uvloop.run
        except ImportError:
            run = asyncio.run
        t0 = time.time()
        sampler = c.Sampler(recv.count, 0.1, t0).start()
        oks = run(asyncio.wait_for(all_of(), timeout))
        deadline = time.time() + 10
        while recv.count() < n and time.time() < deadline:
            time.sleep(0.05)
        series = sampler.stop()
        received = recv.count()
        e2e = (recv.last_at() or time.time()) - t0
        return {"system": "physical-pipelined", "messages": n, "receiver": recv.kind,
                "accepted": sum(oks), "delivered": received, "received_by_sink": received,
                "seconds_end_to_end": round(e2e, 3),
                "delivered_per_s": round(received / e2e, 1) if received and e2e > 0 else None,
                "delivered_per_s_10_90": c.steady_rate(series, n), "series": series,
                "message_bytes": size, "sessions": sessions,
                "ok": received == n and sum(oks) == n}
    finally:
        recv.stop()


def print_peer(res: dict[str, Any]) -> None:
    if res.get("skipped"):
        print(f"{res['system']}: skipped ({res['skipped']})")
        return
    print(f"\n{res['system']}: {res['received_by_sink']:,} of {res['messages']:,} received "
          f"in {res['seconds_end_to_end']} s = {res['delivered_per_s']} msgs/s end to end "
          f"(10%-90%: {res['delivered_per_s_10_90']} msgs/s)")
    if res["system"] == "postfix":
        lat = res["message_latency_ms"]
        lat_s = f"{lat['p50']}/{lat['p95']}/{lat['p99']} ms" if lat else "- (not measured)"
        print(f"  accepted (SMTP injection by {res.get('injector', 'python')}) "
              f"{res['accepted_per_s']} msgs/s, per-message latency p50/p95/p99 {lat_s}, "
              f"queue left {res['still_queued']}")
        print(f"  CPU s / 1000 msgs: Postfix {res['cpu_postfix_s_per_1000']}, injector "
              f"{res['cpu_client_s_per_1000']}; by process: "
              + ", ".join(f"{k} {v}" for k, v in list(res["cpu_by_process"].items())[:8]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=20_000)
    ap.add_argument("--which", choices=["postfix", "physical", "both"], default="both")
    ap.add_argument("--connections", type=int, default=8, help="SMTP injection sessions")
    ap.add_argument("--concurrency", type=int, default=20,
                    help="Postfix smtp_destination_concurrency_limit")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--injector", choices=["auto", "smtp-source", "python"], default="auto",
                    help="who submits to Postfix (auto: smtp-source when installed)")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if not c.ensure_postfix(install=not args.no_install):
        print("Postfix is not available: nothing to measure", file=sys.stderr)
        return 1
    ok = True
    out: dict[str, Any] = {"machine": c.machine_info()}
    if args.which in ("postfix", "both"):
        out["postfix"] = run_postfix(args.messages, connections=args.connections,
                                     concurrency=args.concurrency, timeout=args.timeout,
                                     progress=not args.quiet, injector=args.injector)
        print_peer(out["postfix"])
        ok = c.check_counts(out["postfix"]) and ok
    if args.which in ("physical", "both"):
        out["physical"] = run_physical(args.messages, timeout=args.timeout)
        print_peer(out["physical"])
        ok = (out["physical"].get("skipped") is not None or c.check_counts(out["physical"])) \
            and ok
    print(f"results: {c.write_result('peers', out)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
