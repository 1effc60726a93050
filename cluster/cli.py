"""The ``raymta`` command: up, down, demo, submit, status, events, parse-bounce, dkim,
dns-check.

``raymta demo`` is the embedded default: a local Ray bound to loopback, a DNS server and SMTP
sinks on loopback, a spool in a local directory; it sends N messages to M domains, shows a
progress bar, and prints what happened. Nothing it does leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    from cluster.deploy import NoCluster, find_cluster, start_head
    cfg = load_config(args.config)
    try:
        address = find_cluster(args.address)
    except NoCluster as e:
        if args.address != "auto":
            raise
        # nothing running here, or only a stale address left by an earlier `ray start`
        print(f"{e}\nstarting a Ray head node on 127.0.0.1")
        address = start_head()
    join_with_token()
    ray.init(address=address, namespace=cfg.cluster.namespace, log_to_driver=False)
    handles = deploy(cfg, detached=True)
    print(f"raymta deployed in namespace {cfg.cluster.namespace!r}:")
    for name in sorted(handles):
        print(f"  {name}")
    print(f"spool: {Path(cfg.spool.directory).resolve()}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    _loopback_env()
    import ray

    from cluster.deploy import find_cluster, join_with_token
    address = find_cluster(args.address)
    join_with_token()
    ray.init(address=address, namespace=args.namespace, log_to_driver=False)
    n = 0
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == args.namespace and a["name"].split(":")[0] in (
                "coordinator", "replica", "throttle", "relay", "bounce", "ingress", "metrics",
                "webhooks"):
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
        # the demo's sinks are on loopback: the MX address guard must be told so
        "delivery": {"smtp_port": smtp_port, "allow_networks": ["127.0.0.0/8"],
                     "connect_timeout": "3s", "idle_timeout": "2s",
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


def retention_line(r: dict[str, Any]) -> str | None:
    """The ``raymta status`` line of a shard holding event files for webhook endpoints behind
    (the leader's ``stats()["event_retention"]``), or None when it holds none and never hit
    the cap."""
    if not r.get("held_files") and not r.get("capped_files"):
        return None
    line = (f"  event files held for webhook endpoints: {r.get('held_files', 0)} "
            f"({r.get('held_bytes', 0)} bytes of spool.event_retain_bytes)")
    if r.get("capped_files"):
        eps = ", ".join((r.get("last_capped") or {}).get("endpoints") or []) or "?"
        line += (f"; {r['capped_files']} deleted at the cap, the last before {eps} "
                 f"acknowledged them")
    return line


def warmup_lines(rows: list[dict[str, Any]]) -> list[str]:
    """``raymta status`` lines for egress sources warming up: one per source with its plan's
    day and today's count / cap per provider (:meth:`MailCluster.warmup`)."""
    out: list[str] = []
    by_source: dict[str, list[dict[str, Any]]] = {}
    for w in rows:
        by_source.setdefault(w["source"], []).append(w)
    for src, ws in by_source.items():
        w = ws[0]
        if w["day"] > w["last_day"]:
            out.append(f"warm-up {src} ({w['plan']}): warm, the plan ended on day "
                       f"{w['last_day']}")
            continue
        caps = ", ".join(f"{x['provider']} {x['count']}/"
                         f"{'no cap' if x['cap'] is None else x['cap']}" for x in ws)
        out.append(f"warm-up {src} ({w['plan']}): day {w['day']} of {w['last_day']}, today "
                   f"{caps} (at the cap: {w['when_capped']})")
    return out


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
        line = retention_line(s.get("event_retention") or {})
        if line:
            print(line)
        for c in s["replication"][1:]:
            if c["state"] != "streaming" or c["lag_seconds"] > 1:
                print(f"  {c['name']}: {c['state']}, {c['lag_records']} records / "
                      f"{c['lag_seconds']}s behind {c.get('error', '')}")
    now = time.time()
    for a in mc.shaping():
        limits = ", ".join(f"{k}={a[k]}" for k in ("rates", "max_connections",
                                                   "deliveries_per_connection") if a.get(k))
        print(f"shaping rule {a['rule']}: {a['action']} {a['key']}"
              + (f" ({limits})" if limits else "")
              + f" for {max(0.0, a['until'] - now):.0f}s more: {a.get('text', '')[:100]}")
    for line in warmup_lines(mc.warmup()):
        print(line)
    ns = mc.cfg.cluster.namespace
    from actors.drain_mark import drained_nodes
    for nid, mark in sorted(drained_nodes(ns).items()):
        print(f"node {nid[:12]} marked drained since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(mark.get('since', 0)))} UTC "
              "(`raymta undrain` lifts it)")
    for a in sorted(ray.util.list_named_actors(all_namespaces=True), key=lambda a: a["name"]):
        if a["name"] == "webhooks:dispatcher" and a["namespace"] == ns:
            info = ray.get(ray.get_actor(a["name"], namespace=ns).stats.remote())
            for name, e in info["endpoints"].items():
                print(f"webhook {name}: backlog={e['backlog']} oldest={e['oldest_seconds']}s "
                      f"sent={e['events']} failures={e['failures']} "
                      f"given_up={e['given_up']} skipped={e['skipped_events']} "
                      f"cursors={e['cursors']}"
                      + (f" last_error={e['last_error']}" if e["last_error"] else ""))
            continue
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
          f"({res['skipped']} already queued here were skipped)"
          + (f"; {res['dsns']} DSNs owed" if res.get("dsns") else ""))
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    """A qshape-like table: destination domains × age buckets."""
    mc = _attach(args.address, args.config)
    from cluster.core.queue_shape import AGE_BUCKETS, OTHER
    shape = mc.queue_shape(args.top)
    if args.json:
        print(json.dumps(shape))
        return 0
    labels = [label for label, _ in AGE_BUCKETS]
    ranked = sorted(shape["site_ages"].items(),
                    key=lambda kv: (kv[0] == OTHER, -sum(kv[1].values())))
    rows = [["TOTAL"] + [shape["ages"].get(b, 0) for b in labels]]
    rows += [[d] + [ages.get(b, 0) for b in labels] for d, ages in ranked]
    width = max([len(str(r[0])) for r in rows] + [6])
    print(f"{'domain':<{width}} {'total':>7} " + " ".join(f"{h:>6}" for h in labels))
    for r in rows:
        print(f"{r[0]:<{width}} {sum(r[1:]):>7} " + " ".join(f"{v:>6}" for v in r[1:]))
    print("states: " + ", ".join(f"{k} {v}" for k, v in shape["states"].items()))
    return 0


def cmd_suspend(args: argparse.Namespace) -> int:
    from cluster.core.ratespec import parse_duration
    mc = _attach(args.address, args.config)
    if args.cmd == "resume":
        res = mc.resume(args.site)
        print(json.dumps(res) if args.json else f"resumed {res['site']}")
        return 0
    seconds = parse_duration(args.for_)
    res = mc.suspend(args.site, seconds)
    print(json.dumps(res) if args.json else
          f"suspended {res['site']} for {args.for_} ({res['messages']} messages wait; "
          "those in flight finish)")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    mc = _attach(args.address, args.config)
    n = mc.retry_now(args.site)
    print(json.dumps({"site": args.site, "retried": n}) if args.json else
          f"{n} deferred messages for {args.site} will be tried now")
    return 0


def cmd_bounce(args: argparse.Namespace) -> int:
    mc = _attach(args.address, args.config)
    if not (args.domain or args.tag or args.id):
        raise SystemExit("raymta bounce: give --domain D, --tag key=value or --id ID")
    res = mc.admin_bounce(domain=args.domain, tag=args.tag, ids=args.id)
    print(json.dumps(res) if args.json else
          ", ".join(f"{v} {k}" for k, v in res.items()) or "nothing matched")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    mc = _attach(args.address, args.config)
    info = mc.inspect(args.id)
    if info is None:
        print(f"raymta: no message {args.id} (unknown, or finished too long ago)",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info))
        return 0
    headers = info.pop("headers", "")
    for k, v in info.items():
        print(f"{k:>16}: {v}")
    if headers:
        print("\n" + headers.replace("\r\n", "\n"))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """Move everything raymta has on a node elsewhere, before the node is removed."""
    from cluster.drain import DrainError, drain
    mc = _attach(args.address, args.config)
    try:
        res = drain(mc, args.node, timeout=args.timeout, grace=args.grace,
                    ray_drain=not args.keep_ray_node,
                    say=(lambda s: None) if args.json else (lambda s: print(s, flush=True)))
    except DrainError as e:
        print(f"raymta drain: {e}", file=sys.stderr)
        return 2
    ok = not res["left"] and not res["problems"]
    if args.json:
        print(json.dumps({**res, "drained": ok}))
    elif ok:
        print(f"node {res['node'][:12]} drained: nothing of raymta's left on it "
              f"({res['seconds']} s)")
    else:
        parts = ([", ".join(sorted(res["left"]))] if res["left"] else []) + res["problems"]
        print(f"node {res['node'][:12]} NOT drained after {res['seconds']} s: still there: "
              + "; ".join(parts))
    return 0 if ok else 1


def cmd_undrain(args: argparse.Namespace) -> int:
    from cluster.drain import DrainError, undrain
    mc = _attach(args.address, args.config)
    try:
        res = undrain(mc.cfg.cluster.namespace, args.node)
    except DrainError as e:
        print(f"raymta undrain: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
    elif not res["was_marked"]:
        print(f"node {res['node'][:12]} was not marked drained")
    else:
        print(f"node {res['node'][:12]}: drain mark removed; raymta may place work there "
              "again (`raymta up` adds its relays and ingress)"
              + ("" if res["alive"] else "; Ray no longer lists it alive (Ray's own drain "
                 "cannot be undone: start the node's raylet again)"))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    cfg = load_config(args.file)     # a ConfigError names the key and the problem
    print(f"{args.file}: ok ({cfg.queue.shards} shards x {cfg.cluster.replicas} copies, "
          f"{len(cfg.egress)} egress sources, {len(cfg.sites)} site rules, "
          f"{len(cfg.dkim.keys)} DKIM keys)")
    return 0


SUPPRESSION_CSV = ["address", "scope", "reason", "created", "expires_at", "cause"]


def cmd_suppress(args: argparse.Namespace) -> int:
    """``raymta suppress add|remove|list|import|export``: the suppression list (CSV columns
    address, scope, reason, created, expires_at, cause; import needs only address)."""
    import csv
    mc = _attach(args.address, args.config)
    if args.action in ("add", "remove"):
        if not args.addresses:
            raise SystemExit(f"raymta suppress {args.action}: give one or more addresses")
        if args.action == "add":
            res = mc.suppress(args.addresses, reason=args.reason, scope=args.scope,
                              cause=args.cause)
            print(f"suppressed {res['added']} addresses" +
                  (f"; refused {res['refused']}: " + "; ".join(res["errors"][:5])
                   if res.get("refused") else ""))
        else:
            res = mc.unsuppress(args.addresses, scope=args.scope)
            print(f"removed {res['removed']} suppressions" +
                  (f"; refused {res['refused']}: " + "; ".join(res["errors"][:5])
                   if res.get("refused") else ""))
        return 1 if res.get("refused") else 0
    if args.action == "list":
        for e in mc.suppressions(args.prefix or "", limit=args.limit):
            print(json.dumps(e))
        return 0
    if args.action == "export":
        out = open(args.file, "w", newline="") if args.file else sys.stdout
        try:
            w = csv.writer(out)
            w.writerow(SUPPRESSION_CSV)
            for e in mc.suppressions("", limit=args.limit):
                w.writerow([e.get(k) if e.get(k) is not None else "" for k in SUPPRESSION_CSV])
        finally:
            if out is not sys.stdout:
                out.close()
        return 0
    # import
    if not args.file:
        raise SystemExit("raymta suppress import: give a CSV file (--file)")
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    with open(args.file, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "address" not in reader.fieldnames:
            raise SystemExit(f"{args.file}: the first line must name the columns, with "
                             f"'address' among them (columns: {', '.join(SUPPRESSION_CSV)})")
        for r in reader:
            rows.append({"address": r["address"], "scope": r.get("scope") or args.scope,
                         "reason": r.get("reason") or args.reason,
                         "cause": r.get("cause") or None,
                         "expires_at": float(r["expires_at"]) if r.get("expires_at") else None})
    res = mc.suppress(rows)
    print(f"imported {res['added']} of {len(rows)} rows in {time.time() - t0:.1f} s" +
          (f"; refused {res['refused']}: " + "; ".join(res["errors"][:5])
           if res.get("refused") else ""))
    return 1 if res.get("refused") else 0


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


# ---------------------------------------------------------------------------------------- dkim
def _txt_zone_line(name: str, record: str) -> str:
    parts = [record[i:i + 255] for i in range(0, len(record), 255)]
    return f"{name}. IN TXT ( " + " ".join(f'"{p}"' for p in parts) + " )"


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    """Write a new private key (mode 0600) as <out>/<domain>/<selector>.<alg>.pem, the
    layout of [dkim] key_directory, and print the DNS record to publish."""
    from cluster.adapters.dkim_keys import dns_record, generate_private_key, write_private_key
    from cluster.config import ConfigError
    from cluster.core.dkim import is_valid_selector
    domain = args.domain.strip().lower().rstrip(".")
    if "." not in domain or any(c.isspace() or c in "@/" for c in domain):
        raise ConfigError("--domain", f"expected a domain name such as example.com, got "
                                      f"{args.domain!r}")
    if not is_valid_selector(args.selector):
        raise ConfigError("--selector", f"{args.selector!r} is not a DNS name: letters, digits "
                                        "and inner '-', labels separated by dots")
    if args.algorithm == "rsa" and args.bits < 1024:
        raise ConfigError("--bits", f"{args.bits}: RSA DKIM keys need at least 1024 bits "
                                    "(RFC 8301); use 2048")
    d = Path(args.out) / domain
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / f"{args.selector}.{args.algorithm}.pem"
    if path.exists():
        raise ConfigError(str(path), "exists already: pick a new selector for a new key "
                                     "(rotation = new selector, publish, then switch)")
    key = generate_private_key(args.algorithm, args.bits)
    write_private_key(key, path)
    record = dns_record(key)
    size = f"{args.bits}-bit RSA" if args.algorithm == "rsa" else "Ed25519"
    if args.algorithm == "rsa" and args.bits < 2048:
        print(f"warning: {args.bits}-bit RSA: RFC 8301 recommends 2048", file=sys.stderr)
    print(f"wrote {size} private key {path} (mode 0600)")
    print("publish this TXT record:")
    print(_txt_zone_line(f"{args.selector}._domainkey.{domain}", record))
    print("and configure it:")
    print(f'[[dkim.key]]\ndomain = "{domain}"\nselector = "{args.selector}"\n'
          f'algorithm = "{args.algorithm}"\nkey_file = "{path.resolve()}"')
    print(f"(or set [dkim] key_directory = \"{Path(args.out).resolve()}\")")
    return 0


def cmd_dkim_reload(args: argparse.Namespace) -> int:
    """Make every relay re-read its DKIM key files now."""
    import ray

    from actors.remote import list_relays
    mc = _attach(args.address, args.config)
    ns = mc.cfg.cluster.namespace
    bad = 0
    for name in list_relays(ns):
        res = ray.get(ray.get_actor(name, namespace=ns).reload_dkim.remote())
        keys = ", ".join(f"{k['domain']}/{k['selector']} ({k['algorithm']}, {k['bits']})"
                         for k in res["keys"]) or "no keys"
        print(f"{name}: {'; '.join(res['changed']) or 'no change'}; signing with {keys}")
        for e in res["errors"]:
            bad += 1
            print(f"  error: {e}", file=sys.stderr)
    return 1 if bad else 0


def cmd_dns_check(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.dnscheck import Resolver, format_table, run_checks
    cfg = load_config(args.config)
    r = Resolver(cfg.dns.nameservers, cfg.dns.port, cfg.dns.timeout)
    checks = run_checks(args.domain, cfg, r, selectors=args.selector or (),
                        return_path=args.return_path)
    if args.json:
        print(json.dumps({"domain": args.domain, "checks": [c.as_dict() for c in checks],
                          "fail": sum(c.status == "fail" for c in checks),
                          "warn": sum(c.status == "warn" for c in checks)}, indent=1))
    else:
        print(format_table(args.domain, checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def cmd_parse_bounce(args: argparse.Namespace) -> int:
    """Parse bounce, complaint or auto-reply files; one JSON object per file with --json (the
    stable contract of cluster.core.dsn.contract, documented in the README). Never stops on a
    bad file: unreadable input is kind "unknown" with the reason."""
    from cluster.config import load_config
    from cluster.core.dsn import MAX_BYTES, contract, parse_message
    rules = load_config(args.config).classification.rules if args.config else None
    for name in args.files:
        try:
            with open(name, "rb") as f:
                raw = f.read(MAX_BYTES + 1)
            obj = contract(parse_message(raw, rules=rules), name)
        except OSError as e:
            obj = {"file": name, "kind": "unknown", "reason": f"cannot read: {e.strerror}"}
        if args.json:
            print(json.dumps(obj, ensure_ascii=False), flush=True)
        else:
            what = obj.get("feedback_type") if obj["kind"] == "arf" else \
                f"{obj.get('category')}/{obj.get('class')} {obj.get('status') or ''}".strip()
            print(f"{name}: {obj['kind']} {obj.get('recipient') or '-'} {what} "
                  f"{(obj.get('diagnostic') or obj.get('reason') or '')[:100]}", flush=True)
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
    p = sub.add_parser("queue", help="queue shape: destination domains x age (like qshape)")
    common(p)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_queue)
    for name, what in (("suspend", "stop dispatching to a domain or site for a while"),
                       ("resume", "dispatch to a suspended domain or site again")):
        p = sub.add_parser(name, help=what)
        common(p)
        p.add_argument("site", help="a destination domain or site name")
        if name == "suspend":
            p.add_argument("--for", dest="for_", default="1h", help="how long (e.g. 2h)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=cmd_suspend)
    p = sub.add_parser("retry", help="try the deferred mail of a domain or site now")
    common(p)
    p.add_argument("--site", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_retry)
    p = sub.add_parser("bounce", help="bounce queued mail by domain, tag or id (AdminBounce)")
    common(p)
    p.add_argument("--domain")
    p.add_argument("--tag", help="key=value")
    p.add_argument("--id", action="append")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_bounce)
    p = sub.add_parser("inspect", help="one message: envelope, state, attempts, headers")
    common(p)
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("drain", help="move everything raymta has on a node elsewhere "
                       "before removing it")
    common(p)
    p.add_argument("node", help="Ray node id (or a unique prefix), or its address / host name")
    p.add_argument("--timeout", type=float, default=300.0, help="give up after (s)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds the node's ingress answers 421 / readyz 503 before it stops")
    p.add_argument("--keep-ray-node", action="store_true",
                   help="do not ask Ray to drain the node too (then `undrain` can bring it "
                   "back; actors Ray would restart there are not moved)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_drain)
    p = sub.add_parser("undrain", help="remove a node's drain mark")
    common(p)
    p.add_argument("node")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_undrain)

    p = sub.add_parser("config", help="config check FILE: parse and check a config file")
    p.add_argument("action", choices=["check"])
    p.add_argument("file")
    p.set_defaults(fn=cmd_config_check)
    p = sub.add_parser("suppress", help="the suppression list: add, remove, list, import, "
                       "export (CSV)")
    common(p)
    p.add_argument("action", choices=["add", "remove", "list", "import", "export"])
    p.add_argument("addresses", nargs="*")
    p.add_argument("--reason", default="manual",
                   choices=["manual", "hard-bounce", "complaint", "unsubscribe"])
    p.add_argument("--scope", default="", help="a sender domain ('' = every sender)")
    p.add_argument("--cause", default=None, help="why (kept with the entry)")
    p.add_argument("--file", help="CSV file for import / export (export: default stdout)")
    p.add_argument("--prefix", help="list: addresses starting with this")
    p.add_argument("--limit", type=int, default=10_000_000)
    p.set_defaults(fn=cmd_suppress)
    p = sub.add_parser("restore", help="queue a backup's messages into an empty cluster")
    common(p)
    p.add_argument("dir", help="a backup directory (holding shard-<n>.msgpack files)")
    p.set_defaults(fn=cmd_restore)
    p = sub.add_parser("dkim", help="DKIM keys: keygen, reload")
    dsub = p.add_subparsers(dest="dkim_cmd", required=True)
    q = dsub.add_parser("keygen", help="write a private key (0600) and print its DNS record")
    q.add_argument("--domain", required=True)
    q.add_argument("--selector", required=True)
    q.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    q.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    q.add_argument("--out", default=".", help="directory: the key goes to "
                   "OUT/<domain>/<selector>.<algorithm>.pem (default .)")
    q.set_defaults(fn=cmd_dkim_keygen)
    q = dsub.add_parser("reload", help="make every relay re-read its DKIM key files now")
    common(q)
    q.set_defaults(fn=cmd_dkim_reload)
    p = sub.add_parser("dns-check", help="check a sending domain's MX, SPF, DKIM, DMARC, "
                       "FCrDNS, MTA-STS and TLS-RPT records")
    p.add_argument("domain")
    p.add_argument("--selector", action="append", help="DKIM selector to check (repeatable; "
                   "default: the configured keys of the domain)")
    p.add_argument("--return-path", help="envelope sender domain for SPF (default: DOMAIN)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--config", help="TOML config file: nameservers, egress sources, DKIM keys")
    p.set_defaults(fn=cmd_dns_check)
    p = sub.add_parser("parse-bounce", help="parse bounce (DSN), complaint (ARF) and "
                       "auto-reply messages; no cluster needed")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object per file (see README)")
    p.add_argument("--config", help="TOML config whose [classification] rules_file applies")
    p.set_defaults(fn=cmd_parse_bounce)
    p = sub.add_parser("bench", help="raymta vs Postfix vs the physical limit (bench/run_all.py)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="passed on, e.g. --messages 20000 --rounds 3")
    p.set_defaults(fn=cmd_bench)
    argv = sys.argv[1:] if argv is None else list(argv)
    # before anything imports Ray: it reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, on import
    from cluster.connect import prepare
    address = "auto"
    for k, a in enumerate(argv):
        if a == "--address" and k + 1 < len(argv):
            address = argv[k + 1]
        elif a.startswith("--address="):
            address = a.split("=", 1)[1]
    if argv[:1] in (["demo"], ["bench"], ["parse-bounce"], ["dkim"], ["config"]):
        address = ""
    if address:
        prepare(address)
    else:
        from cluster.connect import use_loopback
        use_loopback()
    if argv[:1] == ["bench"]:
        # everything after `bench` is run_all's (argparse's REMAINDER refuses a first word
        # that looks like an option, so `raymta bench --messages 20000` failed)
        args = argparse.Namespace(fn=cmd_bench, bench_args=argv[1:])
    else:
        args = ap.parse_args(argv)
    from cluster.client import SubmitError
    from cluster.config import ConfigError
    from cluster.deploy import NoCluster
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, SubmitError, FileNotFoundError, NoCluster) as e:
        print(f"raymta: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
