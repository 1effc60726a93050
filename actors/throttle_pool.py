"""The published size of the shared throttle pool (:class:`cluster.core.throttle_pool.PoolView`).

A key ``throttle_pool`` in Ray's internal key-value store (kept by the GCS: every process sees
it, and it outlives the deploy that wrote it), namespace ``raymta:<cluster namespace>``, as
:mod:`actors.drain_mark` keeps its marks. The deploy writes it; coordinators read it every few
seconds (:data:`REFRESH`) and throttles when they start and when the deploy tells them. Without
the key (actors made without a deploy) the view is the configured count, or one with "auto".
"""

from __future__ import annotations

import json

from cluster.config import Config
from cluster.core.throttle_pool import PoolView

__all__ = ["REFRESH", "publish_view", "read_view"]

#: seconds a coordinator uses the pool's size before reading it again
REFRESH = 5.0

_KEY = "throttle_pool"


def _kv_namespace(namespace: str) -> str:
    return f"raymta:{namespace}"


def read_view(cfg: Config) -> PoolView:
    from ray.experimental.internal_kv import _internal_kv_get
    raw = _internal_kv_get(_KEY, namespace=_kv_namespace(cfg.cluster.namespace))
    if raw:
        return PoolView.from_wire(json.loads(raw))
    n = cfg.delivery.fixed_throttles or 1
    return PoolView(n, n, 0.0)


def publish_view(cfg: Config, view: PoolView) -> None:
    from ray.experimental.internal_kv import _internal_kv_put
    _internal_kv_put(_KEY, json.dumps(view.to_wire()), overwrite=True,
                     namespace=_kv_namespace(cfg.cluster.namespace))
