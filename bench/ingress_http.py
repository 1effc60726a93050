"""HTTP API throughput and latency: POST /v1/messages with 100 messages a request.

An embedded local Ray (2 shards x 3 copies, fsync on) deployed with an ``[ingress]`` HTTP
listener on 127.0.0.1 (the ingress actor, as ``raymta up`` runs it); delivery held back (sites
limited to 1 message an hour) so only the accept path runs. Two phases, each bounded by
``--seconds``: an open loop offering ``--rate`` messages per second (the issue's probe: 1,000
msgs/s as 10 requests of 100 per second; p50/p99 per request), then ``--threads`` clients
flat out (the most msgs/s the API accepts), then as many threads of the direct Python client
(``MailCluster.submit``) with the same batches of structured messages, beside it. HTTP clients
are http.client connections with keep-alive, in this process. Writes ``bench/results/ingress-http-<ts>.json``.

    python bench/ingress_http.py --rate 1000 --seconds 8 --threads 4
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
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

KEY = "rmta_bench_key_0123456789abcdefghijklmnopqrstuvwxyz"
PER_REQUEST = 100


def _body(seq: int) -> bytes:
    text = "".join(f"line {n} of a benchmark message, about seventy characters long.\n"
                   for n in range(28))
    return json.dumps({"messages": [
        {"from": "News <news@bench.test>", "recipients": [f"u{seq}x{i}@held.bench.test"],
         "subject": f"bench {seq} {i}", "text": text} for i in range(PER_REQUEST)]}).encode()


class _Client:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, body: bytes) -> tuple[int, float]:
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/messages", body=body, headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = self.conn.getresponse()
        r.read()
        return r.status, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * (len(xs) - 1)))], 1)


def _in_threads(fn: Any, n: int) -> float:
    """``fn(0)`` .. ``fn(n - 1)`` in threads at once; the seconds until all returned."""
    ts = [threading.Thread(target=fn, args=(t,)) for t in range(n)]
    start = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join(180)
    return time.perf_counter() - start


def run(*, rate: float = 1000.0, seconds: float = 8.0, threads: int = 4) -> dict[str, Any]:
    import ray

    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.core.submission import hash_api_key

    tmp = Path(tempfile.mkdtemp(prefix="raymta-http-bench-"))
    dns = mc = None
    try:
        dns = c.start_dns(["held.bench.test"], "127.0.0.2")
        cfg = c.raymta_config(str(tmp / "spool"), dns.port, 9, rate="1/h", max_connections=1)
        ingress = parse_config({"ingress": {"http": ["127.0.0.1:0"], "api_key": [
            {"name": "bench", "key_hash": hash_api_key(KEY), "domains": ["bench.test"]}]}})
        mc = MailCluster.connect(config=replace(cfg, ingress=ingress.ingress), num_cpus=2)
        actor = next(h for name, h in mc.handles.items() if name.startswith("ingress:"))
        port = ray.get(actor.addresses.remote())[0][1]
        bodies = [_body(i) for i in range(64)]
        # open loop: one request of 100 every PER_REQUEST / rate seconds
        probe: list[float] = []
        codes: dict[int, int] = {}
        interval = PER_REQUEST / rate
        lock = threading.Lock()
        pool = [_Client(port) for _ in range(8)]
        free = list(pool)
        workers: list[threading.Thread] = []

        def one(k: int) -> None:
            with lock:
                cl = free.pop() if free else _Client(port)
            code, dt = cl.post(bodies[k % len(bodies)])
            with lock:
                probe.append(dt)
                codes[code] = codes.get(code, 0) + 1
                free.append(cl)
        t0 = time.perf_counter()
        k = 0
        while time.perf_counter() - t0 < seconds:
            due = t0 + k * interval
            time.sleep(max(0.0, due - time.perf_counter()))
            th = threading.Thread(target=one, args=(k,))
            th.start()
            workers.append(th)
            k += 1
        for th in workers:
            th.join(120)
        # closed loop: `threads` clients flat out
        done: list[float] = []
        flat_codes: dict[int, int] = {}
        until = time.perf_counter() + seconds

        def flat(t: int) -> None:
            cl = _Client(port)
            i = 0
            while time.perf_counter() < until:
                code, dt = cl.post(bodies[(t * 17 + i) % len(bodies)])
                i += 1
                with lock:
                    done.append(dt)
                    flat_codes[code] = flat_codes.get(code, 0) + 1
        elapsed = _in_threads(flat, threads)
        # the direct Python client beside it: the same batches of 100 structured messages,
        # `threads` submitters flat out through MailCluster.submit (rendered in this process)
        batches = [json.loads(b)["messages"] for b in bodies]
        direct: list[float] = []
        direct_ok = [0]
        until = time.perf_counter() + seconds

        def submitter(t: int) -> None:
            i = 0
            while time.perf_counter() < until:
                batch = [{**m, "recipients": [f"d{t}x{i}x{j}@held.bench.test"]}
                         for j, m in enumerate(batches[(t * 17 + i) % len(batches)])]
                t1 = time.perf_counter()
                res = mc.submit(batch, timeout=60.0)
                dt = time.perf_counter() - t1
                i += 1
                with lock:
                    direct.append(dt)
                    direct_ok[0] += sum(1 for r in res if r.accepted)
        direct_elapsed = _in_threads(submitter, threads)
        return {
            "per_request": PER_REQUEST, "offered_msgs_per_s": rate, "seconds": seconds,
            "probe_requests": len(probe), "probe_replies": codes,
            "probe_ms_p50": _pct(probe, 0.5), "probe_ms_p99": _pct(probe, 0.99),
            "flat_threads": threads, "flat_replies": flat_codes,
            "flat_msgs_per_s": round(flat_codes.get(200, 0) * PER_REQUEST / elapsed, 1),
            "flat_ms_p50": _pct(done, 0.5), "flat_ms_p99": _pct(done, 0.99),
            "client_threads": threads, "client_calls": len(direct),
            "client_msgs_per_s": round(direct_ok[0] / direct_elapsed, 1),
            "client_ms_p50": _pct(direct, 0.5), "client_ms_p99": _pct(direct, 0.99),
            "machine": c.machine_info()}
    finally:
        if mc is not None:
            mc.close()
        if dns is not None:
            dns.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="offered msgs/s (open loop)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    if args.seconds > 60:
        ap.error("--seconds: at most 60 (the machine is shared)")
    res = run(rate=args.rate, seconds=args.seconds, threads=args.threads)
    path = c.write_result("ingress-http", res)
    for k, v in res.items():
        if k != "machine":
            print(f"{k:<20} {v}")
    print(f"load average at start {res['machine'].get('loadavg_at_start')}; written to {path}")
    ok = set(res["probe_replies"]) == {200} and set(res["flat_replies"]) == {200}
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
