"""BounceListener actor: the return-path domain's MX, one per ingress node (the head's when no
node is labelled ingress), named ``bounce:<node>``.

A thin shell over :class:`cluster.adapters.bounce_smtp.BounceServer`: it starts the server in
its constructor (so a listener Ray restarts after a crash listens again at once) and gives it
two coroutines backed by the queue shards:

- ``lookup(ids)``: each id's recipient from its owning shard's ``status`` (shard =
  ``stable_hash(id) % shards``, as :func:`cluster.client.shard_of`);
- ``record(items)``: the owning shard's ``outside_reports`` (OOBBounce / Complaint events,
  suppression), returning once every shard concerned has answered.

With ``[[unsubscribe]]`` it also takes mail to the signed unsubscribe addresses and, with
``bounce.http_port``, runs the one-click HTTP endpoint (``cluster.adapters.unsub_http``): an
unsubscribe is a ``suppress`` (reason ``unsubscribe``, scope the sender domain) on the
recipient's shard, which hands it to every other shard.

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
from cluster.adapters.unsub_http import UnsubscribeHttp
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
        unsub_keys = {u.domain: u.keys for u in config.unsubscribe if u.keys is not None}
        self.server = BounceServer(
            keys=b.keys, prefix=b.prefix, domain=b.domain, fbl_address=b.fbl_address,
            lookup=self._lookup, record=self._record, host=b.listen_host, port=b.listen_port,
            max_size=b.max_message_size, timeout=b.report_timeout,
            unsub_keys=unsub_keys,
            unsubscribe=self._unsubscribe if unsub_keys else None).start()
        self.http: UnsubscribeHttp | None = None
        if unsub_keys and b.http_port:
            self.http = UnsubscribeHttp(b.listen_host, b.http_port, unsub_keys,
                                        self._unsubscribe_blocking).start()
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

    async def _call(self, shard: int, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            h = await loop.run_in_executor(None, self._coordinator, shard)
            ref = getattr(h, method).remote(*args)
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

    def _unsubscribe_rows(self, rows: list[tuple[str, str, str]]) -> list[tuple[int, Any]]:
        """Per shard (the recipient's), the suppress rows; that shard hands them to the others
        (``propagate``), as for what it learns itself."""
        groups: dict[int, list[Any]] = {}
        for rcpt, domain, cause in rows:
            groups.setdefault(stable_hash(rcpt) % self.cfg.queue.shards, []).append(
                [rcpt, domain, "unsubscribe", cause, None])
        return list(groups.items())

    async def _unsubscribe(self, rows: list[tuple[str, str, str]]) -> None:
        res = await asyncio.gather(*(self._call(s, "suppress", g, True)
                                     for s, g in self._unsubscribe_rows(rows)))
        _check_added(res)

    def _unsubscribe_blocking(self, rcpt: str, domain: str, cause: str) -> None:
        (shard, group), = self._unsubscribe_rows([(rcpt, domain, cause)])
        h = self._coordinator(shard)
        try:
            res = ray.get(h.suppress.remote(group, True), timeout=self.cfg.bounce.report_timeout)
        except Exception:
            self._handles.pop(shard, None)
            raise
        _check_added([res])

    async def stats(self) -> dict[str, Any]:
        b = self.cfg.bounce
        return {"name": self.name, "pid": os.getpid(), "listen": f"{b.listen_host}:"
                f"{b.listen_port}", **dict(self.server.counters),
                "http": None if self.http is None else {"port": self.http.port,
                                                        **self.http.counters}}

    async def ping(self) -> int:
        return os.getpid()


def _check_added(answers: list[Any]) -> None:
    for res in answers:
        if not isinstance(res, dict) or res.get("refused"):
            raise RuntimeError(f"the shard refused the unsubscribe: {res!r}"[:300])
