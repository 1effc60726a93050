"""Backup → wipe → restore: the queue of a lost cluster delivers from a backup.

Cluster A queues messages for a domain whose mail server is down, so they stay queued
(deferred after a failed attempt). ``raymta backup`` writes every shard's queue to a
directory. Cluster A is stopped and its spool deleted. Cluster B, new and empty, gets
``raymta restore DIR``; the domain's server is back, and every message — same ids — is
delivered. Real Ray, real DNS on loopback, real SMTP sinks; the CLI runs in-process against the
Ray this process is connected to.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from cluster import cli
from tests.conftest import MAIN_SINKS, pipeline_config, raw_message, wait_for

pytestmark = pytest.mark.timeout(600)

DOWN = "127.0.0.9"     # nothing listens here


def test_backup_wipe_restore_delivers_everything(tmp_path, dns_server, capsys):
    from cluster.client import MailCluster, SubmitError
    from cluster.devservers import SinkGroup
    sinks = SinkGroup(MAIN_SINKS[:1]).start()
    try:
        dns_server.add_a("mx.held.test", DOWN)
        dns_server.add_mx("held.test", [(10, "mx.held.test")])
        dns_server.add_a("mx.live.test", MAIN_SINKS[0])
        dns_server.add_mx("live.test", [(10, "mx.live.test")])
        spool_a = tmp_path / "spool-a"
        cfg = pipeline_config(str(spool_a), dns_server.port, sinks.port,
                              retry_initial="2s", retry_max_delay="4s")
        n = 300
        held = [{"sender": "s@origin.test", "recipients": [f"h{i}@held.test"],
                 "raw": raw_message(i, f"h{i}@held.test", size=400),
                 **({"idempotency_key": f"order-{i}"} if i % 10 == 0 else {})}
                for i in range(n)]
        live = [{"sender": "s@origin.test", "recipients": [f"l{i}@live.test"],
                 "raw": raw_message(i, f"l{i}@live.test")} for i in range(50)]
        mc = MailCluster.connect(config=cfg, num_cpus=2)
        try:
            res = mc.submit(held + live)
            assert all(r.accepted for r in res)
            ids = [r.ids[0] for r in res[:n]]
            # the live ones go; the held ones fail once (connection refused) and wait
            wait_for(lambda: Counter(s["state"] for s in mc.status(ids)) == {"deferred": n}
                     and all(s["attempts"] >= 1 for s in mc.status(ids)), 60,
                     "every held message tried once and deferred")
            assert cli.main(["backup", str(tmp_path / "backups")]) == 0
            out = capsys.readouterr().out
            assert f"backed up {n} queued messages" in out, out
        finally:
            mc.close()
        shutil.rmtree(spool_a)                                # the cluster's disks are gone
        backup_dir = next((tmp_path / "backups").iterdir())
        assert sorted(p.name for p in backup_dir.iterdir()) == [
            f"shard-{s}.msgpack" for s in range(cfg.queue.shards)]
        before = len(sinks.received)

        dns_server.remove("mx.held.test", "A")                # the site is back
        dns_server.add_a("mx.held.test", MAIN_SINKS[0])
        cfg_b = cfg.with_spool(str(tmp_path / "spool-b"))
        mc = MailCluster.connect(config=cfg_b, num_cpus=2)
        try:
            assert cli.main(["restore", str(backup_dir)]) == 0
            assert f"restored {n} messages" in capsys.readouterr().out
            wait_for(lambda: Counter(s["state"] for s in mc.status(ids)) == {"delivered": n},
                     60, "every restored message delivered")
            got = Counter(r.rcpt_to for r in sinks.received[before:])
            assert set(got) == {f"h{i}@held.test" for i in range(n)}
            assert max(got.values()) == 1
            st = mc.status(ids[0])
            assert st["attempts"] >= 2      # the attempt made before the backup carried over
            # idempotency keys came back with the messages
            again = mc.submit([held[10]])[0]
            assert again.duplicate and again.ids == [ids[10]]
            # a second restore finds every id already known and queues nothing
            res2 = mc.restore(backup_dir)
            assert res2["restored"] == 0 and res2["skipped"] == n
        finally:
            mc.close()
        with pytest.raises(SubmitError, match="not a raymta backup"):
            MailCluster.restore(_Nothing(), tmp_path)
    finally:
        sinks.stop()


DSN_MX = "127.0.0.23"


def test_a_dsn_still_owed_at_backup_time_is_sent_after_the_restore(tmp_path, dns_server):
    """A message to two recipients asks for a DSN: one is refused (550), the other's server is
    down, so the DSN waits for it (a coalescing window of an hour) and is still owed when the
    backup is taken. The new cluster, restored from it, sends that DSN — once: a second
    restore of the same backup owes nothing again."""
    from dataclasses import replace

    from cluster.client import MailCluster
    from cluster.config import parse_config
    from cluster.core.dsn import parse_message
    from cluster.devservers import SinkGroup
    sinks = SinkGroup([DSN_MX]).start()
    sinks.by_address(DSN_MX).rcpt_reply = lambda rcpt, attempt: (
        (550, "5.1.1 User unknown") if rcpt.startswith("unknown") else None)
    try:
        dns_server.add_a("mx.fail.bk.test", DSN_MX)
        dns_server.add_mx("fail.bk.test", [(10, "mx.fail.bk.test")])
        dns_server.add_a("mx.origin.bk.test", DSN_MX)
        dns_server.add_mx("origin.bk.test", [(10, "mx.origin.bk.test")])
        dns_server.add_a("mx.held.bk.test", DOWN)
        dns_server.add_mx("held.bk.test", [(10, "mx.held.bk.test")])
        base = pipeline_config(str(tmp_path / "spool-a"), dns_server.port, sinks.port,
                               retry_initial="2s", retry_max_delay="4s")
        cfg = replace(base, dsn=parse_config({"dsn": {"coalesce": "1h"}}).dsn)

        def dsns():
            return [r for r in sinks.received if r.rcpt_to == "s@origin.bk.test"]
        mc = MailCluster.connect(config=cfg, num_cpus=2)
        try:
            [res] = mc.submit({"sender": "s@origin.bk.test", "dsn": True,
                               "recipients": ["unknown1@fail.bk.test", "h1@held.bk.test"],
                               "raw": b"From: <s@origin.bk.test>\r\nSubject: bk\r\n"
                                      b"Message-ID: <bk@origin.bk.test>\r\n\r\nbody\r\n"})
            assert res.accepted, res.error
            bounced, held = res.ids
            wait_for(lambda: mc.status(bounced)["state"] == "bounced"
                     and mc.status(held)["attempts"] >= 1, 60, "one bounced, one deferred")
            assert mc.status(held)["state"] == "deferred"
            # owed, not queued: no message from <> yet
            assert not [e for e in mc.events(0) if e["type"] == "Reception"
                        and e["sender"] == ""]
            mc.backup(tmp_path / "backups")
        finally:
            mc.close()
        shutil.rmtree(tmp_path / "spool-a")
        backup_dir = next((tmp_path / "backups").iterdir())
        assert not dsns()

        dns_server.remove("mx.held.bk.test", "A")              # the held site is back
        dns_server.add_a("mx.held.bk.test", DSN_MX)
        cfg_b = replace(cfg.with_spool(str(tmp_path / "spool-b")),
                        dsn=parse_config({"dsn": {"coalesce": "0s"}}).dsn)
        mc = MailCluster.connect(config=cfg_b, num_cpus=2)
        try:
            r = mc.restore(backup_dir)
            assert (r["restored"], r["dsns"]) == (1, 1), r
            [got] = wait_for(dsns, 60, "the DSN owed in the backup")
            rep = parse_message(got.data)
            assert rep.raymta_id == bounced and rep.original_message_id == "<bk@origin.bk.test>"
            assert [(x.recipient, x.status) for x in rep.recipients] == \
                [("unknown1@fail.bk.test", "5.1.1")]
            wait_for(lambda: mc.status(held)["state"] == "delivered", 60, "h1 delivered")
            assert mc.wait_until_idle(30), mc.stats()   # (a DSN's record is not pending)
            r2 = mc.restore(backup_dir)
            assert (r2["restored"], r2["skipped"], r2["dsns"]) == (0, 1, 0), r2
            time.sleep(2)   # a second DSN would be queued in the restore's commit round
            assert len(dsns()) == 1
        finally:
            mc.close()
    finally:
        sinks.stop()


class _Nothing:
    """restore() checks the directory before it talks to any cluster."""
    coordinators: list = []

    def stats(self) -> dict:
        return {"live": 0}


def test_backup_dir_listing_helper(tmp_path: Path) -> None:
    # a directory without shard files is refused with a message naming it
    from cluster.client import MailCluster, SubmitError
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(SubmitError) as ei:
        MailCluster.restore(_Nothing(), tmp_path)
    assert str(tmp_path) in str(ei.value)


def test_backup_files_are_written_whole_and_only_the_newest_are_kept(tmp_path):
    """One layout and one writer for `raymta backup` and the leaders' periodic backups
    (cluster.adapters.backup)."""
    from cluster.adapters.backup import backup_stamp, prune_backups, write_shard_backup
    stamps = [backup_stamp(1_790_000_000 + 60 * k) for k in range(5)]
    assert stamps == sorted(stamps) and len(set(stamps)) == 5
    for st in stamps:
        for shard in (0, 1):
            p = write_shard_backup(tmp_path, st, shard, f"{st}:{shard}".encode())
            assert p.read_bytes() == f"{st}:{shard}".encode()
    assert not list(tmp_path.rglob("*.tmp"))
    gone = prune_backups(tmp_path, 0, keep=2)
    assert [p.parent.name for p in gone] == stamps[:3]
    left0 = sorted(p.parent.name for p in tmp_path.glob("*/shard-0.msgpack"))
    assert left0 == stamps[3:]
    # shard 1's backups are untouched, so their directories stay
    assert len(list(tmp_path.glob("*/shard-1.msgpack"))) == 5
    prune_backups(tmp_path, 1, keep=2)
    assert sorted(d.name for d in tmp_path.iterdir()) == stamps[3:]   # empty dirs removed
