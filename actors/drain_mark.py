"""The drain marks: which Ray nodes raymta must place nothing new on.

A mark is a key ``drain:<node id>`` in Ray's internal key-value store (kept by the GCS, so
every process of the cluster sees it, and it outlives the process that set it), namespace
``raymta:<cluster namespace>``. ``raymta drain NODE`` sets it, ``raymta undrain NODE``
removes it. Placement honours it (:func:`actors.remote.node_regions`, ``list_relays``,
``ingress_nodes``): no shard copy, relay batch, ingress or bounce listener goes to a marked
node. Reading the marks costs one GCS call; callers read them when they look at the nodes
anyway (every ~10 s at most on a hot path).
"""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["drained_nodes", "mark_drained", "unmark_drained"]

_PREFIX = "drain:"


def _kv_namespace(namespace: str) -> str:
    return f"raymta:{namespace}"


def mark_drained(namespace: str, node_id: str, reason: str = "") -> None:
    from ray.experimental.internal_kv import _internal_kv_put
    _internal_kv_put(_PREFIX + node_id, json.dumps({"since": time.time(), "reason": reason}),
                     overwrite=True, namespace=_kv_namespace(namespace))


def unmark_drained(namespace: str, node_id: str) -> bool:
    """Remove the mark; False when there was none."""
    from ray.experimental.internal_kv import _internal_kv_del
    return bool(_internal_kv_del(_PREFIX + node_id, namespace=_kv_namespace(namespace)))


def drained_nodes(namespace: str) -> dict[str, dict[str, Any]]:
    """``{node id: {"since", "reason"}}`` of the marked nodes."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list
    ns = _kv_namespace(namespace)
    out: dict[str, dict[str, Any]] = {}
    for key in _internal_kv_list(_PREFIX, namespace=ns):
        k = key.decode() if isinstance(key, bytes) else str(key)
        # Ray 2.60 lists a namespaced key with part of its namespace in front
        node = k.rsplit(_PREFIX, 1)[-1]
        raw = _internal_kv_get(_PREFIX + node, namespace=ns)
        out[node] = json.loads(raw) if raw else {}
    return out
