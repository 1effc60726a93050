"""Ray metrics for raymta's actors: what operators see on the Ray dashboard (DESIGN rule 7).

Owns the metric names and tags. Counters are bumped once per batch (never per message on a hot
path); gauges are set from the actors' periodic housekeeping. Names: ``raymta_<what>``.
"""

from __future__ import annotations

from collections import Counter as _Tally
from typing import Iterable

from ray.util.metrics import Counter, Gauge

__all__ = ["CoordinatorMetrics", "RelayMetrics", "ThrottleMetrics", "loop_lag_reporter"]


def loop_lag_reporter(actor: str):
    """A callback for :class:`actors.loop.LoopLag`: the worst event-loop lag of the last
    10 s, as ``raymta_loop_lag_seconds{actor=...}``."""
    gauge = Gauge("raymta_loop_lag_seconds", "how late the actor's event loop ran a timer "
                  "(worst of the last 10 s): every call and SMTP reply waits as long",
                  tag_keys=("actor",))
    tags = {"actor": actor}
    return lambda seconds: gauge.set(seconds, tags)


class CoordinatorMetrics:
    def __init__(self, shard: int) -> None:
        self.tags = {"shard": str(shard)}
        self.events = Counter("raymta_events_total",
                              "queue state changes by type (Reception, Delivery, Bounce, ...)",
                              tag_keys=("shard", "type"))
        self.queue = Gauge("raymta_queue_messages", "live messages by state",
                           tag_keys=("shard", "state"))
        self.body_bytes = Gauge("raymta_queue_body_bytes", "message bytes held by the queue",
                                tag_keys=("shard",))
        self.commit_seconds = Gauge("raymta_commit_seconds",
                                    "duration of the last group commit (write + fsync on a "
                                    "quorum of copies)", tag_keys=("shard",))
        self.epoch = Gauge("raymta_shard_epoch", "the shard leader's epoch (rises at failover)",
                           tag_keys=("shard",))
        self.lag_records = Gauge("raymta_replica_lag_records",
                                 "log records a copy has not acknowledged yet",
                                 tag_keys=("shard", "copy"))
        self.lag_seconds = Gauge("raymta_replica_lag_seconds",
                                 "age of the oldest record a copy has not acknowledged",
                                 tag_keys=("shard", "copy"))

    def count_events(self, types: Iterable[str]) -> None:
        for etype, n in _Tally(types).items():
            self.events.inc(n, {**self.tags, "type": etype})

    def set_replication(self, epoch: int, copies: list[dict]) -> None:
        self.epoch.set(epoch, self.tags)
        for c in copies[1:]:
            tags = {**self.tags, "copy": str(c["slot"])}
            self.lag_records.set(c["lag_records"], tags)
            self.lag_seconds.set(c["lag_seconds"], tags)

    def set_queue(self, counts: dict[str, int]) -> None:
        for state in ("ready", "inflight", "deferred", "live"):
            self.queue.set(counts[state], {**self.tags, "state": state})
        self.body_bytes.set(counts["body_bytes"], self.tags)


class RelayMetrics:
    def __init__(self, relay: str) -> None:
        self.tags = {"relay": relay}
        self.results = Counter("raymta_delivery_results_total",
                               "SMTP transaction outcomes (delivered, transient, permanent)",
                               tag_keys=("relay", "outcome"))
        self.connections = Gauge("raymta_relay_connections", "open SMTP connections",
                                 tag_keys=("relay",))
        self.connect_failures = Counter("raymta_connect_failures_total",
                                        "sites none of whose MX hosts could be used",
                                        tag_keys=("relay",))

    def count_results(self, outcomes: Iterable[str]) -> None:
        for outcome, n in _Tally(outcomes).items():
            self.results.inc(n, {**self.tags, "outcome": outcome})


class ThrottleMetrics:
    def __init__(self, name: str) -> None:
        self.tags = {"throttle": name}
        self.sites = Gauge("raymta_throttle_sites", "sites this throttle is the authority for",
                           tag_keys=("throttle",))
        self.paused = Gauge("raymta_throttle_sites_paused", "sites in backoff",
                            tag_keys=("throttle",))
        self.leases = Gauge("raymta_throttle_connection_leases", "connection leases held",
                            tag_keys=("throttle",))
