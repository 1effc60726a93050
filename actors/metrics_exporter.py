"""MetricsExporter actor: raymta's own Prometheus endpoint on the head node (DESIGN rule 7).

One per cluster (``metrics:exporter``, placed on the head). Every ``metrics.interval`` it asks
each shard leader for ``stats()`` (queue counts, replication, its event and submit-latency
tallies, spool disk) and ``metrics_shape()`` (past 5,000 queued in a shard, at most every
30 s), every relay and throttle for ``stats()``, every
replica for its spool disk, and Ray for the live nodes; from that it builds cluster-wide
metric families that a scrape of ``http://<metrics.host>:<metrics.port>/metrics`` returns as
they were at the last gathering (a scrape never makes an actor call). The names it serves are
:data:`EXPORTED` (the dashboard and the alert rules use only these; a test checks both).

Counters stay monotonic across actor restarts: each source's tallies are remembered with its
incarnation (pid), and when that changes the last values are carried over. Label cardinality
is bounded: sites are the ``metrics.top_sites`` biggest plus "other".

It owns no state that matters: if it dies, Ray restarts it and counters continue from the
actors' own tallies (a restart of the exporter is a counter reset Prometheus handles).

A host other than loopback is served only with HTTP basic auth (refused by the config parser
otherwise). Must not: make a call to any actor on the scrape path, or block its event loop on
I/O (Ray calls are awaited, node listing runs in a thread).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from actors.metrics import SUBMIT_LATENCY_BOUNDS
from cluster.config import Config
from cluster.core.queue_shape import AGE_BUCKETS, merge_shapes

__all__ = ["EXPORTED", "EXPORTER_NAME", "MetricsExporter", "WEBHOOK_EXPORTED"]

log = logging.getLogger("raymta.metrics")

EXPORTER_NAME = "metrics:exporter"

#: every metric family the endpoint serves: name (as exposed) -> (type, labels, help)
EXPORTED: dict[str, tuple[str, tuple[str, ...], str]] = {
    "raymta_queue_messages": ("gauge", ("state",), "live messages by state (live, ready, "
                              "inflight, deferred), all shards"),
    "raymta_queue_body_bytes": ("gauge", (), "message bytes held by the queues"),
    "raymta_queue_site_messages": ("gauge", ("site",), "live messages by site (top sites + "
                                   "other)"),
    "raymta_queue_age_messages": ("gauge", ("age",), "live messages by age bucket"),
    "raymta_queue_site_age_messages": ("gauge", ("site", "age"), "live messages by site and "
                                       "age (qshape)"),
    "raymta_queue_oldest_message_age_seconds": ("gauge", (), "age of the oldest live message"),
    "raymta_messages_total": ("counter", ("event", "site", "category"),
                              "queue events: Reception (accepted), Delivery, TransientFailure "
                              "(deferred), Bounce, Expiration, ... by site and bounce category"),
    "raymta_submit_latency_seconds": ("histogram", (), "submit call arrival at the shard "
                                      "leader to commit"),
    "raymta_submit_refused_items_total": ("counter", (), "submit items refused outright "
                                          "(malformed payloads)"),
    "raymta_quarantined_records_total": ("counter", (), "log records set aside because they "
                                         "could not be applied"),
    "raymta_suppression_entries": ("gauge", (), "entries in the suppression list"),
    "raymta_shard_serving": ("gauge", ("shard",), "1 when the shard leader serves"),
    "raymta_shard_quorum": ("gauge", ("shard",), "1 when a majority of the shard's copies is "
                            "caught up (leader included)"),
    "raymta_shard_copies_in_sync": ("gauge", ("shard",), "copies that are members and "
                                    "streaming (leader included)"),
    "raymta_shard_copies": ("gauge", ("shard",), "copies the shard should have"),
    "raymta_shard_epoch": ("gauge", ("shard",), "the shard leader's epoch"),
    "raymta_epoch_changes_total": ("counter", ("shard",), "rises of a shard's epoch seen by "
                                   "the exporter (leader changes)"),
    "raymta_replica_lag_records": ("gauge", ("shard", "copy"), "records a copy has not "
                                   "acknowledged"),
    "raymta_replica_lag_seconds": ("gauge", ("shard", "copy"), "age of the oldest record a "
                                   "copy has not acknowledged"),
    "raymta_relay_connections": ("gauge", ("relay", "egress"), "open SMTP connections"),
    "raymta_relay_connections_opened_total": ("counter", ("egress", "tls"), "SMTP connections "
                                              "opened (tls yes/no)"),
    "raymta_relay_results_total": ("counter", ("egress", "outcome", "category"),
                                   "SMTP results by egress source, outcome and category"),
    "raymta_relay_tls_total": ("counter", ("site", "kind"), "SMTP connections by site (top "
                               "sites + other) and TLS outcome: tls, plaintext, fallback "
                               "(plaintext after a failed opportunistic handshake), "
                               "tls_failures (hosts failing a required TLS policy)"),
    "raymta_connect_failures_total": ("counter", ("egress",), "sites none of whose MX hosts "
                                      "could be used"),
    "raymta_dkim_signatures_total": ("counter", ("egress",), "DKIM signatures made"),
    "raymta_dkim_errors_total": ("counter", ("egress",), "messages sent unsigned because "
                                 "signing failed"),
    "raymta_throttle_granted_total": ("counter", ("throttle",), "messages throttles let "
                                      "shards dispatch"),
    "raymta_throttle_suspensions_total": ("counter", ("throttle",), "sites paused after a "
                                          "reply asked to slow down"),
    "raymta_throttle_sites_paused": ("gauge", ("throttle",), "sites in backoff now"),
    "raymta_shaping_rules_fired_total": ("counter", ("rule", "provider"), "shaping rules "
                                         "fired (provider: the site's, or other)"),
    "raymta_shaping_rules_active": ("gauge", ("action",), "shaping actions in force now"),
    "raymta_throttle_connection_leases": ("gauge", ("throttle",), "connection leases held"),
    "raymta_spool_free_bytes": ("gauge", ("node",), "free bytes on the spool filesystem"),
    "raymta_spool_size_bytes": ("gauge", ("node",), "size of the spool filesystem"),
    "raymta_nodes_alive": ("gauge", ("region",), "live Ray nodes per region (regions of dead "
                           "nodes stay, at 0)"),
    "raymta_exporter_last_gather_timestamp_seconds": ("gauge", (), "when the figures served "
                                                      "were gathered"),
    "raymta_exporter_gather_errors_total": ("counter", (), "actor calls that failed or timed "
                                            "out while gathering"),
}

#: served only when ``[[webhooks]]`` are configured (one sample per endpoint)
WEBHOOK_EXPORTED: dict[str, tuple[str, tuple[str, ...], str]] = {
    "raymta_webhook_backlog_events": ("gauge", ("endpoint",), "selected events read and not "
                                      "yet acknowledged by the endpoint"),
    "raymta_webhook_oldest_event_age_seconds": ("gauge", ("endpoint",), "age of the oldest "
                                                "event the endpoint has not acknowledged"),
    "raymta_webhook_events_total": ("counter", ("endpoint",), "events the endpoint "
                                    "acknowledged (since the dispatcher started)"),
    "raymta_webhook_failures_total": ("counter", ("endpoint",), "failed POSTs (since the "
                                      "dispatcher started)"),
    "raymta_webhook_given_up_events_total": ("counter", ("endpoint",), "events given up "
                                             "after retry_for"),
    "raymta_webhook_skipped_events_total": ("counter", ("endpoint",), "events rotated out of "
                                            "the event files before the endpoint read them"),
}


class _Carry:
    """Monotonic counters over restarts: per source, its incarnation and last values."""

    def __init__(self) -> None:
        self.base: dict[str, dict[Any, float]] = {}
        self.last: dict[str, tuple[Any, dict[Any, float]]] = {}

    def update(self, source: str, incarnation: Any, values: dict[Any, float]) -> dict[Any, float]:
        base = self.base.setdefault(source, {})
        prev = self.last.get(source)
        if prev is not None and prev[0] != incarnation:
            for k, v in prev[1].items():
                base[k] = base.get(k, 0) + v
        self.last[source] = (incarnation, dict(values))
        out: dict[Any, float] = dict(base)
        for k, v in values.items():
            out[k] = out.get(k, 0) + v
        return out


def _sum_into(total: dict[Any, float], values: dict[Any, float]) -> None:
    for k, v in values.items():
        total[k] = total.get(k, 0) + v


class MetricsExporter:
    def __init__(self, config: Config) -> None:
        self.cfg = config
        self.ns = config.cluster.namespace
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)          # collect() below
        self._families: list[Any] = []
        self._server: ThreadingHTTPServer | None = None
        self._url = ""
        self._bind_error = ""
        self._task: asyncio.Task | None = None
        self._carry = _Carry()
        self._epochs: dict[int, int] = {}
        self._epoch_changes: Counter = Counter()
        self._errors = 0
        self._gathers = 0
        self._last = 0.0
        self._regions: set[str] = set()
        self._handles: dict[str, Any] = {}
        #: each shard's last queue shape and when it was taken (see SHAPE_EVERY)
        self._shapes: dict[str, tuple[float, Any]] = {}
        #: each shard's live messages at the last gathering
        self._live: dict[str, int] = {}

    #: a shard's queue shape (by site and age) walks the shard's whole queue: 30 ms of the
    #: leader's CPU per call at 20,000 queued, and more as the queue grows. Past SHAPE_CHEAP
    #: live messages (at the last gathering) it is taken at most every SHAPE_EVERY seconds
    #: (the figures it gives move slowly there); below, at every gathering.
    SHAPE_EVERY = 30.0
    SHAPE_CHEAP = 5_000

    # ------------------------------------------------------------------ prometheus_client
    def collect(self) -> list[Any]:
        return self._families     # swapped whole by each gathering: no lock needed

    def describe(self) -> list[Any]:
        return []

    # ------------------------------------------------------------------ serving
    def _serve(self) -> None:
        m = self.cfg.metrics
        registry = self.registry
        auth = ""
        if m.username:
            auth = "Basic " + base64.b64encode(f"{m.username}:{m.password}".encode()).decode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if auth and not hmac.compare_digest(self.headers.get("Authorization", ""),
                                                    auth):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="raymta"')
                    self.end_headers()
                    return
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        srv = ThreadingHTTPServer((m.host, m.port), Handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, name="metrics-http", daemon=True).start()
        self._server = srv
        host, port = srv.server_address[:2]
        self._url = f"http://{host!s}:{port}/metrics"
        log.info("raymta metrics on %s", self._url)

    def close(self) -> None:
        """Stop serving (tests; an actor's server ends with its process)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    async def start(self) -> dict[str, Any]:
        """Serve and start gathering (idempotent); returns :meth:`status`. A port in use is
        reported (``bind_error``) and tried again every 30 s: metrics never stop a deploy."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if self._server is None:
            try:
                self._serve()
                self._bind_error = ""
            except OSError as e:
                self._bind_error = (f"cannot listen on {self.cfg.metrics.host}:"
                                    f"{self.cfg.metrics.port}: {e.strerror}")
                log.error("metrics endpoint: %s (retrying every 30 s)", self._bind_error)
        return await self.status()

    async def status(self) -> dict[str, Any]:
        return {"url": self._url, "bind_error": self._bind_error, "gathers": self._gathers,
                "last_gather": self._last, "errors": self._errors, "pid": os.getpid()}

    async def ping(self) -> int:
        return os.getpid()

    async def _run(self) -> None:
        tried = time.monotonic()
        while True:
            try:
                await self.gather()
            except Exception:   # never fatal: the last figures stay served
                log.exception("gathering metrics failed")
                self._errors += 1
            if self._server is None and time.monotonic() - tried > 30:
                tried = time.monotonic()
                await self.start()
            await asyncio.sleep(self.cfg.metrics.interval)

    # ------------------------------------------------------------------ gathering
    def _handle(self, name: str) -> Any:
        h = self._handles.get(name)
        if h is None:
            h = ray.get_actor(name, namespace=self.ns)
            self._handles[name] = h
        return h

    async def _call(self, name: str, method: str, *args: Any, timeout: float = 5.0) -> Any:
        try:
            return await asyncio.wait_for(getattr(self._handle(name), method).remote(*args),
                                          timeout)
        except (TimeoutError, ray.exceptions.RayError, ValueError) as e:
            self._handles.pop(name, None)
            self._errors += 1
            log.debug("metrics: %s.%s failed: %s", name, method, e)
            return None

    async def _shape(self, name: str, top: int, now: float) -> Any:
        """The shard's queue shape, asked again only past :attr:`SHAPE_EVERY`."""
        last = self._shapes.get(name)
        if last is not None and now - last[0] < self.SHAPE_EVERY and \
                self._live.get(name, 0) > self.SHAPE_CHEAP:
            return last[1]
        shape = await self._call(name, "metrics_shape", top)
        if shape is not None:
            self._shapes[name] = (now, shape)
        return shape

    def _actor_names(self, nodes: list[dict[str, Any]]) -> dict[str, list[str]]:
        # (not actors.remote.list_relays: importing it loads every actor module, ~0.2 s of
        # CPU in this small process)
        alive = {n["NodeID"][:12] for n in nodes if n.get("Alive")}
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a.get("namespace") == self.ns]
        return {"relay": sorted(n for n in names if n.startswith("relay:") and
                                n.split(":")[1] in alive),
                "throttle": sorted(n for n in names if n.startswith("throttle:")),
                "replica": sorted(n for n in names if n.startswith("replica:"))}

    async def gather(self) -> int:
        """Gather now (also done every ``metrics.interval``); returns the families built."""
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        top = cfg.metrics.top_sites
        shards = list(range(cfg.queue.shards))
        nodes = await loop.run_in_executor(None, ray.nodes)
        names = await loop.run_in_executor(None, self._actor_names, nodes)
        coord = [f"coordinator:{s}" for s in shards]
        now = time.monotonic()
        calls = ([self._call(n, "stats") for n in coord] +
                 [self._shape(n, top, now) for n in coord] +
                 [self._call(n, "stats") for n in names["relay"]] +
                 [self._call(n, "stats") for n in names["throttle"]] +
                 [self._call(n, "stats") for n in names["replica"]])
        res = await asyncio.gather(*calls)
        k = len(coord)
        stats, shapes = res[:k], res[k:2 * k]
        for n, st in zip(coord, stats):
            if st is not None:
                self._live[n] = st.get("live", 0)
        relays = res[2 * k:2 * k + len(names["relay"])]
        rest = res[2 * k + len(names["relay"]):]
        throttles = rest[:len(names["throttle"])]
        replicas = rest[len(names["throttle"]):]
        fams = self._build(stats, shapes, list(zip(names["relay"], relays)),
                           list(zip(names["throttle"], throttles)), replicas, nodes)
        if cfg.webhooks:
            fams += self._webhook_families(await self._call("webhooks:dispatcher", "stats"))
        self._families = fams
        self._gathers += 1
        self._last = time.time()
        return len(fams)

    def _build(self, stats: list[Any], shapes: list[Any], relays: list[tuple[str, Any]],
               throttles: list[tuple[str, Any]], replicas: list[Any],
               nodes: list[dict[str, Any]]) -> list[Any]:
        f: dict[str, Any] = {}
        for name, (kind, labels, doc) in EXPORTED.items():
            cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily,
                   "histogram": HistogramMetricFamily}[kind]
            f[name] = cls(name, doc, labels=list(labels))
        cfg = self.cfg
        top = cfg.metrics.top_sites
        majority = cfg.cluster.replicas // 2 + 1

        # ---- shards: queue, replication, event tallies, latency
        states: Counter = Counter()
        events: dict[Any, float] = {}
        latency = [0.0] * (len(SUBMIT_LATENCY_BOUNDS) + 1)
        lat_sum = 0.0
        refused = quarantined = 0.0
        suppressions = 0
        spool: dict[str, tuple[int, int]] = {}
        for shard, st in enumerate(stats):
            if st is None:
                f["raymta_shard_serving"].add_metric([str(shard)], 0)
                f["raymta_shard_quorum"].add_metric([str(shard)], 0)
                continue
            src = f"coordinator:{shard}"
            serving = bool(st.get("serving"))
            f["raymta_shard_serving"].add_metric([str(shard)], 1 if serving else 0)
            for key in ("live", "ready", "inflight", "deferred", "body_bytes"):
                states[key] += st.get(key, 0)
            copies = st.get("replication") or []
            in_sync = sum(1 for c in copies if c.get("member") and
                          c.get("state") in ("leader", "streaming"))
            f["raymta_shard_copies_in_sync"].add_metric([str(shard)], in_sync)
            f["raymta_shard_copies"].add_metric([str(shard)], cfg.cluster.replicas)
            f["raymta_shard_quorum"].add_metric([str(shard)], 1 if serving and
                                                in_sync >= majority else 0)
            for c in copies[1:]:
                lbl = [str(shard), str(c["slot"])]
                f["raymta_replica_lag_records"].add_metric(lbl, c.get("lag_records", 0))
                f["raymta_replica_lag_seconds"].add_metric(lbl, c.get("lag_seconds", 0.0))
            epoch = st.get("epoch", 0)
            if epoch:
                prev = self._epochs.get(shard)
                if prev is not None and epoch > prev:
                    self._epoch_changes[shard] += 1
                self._epochs[shard] = max(epoch, prev or 0)
            f["raymta_shard_epoch"].add_metric([str(shard)], epoch)
            m = st.get("metrics") or {}
            flat: dict[Any, float] = {("ev",) + tuple(r[:3]): r[3] for r in m.get("events", [])}
            lat = m.get("submit_latency") or {}
            for i, n in enumerate(lat.get("buckets", [])):
                flat[("lat", i)] = n
            flat[("lat_sum",)] = lat.get("sum", 0.0)
            flat[("refused",)] = st.get("refused_items", 0)
            flat[("quarantined",)] = st.get("quarantined", 0)
            total = self._carry.update(src, st.get("pid"), flat)
            for key, v in total.items():
                if key[0] == "ev":
                    events[key[1:]] = events.get(key[1:], 0) + v
                elif key[0] == "lat":
                    latency[key[1]] += v
                elif key[0] == "lat_sum":
                    lat_sum += v
                elif key[0] == "refused":
                    refused += v
                elif key[0] == "quarantined":
                    quarantined += v
            suppressions = max(suppressions, m.get("suppressions", 0))  # each shard: all
            self._spool(spool, st.get("node", ""), m.get("spool") or {})
        for shard in range(cfg.queue.shards):
            f["raymta_epoch_changes_total"].add_metric([str(shard)], self._epoch_changes[shard])
        for state in ("live", "ready", "inflight", "deferred"):
            f["raymta_queue_messages"].add_metric([state], states[state])
        f["raymta_queue_body_bytes"].add_metric([], states["body_bytes"])
        # events: the site labels each shard chose, then top sites again over the sum
        per_site: dict[str, float] = {}
        for (etype, site, cat), n in events.items():
            per_site[site] = per_site.get(site, 0) + n
        ranked = sorted((s for s in per_site if s not in ("", "other")),
                        key=lambda s: -per_site[s])
        keep = set(ranked[:top])
        merged: dict[tuple[str, str, str], float] = {}
        for (etype, site, cat), n in events.items():
            label = site if site in keep else ("none" if not site else "other")
            mkey = (etype, label, cat or "none")
            merged[mkey] = merged.get(mkey, 0) + n
        for labels, n in sorted(merged.items()):
            f["raymta_messages_total"].add_metric(list(labels), n)
        cum = 0.0
        buckets = []
        for bound, n in zip(list(SUBMIT_LATENCY_BOUNDS) + [float("inf")], latency):
            cum += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
        f["raymta_submit_latency_seconds"].add_metric([], buckets, lat_sum)
        f["raymta_submit_refused_items_total"].add_metric([], refused)
        f["raymta_quarantined_records_total"].add_metric([], quarantined)
        f["raymta_suppression_entries"].add_metric([], suppressions)

        # ---- queue shape
        shape = merge_shapes([s for s in shapes if s], top)
        for site, n in sorted(shape["sites"].items()):
            f["raymta_queue_site_messages"].add_metric([site], n)
        for label, _ in AGE_BUCKETS:
            f["raymta_queue_age_messages"].add_metric([label], shape["ages"].get(label, 0))
        for site, ages in sorted(shape["site_ages"].items()):
            for label, n in sorted(ages.items()):
                f["raymta_queue_site_age_messages"].add_metric([site, label], n)
        f["raymta_queue_oldest_message_age_seconds"].add_metric([], shape["oldest_age"])

        # ---- relays
        per_egress: dict[str, dict[Any, float]] = {}
        for name, st in relays:
            if st is None:
                continue
            egress = st.get("egress", name.rsplit(":", 1)[-1])
            open_conns = sum(s.get("connections", 0) for s in (st.get("sites") or {}).values())
            f["raymta_relay_connections"].add_metric([name, egress], open_conns)
            dk = st.get("dkim") or {}
            flat = {("res", o, c): n for o, c, n in st.get("results") or []}
            flat.update({("opened",): st.get("connections", 0),
                         ("tls",): st.get("tls_connections", 0),
                         ("connect_failures",): st.get("connect_failures", 0),
                         ("dkim",): dk.get("signatures", 0), ("dkim_errors",): dk.get("errors", 0)})
            for site, kinds in (st.get("tls_sites") or {}).items():
                for kind, n in kinds.items():
                    flat[("tls_site", site, kind)] = n
            _sum_into(per_egress.setdefault(egress, {}),
                      self._carry.update(name, st.get("incarnation"), flat))
        # per-site TLS figures: the top sites by connections keep their label, the rest "other"
        tls_sites: dict[tuple[str, str], float] = {}
        for t in per_egress.values():
            for key, n in t.items():
                if key[0] == "tls_site":
                    tls_sites[(key[1], key[2])] = tls_sites.get((key[1], key[2]), 0) + n
        conns: dict[str, float] = {}
        for (site, _kind), n in tls_sites.items():
            conns[site] = conns.get(site, 0) + n
        keep = set(sorted((s for s in conns if s != "other"), key=lambda s: -conns[s])[:top])
        by_label: dict[tuple[str, str], float] = {}
        for (site, kind), n in tls_sites.items():
            label = (site if site in keep else "other", kind)
            by_label[label] = by_label.get(label, 0) + n
        for (site, kind), n in sorted(by_label.items()):
            f["raymta_relay_tls_total"].add_metric([site, kind], n)
        for egress, t in sorted(per_egress.items()):
            for key, n in sorted(t.items(), key=str):
                if key[0] == "res":
                    f["raymta_relay_results_total"].add_metric([egress, key[1],
                                                                key[2] or "none"], n)
            f["raymta_relay_connections_opened_total"].add_metric([egress, "yes"],
                                                                  t.get(("tls",), 0))
            f["raymta_relay_connections_opened_total"].add_metric(
                [egress, "no"], t.get(("opened",), 0) - t.get(("tls",), 0))
            f["raymta_connect_failures_total"].add_metric([egress],
                                                          t.get(("connect_failures",), 0))
            f["raymta_dkim_signatures_total"].add_metric([egress], t.get(("dkim",), 0))
            f["raymta_dkim_errors_total"].add_metric([egress], t.get(("dkim_errors",), 0))

        # ---- throttles
        fired: dict[Any, float] = {}
        active = {"suspend": 0, "set_limits": 0}
        for name, st in throttles:
            if st is None:
                continue
            _sum_into(fired, self._carry.update(f"{name}/shaping", st.get("started"),
                                                st.get("shaping_fired") or {}))
            for a in st.get("shaping_active") or ():
                active[a["action"]] = active.get(a["action"], 0) + 1
            sites = st.get("sites") or {}
            t = self._carry.update(name, st.get("started"),
                                   {"granted": st.get("granted", 0),
                                    "suspensions": st.get("suspensions", 0)})
            f["raymta_throttle_granted_total"].add_metric([name], t["granted"])
            f["raymta_throttle_suspensions_total"].add_metric([name], t["suspensions"])
            f["raymta_throttle_sites_paused"].add_metric(
                [name], sum(1 for s in sites.values() if s.get("backoff_remaining", 0) > 0))
            f["raymta_throttle_connection_leases"].add_metric(
                [name], sum(s.get("connections", 0) for s in sites.values()))

        for r in self.cfg.shaping.rules.rules if self.cfg.shaping.enabled else ():
            fired.setdefault(f"{r.name}|{r.provider or 'other'}", 0)   # every rule, from 0
        for key, n in sorted(fired.items()):
            rule, _, provider = str(key).partition("|")
            f["raymta_shaping_rules_fired_total"].add_metric([rule, provider or "other"], n)
        for action, n in sorted(active.items()):
            f["raymta_shaping_rules_active"].add_metric([action], n)

        # ---- disks, nodes
        for st in replicas:
            if st is not None:
                self._spool(spool, st.get("node", ""), st.get("spool") or {})
        for node, (free, size) in sorted(spool.items()):
            f["raymta_spool_free_bytes"].add_metric([node], free)
            f["raymta_spool_size_bytes"].add_metric([node], size)
        alive: Counter = Counter()
        for n in nodes:
            region = (n.get("Labels") or {}).get("region", "") or next(
                (k.split(":", 1)[1] for k in n.get("Resources", {}) if k.startswith("region:")),
                "")
            region = region or "none"
            self._regions.add(region)
            if n.get("Alive"):
                alive[region] += 1
        for region in sorted(self._regions):
            f["raymta_nodes_alive"].add_metric([region], alive[region])
        f["raymta_exporter_last_gather_timestamp_seconds"].add_metric([], time.time())
        f["raymta_exporter_gather_errors_total"].add_metric([], self._errors)
        return list(f.values())

    def _webhook_families(self, st: dict[str, Any] | None) -> list[Any]:
        """Per endpoint: backlog, oldest unacknowledged event, counters (actors/webhooks.py)."""
        f = {name: (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
            name, doc, labels=list(labels)) for name, (kind, labels, doc)
            in WEBHOOK_EXPORTED.items()}
        if st is None:
            return []
        for ep, e in st["endpoints"].items():
            f["raymta_webhook_backlog_events"].add_metric([ep], e["backlog"])
            f["raymta_webhook_oldest_event_age_seconds"].add_metric([ep], e["oldest_seconds"])
            t = self._carry.update(f"webhooks:{ep}", st.get("pid"),
                                   {k: e[k] for k in ("events", "failures", "given_up",
                                                      "skipped_events")})
            f["raymta_webhook_events_total"].add_metric([ep], t["events"])
            f["raymta_webhook_failures_total"].add_metric([ep], t["failures"])
            f["raymta_webhook_given_up_events_total"].add_metric([ep], t["given_up"])
            f["raymta_webhook_skipped_events_total"].add_metric([ep], t["skipped_events"])
        return list(f.values())

    @staticmethod
    def _spool(spool: dict[str, tuple[int, int]], node: str, disk: dict[str, int]) -> None:
        if not disk or not node:
            return
        key = node[:12]
        free = disk.get("free", 0)
        if key not in spool or free < spool[key][0]:
            spool[key] = (free, disk.get("total", 0))
