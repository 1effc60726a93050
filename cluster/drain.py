"""``raymta drain NODE`` / ``raymta undrain NODE``: empty a Ray node of raymta before it is
removed, without losing accepted mail.

The steps, each waiting for the one before:

1. **Mark.** The node is marked drained in Ray's key-value store (:mod:`actors.drain_mark`):
   raymta's placement leaves it out from now on (shard copies, relay batches, ingress and
   bounce listeners, ``raymta up``). Then Ray's own drain (``GcsClient.drain_node``, reason
   preemption, no deadline): Ray schedules nothing new there either, so an actor of the node
   that restarts comes up on another node (every raymta actor's placement has a fallback), and
   Ray ends the node's raylet once nothing runs on it. Ray cannot cancel its drain: after one,
   ``undrain`` only lifts raymta's mark (start the node's raylet again to bring it back).
   ``--keep-ray-node`` skips Ray's drain (then nothing that restarts elsewhere can be moved:
   such actors are reported as left).
2. **Ingress.** The node's ingress listeners answer new SMTP connections with 421 and
   HTTP ``/readyz`` with 503 (a load balancer takes the node out); after ``grace`` seconds the
   ingress actor stops. Its bounce listener stops.
3. **Relays.** The node's relays take no new batch (their leaders requeue it and pick another
   relay) and finish what they hold; each stops once it holds no message and every result it
   sent is confirmed committed by its leader (so no delivery is repeated).
4. **Shard leaders.** Each leader on the node is restarted by Ray on another node (the
   placement's fallback: a node without a copy of its shard when there is one); it claims a
   new epoch from its copies and recovers the log from them (mail accepted stays accepted).
5. **Copies and the rest.** Each replica on the node is restarted elsewhere the same way;
   its leader makes it a member again once it has caught up (the replacement path of
   ``cluster.core.replication.can_replace``), and the drain waits until every shard again has
   all its copies as caught-up members. Throttles, the webhook dispatcher and the metrics
   exporter hold only soft state: restarted elsewhere.

Ends when no raymta actor is left on the node, or at ``timeout`` with what is still there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

__all__ = [
    "RAYMTA_KINDS",
    "DrainError",
    "drain",
    "raymta_actors_on",
    "resolve_node",
    "undrain",
]

#: the first part of every raymta actor name (``raymta down`` stops the same set)
RAYMTA_KINDS = ("coordinator", "replica", "throttle", "relay", "bounce", "ingress", "metrics",
                "webhooks")
_PINNED = ("relay", "ingress", "bounce")     # belong to their node: stopped, not moved


class DrainError(RuntimeError):
    """A node that cannot be drained (unknown, ambiguous, the head, Ray refused)."""


def resolve_node(spec: str, *, alive_only: bool = True) -> dict[str, Any]:
    """The Ray node ``spec`` names: its id, a unique prefix of it, or its address or host
    name (as ``ray list nodes`` shows them)."""
    nodes = [n for n in ray.nodes() if n.get("Alive") or not alive_only]
    s = spec.strip().lower()
    if not s:
        raise DrainError("NODE: empty; give a node id (or a unique prefix), address or host")
    exact = [n for n in nodes if n["NodeID"].lower() == s]
    by_addr = [n for n in nodes if s in (str(n.get("NodeManagerAddress", "")).lower(),
                                         str(n.get("NodeManagerHostname", "")).lower())]
    by_prefix = [n for n in nodes if n["NodeID"].lower().startswith(s)]
    for found in (exact, by_addr, by_prefix):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            ids = ", ".join(n["NodeID"][:12] for n in found)
            raise DrainError(f"NODE {spec!r} names {len(found)} nodes ({ids}): give more of "
                             "the node id")
    alive = ", ".join(f"{n['NodeID'][:12]} ({n.get('NodeManagerAddress')})" for n in nodes)
    raise DrainError(f"NODE {spec!r}: no {'live ' if alive_only else ''}Ray node has that id, "
                     f"address or host name (nodes: {alive or 'none'})")


def raymta_actors_on(namespace: str, node_id: str) -> dict[str, str]:
    """``{name: state}`` of raymta's actors (in ``namespace``) that Ray has on ``node_id``
    (alive there, or being created or restarted with that node as their last place)."""
    from ray._private import state
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == namespace and a["name"].split(":")[0] in RAYMTA_KINDS}
    out: dict[str, str] = {}
    for info in state.actors().values():
        if info.get("Name") in names and info.get("State") == "ALIVE" and \
                info.get("Address", {}).get("NodeID") == node_id:
            out[info["Name"]] = info["State"]
    return out


def _ray_drain(node_id: str, reason: str) -> None:
    from ray._raylet import GcsClient  # type: ignore[attr-defined]
    from ray.core.generated import autoscaler_pb2
    preemption = autoscaler_pb2.DrainNodeReason.Value(  # type: ignore[attr-defined]
        "DRAIN_NODE_REASON_PREEMPTION")
    gcs = GcsClient(address=ray.get_runtime_context().gcs_address)
    accepted, why = gcs.drain_node(node_id, preemption, reason, 0)   # 0: no deadline
    if not accepted:
        raise DrainError(f"Ray refused to drain node {node_id[:12]}: {why}")


def _copies_ready(mc: Any) -> list[str]:
    """What keeps the shards from being whole: a copy that is not a caught-up member (yet).
    Empty when every shard has all its copies serving."""
    problems = []
    for rep in mc.replication():
        for c in rep["copies"]:
            if not c.get("member") or c.get("state") not in ("leader", "streaming"):
                problems.append(f"shard {rep['shard']} {c['name']}: {c.get('state')}"
                                + ("" if c.get("member") else " (not yet a member)"))
    return problems


def drain(mc: Any, node_spec: str, *, timeout: float = 300.0, grace: float = 10.0,
          ray_drain: bool = True, say: Callable[[str], None] = print,
          poll: float = 0.5) -> dict[str, Any]:
    """Empty ``node_spec`` of raymta (see the module docstring). ``mc``: a connected
    :class:`cluster.client.MailCluster`. Returns ``{"node", "left": {name: state},
    "problems": [...], "seconds"}``; nothing left and no problem means drained."""
    from actors.drain_mark import mark_drained
    ns = mc.cfg.cluster.namespace
    t0 = time.time()
    deadline = t0 + timeout
    node = resolve_node(node_spec)
    nid = node["NodeID"]
    short = f"{nid[:12]} ({node.get('NodeManagerAddress')})"
    if "node:__internal_head__" in node.get("Resources", {}):
        raise DrainError(f"node {short} is the head node: its GCS is the cluster; move the "
                         "head instead (docs/operations.md, GCS fault tolerance)")
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != nid]
    if not others:
        raise DrainError(f"node {short} is the only live node: nowhere to move raymta to")

    def handle(name: str) -> Any:
        return ray.get_actor(name, namespace=ns)

    def left() -> dict[str, str]:
        return raymta_actors_on(ns, nid)

    mark_drained(ns, nid, "raymta drain")
    say(f"node {short}: marked drained (raymta places nothing new there)")
    if ray_drain:
        _ray_drain(nid, "raymta drain")
        say(f"node {short}: Ray drains it too (no new work; its raylet ends once idle)")
    on = left()
    say(f"node {short} holds {len(on)} raymta actors: {', '.join(sorted(on)) or 'none'}")

    # 2. ingress: 421 / readyz 503 at once, stopped after the grace period
    ingress = [n for n in on if n.startswith("ingress:")]
    for name in ingress:
        ray.get(handle(name).drain.remote(), timeout=30)
        say(f"  {name}: new SMTP connections get 421, /readyz 503")
    ingress_until = time.time() + grace

    # 3. relays: no new batch; stop each once it holds nothing and its results are committed
    relays = {n for n in on if n.startswith("relay:")}
    while relays and time.time() < deadline:
        for name in sorted(relays):
            try:
                held = ray.get(handle(name).drain.remote(), timeout=30)
            except (ray.exceptions.RayError, ValueError) as e:
                say(f"  {name}: gone ({type(e).__name__})")
                relays.discard(name)
                continue
            if not any(held.values()):
                ray.kill(handle(name), no_restart=True)
                relays.discard(name)
                say(f"  {name}: empty, stopped")
            else:
                say(f"  {name}: finishing {held['holding']} messages, {held['outbox']} "
                    f"results to send, {held['unacked']} to be confirmed")
        if relays:
            time.sleep(poll)

    # 4. and 5. leaders first (one at a time: each must serve again), then copies, then the
    # soft-state actors. Without Ray's drain, Ray would restart them on this node again:
    # they stay (and are reported), rather than fail over for nothing.
    movable = sorted(n for n in on if n.split(":")[0] in ("coordinator", "replica",
                                                            "throttle", "metrics", "webhooks"))
    if not ray_drain and movable:
        say(f"  not moved (--keep-ray-node: Ray would restart them here): "
            f"{', '.join(movable)}")
        movable = []
    for name in [n for n in movable if n.startswith("coordinator:")]:
        if time.time() >= deadline:
            break
        ray.kill(handle(name), no_restart=False)
        say(f"  {name}: leader steps down; a new one starts on another node")
        ray.get(handle(name).start.remote(), timeout=max(1.0, deadline - time.time()))
        say(f"  {name}: serving again")
    for name in [n for n in movable if n.startswith("replica:")]:
        ray.kill(handle(name), no_restart=False)
        say(f"  {name}: copy restarts on another node and catches up")
    for name in [n for n in movable if n.split(":")[0] in ("throttle", "metrics",
                                                             "webhooks")]:
        ray.kill(handle(name), no_restart=False)
        say(f"  {name}: restarted on another node")
    for name in sorted(n for n in on if n.startswith("bounce:")):
        ray.kill(handle(name), no_restart=True)
        say(f"  {name}: stopped")
    if ingress:
        time.sleep(max(0.0, min(ingress_until, deadline) - time.time()))
        for name in ingress:
            ray.kill(handle(name), no_restart=True)
            say(f"  {name}: stopped")

    problems: list[str] = []
    last = ""
    while True:
        try:
            problems = _copies_ready(mc)
        except (ray.exceptions.RayError, TimeoutError) as e:
            problems = [f"replication state not readable yet: {type(e).__name__}"]
        rest = left()
        if not problems and not rest:
            break
        now_ = "; ".join(problems + [f"{n} on the node" for n in sorted(rest)])
        if now_ != last:
            say(f"  waiting: {now_}")
            last = now_
        if time.time() >= deadline:
            break
        time.sleep(poll)
    rest = left()
    return {"node": nid, "address": node.get("NodeManagerAddress"), "left": rest,
            "problems": problems, "seconds": round(time.time() - t0, 1)}


def undrain(namespace: str, node_spec: str) -> dict[str, Any]:
    """Lift raymta's mark from a node (alive or not). Ray's own drain cannot be cancelled."""
    from actors.drain_mark import drained_nodes, unmark_drained
    marked = drained_nodes(namespace)
    try:
        nid = resolve_node(node_spec, alive_only=False)["NodeID"]
    except DrainError:
        # a node Ray no longer lists (removed after its drain): by a prefix of the mark
        hits = [n for n in marked if n.startswith(node_spec.strip().lower())]
        if len(hits) != 1:
            raise
        nid = hits[0]
    had = unmark_drained(namespace, nid)
    node = next((n for n in ray.nodes() if n["NodeID"] == nid and n.get("Alive")), None)
    return {"node": nid, "was_marked": had, "alive": node is not None}
