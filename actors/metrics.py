"""Ray metrics for raymta's actors: what operators see on the Ray dashboard (DESIGN rule 7).

Owns the metric names and tags, and the per-actor tallies the head's Prometheus endpoint
(:mod:`actors.metrics_exporter`) reads through the actors' ``stats()``. Counters are tallied
once per batch (a commit, a relay's result flush, a throttle call) into plain dicts and pushed
to Ray once a second from the actors' housekeeping: never a Ray metric call per message. Gauges
are set from the same housekeeping. Names: ``raymta_<what>`` (Ray adds its ``ray_`` prefix on
its own endpoint).

Label cardinality is bounded: a process gives the first ``top_sites`` sites it sees a label of
their own and counts the rest as "other" (:class:`BoundedLabels`); categories likewise.

``[metrics] enabled = false`` gives every actor the same objects with nothing behind them: no
Ray metric is created or updated, no tally is kept.
"""

from __future__ import annotations

from collections import Counter as _Tally
from collections.abc import Iterable
from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

__all__ = [
    "SUBMIT_LATENCY_BOUNDS",
    "BoundedLabels",
    "CoordinatorMetrics",
    "RelayMetrics",
    "ThrottleMetrics",
    "loop_lag_reporter",
    "spool_disk",
    "tally_rows",
]

#: seconds from a submit call's arrival at the shard leader to its commit (upper bounds)
SUBMIT_LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                         10.0)
OTHER = "other"


class BoundedLabels:
    """At most ``limit`` distinct label values plus "other": the first values seen keep their
    name for the life of the process (a counter's series must not change label later)."""

    __slots__ = ("known", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.known: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.known:
            return value
        if len(self.known) < self.limit:
            self.known.add(value)
            return value
        return OTHER


def loop_lag_reporter(actor: str, enabled: bool = True):
    """A callback for :class:`actors.loop.LoopLag`: the worst event-loop lag of the last
    10 s, as ``raymta_loop_lag_seconds{actor=...}``."""
    if not enabled:
        return lambda seconds: None
    gauge = Gauge("raymta_loop_lag_seconds", "how late the actor's event loop ran a timer "
                  "(worst of the last 10 s): every call and SMTP reply waits as long",
                  tag_keys=("actor",))
    tags = {"actor": actor}
    return lambda seconds: gauge.set(seconds, tags)


class _Nothing:
    """A metric that is not there (``[metrics] enabled = false``)."""

    def set(self, *a: Any) -> None: ...
    def inc(self, *a: Any) -> None: ...
    def observe(self, *a: Any) -> None: ...


_NOTHING = _Nothing()


class _Base:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _metric(self, kind: Any, name: str, doc: str, tags: tuple[str, ...], **kw: Any) -> Any:
        return kind(name, doc, tag_keys=tags, **kw) if self.enabled else _NOTHING


class CoordinatorMetrics(_Base):
    def __init__(self, shard: int, enabled: bool = True, top_sites: int = 20) -> None:
        super().__init__(enabled)
        self.tags = {"shard": str(shard)}
        m = self._metric
        self.events = m(Counter, "raymta_events_total",
                        "queue state changes by type (Reception, Delivery, Bounce, ...)",
                        ("shard", "type"))
        self.site_events = m(Counter, "raymta_site_events_total",
                             "queue state changes by type, site (top sites + other) and "
                             "bounce category", ("shard", "type", "site", "category"))
        self.queue = m(Gauge, "raymta_queue_messages", "live messages by state",
                       ("shard", "state"))
        self.body_bytes = m(Gauge, "raymta_queue_body_bytes", "message bytes held by the queue",
                            ("shard",))
        self.commit_seconds = m(Gauge, "raymta_commit_seconds",
                                "duration of the last group commit (write + fsync on a quorum "
                                "of copies)", ("shard",))
        self.epoch = m(Gauge, "raymta_shard_epoch", "the shard leader's epoch (rises at "
                       "failover)", ("shard",))
        self.lag_records = m(Gauge, "raymta_replica_lag_records",
                             "log records a copy has not acknowledged yet", ("shard", "copy"))
        self.lag_seconds = m(Gauge, "raymta_replica_lag_seconds",
                             "age of the oldest record a copy has not acknowledged",
                             ("shard", "copy"))
        self.submit_latency = m(Histogram, "raymta_submit_latency_seconds",
                                "from a submit call's arrival at the shard leader to its "
                                "commit", ("shard",), boundaries=list(SUBMIT_LATENCY_BOUNDS))
        self.retention_capped_files = m(
            Counter, "raymta_event_retention_capped_files_total",
            "event files deleted at spool.event_retain_bytes although the webhook endpoint had "
            "not acknowledged their events (it is told what it lost)", ("shard", "endpoint"))
        self.sites = BoundedLabels(top_sites)
        self.categories = BoundedLabels(40)
        #: (type, site label, category label) -> count: since the last flush / ever
        self._pending: _Tally[tuple[str, str, str]] = _Tally()
        self.totals: _Tally[tuple[str, str, str]] = _Tally()
        #: submit calls per latency bucket (not cumulative; the last is +Inf), and their sum
        self.latency_buckets = [0] * (len(SUBMIT_LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0

    def count_events(self, evs: list[dict[str, Any]]) -> None:
        """One commit's events, tallied (a dict update per event, no Ray call)."""
        if not self.enabled or not evs:
            return
        raw = _Tally((ev["type"], ev.get("site") or "", ev.get("category") or "") for ev in evs)
        for (etype, site, cat), n in raw.items():
            self._pending[(etype, self.sites(site) if site else "", self.categories(cat))] += n

    def retention_capped(self, endpoints: Iterable[str], files: int) -> None:
        """Event files deleted at the retention cap before these endpoints acknowledged them
        (rare: once per rotation at most; endpoints are the configured ones, a few)."""
        for ep in endpoints:
            self.retention_capped_files.inc(files, {**self.tags, "endpoint": ep})

    def observe_submit(self, seconds: float) -> None:
        """One submit call (not per message): arrival to commit."""
        if not self.enabled:
            return
        self.submit_latency.observe(seconds, self.tags)
        i = 0
        for i, bound in enumerate(SUBMIT_LATENCY_BOUNDS):
            if seconds <= bound:
                break
        else:
            i = len(SUBMIT_LATENCY_BOUNDS)
        self.latency_buckets[i] += 1
        self.latency_sum += seconds

    def flush(self) -> None:
        """Push the tallies since the last flush to Ray (housekeeping, once a second)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, _Tally()
        self.totals.update(pending)
        by_type: _Tally[str] = _Tally()
        for (etype, site, cat), n in pending.items():
            by_type[etype] += n
            self.site_events.inc(n, {**self.tags, "type": etype, "site": site or "none",
                                     "category": cat or "none"})
        for etype, n in by_type.items():
            self.events.inc(n, {**self.tags, "type": etype})

    def set_replication(self, epoch: int, copies: list[dict]) -> None:
        if not self.enabled:
            return
        self.epoch.set(epoch, self.tags)
        for c in copies[1:]:
            tags = {**self.tags, "copy": str(c["slot"])}
            self.lag_records.set(c["lag_records"], tags)
            self.lag_seconds.set(c["lag_seconds"], tags)

    def set_queue(self, counts: dict[str, int]) -> None:
        if not self.enabled:
            return
        for state in ("ready", "inflight", "deferred", "live"):
            self.queue.set(counts[state], {**self.tags, "state": state})
        self.body_bytes.set(counts["body_bytes"], self.tags)
        self.flush()

    def snapshot(self) -> dict[str, Any]:
        """What the head's exporter sums over shards (cumulative since this process began)."""
        self.flush()
        return {"events": [[t, s, c, n] for (t, s, c), n in self.totals.items()],
                "submit_latency": {"buckets": list(self.latency_buckets),
                                   "sum": self.latency_sum}}


class RelayMetrics(_Base):
    def __init__(self, relay: str, enabled: bool = True, source: str = "default") -> None:
        super().__init__(enabled)
        self.tags = {"relay": relay}
        self.source = source
        m = self._metric
        self.results = m(Counter, "raymta_delivery_results_total",
                         "SMTP transaction outcomes (delivered, transient, permanent)",
                         ("relay", "outcome"))
        self.category_results = m(Counter, "raymta_relay_results_total",
                                  "results by egress source, outcome and bounce category",
                                  ("relay", "egress", "outcome", "category"))
        self.connections = m(Gauge, "raymta_relay_connections", "open SMTP connections",
                             ("relay",))
        self.connect_failures = m(Counter, "raymta_connect_failures_total",
                                  "sites none of whose MX hosts could be used", ("relay",))
        self.opened = m(Counter, "raymta_relay_connections_opened_total",
                        "SMTP connections opened, and of them with STARTTLS",
                        ("relay", "egress", "tls"))
        self.dkim = m(Counter, "raymta_dkim_signatures_total", "DKIM signatures made",
                      ("relay", "egress"))
        self.categories = BoundedLabels(40)
        self.totals: _Tally[tuple[str, str]] = _Tally()   # (outcome, category) -> n
        self._last: dict[str, int] = {}

    def count_results(self, results: list[list[Any]]) -> None:
        """One flush's results (``[id, outcome, code, enhanced, text, category, host]``)."""
        if not self.enabled or not results:
            return
        raw = _Tally((r[1], r[5] or "") for r in results)
        by_outcome: _Tally[str] = _Tally()
        for (outcome, cat), n in raw.items():
            cat = self.categories(cat)
            by_outcome[outcome] += n
            self.totals[(outcome, cat)] += n
            self.category_results.inc(n, {**self.tags, "egress": self.source,
                                          "outcome": outcome, "category": cat or "none"})
        for outcome, n in by_outcome.items():
            self.results.inc(n, {**self.tags, "outcome": outcome})

    def set_state(self, open_connections: int, counters: dict[str, int],
                  dkim: dict[str, int] | None) -> None:
        """From the relay's renewal loop: open connections and what its counters gained."""
        if not self.enabled:
            return
        self.connections.set(open_connections, self.tags)
        now = {"connections": counters.get("connections", 0),
               "tls": counters.get("tls_connections", 0),
               "signatures": (dkim or {}).get("signatures", 0)}
        d = {k: v - self._last.get(k, 0) for k, v in now.items()}
        self._last = now
        tags = {**self.tags, "egress": self.source}
        if d["tls"] > 0:
            self.opened.inc(d["tls"], {**tags, "tls": "yes"})
        if d["connections"] - d["tls"] > 0:
            self.opened.inc(d["connections"] - d["tls"], {**tags, "tls": "no"})
        if d["signatures"] > 0:
            self.dkim.inc(d["signatures"], tags)

    def snapshot(self) -> list[list[Any]]:
        return [[o, c, n] for (o, c), n in self.totals.items()]


class ThrottleMetrics(_Base):
    def __init__(self, name: str, enabled: bool = True) -> None:
        super().__init__(enabled)
        self.tags = {"throttle": name}
        m = self._metric
        self.sites = m(Gauge, "raymta_throttle_sites", "sites this throttle is the authority "
                       "for", ("throttle",))
        self.paused = m(Gauge, "raymta_throttle_sites_paused", "sites in backoff",
                        ("throttle",))
        self.leases = m(Gauge, "raymta_throttle_connection_leases", "connection leases held",
                        ("throttle",))
        self.granted = m(Counter, "raymta_throttle_granted_total",
                         "messages the throttle let shards dispatch", ("throttle",))
        self.suspensions = m(Counter, "raymta_throttle_suspensions_total",
                             "sites paused after a reply asked to slow down", ("throttle",))
        self._last: dict[str, int] = {}

    def export(self, totals: tuple[int, int, int], counters: dict[str, int]) -> None:
        """``totals``: sites, paused sites, leases (ThrottleBook.totals)."""
        if not self.enabled:
            return
        t = self.tags
        sites, paused, leases = totals
        self.sites.set(sites, t)
        self.paused.set(paused, t)
        self.leases.set(leases, t)
        for key, metric in (("granted", self.granted), ("suspensions", self.suspensions)):
            d = counters.get(key, 0) - self._last.get(key, 0)
            if d > 0:
                metric.inc(d, t)
            self._last[key] = counters.get(key, 0)


def spool_disk(path: Any) -> dict[str, int]:
    """Free and total bytes of the filesystem a spool copy lives on (one statvfs)."""
    import shutil
    try:
        u = shutil.disk_usage(path)
    except OSError:
        return {}
    return {"free": u.free, "total": u.total}


def tally_rows(rows: Iterable[list[Any]]) -> _Tally[tuple[Any, ...]]:
    """``[[k1, k2, ..., n], ...]`` (a snapshot's rows) as a tally keyed by the leading fields."""
    out: _Tally[tuple[Any, ...]] = _Tally()
    for *key, n in rows:
        out[tuple(key)] += n
    return out
