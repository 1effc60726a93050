"""BounceListener actor: the return-path domain's MX, one per ingress node (the head's when no
node is labelled ingress), named ``bounce:<node>``.

A thin shell over :class:`cluster.adapters.bounce_smtp.BounceServer`: it starts the server in
its constructor (so a listener Ray restarts after a crash listens again at once) and gives it
two coroutines backed by the queue shards:

- ``lookup(ids)``: each id's recipient from its owning shard's ``status`` (shard =
  ``stable_hash(id) % shards``, as :func:`cluster.client.shard_of`);
- ``record(items)``: the owning shard's ``outside_reports`` (OOBBounce / Complaint events,
  suppression), returning once every shard concerned has answered.

Stateless: a report in flight when this process dies was not answered 250, so its sender
retries it (RFC 5321 §4.5.4.1). Owns no state worth keeping.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray

from cluster.adapters.bounce_smtp import BounceServer
from cluster.config import Config
from cluster.core.sites import stable_hash

__all__ = ["BounceListener", "bounce_listener_name"]

log = logging.getLogger("raymta.bounce")


def bounce_listener_name(node_id: str) -> str:
    return f"bounce:{node_id[:12]}"


class BounceListener:
    def __init__(self, config: Config, name: str) -> None:
        b = config.bounce
        if not b.enabled or b.keys is None:
            raise ValueError("BounceListener needs [bounce] domain and keys")
        self.cfg = config
        self.name = name
        self._handles: dict[int, Any] = {}
        self.server = BounceServer(
            keys=b.keys, prefix=b.prefix, domain=b.domain, fbl_address=b.fbl_address,
            lookup=self._lookup, record=self._record, host=b.listen_host, port=b.listen_port,
            max_size=b.max_message_size, timeout=b.report_timeout).start()
        log.info("bounce listener %s on %s:%d for %s", name, b.listen_host, b.listen_port,
                 b.domain)

    def _coordinator(self, shard: int) -> Any:
        h = self._handles.get(shard)
        if h is None:
            h = ray.get_actor(f"coordinator:{shard}", namespace=self.cfg.cluster.namespace)
            self._handles[shard] = h
        return h

    def _by_shard(self, ids: list[str]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for i in ids:
            out.setdefault(stable_hash(i) % self.cfg.queue.shards, []).append(i)
        return out

    async def _call(self, shard: int, method: str, arg: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            h = await loop.run_in_executor(None, self._coordinator, shard)
            ref = getattr(h, method).remote(arg)
            return await asyncio.wrap_future(ref.future())
        except Exception:
            self._handles.pop(shard, None)
            raise

    async def _lookup(self, ids: list[str]) -> dict[str, str | None]:
        groups = self._by_shard(ids)
        answers = await asyncio.gather(*(self._call(s, "status", g) for s, g in groups.items()))
        out: dict[str, str | None] = {}
        for g, res in zip(groups.values(), answers):
            for i, st in zip(g, res):
                out[i] = st.get("recipient") if isinstance(st, dict) else None
        return out

    async def _record(self, items: list[dict[str, Any]]) -> None:
        groups: dict[int, list[dict[str, Any]]] = {}
        for it in items:
            groups.setdefault(stable_hash(it["id"]) % self.cfg.queue.shards, []).append(it)
        answers = await asyncio.gather(*(self._call(s, "outside_reports", g)
                                         for s, g in groups.items()))
        for res in answers:
            if res.get("refused"):
                log.warning("bounce listener: shard %s refused %d report(s)", res.get("shard"),
                            res["refused"])

    async def stats(self) -> dict[str, Any]:
        b = self.cfg.bounce
        return {"name": self.name, "pid": os.getpid(), "listen": f"{b.listen_host}:"
                f"{b.listen_port}", **dict(self.server.counters)}

    async def ping(self) -> int:
        return os.getpid()
