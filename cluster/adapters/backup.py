"""Backup files: where a shard's backup goes, written atomically, and how many are kept.

Owns the layout ``<root>/<UTC time>/shard-<n>.msgpack`` shared by ``raymta backup`` (the
client writes what every leader hands it) and a leader's periodic backups (written on its own
node under ``backup.directory``). The bytes are a leader's ``backup()``: msgpack of
``{"format": "raymta-backup-1", "shard", "shards", "epoch", "lsn", "taken_at", "state"}``.
Must not decide what is in a backup (the leader does) or read one back (``restore``).
"""

from __future__ import annotations

import time
from pathlib import Path

from cluster.adapters.spool import write_atomic

__all__ = ["backup_stamp", "write_shard_backup", "prune_backups"]


def backup_stamp(now: float | None = None) -> str:
    """The directory name of a backup taken at ``now`` (UTC, sortable)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def write_shard_backup(root: str | Path, stamp: str, shard: int, data: bytes) -> Path:
    """Write one shard's backup bytes as ``root/stamp/shard-<n>.msgpack`` (``.tmp``, fsync,
    rename: a reader never sees half a file); returns the path."""
    d = Path(root) / stamp
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"shard-{shard}.msgpack"
    write_atomic(final, data)
    return final


def prune_backups(root: str | Path, shard: int, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups of ``shard`` under ``root`` (and the
    directories they leave empty); returns what was deleted."""
    mine = sorted(Path(root).glob(f"*/shard-{shard}.msgpack"))
    gone = mine[:-keep] if keep > 0 else mine
    for old in gone:
        old.unlink(missing_ok=True)
        try:
            old.parent.rmdir()
        except OSError:
            pass
    return gone
