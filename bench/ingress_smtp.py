"""SMTP submission ingress throughput: messages per second answered 250 (durable on a quorum).

An embedded local Ray (2 shards x 3 copies, fsync on, as ``raymta up`` runs) deployed with an
``[ingress]`` section, so the listener is the real ingress actor in its own process; clients
are separate processes (``--procs``) of smtplib threads (``--threads`` each), every thread one
persistent session that sends ~2 KB single-recipient messages back to back. Modes:

- ``tls`` (default): STARTTLS + AUTH PLAIN, the submission path a real sender takes;
- ``plain``: a loopback listener without TLS or AUTH (what ``raymta listen`` was).

Delivery is held back (every site limited to 1 message per hour, the MX does not listen), so
the figure is the accept path alone, like ``bench/throughput.py``'s intake-only phase. Bounded:
``--seconds`` of sending (default 8) and at most ``--messages``; everything started is
stopped. Prints msgs/s, the per-message DATA latency (p50/p99) and how many messages each
submit call carried; writes ``bench/results/ingress-smtp-<ts>.json``.

    python bench/ingress_smtp.py --mode tls --procs 2 --threads 8 --seconds 8

``--injector smtp-source`` (plain mode only: it speaks neither STARTTLS nor AUTH): Postfix's C
injector instead of the Python clients, ``--messages`` messages over ``procs x threads`` reused
sessions (the clients then take little of the 2 cores); ``--postfix`` then also feeds a
throwaway Postfix's smtpd the same smtp-source command (bench/peer_postfix.py, which relays
to a sink as it accepts) and prints its intake beside raymta's.

    python bench/ingress_smtp.py --mode plain --injector smtp-source --procs 2 --threads 32 \
        --messages 20000 --postfix
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import smtplib
import ssl
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import common as c  # noqa: E402  (sets Ray's environment before ray is imported)

__all__ = ["run", "main"]

PASSWORD = "bench-password"


def _message(i: int, k: int) -> tuple[str, bytes]:
    rcpt = f"u{k}x{i}@held.bench.test"
    body = "".join(f"line {n} of a benchmark message, about seventy characters long.\r\n"
                   for n in range(28))
    return rcpt, (f"From: Bench <news@bench.test>\r\nTo: <{rcpt}>\r\nSubject: bench {k} {i}\r\n"
                  f"Message-ID: <b{k}.{i}@bench.test>\r\nDate: Fri, 04 Dec 2026 23:00:00 +0000"
                  f"\r\n\r\n{body}").encode()


def _client(port: int, mode: str, ca_file: str, threads: int, until: float, cap: int,
            proc: int, out: Any) -> None:
    """One client process: ``threads`` sessions sending until ``until`` or ``cap`` each."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()

    errors: list[str] = []

    def one(t: int) -> None:
        try:
            session(t)
        except Exception as e:   # noqa: BLE001 - counted and reported: the run is then invalid
            with lock:
                errors.append(f"{type(e).__name__}: {e}")

    def session(t: int) -> None:
        k = proc * 1000 + t
        ctx = ssl.create_default_context(cafile=ca_file)
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.ehlo("bench.test")
            if mode == "tls":
                s.starttls(context=ctx)
                s.ehlo("bench.test")
                s.login("bench", PASSWORD)
            mine: list[float] = []
            got: dict[int, int] = {}
            i = 0
            while time.time() < until and i < cap:
                rcpt, data = _message(i, k)
                s.mail("news@bench.test")
                s.rcpt(rcpt)
                t0 = time.perf_counter()
                code, _ = s.data(data)
                mine.append(time.perf_counter() - t0)
                got[code] = got.get(code, 0) + 1
                i += 1
        with lock:
            lat.extend(mine)
            for code, n in got.items():
                codes[code] = codes.get(code, 0) + n

    ts = [threading.Thread(target=one, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put({"latencies": lat, "codes": codes, "errors": errors})


def run(*, mode: str = "tls", procs: int = 2, threads: int = 8, seconds: float = 8.0,
        messages: int = 100_000, batch_window: str = "2ms", batch_max: int = 1000,
        batch_concurrency: int = 4,
        in_process: bool = False, injector: str = "smtplib") -> dict[str, Any]:
    import ray

    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.core.submission import hash_password
    from tests.ingress_certs import make_ca

    tmp = Path(tempfile.mkdtemp(prefix="raymta-ingress-bench-"))
    dns = mc = None
    try:
        # held.bench.test: the smtplib clients' recipients; d0.bench.test: smtp-source's
        # (bench/peer_postfix.py). Both must resolve: an unknown domain bounces every message,
        # and the leader's CPU would then be bounces, suppressions and DSNs, not the accept path
        dns = c.start_dns(["held.bench.test", "d0.bench.test"], "127.0.0.2")
        # sites held: 1 message an hour to a port where nothing listens
        cfg = c.raymta_config(str(tmp / "spool"), dns.port, 9, rate="1/h", max_connections=1)
        ca = make_ca(tmp / "ca")
        cert, key = ca.server_cert("ingress.bench.test", ["127.0.0.1"])
        section: dict[str, Any] = {"hostname": "ingress.bench.test",
                                   "submission": ["127.0.0.1:0"], "batch_window": batch_window,
                                   "batch_max": batch_max,
                                   "batch_concurrency": batch_concurrency,
                                   "max_connections_per_ip": 1000,
                                   "max_connections_per_user": 1000}
        if mode == "tls":
            section.update(cert_file=str(cert), key_file=str(key), user=[{
                "name": "bench", "domains": ["bench.test"],
                "password_hash": hash_password(PASSWORD, ln=10)}])
        else:
            section["auth"] = False
        settings = parse_config({"ingress": section}).ingress
        if in_process:   # the listener in this process (to profile it), not in an actor
            from cluster.ingress_smtp import SmtpIngress
            mc = MailCluster.connect(config=cfg, num_cpus=2)
            local = SmtpIngress.from_config(mc, settings).start()
            port = local.addresses[0].port

            def stats() -> dict[str, Any]:
                return local.stats()
        else:
            mc = MailCluster.connect(config=replace(cfg, ingress=settings), num_cpus=2)
            actor = next(h for name, h in mc.handles.items() if name.startswith("ingress:"))
            port = ray.get(actor.addresses.remote())[0][1]

            def stats() -> dict[str, Any]:
                return ray.get(actor.stats.remote())
        before = stats()
        if injector == "smtp-source":
            return _smtp_source_run(port, messages, procs * threads, stats, before,
                                    mode=mode, seconds=seconds)
        ctxmp = mp.get_context("spawn")
        q = ctxmp.Queue()
        start = time.time() + 3.0          # every process connected and ready by then
        until = start + seconds
        cap = max(1, messages // (procs * threads))
        ps = [ctxmp.Process(target=_wait_then_client,
                            args=(start, port, mode, str(ca.ca_file), threads, until, cap, p, q))
              for p in range(procs)]
        for p in ps:
            p.start()
        results = [q.get(timeout=seconds + 120) for _ in ps]
        for p in ps:
            p.join(30)
        after = stats()
        if in_process:
            local.stop()
        lat = sorted(x for r in results for x in r["latencies"])
        codes: dict[int, int] = {}
        for r in results:
            for code, n in r["codes"].items():
                codes[code] = codes.get(code, 0) + n
        ok = codes.get(250, 0)
        session_errors = [e for r in results for e in r["errors"]]
        elapsed = seconds if lat else 0.0
        calls = after["batches"]["calls"] - before["batches"]["calls"]
        sent = after["batches"]["messages"] - before["batches"]["messages"]
        out = {
            "mode": mode, "in_process": in_process, "procs": procs, "threads": threads,
            "sessions": procs * threads,
            "seconds": seconds, "accepted": ok, "replies": codes,
            "session_errors": len(session_errors), "first_error": (session_errors or [""])[0],
            "accepted_per_s": round(ok / elapsed, 1) if elapsed else 0.0,
            "latency_ms_p50": round(1000 * statistics.median(lat), 2) if lat else None,
            "latency_ms_p99": round(1000 * lat[int(0.99 * (len(lat) - 1))], 2) if lat else None,
            "submit_calls": calls, "messages_per_call": round(sent / calls, 1) if calls else 0,
            "largest_call": after["batches"]["largest"], "batch_window": batch_window,
            "batch_max": batch_max, "injector": injector,
            "machine": c.machine_info(),
        }
        return out
    finally:
        if mc is not None:
            mc.close()
        if dns is not None:
            dns.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _smtp_source_run(port: int, n: int, sessions: int, stats: Any, before: dict[str, Any], *,
                     mode: str, seconds: float) -> dict[str, Any]:
    from bench.peer_postfix import _inject_smtp_source
    if mode != "plain":
        raise SystemExit("smtp-source speaks neither STARTTLS nor AUTH: use --mode plain")
    pid = before.get("pid")          # the ingress actor's process (absent: in this process)
    cpu0 = _cpu_s(pid)
    # where the machine's CPU went: this process's tree (the embedded Ray cluster: ingress,
    # shard leaders and copies, raylet, GCS; and smtp-source)
    meter = c.CpuMeter(lambda: [os.getpid()]).start()
    r = _inject_smtp_source("127.0.0.1", port, n, 2000, sessions,
                            time.time() + max(60.0, seconds * 20))
    cpu1 = _cpu_s(pid)
    used = meter.stop()
    after = stats()
    took = r["t_last"] - r["t_first"]
    ok = after.get("accepted", 0) - before.get("accepted", 0)
    calls = after["batches"]["calls"] - before["batches"]["calls"]
    sent = after["batches"]["messages"] - before["batches"]["messages"]
    return {"mode": mode, "injector": "smtp-source", "command": r["command"],
            "sessions": sessions, "seconds": round(took, 2),
            "accepted": ok, "replies": {250: ok}, "session_errors": len(r["errors"]),
            "first_error": (r["errors"] or [""])[0],
            "accepted_per_s": round(ok / took, 1) if took else 0.0,
            "latency_ms_p50": None, "latency_ms_p99": None, "submit_calls": calls,
            "messages_per_call": round(sent / calls, 1) if calls else 0,
            "largest_call": after["batches"]["largest"], "injector_cpu_s": r["cpu_s"],
            # the listener's own CPU per message: what the front end costs, whatever the
            # machine's load (which moves msgs/s a lot on this shared machine)
            "ingress_cpu_us_per_msg": round(1e6 * (cpu1 - cpu0) / ok) if ok and pid else None,
            "cpu_us_per_msg_by_process": {k: round(1e6 * v / ok) for k, v in
                                          used["by_process"].items()} if ok else {},
            "machine": c.machine_info()}


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of process ``pid`` so far; 0 without one."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_then_client(start: float, *args: Any) -> None:
    time.sleep(max(0.0, start - time.time()))
    _client(*args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("tls", "plain"), default="tls")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--batch-window", default="2ms")
    ap.add_argument("--batch-max", type=int, default=1000,
                    help="most messages per submit call (1: one commit per message)")
    ap.add_argument("--batch-concurrency", type=int, default=4,
                    help="submit calls in flight at once (new arrivals gather meanwhile)")
    ap.add_argument("--injector", choices=("smtplib", "smtp-source"), default="smtplib")
    ap.add_argument("--postfix", action="store_true",
                    help="also feed Postfix's smtpd the same smtp-source command")
    ap.add_argument("--in-process", action="store_true",
                    help="run the listener in this process instead of an ingress actor")
    args = ap.parse_args(argv)
    if args.seconds > 60:
        ap.error("--seconds: at most 60 (the machine is shared)")
    res = run(mode=args.mode, procs=args.procs, threads=args.threads, seconds=args.seconds,
              messages=args.messages, batch_window=args.batch_window,
              batch_max=args.batch_max, batch_concurrency=args.batch_concurrency,
              in_process=args.in_process, injector=args.injector)
    if args.postfix:
        from bench.peer_postfix import run_postfix
        pf = run_postfix(args.messages, connections=args.procs * args.threads,
                         injector="smtp-source", progress=False)
        res["postfix"] = {k: pf[k] for k in ("accepted", "accepted_per_s", "injector_command",
                                             "inject_errors")}
    path = c.write_result("ingress-smtp", res)
    for k in ("mode", "sessions", "session_errors", "seconds", "accepted", "replies",
              "accepted_per_s",
              "latency_ms_p50", "latency_ms_p99", "submit_calls", "messages_per_call",
              "largest_call", "ingress_cpu_us_per_msg", "cpu_us_per_msg_by_process"):
        if k in res:
            print(f"{k:<20} {res[k]}")
    if "postfix" in res:
        print(f"postfix smtpd        {res['postfix']['accepted_per_s']} msgs/s accepted "
              f"({res['postfix']['accepted']} messages, same smtp-source)")
    print(f"load average at start {res['machine'].get('loadavg_at_start')}; written to {path}")
    if res["session_errors"]:
        print(f"INVALID RUN: {res['session_errors']} sessions failed: {res['first_error']}")
    return 0 if res["accepted"] and set(res["replies"]) == {250} and \
        not res["session_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
