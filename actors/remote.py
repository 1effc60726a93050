"""Where the actor classes become Ray actors: restart policy, placement and stable names.

Actor classes stay plain Python (testable without Ray); this module applies ``ray.remote`` with
the options every kind needs, and finds or creates actors by their parseable names:
``coordinator:<shard>``, ``replica:<shard>:<slot>``, ``throttle:pool:<k>`` / ``throttle:<site>``,
``relay:<node>:<source>``, ``ingress:<node>``.

Ingress listeners go to the nodes that carry an ``ingress`` resource or label (the head node
when none does), one per node, pinned there: their addresses are that node's.

Placement: the copies of a shard (its leader is copy 0) go to distinct nodes, in distinct
regions first (a node's region is its ``region`` label, or a ``region:<name>`` resource), by
:func:`cluster.core.replication.place_copies`. The affinity is soft: when a node dies, Ray
restarts its actors elsewhere, and the copy catches up there.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.bounce_listener import BounceListener, bounce_listener_name
from actors.coordinator import QueueCoordinator
from actors.metrics_exporter import EXPORTER_NAME, MetricsExporter
from actors.ingress import IngressNode, ingress_name
from actors.relay_pool import RelayPool
from actors.replica_log import ReplicaLog
from actors.site_throttle import SiteThrottle
from cluster.config import Config, EgressSource

__all__ = ["coordinator_name", "replica_name", "relay_name", "ensure_coordinator",
           "ensure_replica", "ensure_throttle", "ensure_relay", "list_relays", "node_regions",
           "shard_placement", "ensure_bounce_listener", "bounce_listener_nodes",
           "ingress_nodes", "ensure_ingress", "ensure_exporter", "RemoteBounceListener",
           "RemoteCoordinator", "RemoteReplica", "RemoteThrottle", "RemoteRelay", "RemoteIngress",
           "RemoteExporter"]

# Every actor is restarted by Ray for ever; calls into a restarting actor wait and are retried
# (every method is idempotent or harmless to repeat). num_cpus=0: these actors are I/O bound
# and a 2-core node must fit all of them; the OS scheduler shares the cores.
_COMMON: dict[str, Any] = dict(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                               max_concurrency=10_000)

RemoteCoordinator = ray.remote(**_COMMON)(QueueCoordinator)
RemoteThrottle = ray.remote(**_COMMON)(SiteThrottle)
RemoteRelay = ray.remote(**_COMMON)(RelayPool)
RemoteReplica = ray.remote(**_COMMON)(ReplicaLog)
RemoteBounceListener = ray.remote(**_COMMON)(BounceListener)
# the one actor whose methods are all plain functions: Ray gives a threaded actor a pool of
# max_concurrency OS threads at once (10,000 would be 10,022 threads per process, measured;
# four ingress nodes then exceed a default pid_max of 32,768 and the fourth cannot start).
# Its methods are short (ping, stats, reload, drain), so a few threads serve them.
RemoteIngress = ray.remote(**{**_COMMON, "max_concurrency": 8})(IngressNode)
RemoteExporter = ray.remote(**_COMMON)(MetricsExporter)


def coordinator_name(shard: int) -> str:
    return f"coordinator:{shard}"


def replica_name(shard: int, slot: int) -> str:
    return f"replica:{shard}:{slot}"


def _drained() -> set[str]:
    """Nodes marked drained (``raymta drain``) in this process's namespace."""
    from actors.drain_mark import drained_nodes
    return set(drained_nodes(ray.get_runtime_context().namespace))


def node_regions() -> list[tuple[str, str]]:
    """``[(node id, region)]`` of the live nodes ("" where a node says nothing), but those
    marked drained (``raymta drain``): no shard copy is placed or moved there."""
    out = []
    drained = _drained()
    for n in ray.nodes():
        if not n.get("Alive") or n["NodeID"] in drained:
            continue
        region = (n.get("Labels") or {}).get("region", "")
        if not region:
            region = next((k.split(":", 1)[1] for k in n.get("Resources", {})
                           if k.startswith("region:")), "")
        out.append((n["NodeID"], region))
    return out


def shard_placement(cfg: Config, shard: int) -> list[str | None]:
    from cluster.core.replication import place_copies
    return place_copies(node_regions(), shard, cfg.cluster.replicas)


def _affinity(node: str | None, siblings: list[str | None] = ()) -> dict[str, Any]:
    """Run on ``node``; if it is gone (now or at a restart), on a node without a sibling copy
    of the same shard, else anywhere. (Ray's soft NodeAffinity does not hold actors with
    num_cpus=0 to the node; a label selector with fallbacks does.)"""
    if node is None:
        return {}
    others = sorted({n for n in siblings if n and n != node} | {node})
    return {"label_selector": {"ray.io/node-id": node},
            "fallback_strategy": [
                {"label_selector": {"ray.io/node-id": f"!in({','.join(others)})"}},
                {"label_selector": {"ray.io/node-id": f"!in({node})"}}]}


def ensure_replica(cfg: Config, shard: int, slot: int, node: str | None = None,
                   siblings: list[str | None] = (), *, detached: bool = False) -> Any:
    opts: dict[str, Any] = dict(name=replica_name(shard, slot), namespace=cfg.cluster.namespace,
                                get_if_exists=True, **_affinity(node, siblings))
    if detached:
        opts["lifetime"] = "detached"
    return RemoteReplica.options(**opts).remote(cfg, shard, slot)


def relay_name(node_id: str, source: str) -> str:
    return f"relay:{node_id[:12]}:{source}"


def ensure_coordinator(cfg: Config, shard: int, node: str | None = None,
                       siblings: list[str | None] = (), *, detached: bool = False) -> Any:
    opts: dict[str, Any] = dict(name=coordinator_name(shard), namespace=cfg.cluster.namespace,
                                get_if_exists=True, **_affinity(node, siblings))
    if detached:
        opts["lifetime"] = "detached"
    return RemoteCoordinator.options(**opts).remote(cfg, shard)


#: memory a SiteThrottle process takes, about (its scheduling request when it is placed)
THROTTLE_MEMORY = 50 << 20


def ensure_throttle(cfg: Config, name: str, *, detached: bool = False,
                    node: str | None = None) -> Any:
    """The throttle ``name``; one that does not exist yet starts on ``node`` if given (soft:
    if that node dies Ray restarts it on another)."""
    opts: dict[str, Any] = dict(name=name, namespace=cfg.cluster.namespace, get_if_exists=True)
    if node is not None:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        # an actor that asks for no resource at all is put on any node, soft affinity or not
        # (Ray 2.60, 3-node cluster_utils: 2 of 3 throttles on the wrong node); asking for the
        # memory a throttle process takes makes the scheduler honour the preferred node
        opts["memory"] = THROTTLE_MEMORY
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


def ensure_exporter(cfg: Config, *, detached: bool = False) -> Any:
    """The cluster's metrics exporter (``[metrics]``), on the head node where Ray says which
    that is (its endpoint address is the head's)."""
    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and
                 "node:__internal_head__" in n.get("Resources", {})), None)
    opts: dict[str, Any] = dict(name=EXPORTER_NAME, namespace=cfg.cluster.namespace,
                                get_if_exists=True)
    if head is not None:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    if detached:
        opts["lifetime"] = "detached"
    return RemoteExporter.options(**opts).remote(cfg)


def list_relays(namespace: str) -> list[str]:
    """Relay pools on live nodes (a relay is pinned to its node: on a dead node it is gone)
    that are not marked drained (``raymta drain``: they get no new batches)."""
    from actors.drain_mark import drained_nodes
    drained = set(drained_nodes(namespace))
    alive = {n["NodeID"][:12] for n in ray.nodes() if n.get("Alive") and
             n["NodeID"] not in drained}
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in names
                  if a.get("namespace") == namespace and a["name"].startswith("relay:")
                  and a["name"].split(":")[1] in alive)


def bounce_listener_nodes() -> list[str]:
    """Where bounce listeners run: every live node labelled ``role=ingress`` (or with an
    ``ingress`` resource); the head node when there is none. Never a node marked drained."""
    drained = _drained()
    alive = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in drained]
    ingress = [n["NodeID"] for n in alive
               if (n.get("Labels") or {}).get("role") == "ingress"
               or "ingress" in n.get("Resources", {})]
    if ingress:
        return ingress
    head = [n["NodeID"] for n in alive
            if "node:__internal_head__" in n.get("Resources", {})]
    return head[:1] or [n["NodeID"] for n in alive][:1]


def ensure_bounce_listener(cfg: Config, node_id: str, *, detached: bool = False) -> Any:
    """The bounce/FBL listener of ``node_id`` (it binds ``bounce.listen_host`` there)."""
    opts: dict[str, Any] = dict(
        name=bounce_listener_name(node_id), namespace=cfg.cluster.namespace,
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    if detached:
        opts["lifetime"] = "detached"
    return RemoteBounceListener.options(**opts).remote(cfg, bounce_listener_name(node_id))


def ingress_nodes() -> list[str]:
    """Ids of the live nodes that should run an ingress (SMTP submission, HTTP API) actor:
    the same nodes as the bounce listeners (a ``role=ingress`` label or an ``ingress``
    resource; the head node when there is none)."""
    return bounce_listener_nodes()


def ensure_ingress(cfg: Config, node_id: str, *, detached: bool = False) -> Any:
    opts: dict[str, Any] = dict(
        name=ingress_name(node_id), namespace=cfg.cluster.namespace, get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    if detached:
        opts["lifetime"] = "detached"
    return RemoteIngress.options(**opts).remote(cfg, ingress_name(node_id))
