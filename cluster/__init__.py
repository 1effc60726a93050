"""raymta: an outbound email delivery cluster on Ray.

``from cluster import MailCluster`` is the sender's entry point. The pure core lives in
``cluster.core``, I/O adapters in ``cluster.adapters``; actors are in the ``actors`` package.
"""

from typing import Any

__all__ = ["MailCluster", "SubmitResult"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the pure core must not import Ray.
    if name in ("MailCluster", "SubmitResult", "SubmitError"):
        from cluster import client
        return getattr(client, name)
    raise AttributeError(name)
