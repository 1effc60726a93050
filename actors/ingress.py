"""The per-node ingress actor: a thin shell that runs this node's SMTP submission listeners.

Owns nothing but the :class:`cluster.ingress_smtp.SmtpIngress` it starts in its constructor
(so a restart by Ray listens again at once) and a :class:`cluster.client.MailCluster` handle
on the shard leaders, through which every accepted message goes. It holds no queue state: a
listener that dies loses only sessions in progress, whose senders saw no 250 and retry (a
load balancer sends them to another node).

The one actor above the client in the import order: an ingress is a submitter like any
sender, so it uses the client's API (validation, ids, the leaders' submit streams) rather
than a private path into the coordinator. It never talks to relays or replicas.
"""

from __future__ import annotations

import os
from typing import Any

from cluster.config import Config

__all__ = ["IngressNode", "ingress_name"]


def ingress_name(node_id: str) -> str:
    return f"ingress:{node_id[:12]}"


class IngressNode:
    """Listens as ``cfg.ingress`` says on the node it was placed on."""

    def __init__(self, cfg: Config, name: str) -> None:
        import ray

        from cluster.client import MailCluster
        from cluster.ingress_smtp import SmtpIngress
        self.cfg = cfg
        self.name = name
        ns = cfg.cluster.namespace
        coords = [ray.get_actor(f"coordinator:{s}", namespace=ns)
                  for s in range(cfg.queue.shards)]
        self.mc = MailCluster(cfg, coords, direct=True)
        self.smtp = SmtpIngress.from_config(self.mc, cfg.ingress).start()

    def ping(self) -> int:
        return os.getpid()

    def addresses(self) -> list[tuple[str, int, str]]:
        """The listeners as bound: (host, port, mode) — the port a ``:0`` listener got."""
        return [(a.host, a.port, a.mode) for a in self.smtp.addresses]

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), **self.smtp.stats()}

    def reload(self) -> dict[str, Any]:
        """Read the certificate, key and users file again."""
        return self.smtp.reload()

    def stop(self) -> None:
        self.smtp.stop()
