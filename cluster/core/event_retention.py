"""Which event files a shard may delete at rotation, given its webhook endpoints' cursors.

Owns the rule, not the files (:mod:`cluster.adapters.eventlog` does the I/O). A shard keeps its
newest ``files_kept`` event files whatever happens. An older file is held back while a
configured webhook endpoint's committed cursor for the shard has not passed the events in it
(the endpoint has not acknowledged them: deleting the file would skip them), but the files held
back this way take at most ``retain_bytes``; past that the oldest of them go as they would have
without retention, and the endpoints still before them are named (they will be told exactly
what they lost: ``EventLog.gap``). ``retain_bytes = 0`` holds nothing.

A file's events are the seqs from its first up to the next file's first, exclusive (seqs are
log sequence numbers: not every record makes an event, so a file's last event may be lower).
A cursor ``c`` has passed a file when ``c >= next_first - 1``.

Pure: no I/O, no ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["RotationPlan", "plan_rotation"]


@dataclass(frozen=True)
class RotationPlan:
    #: first seqs of the files to delete now, oldest first (always the oldest files)
    delete: tuple[int, ...]
    #: first seqs of the files kept beyond ``files_kept`` for endpoints still before them
    held: tuple[int, ...]
    held_bytes: int
    #: files deleted although an endpoint had not passed them (``retain_bytes`` reached)
    capped: tuple[int, ...]
    #: the endpoints whose cursors had not passed a capped file, lowest cursor first
    holders: tuple[str, ...]


def plan_rotation(files: Sequence[tuple[int, int]], files_kept: int,
                  cursors: Mapping[str, int], retain_bytes: int) -> RotationPlan:
    """``files``: (first seq, size in bytes) of a shard's event files, oldest first, the
    active one last. ``cursors``: the committed cursor of each configured webhook endpoint
    (endpoints no longer configured must not be in it: they hold nothing)."""
    if files_kept < 1:
        raise ValueError(f"files_kept must be >= 1, got {files_kept}")
    if retain_bytes < 0:
        raise ValueError(f"retain_bytes must be >= 0, got {retain_bytes}")
    over = max(0, len(files) - files_kept)        # the files rotation alone would delete
    low = min(cursors.values()) if cursors else None
    # held: candidates some cursor has not passed. They are the newest candidates (a cursor
    # before one file is before every later one): a suffix of files[:over]
    first_held = over
    if low is not None and retain_bytes > 0:
        while first_held > 0 and low < files[first_held][0] - 1:
            first_held -= 1
    # keep the newest held files within retain_bytes; the older ones go (capped)
    keep_from = over
    held_bytes = 0
    while keep_from > first_held and held_bytes + files[keep_from - 1][1] <= retain_bytes:
        keep_from -= 1
        held_bytes += files[keep_from][1]
    capped = tuple(f for f, _ in files[first_held:keep_from])
    holders: tuple[str, ...] = ()
    if capped:
        newest_capped_end = files[keep_from][0] - 1
        holders = tuple(name for name, c in sorted(cursors.items(), key=lambda kv: (kv[1], kv[0]))
                        if c < newest_capped_end)
    return RotationPlan(delete=tuple(f for f, _ in files[:keep_from]),
                        held=tuple(f for f, _ in files[keep_from:over]),
                        held_bytes=held_bytes, capped=capped, holders=holders)
