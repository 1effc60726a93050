"""Suppression at scale: import a million entries, then the accept rate with them loaded.

Starts the embedded default (a local Ray, a spool in a temporary directory; nothing is
delivered: every message is held by ``not_before`` and cancelled at the end), and measures in
one run:

- the intake rate (messages accepted per second, durable on a quorum, batches of 100 from
  ``--threads`` submitting threads) with no suppressions;
- the time to import ``--entries`` suppressions (``MailCluster.suppress``, every shard);
- each shard leader's resident memory before and after, per entry;
- the intake rate again with them loaded (every recipient is looked up on the submit path).

Prints a table and writes ``bench/results/suppression-<time>.json``. Bounded: ``--messages``
per intake round (default 20,000), ``--entries`` (default 1,000,000).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _workload(tag: str, n: int) -> list[dict[str, Any]]:
    held = time.time() + 3600
    body = ("x" * 70 + "\r\n") * 25
    return [{"sender": "news@bounces.origin.test", "recipients": [f"{tag}{i}@d{i % 100}.test"],
             "raw": (f"From: news@origin.test\r\nTo: {tag}{i}@d{i % 100}.test\r\n"
                     f"Subject: bench {i}\r\n\r\n{body}").encode(), "not_before": held}
            for i in range(n)]


def _intake(mc: Any, msgs: list[dict[str, Any]], threads: int) -> tuple[float, int]:
    """Accepted msgs/s over ``msgs`` in batches of 100 from ``threads`` threads."""
    batches = [msgs[k:k + 100] for k in range(0, len(msgs), 100)]
    lock = threading.Lock()
    refused = [0]

    def run() -> None:
        while True:
            with lock:
                if not batches:
                    return
                b = batches.pop()
            res = mc.submit(b)
            bad = sum(1 for r in res if not r.accepted)
            if bad:
                with lock:
                    refused[0] += bad
    gc.freeze()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.perf_counter() - t0
    return (len(msgs) - refused[0]) / took, refused[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("-n", "--messages", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    from cluster.client import MailCluster
    from cluster.config import parse_config
    spool = tempfile.mkdtemp(prefix="raymta-bench-supp-")
    cfg = parse_config({"spool": {"directory": spool}, "backup": {"interval": 0}})
    out: dict[str, Any] = {"entries": args.entries, "messages": args.messages,
                           "threads": args.threads, "started": time.time()}
    try:
        _run(MailCluster, cfg, args, out)
    finally:
        shutil.rmtree(spool, ignore_errors=True)   # the held messages go with it
    print(f"\nsuppression bench ({args.entries:,} entries, {args.messages:,} messages per "
          f"intake round, {args.threads} threads)")
    for k in ("intake_msgs_per_s_without", "import_seconds", "import_entries_per_s",
              "bytes_per_entry_per_leader", "intake_msgs_per_s_with",
              "intake_ratio_with_without", "probe_refused_as_suppressed"):
        print(f"  {k:32} {out[k]}")
    d = Path(__file__).resolve().parent / "results"
    d.mkdir(exist_ok=True)
    f = d / f"suppression-{time.strftime('%Y%m%d-%H%M%S')}.json"
    f.write_text(json.dumps(out, indent=2))
    print(f"  written to {f}")
    return 0


def _run(MailCluster: Any, cfg: Any, args: argparse.Namespace, out: dict[str, Any]) -> None:
    with MailCluster.connect(config=cfg) as mc:
        pids = [s["pid"] for s in mc.stats()["shards"]]
        rate0, ref0 = _intake(mc, _workload("a", args.messages), args.threads)
        rss0 = [_rss(p) for p in pids]
        t0 = time.perf_counter()
        rows = [{"address": f"sup{i}@d{i % 100}.test", "reason": "hard-bounce"}
                for i in range(args.entries)]
        res = mc.suppress(rows)
        took = time.perf_counter() - t0
        del rows
        rss1 = [_rss(p) for p in pids]
        rate1, ref1 = _intake(mc, _workload("b", args.messages), args.threads)
        # and messages to suppressed recipients are refused on the same path
        probe = mc.submit(_workload("sup", 100))
        out.update({
            "intake_msgs_per_s_without": round(rate0, 1), "refused_without": ref0,
            "import_seconds": round(took, 2), "imported": res["added"],
            "import_entries_per_s": round(res["added"] / took, 1),
            "leader_rss_bytes_before": rss0, "leader_rss_bytes_after": rss1,
            "bytes_per_entry_per_leader": [round((b - a) / max(1, args.entries), 1)
                                           for a, b in zip(rss0, rss1)],
            "intake_msgs_per_s_with": round(rate1, 1), "refused_with": ref1,
            "intake_ratio_with_without": round(rate1 / rate0, 3),
            "probe_refused_as_suppressed": sum(1 for r in probe if not r.accepted and
                                               "suppressed" in (r.error or "")),
        })


if __name__ == "__main__":
    raise SystemExit(main())
