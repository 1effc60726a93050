"""Cluster wiring: start (or attach to) Ray and deploy raymta's actors from a config.

Owns the environment raymta needs from Ray (loopback-only defaults for the embedded cluster)
and the set of actors a deployment consists of. Idempotent: deploying again attaches to the
actors that exist (names are stable) and creates only what is missing, e.g. relays for nodes
that joined.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray

from cluster.config import Config, ConfigError, check_dkim_keys

__all__ = ["LOOPBACK_ENV", "NoCluster", "deploy", "deploy_ingress", "deploy_throttles", "find_cluster",
           "init_local_ray", "join_with_token", "start_head", "wait_ready"]

from cluster.connect import LOOPBACK_ENV, NoCluster, find_cluster, start_head  # noqa: F401


#: Ray settings raymta's cluster runs with (``ray start --system-config`` for a launched
#: cluster: see cluster.yaml). max_direct_call_object_size: Ray passes a call argument or result
#: above 100 KiB through the shared-memory object store, with work for the raylet and both
#: sides; a batch of 100 x 2 KB messages (a Ray-call submit, a relay's batch of bodies) is
#: over that. Up to 4 MiB they now travel inside the call (accept-only run, 200 batches of
#: 100: raylet CPU 0.64 -> 0.03 s, ~3 ms a batch; accepted 3,923 -> 5,264/s).
RAY_SYSTEM_CONFIG: dict[str, Any] = {"max_direct_call_object_size": 4 << 20}

#: node health checks of raymta's launched clusters (`raymta up`, cluster.yaml): every 1 s,
#: 1 s timeout, dead after 3 misses. Ray's defaults take ~30 s to call a lost node dead, and
#: until then the shards whose leader was on it wait: bench/failover.py with these settings,
#: 2026-12-05 00:26 (failover-20261205-002637.json): node loss first ack 3.72 s, deliveries
#: resume 3.97 s; leader SIGKILL 1.36 s / 1.59 s. (The embedded single-node Ray keeps the
#: defaults: it has no other node to lose.)
NODE_HEALTH: dict[str, Any] = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                               "health_check_failure_threshold": 3}
RAY_CLUSTER_SYSTEM_CONFIG: dict[str, Any] = {**RAY_SYSTEM_CONFIG, **NODE_HEALTH}


def init_local_ray(num_cpus: int | None = None, *, dashboard: bool = False,
                   namespace: str = "raymta", **kwargs: Any) -> Any:
    """Start a new local Ray (never attach to a leftover cluster), bound to loopback."""
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    system_config = {**RAY_SYSTEM_CONFIG, **kwargs.pop("_system_config", {})}
    return ray.init(address="local", num_cpus=num_cpus, namespace=namespace,
                    include_dashboard=dashboard, dashboard_host="127.0.0.1",
                    log_to_driver=kwargs.pop("log_to_driver", False),
                    _system_config=system_config, **kwargs)


def join_with_token() -> None:
    """Before ``ray.init(address=...)`` of an existing cluster: use Ray's auth token if any.

    Ray 2.60 turns token auth on by itself only for a cluster it discovers (address "auto"
    without ``RAY_ADDRESS``); given an address ("host:port", "ray://...", ``RAY_ADDRESS``) it
    sends no token unless ``RAY_AUTH_MODE=token``, and a token-auth cluster refuses it. So when
    ``RAY_AUTH_MODE`` is unset and a token exists (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
    or ``~/.ray/auth_token``), turn token mode on for this process; an explicit mode wins."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available)
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def check_spool_shards(cfg: Config) -> None:
    """Refuse a spool that holds more shards than the config has (as far as this machine's
    files show): those shards would have no leader and their mail would never be delivered.
    The shard count is fixed once a spool exists; to change it, back up and restore."""
    base = Path(cfg.spool.directory)
    found: dict[int, Path] = {}
    for d in list(base.glob("shard-*")) + list(base.glob("node-*/shard-*")):
        tail = d.name.removeprefix("shard-")
        if tail.isdigit() and int(tail) >= cfg.queue.shards and \
                any(f.is_file() for f in d.rglob("*")):
            found.setdefault(int(tail), d)
    if found:
        top = max(found)
        raise ConfigError("queue.shards", (
            f"{cfg.queue.shards}, but the spool holds shard {top} ({found[top]}), so it was "
            f"made with at least {top + 1} shards: its mail would never be delivered. Set "
            f"queue.shards = {top + 1}, or move the queue over with `raymta backup` (old "
            f"count) and `raymta restore` (new count)"))


def drained_node_ids(cfg: Config) -> set[str]:
    """The nodes marked by ``raymta drain`` (cluster/drain.py): deploy places nothing there
    (relays here; shard copies, ingress and bounce listeners through actors.remote)."""
    from actors.drain_mark import drained_nodes
    return set(drained_nodes(cfg.cluster.namespace))


def deploy(cfg: Config, *, detached: bool = False) -> dict[str, Any]:
    """Create or attach to every actor; returns the handles by name."""
    check_spool_shards(cfg)
    check_dkim_keys(cfg)   # a bad DKIM key file stops the deploy with the file named
    from actors.remote import (coordinator_name, ensure_coordinator, ensure_exporter,
                               ensure_relay, ensure_replica, relay_name, replica_name,
                               shard_placement)
    handles: dict[str, Any] = {}
    drained = drained_node_ids(cfg)   # `raymta drain`: nothing new goes there
    # a relay per egress source on each node that owns the source's address (its node_label),
    # none on a node being drained
    from cluster.core.relay_choice import NodeInfo, source_nodes
    live = [NodeInfo.from_ray(n) for n in ray.nodes()
            if n.get("Alive") and n["NodeID"] not in drained]
    handles.update(deploy_throttles(cfg, [n.node_id for n in live], detached=detached))
    for src in cfg.egress:
        owners = source_nodes(src.node_label, live)
        if not owners:
            # not fatal: the node may join later (deploying again creates its relay)
            logging.getLogger("raymta.deploy").warning(
                "egress source %r: no live node is labelled egress=%s; it has no relay yet",
                src.name, src.node_label)
        for node_id in owners:
            handles[relay_name(node_id, src.name)] = ensure_relay(
                cfg, node_id, src, detached=detached)
    for shard in range(cfg.queue.shards):
        nodes = shard_placement(cfg, shard)
        for slot in range(1, cfg.cluster.replicas):
            handles[replica_name(shard, slot)] = ensure_replica(
                cfg, shard, slot, nodes[slot], nodes, detached=detached)
        handles[coordinator_name(shard)] = ensure_coordinator(cfg, shard, nodes[0], nodes,
                                                              detached=detached)
    if cfg.bounce.enabled:
        from actors.remote import bounce_listener_nodes, ensure_bounce_listener
        from actors.bounce_listener import bounce_listener_name
        for node in bounce_listener_nodes():
            handles[bounce_listener_name(node)] = ensure_bounce_listener(cfg, node,
                                                                         detached=detached)
    if cfg.metrics.enabled:
        from actors.metrics_exporter import EXPORTER_NAME
        handles[EXPORTER_NAME] = ensure_exporter(cfg, detached=detached)
    wait_ready(handles)
    if cfg.metrics.enabled:
        # serves at once; a port in use is reported by its status() and retried, never fatal
        ray.get(handles[EXPORTER_NAME].start.remote(), timeout=60)
    if cfg.webhooks:
        # after the shard leaders serve: it reads their cursors and events
        from actors.webhooks import WEBHOOKS_NAME, ensure_webhooks
        handles[WEBHOOKS_NAME] = ensure_webhooks(cfg, detached=detached)
        ray.get(handles[WEBHOOKS_NAME].start.remote(), timeout=60)
    if cfg.ingress.enabled:
        handles.update(deploy_ingress(cfg, detached=detached))
    return handles


def deploy_throttles(cfg: Config, nodes: list[str], *, detached: bool = False
                     ) -> dict[str, Any]:
    """The shared throttle pool: its size (``delivery.throttle_actors``; "auto": one per node
    in ``nodes``, never fewer than are running), published for the coordinators and
    throttles (:mod:`actors.throttle_pool`), each new throttle on a node without one first.
    Throttles already running stay where they are; the sites that move to new ones are handed
    over (:mod:`cluster.core.throttle_pool`)."""
    from actors.remote import ensure_throttle
    from actors.throttle_pool import publish_view, read_view
    from cluster.core.throttle_pool import auto_count, place_throttles, pool_names
    view = read_view(cfg)
    want = cfg.delivery.fixed_throttles or max(view.count, auto_count(len(nodes)))
    new_view = view.resized(want, time.time())
    names = pool_names(want)
    running: dict[str, Any] = {}
    for name in names:
        try:
            running[name] = ray.get_actor(name, namespace=cfg.cluster.namespace)
        except ValueError:
            pass
    placed = dict(zip(running, ray.get([h.node.remote() for h in running.values()],
                                       timeout=120)))
    where = place_throttles(names, nodes, placed) if nodes else {}
    out = {name: running.get(name) or ensure_throttle(cfg, name, detached=detached,
                                                     node=where.get(name))
           for name in names}
    # published once every throttle of the new size exists (a leader that reads it at once
    # finds them all), then every throttle is told (a new one may have read the old size)
    if new_view != view or view.since == 0.0:
        publish_view(cfg, new_view)
    ray.get([h.set_pool.remote(new_view.to_wire()) for h in out.values()], timeout=120)
    return out


def deploy_ingress(cfg: Config, *, detached: bool = False, timeout: float = 120.0
                   ) -> dict[str, Any]:
    """An SMTP ingress actor on every ingress node (after the shard leaders are up: it
    submits to them); a listener that cannot start (a port in use, a bad certificate) fails
    the deployment with its reason."""
    from actors.ingress import ingress_name
    from actors.remote import ensure_ingress, ingress_nodes
    out = {ingress_name(n): ensure_ingress(cfg, n, detached=detached) for n in ingress_nodes()}
    for name, h in out.items():
        try:
            ray.get(h.ping.remote(), timeout=timeout)
        except ray.exceptions.RayActorError as e:
            raise ConfigError("ingress", f"{name} could not start: {e}") from None
    return out


def wait_ready(handles: dict[str, Any], timeout: float = 120.0) -> None:
    refs = {name: h.ping.remote() for name, h in handles.items()}
    for name, ref in refs.items():
        try:
            ray.get(ref, timeout=timeout)
        except ray.exceptions.ActorUnschedulableError:
            if not name.startswith("relay:"):
                raise
            # a relay for a node that died while we deployed: it has nowhere to run
            ray.kill(handles.pop(name), no_restart=True)
    # every shard leader claims its shard from its copies and replays its log: in parallel
    ray.get([h.start.remote() for name, h in handles.items()
             if name.startswith("coordinator:")], timeout=timeout)
