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
    """… and a DSN still owed when the backup is taken is sent by the restored cluster, once:
    a message asking for DSNs goes to a recipient that is refused (550) and one on the held
    site, so its DSN waits for the latter (a coalescing window of an hour in cluster A)."""
    from dataclasses import replace

    from cluster.client import MailCluster, SubmitError
    from cluster.config import parse_config
    from cluster.core.dsn import parse_message
    from cluster.devservers import SinkGroup
    sinks = SinkGroup(MAIN_SINKS[:1]).start()
    sinks.by_address(MAIN_SINKS[0]).rcpt_reply = lambda rcpt, attempt: (
        (550, "5.1.1 User unknown") if rcpt.startswith("unknown") else None)
    try:
        dns_server.add_a("mx.held.test", DOWN)
        dns_server.add_mx("held.test", [(10, "mx.held.test")])
        dns_server.add_a("mx.live.test", MAIN_SINKS[0])
        dns_server.add_mx("live.test", [(10, "mx.live.test")])
        dns_server.add_mx("origin.test", [(10, "mx.live.test")])     # where DSNs go
        spool_a = tmp_path / "spool-a"
        cfg = pipeline_config(str(spool_a), dns_server.port, sinks.port,
                              retry_initial="2s", retry_max_delay="4s")
        cfg = replace(cfg, dsn=parse_config({"dsn": {"coalesce": "1h"}}).dsn)
        n = 300
        held = [{"sender": "s@origin.test", "recipients": [f"h{i}@held.test"],
                 "raw": raw_message(i, f"h{i}@held.test", size=400),
                 **({"idempotency_key": f"order-{i}"} if i % 10 == 0 else {})}
                for i in range(n)]
        live = [{"sender": "s@origin.test", "recipients": [f"l{i}@live.test"],
                 "raw": raw_message(i, f"l{i}@live.test")} for i in range(50)]
        asks = {"sender": "s@origin.test", "dsn": True,
                "recipients": ["unknown1@live.test", "hdsn@held.test"],
                "raw": b"From: <s@origin.test>\r\nSubject: bk\r\n"
                       b"Message-ID: <bk@origin.test>\r\n\r\nbody\r\n"}

        def dsns():
            return [r for r in sinks.received if r.rcpt_to == "s@origin.test"]
        mc = MailCluster.connect(config=cfg, num_cpus=2)
        try:
            res = mc.submit(held + live + [asks])
            assert all(r.accepted for r in res)
            ids = [r.ids[0] for r in res[:n]]
            bounced, hdsn = res[-1].ids
            # the live ones go; the held ones fail once (connection refused) and wait
            wait_for(lambda: Counter(s["state"] for s in mc.status(ids)) == {"deferred": n}
                     and all(s["attempts"] >= 1 for s in mc.status(ids))
                     and mc.status(bounced)["state"] == "bounced"
                     and mc.status(hdsn)["state"] == "deferred", 60,
                     "every held message tried once and deferred, unknown1 bounced")
            # its DSN is owed, not queued: no message from <> yet
            assert not [e for e in mc.events(0) if e["type"] == "Reception"
                        and e["sender"] == ""]
            assert cli.main(["backup", str(tmp_path / "backups")]) == 0
            out = capsys.readouterr().out
            assert f"backed up {n + 1} queued messages" in out, out
        finally:
            mc.close()
        shutil.rmtree(spool_a)                                # the cluster's disks are gone
        backup_dir = next((tmp_path / "backups").iterdir())
        assert sorted(p.name for p in backup_dir.iterdir()) == [
            f"shard-{s}.msgpack" for s in range(cfg.queue.shards)]
        before = len(sinks.received)

        dns_server.remove("mx.held.test", "A")                # the site is back
        dns_server.add_a("mx.held.test", MAIN_SINKS[0])
        assert not dsns()
        cfg_b = replace(cfg.with_spool(str(tmp_path / "spool-b")),
                        dsn=parse_config({"dsn": {"coalesce": "0s"}}).dsn)
        mc = MailCluster.connect(config=cfg_b, num_cpus=2)
        try:
            assert cli.main(["restore", str(backup_dir)]) == 0
            out = capsys.readouterr().out
            assert f"restored {n + 1} messages" in out and "; 1 DSNs owed" in out, out
            wait_for(lambda: Counter(s["state"] for s in mc.status(ids + [hdsn])) ==
                     {"delivered": n + 1}, 60, "every restored message delivered")
            got = Counter(r.rcpt_to for r in sinks.received[before:])
            assert set(got) == {f"h{i}@held.test" for i in range(n)} | {"hdsn@held.test",
                                                                        "s@origin.test"}
            assert max(got.values()) == 1
            # the DSN owed in the backup: about unknown1 only, tied to its message
            [dsn] = dsns()
            rep = parse_message(dsn.data)
            assert rep.raymta_id == bounced and rep.original_message_id == "<bk@origin.test>"
            assert [(x.recipient, x.status) for x in rep.recipients] == \
                [("unknown1@live.test", "5.1.1")]
            st = mc.status(ids[0])
            assert st["attempts"] >= 2      # the attempt made before the backup carried over
            # idempotency keys came back with the messages
            again = mc.submit([held[10]])[0]
            assert again.duplicate and again.ids == [ids[10]]
            # a second restore finds every id already known and queues nothing
            assert mc.wait_until_idle(30), mc.stats()   # (a DSN's record is not pending)
            res2 = mc.restore(backup_dir)
            assert (res2["restored"], res2["skipped"], res2["dsns"]) == (0, n + 1, 0), res2
            time.sleep(2)   # a DSN owed again would be queued in the restore's commit round
            assert len(dsns()) == 1
        finally:
            mc.close()
        with pytest.raises(SubmitError, match="not a raymta backup"):
            MailCluster.restore(_Nothing(), tmp_path)
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
