"""The per-node ingress actor: a thin shell that runs this node's SMTP and HTTP listeners.

Owns nothing but the :class:`cluster.ingress_smtp.SmtpIngress` it starts in its constructor
(so a restart by Ray listens again at once) and a :class:`cluster.client.MailCluster` handle
on the shard leaders, through which every accepted message goes. It holds no queue state: a
listener that dies loses only sessions in progress, whose senders saw no 250 and retry (a
load balancer sends them to another node).

The one actor above the client in the import order: an ingress is a submitter like any
sender, so it uses the client's API (validation, ids, the leaders' submit streams) rather
than a private path into the coordinator. It never talks to relays or replicas.

One ``[ingress]`` config serves every ingress node; a node labelled
``ingress-address=<ip>`` (``ray start --labels``) binds its SMTP listeners on that address
instead of the configured hosts (same ports), so each node listens on its own address, as a
load balancer in front expects.
"""

from __future__ import annotations

import os
from typing import Any

from cluster.config import Config

__all__ = ["IngressNode", "ingress_name", "ADDRESS_LABEL"]

#: node label: the address this node's SMTP listeners bind (instead of the configured hosts)
ADDRESS_LABEL = "ingress-address"


def ingress_name(node_id: str) -> str:
    return f"ingress:{node_id[:12]}"


class IngressNode:
    """Listens as ``cfg.ingress`` says on the node it was placed on."""

    def __init__(self, cfg: Config, name: str) -> None:
        import gc

        import ray

        from actors.loop import tune_gc
        from cluster.client import MailCluster
        from cluster.ingress_smtp import SmtpIngress
        self.cfg = cfg
        self.name = name
        ns = cfg.cluster.namespace
        coords = [ray.get_actor(f"coordinator:{s}", namespace=ns)
                  for s in range(cfg.queue.shards)]
        self.mc = MailCluster(cfg, coords, direct=True)
        s = cfg.ingress
        self.smtp = SmtpIngress.from_config(self.mc, s, bind_host=_node_address()).start() \
            if s.submission or s.submissions else None
        self.http = None
        if s.http:
            from cluster.ingress_http import HttpIngress
            from cluster.ingress_smtp import tls_context
            tls = tls_context(s.cert_file, s.key_file) if s.cert_file else None

            here = _node_address()

            def split(a: str) -> tuple[str, int]:
                # like the SMTP listeners: a node labelled ingress-address binds that address
                host, _, port = a.rpartition(":")
                return here or host.strip("[]"), int(port)
            self.http = HttpIngress(self.mc, s, tls).start(
                [split(a) for a in s.http], proxy=[a in s.proxy_protocol for a in s.http])
        # Every message allocates a few hundred objects that refcounting frees; at Python's
        # default the cycle collector ran every 700 allocations, through Ray's and our own
        # modules each time it reached the older generations. Collect rarely, and leave what
        # start-up made (imports, config, listeners) out of every collection.
        tune_gc()
        gc.freeze()

    def ping(self) -> int:
        return os.getpid()

    def addresses(self) -> list[tuple[str, int, str]]:
        """The listeners as bound: (host, port, mode) — the port a ``:0`` listener got; mode
        "starttls", "implicit", "plain" (SMTP) or "http"."""
        out = [(a.host, a.port, a.mode) for a in self.smtp.addresses] if self.smtp else []
        if self.http is not None:
            out += [(h, p, "http") for h, p in self.http.addresses]
        return out

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "pid": os.getpid()}
        if self.smtp is not None:
            out.update(self.smtp.stats())
        if self.http is not None:
            out.update(self.http.stats())
        return out

    def reload(self) -> dict[str, Any]:
        """Read the certificate, key and users file again (SMTP listeners)."""
        return self.smtp.reload() if self.smtp is not None else {}

    def drain(self, on: bool = True) -> dict[str, Any]:
        """``raymta drain``: new SMTP connections get 421 (and are closed), HTTP /readyz
        answers 503, so a load balancer takes this node out; sessions in progress finish.
        Returns the sessions still open."""
        if self.smtp is not None:
            self.smtp.draining = on
        if self.http is not None:
            self.http.draining = on
        return {"draining": on,
                "smtp_sessions": len(self.smtp.sessions) if self.smtp is not None else 0}

    def stop(self) -> None:
        if self.smtp is not None:
            self.smtp.stop()
        if self.http is not None:
            self.http.stop()


def _node_address() -> str | None:
    """This node's ``ingress-address`` label, if it has one."""
    import ray
    v: Any = ray.get_runtime_context().get_node_labels().get(ADDRESS_LABEL)
    if isinstance(v, (list, tuple)):     # typed as a list in some Ray versions
        v = v[0] if v else None
    return str(v) if v else None
