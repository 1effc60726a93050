"""What an SMTP session costs the relay: CPU per message when every message opens a session of
its own (a long tail's site) against the same messages on a few reused connections (issue 17).

``cluster.adapters.smtp.connect_site`` + ``send`` + ``close`` against Postfix's ``smtp-sink`` on
loopback, on uvloop as in the relay; process CPU time (``time.process_time``) over the messages.
The difference of the two figures is the CPU of one session (connect, greeting, EHLO, QUIT).

    python bench/session_cpu.py [--sessions 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c
from cluster.adapters.smtp import connect_site

__all__ = ["main"]

BODY = b"From: a@b.test\r\nTo: x@y.test\r\nSubject: hi\r\n\r\n" + b"x" * 1900 + b"\r\n"


async def _sessions(host: str, port: int, n: int, per: int, concurrency: int = 50) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            conn = await connect_site([(10, f"mx.t{i}.bench.test", [host])], port,
                                      ehlo_name="relay.bench.test", tls="opportunistic")
            for k in range(per):
                nxt = ("s@b.test", f"r{k + 1}@t{i}.bench.test", False) if k + 1 < per else None
                a = await conn.send("s@b.test", f"r{k}@t{i}.bench.test", BODY, then=nxt,
                                    last=nxt is None)
                if a.code != 250:
                    raise RuntimeError(f"not delivered: {a}")
            await conn.close()

    await asyncio.gather(*(one(i) for i in range(n)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=2000, help="messages per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    if a.sessions < 100:
        ap.error(f"--sessions: at least 100, got {a.sessions}")
    import uvloop
    if not c.have_smtp_sink():
        print("smtp-sink missing (apt-get install postfix): nothing measured", file=sys.stderr)
        return 1
    sink = c.SmtpSinkProcess(c.RECEIVER_HOST).start()
    try:
        for _ in range(a.rounds):
            for label, n, per in (("a session per message", a.sessions, 1),
                                  ("100 per connection", a.sessions // 100, 100)):
                t0, w0 = time.process_time(), time.time()
                uvloop.run(_sessions(sink.host, sink.port, n, per))
                cpu = time.process_time() - t0
                print(f"{label:22s} {n * per} msgs: {cpu / (n * per) * 1e6:6.1f} µs CPU a "
                      f"message, wall {time.time() - w0:.2f} s", flush=True)
    finally:
        sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
