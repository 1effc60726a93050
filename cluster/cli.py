"""The ``raymta`` command: up, down, demo, submit, status, events.

``raymta demo`` is the embedded default: a local Ray bound to loopback, a DNS server and SMTP
sinks on loopback, a spool in a local directory; it sends N messages to M domains, shows a
progress bar, and prints what happened. Nothing it does leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "demo_config", "run_demo"]


def _loopback_env() -> None:
    from cluster.deploy import LOOPBACK_ENV
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)


def _attach(address: str, config: str | None) -> Any:
    _loopback_env()
    from cluster.client import MailCluster
    return MailCluster.connect(address, config=config)


# ---------------------------------------------------------------------------------------- up
def cmd_up(args: argparse.Namespace) -> int:
    _loopback_env()
    import ray

    from cluster.config import load_config
    from cluster.deploy import deploy, join_with_token
    cfg = load_config(args.config)
    join_with_token()
    try:
        ray.init(address=args.address, namespace=cfg.cluster.namespace, log_to_driver=False)
    except ConnectionError:
        if args.address != "auto":
            raise
        print("no running Ray cluster: starting a head node on 127.0.0.1")
        if os.environ.get("RAY_AUTH_MODE", "") != "disabled":
            # `ray start` turns token auth on only when a token exists: make sure one does
            subprocess.run(["ray", "get-auth-token", "--generate"], check=True,
                           stdout=subprocess.DEVNULL)
        from cluster.deploy import RAY_SYSTEM_CONFIG
        subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1",
                        "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                        f"--system-config={json.dumps(RAY_SYSTEM_CONFIG)}"], check=True)
        ray.init(address="auto", namespace=cfg.cluster.namespace, log_to_driver=False)
    handles = deploy(cfg, detached=True)
    print(f"raymta deployed in namespace {cfg.cluster.namespace!r}:")
    for name in sorted(handles):
        print(f"  {name}")
    print(f"spool: {Path(cfg.spool.directory).resolve()}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    _loopback_env()
    import ray

    from cluster.deploy import join_with_token
    join_with_token()
    ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
    n = 0
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == args.namespace and a["name"].split(":")[0] in (
                "coordinator", "replica", "throttle", "relay", "ingress"):
            ray.kill(ray.get_actor(a["name"], namespace=args.namespace), no_restart=True)
            n += 1
    print(f"stopped {n} raymta actors (the spool stays on disk)")
    return 0


# ---------------------------------------------------------------------------------------- demo
def demo_config(spool: str, dns_port: int, smtp_port: int, *, retry: str = "2s") -> Any:
    from cluster.config import parse_config
    return parse_config({
        "spool": {"directory": spool},
        "queue": {"retry_initial": retry, "retry_max_delay": "10s", "dns_retry_initial": "1s",
                  "max_age": "10m"},
        "dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "2s"},
        "delivery": {"smtp_port": smtp_port, "connect_timeout": "3s", "idle_timeout": "2s",
                     "site_backoff": "2s", "site_backoff_max": "10s"},
        "egress": [{"name": "default", "ehlo_name": "demo.raymta.test"}],
        "site_defaults": {"rate": "2000/s", "max_connections": 8},
    })


def run_demo(n: int, domains: int, spool: str | None, *, quiet: bool = False) -> dict[str, Any]:
    """Run the embedded demo; returns the summary (also printed)."""
    _loopback_env()
    from tqdm import tqdm

    from cluster.client import MailCluster
    from cluster.devservers import LoopbackDNS, SinkGroup

    tmp = None
    if spool is None:
        tmp = tempfile.mkdtemp(prefix="raymta-demo-")
        spool = tmp
    sinks = SinkGroup(["127.0.0.2", "127.0.0.3", "127.0.0.4"]).start()
    dns = LoopbackDNS().start()
    mc = None
    try:
        # two MX hosts per domain (sites roll up by MX set), one null MX, one missing domain
        for i, s in enumerate(sinks.sinks):
            dns.add_a(f"mx{i + 1}.sinks.test", s.host)
        names = [f"demo{i}.test" for i in range(domains)]
        for i, d in enumerate(names):
            a, b = i % 3 + 1, (i + 1) % 3 + 1
            dns.add_mx(d, [(10, f"mx{a}.sinks.test"), (20, f"mx{b}.sinks.test")])
        dns.add_null_mx("nullmx.test")
        # sinks: 1 in 50 recipients is unknown (550), 1 in 20 deferred once (451)
        def rcpt_reply(rcpt: str, attempt: int) -> tuple[int, str] | None:
            if rcpt.startswith("unknown"):
                return (550, "5.1.1 user unknown")
            if rcpt.startswith("greylist") and attempt == 1:
                return (451, "4.7.1 greylisted, try again later")
            return None
        for s in sinks.sinks:
            s.rcpt_reply = rcpt_reply
        cfg = demo_config(spool, dns.port, sinks.port)
        print(f"starting local Ray and raymta (spool {spool}) ...", flush=True)
        t_start = time.time()
        mc = MailCluster.connect(config=cfg)
        msgs = []
        for i in range(n):
            d = names[i % domains]
            local = "unknown" if i % 50 == 7 else "greylist" if i % 20 == 3 else "user"
            rcpt = f"{local}{i}@{d}" if i != n - 1 else f"user{i}@nullmx.test"
            msgs.append({"sender": "bounces@demo.raymta.test", "recipients": [rcpt],
                         "from": "Demo <news@demo.raymta.test>", "to": rcpt,
                         "subject": f"raymta demo message {i}",
                         "text": f"Hello {rcpt}, this is message {i} of {n}.\n",
                         "tags": {"campaign": "demo"}})
        t0 = time.time()
        accepted = 0
        for k in range(0, n, 1000):
            res = mc.submit(msgs[k:k + 1000])
            accepted += sum(1 for r in res if r.accepted)
        t_sub = time.time() - t0
        done = 0
        with tqdm(total=accepted, desc="delivering", unit="msg", disable=quiet) as bar:
            deadline = time.time() + 300
            while time.time() < deadline:
                st = mc.stats()
                now_done = st["delivered"] + st["bounced"] + st["expired"]
                bar.update(now_done - done)
                done = now_done
                if st["serving"] and st["live"] == 0:
                    break
                time.sleep(0.2)
        t_all = time.time() - t0
        st = mc.stats()
        summary = {"submitted": n, "accepted": accepted, "delivered": st["delivered"],
                   "deferred_then_delivered": st["transient"], "bounced": st["bounced"],
                   "expired": st["expired"], "still_queued": st["live"],
                   "received_by_sinks": len(sinks.received),
                   "submit_seconds": round(t_sub, 2), "total_seconds": round(t_all, 2),
                   "accepted_per_s": round(accepted / t_sub, 1) if t_sub else None,
                   "delivered_per_s": round(st["delivered"] / t_all, 1) if t_all else None,
                   "startup_seconds": round(t0 - t_start, 2)}
        width = max(len(k) for k in summary)
        print("\nraymta demo summary")
        print("-" * (width + 14))
        for k, v in summary.items():
            print(f"{k:<{width}}  {v:>10}")
        return summary
    finally:
        if mc is not None:
            mc.close()
        dns.stop()
        sinks.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def cmd_demo(args: argparse.Namespace) -> int:
    s = run_demo(args.messages, args.domains, args.spool)
    ok = s["still_queued"] == 0 and s["delivered"] + s["bounced"] + s["expired"] == s["accepted"]
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------- submit
def _read_submissions(paths: list[str], sender: str | None, to: list[str]) -> list[dict[str, Any]]:
    import email
    import email.policy
    import email.utils
    out: list[dict[str, Any]] = []
    for p in paths:
        path = Path(p)
        if path.suffix in (".jsonl", ".json"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    m = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{p}:{n}: not JSON: {e}") from None
                if sender and "sender" not in m:
                    m["sender"] = sender
                if to and "recipients" not in m:
                    m["recipients"] = to
                out.append(m)
        else:
            raw = path.read_bytes()
            rcpts = list(to)
            if not rcpts:
                hdr = email.message_from_bytes(raw, policy=email.policy.compat32)
                rcpts = [a for _, a in email.utils.getaddresses(
                    hdr.get_all("To", []) + hdr.get_all("Cc", [])) if a]
            m = {"raw": raw, "recipients": rcpts}
            if sender:
                m["sender"] = sender
            out.append(m)
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    msgs = _read_submissions(args.files, args.sender, args.to or [])
    mc = _attach(args.address, args.config)
    res = mc.submit(msgs)
    bad = 0
    for r in res:
        if r.accepted:
            print(f"[{r.index}] accepted {' '.join(r.ids)}" + (" (duplicate)" if r.duplicate
                                                               else ""))
        else:
            bad += 1
            print(f"[{r.index}] refused: {r.error}", file=sys.stderr)
    return 1 if bad else 0


def cmd_status(args: argparse.Namespace) -> int:
    import ray
    mc = _attach(args.address, args.config)
    if args.ids:
        for mid, st in zip(args.ids, mc.status(args.ids)):
            print(mid, json.dumps(st))
        return 0
    st = mc.stats()
    shards = st.pop("shards")
    print(json.dumps({k: v for k, v in st.items()}, indent=1))
    for s in shards:
        print(f"shard {s['shard']}: live={s['live']} ready={s['ready']} "
              f"inflight={s['inflight']} deferred={s['deferred']} lsn={s['lsn']} "
              f"epoch={s['epoch']} " + ("serving" if s["serving"] else
                                       f"NOT SERVING: {s['not_serving']}"))
        for c in s["replication"][1:]:
            if c["state"] != "streaming" or c["lag_seconds"] > 1:
                print(f"  {c['name']}: {c['state']}, {c['lag_records']} records / "
                      f"{c['lag_seconds']}s behind {c.get('error', '')}")
    ns = mc.cfg.cluster.namespace
    for a in sorted(ray.util.list_named_actors(all_namespaces=True), key=lambda a: a["name"]):
        if a["namespace"] != ns or a["name"].split(":")[0] not in ("throttle", "relay"):
            continue
        info = ray.get(ray.get_actor(a["name"], namespace=ns).stats.remote())
        print(a["name"], json.dumps(info, default=str)[:2000])
    return 0


def cmd_replicas(args: argparse.Namespace) -> int:
    """Each shard's copies: state, acknowledged lsn, lag in records and seconds."""
    mc = _attach(args.address, args.config)
    reps = mc.replication()
    if args.json:
        print(json.dumps(reps, indent=1))
        return 0
    print(f"{'copy':<16} {'state':<12} {'member':<6} {'acked lsn':>10} {'lag rec':>8} "
          f"{'lag s':>7}  note")
    for rep in reps:
        print(f"shard {rep['shard']}: epoch {rep['epoch']}, log end {rep['lsn']}, committed "
              f"{rep['committed']}, membership v{rep['members_version']}")
        for c in rep["copies"]:
            print(f"  {c['name']:<14} {c['state']:<12} {'yes' if c['member'] else 'no':<6} "
                  f"{c['acked']:>10} {c['lag_records']:>8} {c['lag_seconds']:>7.2f}  "
                  f"{c.get('error', '')[:80]}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    mc = _attach(args.address, args.config)
    res = mc.backup(args.out)
    print(f"backed up {res['messages']} queued messages ({res['bytes']} bytes) of "
          f"{len(res['files'])} shards to {res['directory']}")
    print(f"restore with: raymta restore {res['directory']}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    mc = _attach(args.address, args.config)
    res = mc.restore(args.dir)
    print(f"restored {res['restored']} messages from {res['files']} shard files "
          f"({res['skipped']} already queued here were skipped)")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    mc = _attach(args.address, args.config)
    if not args.follow:
        for ev in mc.events(args.since):
            print(json.dumps(ev))
        return 0
    # every shard's cursor starts at --since, whether or not it has events yet
    for ev in mc.follow(args.since, poll=1.0):
        print(json.dumps(ev), flush=True)
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.ingress_smtp import SmtpIngress
    settings = load_config(args.config).ingress
    if not settings.enabled:
        # without [ingress] there is no AUTH: loopback only, checked before anything starts
        from cluster.config import is_loopback
        if not is_loopback(f"{args.host}:{args.port}"):
            print(f"raymta: refusing to listen on {args.host} without authentication: anyone "
                  "who reaches it could send as anyone (an open relay). Use 127.0.0.1, or "
                  "an [ingress] section with TLS and users (docs/ingress.md)", file=sys.stderr)
            return 2
    mc = _attach(args.address, args.config)
    ing = SmtpIngress.from_config(mc, settings) if settings.enabled else \
        SmtpIngress(mc, args.host, args.port)
    with ing:
        where = ", ".join(f"{a.host}:{a.port} ({a.mode})" for a in ing.addresses)
        print(f"raymta SMTP ingress on {where}" + (
            "" if settings.enabled else " (no AUTH: loopback only)") + "; Ctrl-C stops it",
            flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Print the scrypt hash of a password read from the terminal (or one line of stdin),
    for an ``[[ingress.user]]`` ``password_hash``; the password itself is never echoed."""
    import getpass

    from cluster.core.submission import hash_password
    if sys.stdin.isatty():
        pw = getpass.getpass("password: ")
        if getpass.getpass("again: ") != pw:
            print("raymta: the passwords differ", file=sys.stderr)
            return 2
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if not pw:
        print("raymta: empty password", file=sys.stderr)
        return 2
    print(hash_password(pw))
    return 0


def cmd_new_api_key(args: argparse.Namespace) -> int:
    """Print a new HTTP API key (give it to the sender, once) and its hash (for the config)."""
    from cluster.core.submission import hash_api_key, new_api_key
    key = new_api_key()
    print(f"key:      {key}")
    print(f"key_hash: {hash_api_key(key)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # bench/ lives in the source checkout beside the packages, not in the installed package
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "run_all.py").exists():
        raise FileNotFoundError(f"{root / 'bench'}: run `raymta bench` from a source checkout")
    sys.path.insert(0, str(root))
    from bench.run_all import main as bench_main
    return int(bench_main(args.bench_args) or 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="raymta", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML config file (default: built-in defaults)")
        p.add_argument("--address", default="auto",
                       help="Ray address: auto (default), or ray://host:10001")

    p = sub.add_parser("up", help="start or attach to Ray and deploy raymta's actors")
    common(p)
    p.set_defaults(fn=cmd_up)
    p = sub.add_parser("down", help="stop raymta's actors (the spool stays)")
    p.add_argument("--address", default="auto")
    p.add_argument("--namespace", default="raymta")
    p.set_defaults(fn=cmd_down)
    p = sub.add_parser("demo", help="embedded demo: local Ray, DNS and SMTP sinks on loopback")
    p.add_argument("-n", "--messages", type=int, default=5000)
    p.add_argument("-d", "--domains", type=int, default=20)
    p.add_argument("--spool", help="spool directory (default: a temporary one, removed after)")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("submit", help="submit .eml files or JSON-lines files of messages")
    common(p)
    p.add_argument("files", nargs="+")
    p.add_argument("--sender", help="envelope sender (default: the From address)")
    p.add_argument("--to", action="append", help="recipient (repeatable; default: To/Cc)")
    p.set_defaults(fn=cmd_submit)
    p = sub.add_parser("status", help="queue, throttle and relay state, or messages by id")
    common(p)
    p.add_argument("ids", nargs="*")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("events", help="print events as JSON lines")
    common(p)
    p.add_argument("--since", type=int, default=0)
    p.add_argument("--follow", action="store_true")
    p.set_defaults(fn=cmd_events)
    p = sub.add_parser("listen", help="a local SMTP ingress: the config's [ingress] listeners "
                       "(TLS, AUTH), or without one a plain listener on loopback")
    common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.set_defaults(fn=cmd_listen)
    p = sub.add_parser("hash-password", help="scrypt hash of a password for [[ingress.user]]")
    p.set_defaults(fn=cmd_hash_password)
    p = sub.add_parser("new-api-key", help="a new HTTP API key and its hash for "
                       "[[ingress.api_key]]")
    p.set_defaults(fn=cmd_new_api_key)
    p = sub.add_parser("replicas", help="each shard's copies: state and replication lag")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_replicas)
    p = sub.add_parser("backup", help="snapshot every shard's queue into a directory")
    common(p)
    p.add_argument("out", nargs="?", default="./raymta-backups",
                   help="directory (a time-stamped sub-directory is made in it)")
    p.set_defaults(fn=cmd_backup)
    p = sub.add_parser("restore", help="queue a backup's messages into an empty cluster")
    common(p)
    p.add_argument("dir", help="a backup directory (holding shard-<n>.msgpack files)")
    p.set_defaults(fn=cmd_restore)
    p = sub.add_parser("bench", help="raymta vs Postfix vs the physical limit (bench/run_all.py)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="passed on, e.g. --messages 20000 --rounds 3")
    p.set_defaults(fn=cmd_bench)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # everything after `bench` is run_all's (argparse's REMAINDER refuses a first word
        # that looks like an option, so `raymta bench --messages 20000` failed)
        args = argparse.Namespace(fn=cmd_bench, bench_args=argv[1:])
    else:
        args = ap.parse_args(argv)
    from cluster.client import SubmitError
    from cluster.config import ConfigError
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, SubmitError, FileNotFoundError) as e:
        print(f"raymta: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
