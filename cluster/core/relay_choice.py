"""Which relays carry a site's mail, and which nodes an egress source lives on.

Owns three decisions the coordinator and the deployment make:

- **Rendezvous (HRW) hashing** (Thaler & Ravishankar 1998): every relay gets a weight per site,
  ``hash(site, relay)``, and the site goes to the relay of highest weight. A relay that joins
  takes only the sites for which it now weighs most (about 1/n of them) and a relay that leaves
  gives up only its own; ``hash(site) % n`` moved nearly every site on every change, so every
  site's warm connections and lease holders changed hands.
- **Spreading a hot site**: a site with a lot of mail ready (or ``relays`` set in its
  ``[[site]]``) goes to its top-k relays by the same weights, one per node first, so one hot
  destination is no longer capped at one process and one address. Its connection limit still
  holds cluster-wide (every relay leases its connections from the site's one throttle,
  :mod:`cluster.core.throttle`) and so does its rate (grants come from the same throttle).
- **Egress pools**: a sender domain can be tied to a pool of sources with weights; each of its
  messages goes out from one of them, picked by weighted rendezvous hashing on the message id
  (Schindelhauer & Schomaker's logarithmic method), so the shares follow the weights and a
  message keeps its source across attempts while the pool is unchanged.
- **Where an egress source lives**: a source with ``node_label`` belongs to the nodes that carry
  that label (``egress = <label>``) or resource (``egress:<label>``); relays for it run only
  there, since only those nodes own its bind address.

Pure: no Ray, no I/O. Relay names are ``relay:<node>:<source>`` (``actors.remote.relay_name``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "EgressPool",
    "pool_for",
    "weighted_pick",
    "EGRESS_LABEL",
    "NodeInfo",
    "choose_relays",
    "hrw_weight",
    "rank_relays",
    "relay_node",
    "source_nodes",
    "split_counts",
    "spread_count",
]

#: the node label (``egress = <name>``) or resource (``egress:<name>``) that ties egress
#: sources to nodes
EGRESS_LABEL = "egress"


def hrw_weight(site: str, relay: str) -> int:
    """The rendezvous weight of ``relay`` for ``site``: the same in every process (a keyed
    64-bit hash; crc32 of a concatenation is too linear to rank well)."""
    h = hashlib.blake2b(relay.encode("utf-8"), digest_size=8, key=site.encode("utf-8")[:64])
    return int.from_bytes(h.digest(), "big")


def rank_relays(site: str, relays: Iterable[str]) -> list[str]:
    """Relays by descending weight for ``site`` (ties, which need a 64-bit collision, by
    name)."""
    return sorted(relays, key=lambda r: (-hrw_weight(site, r), r))


def relay_node(relay: str) -> str:
    """The node part of ``relay:<node>:<source>`` (the whole name if it has no such part)."""
    parts = relay.split(":")
    return parts[1] if len(parts) >= 3 else relay


def choose_relays(site: str, relays: Sequence[str], k: int) -> list[str]:
    """The ``k`` relays that carry ``site``: in rank order, one relay per node first, then the
    next ranked relays. ``k = 1`` is plain HRW (the top relay). Fewer when fewer exist."""
    if len(relays) <= 1:
        # one relay (one node, one source): nothing to rank, and no cache entry (nor keyed
        # hash) for each of the long tail's thousands of sites
        return list(relays)
    return list(_choose(site, tuple(relays), k))


@lru_cache(maxsize=1 << 16)
def _choose(site: str, relays: tuple[str, ...], k: int) -> tuple[str, ...]:
    # cached (bounded): a shard leader asks for every site it sends to in every dispatch
    # round, and ranking costs a keyed hash per relay and a sort
    ranked = rank_relays(site, relays)
    if k <= 1:
        return tuple(ranked[:1])
    out: list[str] = []
    nodes: set[str] = set()
    for r in ranked:
        n = relay_node(r)
        if n not in nodes:
            nodes.add(n)
            out.append(r)
            if len(out) == k:
                return tuple(out)
    for r in ranked:
        if r not in out:
            out.append(r)
            if len(out) == k:
                break
    return tuple(out)


def spread_count(*, ready: int, configured: int, hot_ready: int, hot_relays: int,
                 max_connections: int, available: int) -> int:
    """How many relays a site's mail goes to this round.

    ``configured`` (the site's ``relays``, 0 = automatic) wins; otherwise a site with at least
    ``hot_ready`` messages ready (0 = never automatically) spreads over ``hot_relays``. Never more
    relays than the site has connections (a relay without a connection only holds mail back),
    nor than exist, and at least one."""
    if configured > 0:
        k = configured
    elif hot_ready > 0 and ready >= hot_ready:
        k = hot_relays
    else:
        k = 1
    return max(1, min(k, max_connections, available))


def split_counts(n: int, k: int, turn: int = 0) -> list[int]:
    """``n`` messages over ``k`` relays as evenly as possible; the extra ones go to the relays
    from ``turn`` on (rotating ``turn`` per round keeps small batches from always landing on the
    first relay)."""
    if k <= 0:
        raise ValueError(f"split over {k} relays")
    if k == 1:   # the common case (one relay a site), every site of every round
        return [max(0, n)]
    base, extra = divmod(max(0, n), k)
    return [base + (1 if (i - turn) % k < extra else 0) for i in range(k)]


@dataclass(frozen=True)
class NodeInfo:
    """What placement needs of a Ray node: its id, labels and resources."""

    node_id: str
    labels: Mapping[str, str]
    resources: Mapping[str, Any]

    @classmethod
    def from_ray(cls, node: Mapping[str, Any]) -> NodeInfo:
        """From an entry of ``ray.nodes()``."""
        return cls(node["NodeID"], dict(node.get("Labels") or {}),
                   dict(node.get("Resources") or {}))

    def egress_labels(self) -> set[str]:
        out = {k.split(":", 1)[1] for k in self.resources if k.startswith(EGRESS_LABEL + ":")}
        v = self.labels.get(EGRESS_LABEL, "")
        out.update(x.strip() for x in v.split(",") if x.strip())
        return out


def source_nodes(node_label: str, nodes: Sequence[NodeInfo]) -> list[str]:
    """Ids of the nodes an egress source with ``node_label`` lives on: every node when the
    source names none (it binds no address of its own, or every node owns it), else the nodes
    labelled ``egress = <node_label>`` (a comma list may name several) or carrying an
    ``egress:<node_label>`` resource. Empty when no live node has it: the source then has no
    relay, and its sites wait (the coordinator logs that no relay serves them)."""
    if not node_label:
        return [n.node_id for n in nodes]
    return [n.node_id for n in nodes if node_label in n.egress_labels()]


@dataclass(frozen=True)
class EgressPool:
    """Sources with weights for the mail of some sender domains (and their sub-domains)."""

    name: str
    #: (source name, weight > 0)
    weights: tuple[tuple[str, float], ...]
    sender_domains: tuple[str, ...] = ()

    @staticmethod
    def parse_source(text: str) -> tuple[str, float]:
        """``"ip1"`` (weight 1) or ``"ip1:3"``; :meth:`format_source` reverses."""
        name, sep, w = text.partition(":")
        if not name:
            raise ValueError(f"no source name in {text!r}")
        if not sep:
            return name, 1.0
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"weight {w!r} in {text!r} is not a number") from None
        if not weight > 0 or math.isinf(weight):
            raise ValueError(f"weight in {text!r} must be a positive number")
        return name, weight

    @staticmethod
    def format_source(name: str, weight: float) -> str:
        return name if weight == 1.0 else f"{name}:{weight:g}"


def pool_for(sender: str, pools: Sequence[EgressPool]) -> EgressPool | None:
    """The pool of ``sender``'s domain: the one naming the longest matching domain (the domain
    itself or a parent), or None (the site's sources, all of them by default)."""
    domain = sender.rpartition("@")[2].lower().rstrip(".")
    if not domain or not pools:
        return None
    best: tuple[int, EgressPool] | None = None
    for p in pools:
        for d in p.sender_domains:
            if (domain == d or domain.endswith("." + d)) and (best is None or len(d) > best[0]):
                best = (len(d), p)
    return best[1] if best else None


def weighted_pick(key: str, weights: Mapping[str, float]) -> str:
    """One of ``weights``' names for ``key``, each with probability weight / total: the name
    with the highest ``-weight / ln(u)``, u a hash of (key, name) in (0, 1). Removing a name
    moves only the keys it had."""
    if not weights:
        raise ValueError("no sources to pick from")
    best, best_score = "", -math.inf
    for name, w in weights.items():
        u = (hrw_weight(key, name) + 0.5) / 2.0 ** 64
        score = -w / math.log(u)
        if score > best_score or (score == best_score and name < best):
            best, best_score = name, score
    return best
