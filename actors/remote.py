"""Where the actor classes become Ray actors: restart policy, placement and stable names.

Actor classes stay plain Python (testable without Ray); this module applies ``ray.remote`` with
the options every kind needs, and finds or creates actors by their parseable names:
``coordinator:<shard>``, ``throttle:pool:<k>`` / ``throttle:<site>``, ``relay:<node>:<source>``.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.coordinator import QueueCoordinator
from actors.relay_pool import RelayPool
from actors.site_throttle import SiteThrottle
from cluster.config import Config, EgressSource

__all__ = ["coordinator_name", "relay_name", "ensure_coordinator", "ensure_throttle",
           "ensure_relay", "list_relays", "RemoteCoordinator", "RemoteThrottle", "RemoteRelay"]

# Every actor is restarted by Ray for ever; calls into a restarting actor wait and are retried
# (every method is idempotent or harmless to repeat). num_cpus=0: these actors are I/O bound
# and a 2-core node must fit all of them; the OS scheduler shares the cores.
_COMMON: dict[str, Any] = dict(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                               max_concurrency=10_000)

RemoteCoordinator = ray.remote(**_COMMON)(QueueCoordinator)
RemoteThrottle = ray.remote(**_COMMON)(SiteThrottle)
RemoteRelay = ray.remote(**_COMMON)(RelayPool)


def coordinator_name(shard: int) -> str:
    return f"coordinator:{shard}"


def relay_name(node_id: str, source: str) -> str:
    return f"relay:{node_id[:12]}:{source}"


def ensure_coordinator(cfg: Config, shard: int, *, detached: bool = False) -> Any:
    opts: dict[str, Any] = dict(name=coordinator_name(shard), namespace=cfg.cluster.namespace,
                                get_if_exists=True)
    if detached:
        opts["lifetime"] = "detached"
    return RemoteCoordinator.options(**opts).remote(cfg, shard)


def ensure_throttle(cfg: Config, name: str, *, detached: bool = False) -> Any:
    opts: dict[str, Any] = dict(name=name, namespace=cfg.cluster.namespace, get_if_exists=True)
    if detached:
        opts["lifetime"] = "detached"
    return RemoteThrottle.options(**opts).remote(cfg, name)


def ensure_relay(cfg: Config, node_id: str, source: EgressSource, *,
                 detached: bool = False) -> Any:
    name = relay_name(node_id, source.name)
    opts: dict[str, Any] = dict(
        name=name, namespace=cfg.cluster.namespace, get_if_exists=True,
        # a relay belongs to its node: its egress addresses live there
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    if detached:
        opts["lifetime"] = "detached"
    return RemoteRelay.options(**opts).remote(cfg, name, source)


def list_relays(namespace: str) -> list[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in names
                  if a.get("namespace") == namespace and a["name"].startswith("relay:"))
