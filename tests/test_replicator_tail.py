"""The leader's in-memory tail of recent commits (cluster/adapters/replicator.py): what a
lagging or caught-up copy is sent, and the shape that lets the copy check a batch by one
checksum. No Ray: the tail is filled as commits fill it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import zlib

import pytest

from cluster.adapters.copystore import CopyStore
from cluster.adapters.replicator import Replicator
from cluster.adapters.spool import iter_headers


@pytest.mark.parametrize("per_append", [1.5, 2.5], ids=["one-commit", "two-commits"])
def test_frames_from_sends_whole_commits_with_a_shape_that_checks_out(tmp_path, per_append):
    store = CopyStore(tmp_path / "lead", 0)
    store.recover(decode=False)
    io = concurrent.futures.ThreadPoolExecutor(1)
    commit_bytes = len(store.log.assign([["r", 0, b"x" * 300]] * 4, 3)[0])
    store.log.next_lsn = 1
    # room for one or two whole commits per append: a lagging copy gets them in pieces
    repl = Replicator(0, 3, store, io, lambda slot: None,
                      batch_bytes=int(commit_bytes * per_append))
    repl.epoch = 3
    commits = []
    for i in range(6):
        frames, first = store.log.assign([["r", i * 4 + k, b"x" * 300] for k in range(4)], 3)
        repl._tail.append((first, first + 3, frames, time.time(), zlib.crc32(frames)))
        commits.append((first, frames))

    async def frames_from(lsn):
        return await repl._frames_from(lsn)

    try:
        for k, (first, _) in enumerate(commits):          # from each commit's start
            blob, shape = asyncio.run(frames_from(first))
            want = b"".join(f for _, f in commits[k:k + int(per_append)])
            assert blob == want, k
            assert shape == [first + len(want) // commit_bytes * 4 - 1, 3, zlib.crc32(want)]
            lsns = [lsn for _e, lsn, _s, _end in iter_headers(blob)]
            assert lsns == list(range(first, shape[0] + 1))
        blob, shape = asyncio.run(frames_from(6))        # from inside a commit: no shape
        assert shape is None and [lsn for _e, lsn, _s, _end in iter_headers(blob)][0] == 6
        assert asyncio.run(frames_from(25)) == (b"", None)
    finally:
        io.shutdown()
        store.close()
