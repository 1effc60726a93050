"""Typed raymta configuration: one TOML file, frozen dataclasses, documented defaults.

Owns: the schema of the config file, its defaults, and the translation of strings such as
``"100/s"`` or ``"5m"`` into typed values. Every bad value raises :class:`ConfigError` naming
the key (dotted path) and the problem. Reads files only in :func:`load_config` and for
``[classification] rules_file`` (bounce classification rules, :mod:`cluster.core.bounce_rules`).

The defaults follow KumoMTA / Postfix / PowerMTA practice (see ../shared/DESIGN.md):
first retry after 10 minutes, doubling, capped at 4 hours, give up after 5 days; per site
10 connections, 100 deliveries per connection, 100 messages/s.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from cluster.core.bounce_rules import RuleError, RuleSet, rules_from_toml
from cluster.core.dkim import DEFAULT_SIGN_HEADERS, is_valid_selector
from cluster.core.dns_policy import DnsPolicy
from cluster.core.mxguard import parse_networks
from cluster.core.ratespec import RateSpec, parse_duration
from cluster.core.relay_choice import EgressPool
from cluster.core.retry import RetryPolicy
from cluster.core.shaping import ShapingError, ShapingRules
from cluster.core.shaping import rules_from_toml as shaping_rules_from_toml
from cluster.core.sites import SiteLimits, SiteOverride, StaticRoute
from cluster.core.submission import ApiKey, PasswordHashError, SubmissionUser
from cluster.core.verp import VerpError, VerpKeys
from cluster.core.warmup import WarmupError, WarmupSchedule, parse_schedule
from cluster.core.webhooks import WebhookEndpoint, resolve_event_names

__all__ = [
    "ClassificationConfig",
    "ShapingConfig",
    "shipped_shaping_rules",
    "ConfigError",
    "ReplicationConfig",
    "BackupConfig",
    "IngressConfig",
    "SubmissionUser",
    "load_users_file",
    "BounceConfig",
    "UnsubscribeConfig",
    "SpoolConfig",
    "QueueConfig",
    "DnsConfig",
    "DeliveryConfig",
    "EgressSource",
    "SiteLimits",
    "SiteOverride",
    "StaticRoute",
    "ClusterConfig",
    "Config",
    "DkimConfig",
    "DkimKeyConfig",
    "MetricsConfig",
    "check_dkim_keys",
    "load_config",
    "parse_config",
    "parse_size",
    "is_loopback",
]


class ConfigError(ValueError):
    """A config value is wrong: ``key`` is the dotted path, ``problem`` what is wrong with it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config {key}: {problem}")
        self.key = key
        self.problem = problem


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "k": 1000, "kib": 1024, "mb": 1000**2, "m": 1000**2,
               "mib": 1024**2, "gb": 1000**3, "g": 1000**3, "gib": 1024**3}


def parse_size(value: str | int) -> int:
    """``"10MB"`` → 10_000_000, ``"64MiB"`` → 67108864, ints pass through."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as '10MB', got {value!r}")
    text = value.strip().lower().replace(" ", "")
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(num):]
    if unit not in _SIZE_UNITS or not num:
        raise ValueError(f"cannot parse size {value!r} (use e.g. '10MB', '64MiB', 1048576)")
    try:
        n = float(num)
    except ValueError:
        raise ValueError(f"cannot parse size {value!r}") from None
    if n < 0:
        raise ValueError(f"size must not be negative, got {value!r}")
    return int(n * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class SpoolConfig:
    #: where the queue log, snapshots and event files live (one sub-directory per shard)
    directory: str = "./raymta-spool"
    #: a log segment is closed and a new one started past this size
    segment_bytes: int = 64 * 1024 * 1024
    #: compact (snapshot + drop old segments) when the log holds this much more than the live queue
    compact_bytes: int = 256 * 1024 * 1024
    #: event files rotate past this size; this many are kept
    event_file_bytes: int = 64 * 1024 * 1024
    event_files_kept: int = 16
    #: beyond those, event files a configured webhook endpoint has not acknowledged yet are
    #: kept, up to this many bytes per shard (0 = none: rotation deletes regardless); past it
    #: the oldest go and the endpoint is told exactly what it lost. 1 GiB holds ~3.5 million
    #: events of ~300 bytes: with the 1 GiB of kept files, 8 hours of ~250 events/s a shard
    #: (README, "Webhooks")
    event_retain_bytes: int = 1024 * 1024 * 1024
    #: each snapshot carries the newest events up to this size, so that a leader rebuilt on
    #: another node from it (its copy of the log starts at the snapshot) still serves the
    #: events just before it to a consumer that lags behind (docs/queue.md, "Events")
    snapshot_events_bytes: int = 32 * 1024 * 1024
    #: while a webhook endpoint's cursor is older than those, the snapshot carries the newest
    #: events up to this size instead (~200,000 events of ~300 bytes); the older ones are
    #: counted, and reported as skipped by a leader rebuilt elsewhere (docs/queue.md, "Events")
    snapshot_held_events_bytes: int = 64 * 1024 * 1024
    #: fsync each group commit (turn off only for throwaway benchmarks of the non-durable path)
    fsync: bool = True
    #: give every Ray node its own sub-directory (``node-<id>``) of ``directory``: set this when
    #: ``directory`` is one filesystem shared by all nodes but should behave like local disks
    #: (a copy that moves to another node then starts empty and catches up). Node ids change
    #: when Ray restarts, so a restarted cluster finds no copies: for tests of node loss.
    per_node: bool = False


@dataclass(frozen=True)
class QueueConfig:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: largest accepted message (rendered bytes); RFC 5321 §4.5.3.1.7 lets us set this
    max_message_size: int = 10_000_000
    #: backpressure: submissions are refused past this many live messages / body bytes per shard
    max_messages: int = 2_000_000
    max_bytes: int = 4 * 1024**3
    #: how often the coordinator looks for work when nothing wakes it
    dispatch_interval: float = 0.02
    #: most messages handed to relays in one dispatch round (per shard)
    dispatch_batch: int = 2000
    #: a message handed to a relay with no result after this long is considered lost and retried
    inflight_timeout: float = 600.0
    #: how many finished messages `status()` still knows about (older ones: see events)
    status_cache: int = 200_000
    #: how long an idempotency key is remembered
    idempotency_window: float = 86400.0
    #: queue shards (message id hash), each with its own leader and copies. Fixed once the
    #: spool exists. Each shard is R more processes (~1 % of a core each when idle, ~2-5 ms of
    #: CPU per Ray call): about one per core of the cluster; on 2 cores, 2 shards delivered
    #: ~1,500 msgs/s where 4 delivered ~1,100 (bench/throughput.py --shards)
    shards: int = 2


@dataclass(frozen=True)
class DnsConfig:
    #: empty = the system resolver (production); tests and the demo set a loopback server
    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 5.0
    min_ttl: float = 5.0
    max_ttl: float = 3600.0
    #: DNS queries in flight at once per resolver (one per throttle actor): a burst of new
    #: domains waits its turn here instead of timing out in the resolver's queue
    max_concurrent: int = 64
    #: a lookup that timed out is asked again after this, doubling up to retry_max_delay;
    #: only timeouts that go on for retry_budget defer the mail (cluster.core.dns_policy)
    retry_initial: float = 1.0
    retry_max_delay: float = 15.0
    retry_budget: float = 120.0
    #: routes of domains with queued mail are refreshed this long before they expire
    refresh_ahead: float = 30.0
    #: a SERVFAIL (or MX hosts without an address) is cached this long before it is asked
    #: again: long enough to stop a storm of repeats, short enough to notice a recovered zone
    servfail_ttl: float = 10.0
    #: ask AAAA records of MX hosts too; false where every egress source is IPv4 (as Postfix's
    #: inet_protocols = ipv4): a third fewer queries per new domain
    ipv6: bool = True

    def policy(self) -> DnsPolicy:
        """The pure cache/retry policy these settings describe."""
        return DnsPolicy(min_ttl=self.min_ttl, max_ttl=self.max_ttl,
                         transient_ttl=self.servfail_ttl,
                         timeout_ttl=min(1.0, self.retry_initial, self.servfail_ttl),
                         retry_initial=self.retry_initial, retry_max_delay=self.retry_max_delay,
                         retry_budget=self.retry_budget, refresh_ahead=self.refresh_ahead)


@dataclass(frozen=True)
class DeliveryConfig:
    #: the port MX hosts are contacted on (RFC 5321 §4.5.4: 25); tests run sinks elsewhere
    smtp_port: int = 25
    connect_timeout: float = 30.0
    command_timeout: float = 60.0
    #: the wait for the reply to the final dot of DATA (RFC 5321 §4.5.3.2.6: 10 minutes)
    data_timeout: float = 600.0
    #: a warm connection with nothing to send is closed after this long
    idle_timeout: float = 5.0
    #: connection leases held by relays expire if not renewed within this time
    lease_ttl: float = 20.0
    #: a site told to slow down (421, "try again later") pauses this long, doubling to the max
    site_backoff: float = 30.0
    site_backoff_max: float = 600.0
    #: shared SiteThrottle actors for the long tail of sites (sites are hashed over them by
    #: rendezvous hashing, cluster/core/throttle_pool.py). "auto": one per live node that can
    #: host one (at most 16), each on a node of its own, chosen at every deploy and never fewer
    #: than are running, so a deploy after nodes join adds throttles. On one node that is one
    #: (on 2 cores, 1 instead of 2 gave 2,280-2,623 delivered/s against 2,179-2,204, 0.48-0.56
    #: CPU s/1k against 0.59). A number fixes the count.
    throttle_actors: int | str = "auto"
    #: a site unused this long whose throttle book holds nothing live (no lease, nothing in
    #: flight, no backoff, no rate backlog) is dropped from its throttle and rebuilt on demand
    throttle_site_idle: float = 300.0
    #: books one throttle keeps at most (then the least recently used without leases or mail
    #: in flight go early); ~1 KiB each
    throttle_max_sites: int = 200_000
    #: networks MX hosts and address literals may resolve to although they are loopback,
    #: private, link-local, CGNAT, ... or the cluster's own addresses (cluster/core/mxguard.py;
    #: tests and the demo allow 127.0.0.0/8). Empty: only public addresses are used.
    allow_networks: tuple[str, ...] = ()
    #: CA certificates (PEM file) that verify MX hosts of sites with tls = "required"; ""
    #: = the system's CAs. [[site]] tls_ca_file overrides it per site.
    tls_ca_file: str = ""
    #: an MX host whose STARTTLS handshake failed is sent to in plaintext (opportunistic TLS)
    #: without trying TLS again for this long
    tls_broken_ttl: float = 3600.0
    #: MTA-STS (RFC 8461): recipient domains' published policies are fetched and honoured
    #: for sites whose TLS is not set per site (cluster/core/mta_sts.py; README "MTA-STS")
    mta_sts: bool = True
    #: the port policy hosts are fetched from (443; tests run their HTTPS server elsewhere)
    mta_sts_port: int = 443
    #: DANE (RFC 7672): MX hosts with DNSSEC-secure TLSA records get mandatory TLS and a
    #: certificate matching them, for sites whose TLS is not set per site; needs [dns]
    #: nameservers to be a validating resolver on this host or loopback (cluster/core/dane.py;
    #: README "DANE"). Off by default: with a resolver that does not validate it does nothing,
    #: and it costs DNS queries per MX host
    dane: bool = False
    #: a site with at least this many messages ready at a shard in one dispatch round is hot:
    #: its mail spreads over ``hot_site_relays`` relays (on distinct nodes first; rendezvous
    #: hashing, cluster/core/relay_choice.py). 0 = only sites with ``relays`` set spread.
    hot_site_ready: int = 500
    #: relays a hot site spreads over (at most its max_connections; its limits hold
    #: cluster-wide: every relay leases its connections from the site's one throttle)
    hot_site_relays: int = 3
    #: recipients of one message at one site sent in one transaction (one RCPT each), at
    #: most this many; 1 = a transaction per recipient. Not with VERP return paths or
    #: per-recipient List-Unsubscribe (the envelope or body differs per recipient)
    max_rcpts_per_transaction: int = 50
    #: SMTP connections one relay process (one egress source on one node) has open at once,
    #: all sites together. A site that finds the relay at this cap waits for a connection to
    #: close (it is neither deferred nor failed): a long tail of thousands of domains must not
    #: open more sessions than the relay's file descriptors, its egress IP's standing or the
    #: next hop allow (smtp-sink's 1,024 were exceeded with DNS concurrency 256)
    max_connections: int = 1000

    @property
    def fixed_throttles(self) -> int | None:
        """The configured number of shared throttles, None with "auto"."""
        return None if self.throttle_actors == "auto" else int(self.throttle_actors)


@dataclass(frozen=True)
class EgressSource:
    name: str = "default"
    #: local address outgoing connections bind to ("" = let the kernel choose)
    bind_address: str = ""
    #: name sent in EHLO (RFC 5321 §4.1.1.1); should resolve back to bind_address in production
    ehlo_name: str = "localhost"
    #: the nodes that own bind_address: those labelled ``egress = <node_label>`` (or with an
    #: ``egress:<node_label>`` resource). Relays for this source run only there. "" = every
    #: node (a source without an address of its own, or one every node has)
    node_label: str = ""
    #: the warm-up plan this source follows (a ``[warmup.NAME]``; "" = warm, no cap)
    warmup: str = ""


@dataclass(frozen=True)
class ClusterConfig:
    #: Ray namespace the actors live in
    namespace: str = "raymta"
    #: copies of each queue shard (the leader's own included); a batch is acknowledged once it
    #: is fsync'd on a majority of them. 1 = no replication (a single disk).
    replicas: int = 3


@dataclass(frozen=True)
class ReplicationConfig:
    #: a submission not durable on a quorum within this long is answered with an error (it may
    #: still commit later: retry with the same ids or idempotency key)
    ack_timeout: float = 5.0
    #: a starting leader retries claiming its shard (copies may still be starting) this long
    #: before it reports "no quorum" to callers; it keeps retrying after that
    claim_timeout: float = 60.0
    #: recent frames kept in the leader's memory for replicas that fall behind (older ones are
    #: read back from its disk)
    tail_bytes: int = 64 * 1024 * 1024
    #: largest append sent to a replica in one call
    batch_bytes: int = 8 * 1024 * 1024
    #: how appends reach the replicas: "stream" (one authenticated TCP connection per replica,
    #: cluster/adapters/stream.py; falls back to Ray calls while it cannot connect) or "ray"
    #: (every append an actor call: ~20 % more leader CPU at load, measured)
    transport: str = "stream"
    #: how often a shard leader checks that its copies are on distinct nodes; when two share a
    #: node (Ray restarted one next to a sibling after a node died) and a node without a copy
    #: is alive, one replica moves there and catches up (0 = never)
    rebalance_interval: float = 30.0


@dataclass(frozen=True)
class BackupConfig:
    #: where each shard leader writes a snapshot every ``interval`` ("" = <spool>/backups);
    #: on several nodes this should be shared storage
    directory: str = ""
    #: 0 turns periodic backups off (``raymta backup`` still works)
    interval: float = 900.0
    #: backups kept per shard (older ones are deleted)
    keep: int = 8


@dataclass(frozen=True)
class IngressConfig:
    """SMTP submission listeners (docs/ingress.md). ``enabled`` is set by an ``[ingress]``
    section; ``raymta up`` then starts a listener actor on every node labelled
    ``role=ingress`` or with an ``ingress`` resource (the head node when none is)."""

    enabled: bool = False
    #: name in the greeting, EHLO reply and Received fields
    hostname: str = "localhost"
    #: "host:port" listeners offering STARTTLS (submission, RFC 6409: port 587)
    submission: tuple[str, ...] = ()
    #: "host:port" listeners speaking TLS from the first byte (submissions, RFC 8314: 465)
    submissions: tuple[str, ...] = ()
    #: "host:port" listeners of the HTTP API (HTTPS when cert_file is set; plain HTTP only on
    #: loopback)
    http: tuple[str, ...] = ()
    #: API keys of the HTTP API (stored as sha256 hashes)
    api_keys: tuple[ApiKey, ...] = ()
    #: largest HTTP request body (413 past it)
    http_max_body: int = 20_000_000
    #: PEM certificate chain and key (re-read by a reload)
    cert_file: str = ""
    key_file: str = ""
    #: require AUTH before MAIL (AUTH is offered only over TLS). false is allowed only when
    #: every listener is on a loopback address
    auth: bool = True
    users: tuple[SubmissionUser, ...] = ()
    #: a TOML file of ``[[user]]`` tables like ``[[ingress.user]]`` (re-read by a reload)
    users_file: str = ""
    max_recipients: int = 100
    #: SIZE (RFC 1870); 0 = queue.max_message_size
    max_message_size: int = 0
    max_connections_per_ip: int = 50
    max_connections_per_user: int = 50
    #: messages per IP / per user (a user's own ``rate`` wins); None = unlimited
    message_rate_per_ip: RateSpec | None = None
    message_rate_per_user: RateSpec | None = None
    #: more Received fields than this means a mail loop (RFC 5321 §6.3; Postfix: 50)
    max_hops: int = 50
    #: DATA handlers of concurrent sessions arriving within this long share one submit call
    #: (one commit on a quorum)
    batch_window: float = 0.002
    batch_max: int = 1000
    #: submit calls in flight at once from one listener
    batch_concurrency: int = 4
    #: an idle SMTP session is closed after this long (RFC 5321 §4.5.3.2.7: 5 minutes)
    command_timeout: float = 300.0
    #: listeners ("host:port" as in ``submission``, ``submissions`` or ``http``) that require a
    #: PROXY protocol (v1 or v2) header from a load balancer before the session (before the
    #: TLS handshake on an implicit-TLS or HTTPS listener); ``proxy_protocol = true`` in the
    #: file means every STARTTLS listener
    proxy_protocol: tuple[str, ...] = ()
    #: the load balancers' source networks ("10.0.0.0/24"): a connection to a PROXY listener
    #: from anywhere else is refused; an HTTP request's ``X-Forwarded-For`` is believed only
    #: from these
    proxy_networks: tuple[str, ...] = ()
    #: a connection whose PROXY header has not arrived within this long is closed
    proxy_timeout: float = 10.0


@dataclass(frozen=True)
class SuppressionConfig:
    #: a suppressed recipient at submission: "refuse" (the message goes to its other
    #: recipients; refused with the reason and date if none is left) or "drop" (accepted, then
    #: finished at once with a Suppressed event)
    on_submit: str = "refuse"
    #: a permanent failure meaning the address does not exist (categories invalid-recipient,
    #: inactive-mailbox, bad-domain) suppresses it for this long; complaints and unsubscribes
    #: never expire
    hard_bounce_ttl: float = 30 * 86400.0
    #: suppress on hard bounces at all (complaints always suppress)
    from_bounces: bool = True


@dataclass(frozen=True)
class DsnConfig:
    """Delivery status notifications to envelope senders (cluster/core/dsn_build.py): a bounce
    or expiry of a message that asked for one queues an RFC 3464 report to its sender (never
    to ``<>``, never about a report)."""

    #: messages submitted over the SMTP ingress ask for one
    smtp: bool = True
    #: messages submitted through the Python client or the HTTP API ask for one unless the
    #: submission's ``dsn`` option says otherwise
    api: bool = False
    #: the Reporting-MTA and the MAILER-DAEMON@ domain ("": ingress.hostname)
    hostname: str = ""
    #: recipients of one message that fail within this many seconds of the first share one
    #: DSN (it goes at once when no recipient of the message is left in the queue); 0: only
    #: those that fail together (cluster/core/dsn_due.py)
    coalesce: float = 10.0


@dataclass(frozen=True)
class ClassificationConfig:
    #: the TOML rules file given (None: the shipped rules only)
    rules_file: str | None = None
    #: the rules in force: the file's rules before the shipped ones, or instead of them when the
    #: file says ``replace = true`` (None: the shipped rules)
    rules: RuleSet | None = field(default=None, compare=False, repr=False)


@functools.lru_cache(maxsize=1)
def shipped_shaping_rules() -> ShapingRules:
    """The shaping rules shipped with raymta (``cluster/shaping_rules.toml``), compiled once."""
    text = (resources.files("cluster") / "shaping_rules.toml").read_text("utf-8")
    return shaping_rules_from_toml(tomllib.loads(text), "shaping_rules.toml")


@dataclass(frozen=True)
class ShapingConfig:
    """Adaptive shaping (``cluster/core/shaping.py``, README "Shaping rules")."""

    #: false: no rule ever fires (replies still back a site off as before)
    enabled: bool = True
    #: the operator's TOML rules file (None: the shipped rules only)
    rules_file: str | None = None
    #: keys (sites, site#source) the throttles keep trigger counters and actions for, each
    max_keys: int = 10_000
    #: the rules in force: the file's before the shipped ones (or instead, ``replace = true``)
    rules: ShapingRules = field(default_factory=shipped_shaping_rules, compare=False,
                                repr=False)


@dataclass(frozen=True)
class DkimKeyConfig:
    """One ``[[dkim.key]]``: a private key that signs mail From ``domain`` (or a subdomain of
    it, with ``dkim.parent_domains``) as ``d=domain; s=selector``."""

    domain: str
    selector: str
    #: "rsa" (rsa-sha256) or "ed25519" (ed25519-sha256)
    algorithm: str = "rsa"
    #: PEM private key, unencrypted (readable by the user raymta runs as only: chmod 600)
    key_file: str = ""
    #: header fields to sign (each oversigned once); None = dkim.headers
    headers: tuple[str, ...] | None = None
    #: seconds from t= to x= (signature expiry); None = dkim.expire_after
    expire_after: float | None = None
    #: i= (the AUID, RFC 6376 §3.5): "@domain" by default
    identity: str | None = None
    #: found in dkim.key_directory (re-scanned by relays) rather than listed
    from_directory: bool = False


@dataclass(frozen=True)
class DkimConfig:
    """DKIM signing (docs/dkim.md). Keys are listed as ``[[dkim.key]]`` and/or found in
    ``key_directory`` as ``<domain>/<selector>.<rsa|ed25519>.pem``; a domain with several
    keys gets one signature per key (RSA + Ed25519 = a dual signature). Relays re-read key
    files whose mtime changed every ``reload_interval`` (and on ``raymta dkim reload``)."""

    keys: tuple[DkimKeyConfig, ...] = ()
    key_directory: str = ""
    #: "if-key": sign when a key exists; "required": refuse submissions From a domain without
    #: one. Per domain in ``policy`` (``[dkim.policy] "example.com" = "required"``).
    sign: str = "if-key"
    policy: tuple[tuple[str, str], ...] = ()
    #: a key for example.com also signs mail From news.example.com (DMARC relaxed alignment)
    parent_domains: bool = True
    headers: tuple[str, ...] = DEFAULT_SIGN_HEADERS
    #: x= = t= + this many seconds (0: no x=)
    expire_after: float = 0.0
    reload_interval: float = 5.0

    @property
    def default_policy(self) -> str:
        return self.sign

    @property
    def policies(self) -> dict[str, str]:
        """Per-domain policies (a policy for example.com covers its subdomains too)."""
        return dict(self.policy)


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: Ray metrics in every actor and the head's Prometheus endpoint
    (actors/metrics_exporter.py; README "Monitoring")."""

    #: false: no metric is updated anywhere and no endpoint is served (measured cost of
    #: true: README "Monitoring")
    enabled: bool = True
    #: the cluster-wide Prometheus endpoint on the head node (0: a port the OS picks, shown by
    #: the exporter's ``status()``)
    host: str = "127.0.0.1"
    port: int = 9464
    #: a host other than loopback requires HTTP basic auth: both set (password from a file
    #: readable by raymta only is better: ``password_file``)
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""
    #: how often the exporter gathers the shards', relays' and throttles' figures
    interval: float = 5.0
    #: sites with a label of their own (the rest are "other"): bounds label cardinality
    top_sites: int = 20


@dataclass(frozen=True)
class BounceConfig:
    """``[bounce]``: VERP return paths at send time and the bounce/FBL listener (README,
    "Bounce listener"). ``domain`` empty = off: messages keep their submitted envelope sender
    and no listener runs. The secrets sit in ``keys`` (a :class:`VerpKeys`, whose repr leaves
    them out); nothing here ever names a secret in a message."""

    #: the return-path domain (its MX is the bounce listener); "" = VERP and listener off
    domain: str = ""
    prefix: str = "b"
    #: the accepted VERP keys; the first listed signs (None when off)
    keys: VerpKeys | None = None
    #: where each listener binds (on its node)
    listen_host: str = "127.0.0.1"
    listen_port: int = 2526
    #: feedback-loop (ARF) reports are also accepted for this address ("" = none)
    fbl_address: str = ""
    #: largest report accepted (SIZE, RFC 1870); bigger ones are refused with 552
    max_message_size: int = 2_000_000
    #: how long a report waits for its shard before the sender is told 451 (try later)
    report_timeout: float = 30.0
    #: the one-click unsubscribe HTTP endpoint (POST /u/TOKEN, RFC 8058) of each listener:
    #: 0 = none (a reverse proxy terminates HTTPS in front of it)
    http_port: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.domain) and self.keys is not None


@dataclass(frozen=True)
class UnsubscribeConfig:
    """One ``[[unsubscribe]]``: mail from ``domain`` (or a sub-domain) gets List-Unsubscribe
    (``url_base`` + token, and/or the mailto at the bounce domain) and List-Unsubscribe-Post;
    the token is signed with ``keys`` (first signs, all verify; never shown)."""

    domain: str
    url_base: str = ""
    mailto: bool = True
    keys: VerpKeys | None = None


@dataclass(frozen=True)
class Config:
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    egress: tuple[EgressSource, ...] = (EgressSource(),)
    #: [[egress_pool]]: sources with weights per sender domain (cluster/core/relay_choice.py)
    egress_pools: tuple[EgressPool, ...] = ()
    #: [warmup.NAME]: warm-up plans by name (cluster/core/warmup.py)
    warmups: tuple[WarmupSchedule, ...] = ()
    site_defaults: SiteLimits = field(default_factory=SiteLimits)
    sites: tuple[SiteOverride, ...] = ()
    routes: tuple[StaticRoute, ...] = ()
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    bounce: BounceConfig = field(default_factory=BounceConfig)
    unsubscribe: tuple[UnsubscribeConfig, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dsn: DsnConfig = field(default_factory=DsnConfig)
    webhooks: tuple[WebhookEndpoint, ...] = ()
    shaping: ShapingConfig = field(default_factory=ShapingConfig)

    @property
    def dsn_hostname(self) -> str:
        return self.dsn.hostname or self.ingress.hostname

    def with_spool(self, directory: str) -> "Config":
        return replace(self, spool=replace(self.spool, directory=directory))

    def warmup_plans(self) -> dict[str, WarmupSchedule]:
        """Egress source → the warm-up plan it follows (sources without one are warm)."""
        by_name = {s.name: s for s in self.warmups}
        return {e.name: by_name[e.warmup] for e in self.egress if e.warmup in by_name}

    def route_for(self, domain: str) -> StaticRoute | None:
        for r in self.routes:
            if r.domain == domain:
                return r
        return None


# ---------------------------------------------------------------------------------------------
# parsing


def _check_keys(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for k in section:
        if k not in allowed:
            raise ConfigError(f"{where}.{k}" if where else k,
                              f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _table(raw: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    v = raw.get(key, {})
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where}{key}", f"expected a table, got {type(v).__name__}")
    return v


def _dur(v: Any, key: str, *, positive: bool = True) -> float:
    try:
        d = parse_duration(v)
    except (ValueError, TypeError) as e:
        raise ConfigError(key, str(e)) from None
    if positive and d <= 0:
        raise ConfigError(key, f"must be greater than zero, got {v!r}")
    return d


def _int(v: Any, key: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"expected an integer, got {v!r}")
    if v < minimum or (maximum is not None and v > maximum):
        rng = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ConfigError(key, f"must be {rng}, got {v}")
    return v


def _float(v: Any, key: str, *, minimum: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(key, f"expected a number, got {v!r}")
    if v < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {v}")
    return float(v)


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, f"expected true or false, got {v!r}")
    return v


def _str(v: Any, key: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"expected a string, got {v!r}")
    return v


def _size(v: Any, key: str) -> int:
    try:
        return parse_size(v)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


def _event_retain_bytes(raw: Mapping[str, Any], d: SpoolConfig) -> int:
    key = "spool.event_retain_bytes"
    v = _size(raw.get("event_retain_bytes", d.event_retain_bytes), key)
    file_bytes = _size(raw.get("event_file_bytes", d.event_file_bytes), "spool.event_file_bytes")
    if 0 < v < file_bytes:
        # a cap below one file could never hold one: retention would be on in name only
        raise ConfigError(key, f"must be 0 (no retention for webhook endpoints) or at least "
                               f"spool.event_file_bytes ({file_bytes}), got {v}")
    return v


def _parse_spool(raw: Mapping[str, Any]) -> SpoolConfig:
    w = "spool"
    _check_keys(raw, {f.name for f in fields(SpoolConfig)}, w)
    d = SpoolConfig()
    return SpoolConfig(
        directory=_str(raw.get("directory", d.directory), f"{w}.directory"),
        segment_bytes=_size(raw.get("segment_bytes", d.segment_bytes), f"{w}.segment_bytes"),
        compact_bytes=_size(raw.get("compact_bytes", d.compact_bytes), f"{w}.compact_bytes"),
        event_file_bytes=_size(raw.get("event_file_bytes", d.event_file_bytes),
                               f"{w}.event_file_bytes"),
        event_files_kept=_int(raw.get("event_files_kept", d.event_files_kept),
                              f"{w}.event_files_kept", minimum=1),
        event_retain_bytes=_event_retain_bytes(raw, d),
        snapshot_events_bytes=_size(raw.get("snapshot_events_bytes", d.snapshot_events_bytes),
                                    f"{w}.snapshot_events_bytes"),
        snapshot_held_events_bytes=_size(
            raw.get("snapshot_held_events_bytes", d.snapshot_held_events_bytes),
            f"{w}.snapshot_held_events_bytes"),
        fsync=_bool(raw.get("fsync", d.fsync), f"{w}.fsync"),
        per_node=_bool(raw.get("per_node", d.per_node), f"{w}.per_node"),
    )


def _parse_replication(raw: Mapping[str, Any]) -> ReplicationConfig:
    w = "replication"
    _check_keys(raw, {f.name for f in fields(ReplicationConfig)}, w)
    d = ReplicationConfig()
    return ReplicationConfig(
        ack_timeout=_dur(raw.get("ack_timeout", d.ack_timeout), f"{w}.ack_timeout"),
        claim_timeout=_dur(raw.get("claim_timeout", d.claim_timeout), f"{w}.claim_timeout"),
        tail_bytes=_size(raw.get("tail_bytes", d.tail_bytes), f"{w}.tail_bytes"),
        batch_bytes=_size(raw.get("batch_bytes", d.batch_bytes), f"{w}.batch_bytes"),
        transport=_transport(raw.get("transport", d.transport), f"{w}.transport"),
        rebalance_interval=_dur(raw.get("rebalance_interval", d.rebalance_interval),
                                f"{w}.rebalance_interval"),
    )


def _transport(v: Any, where: str) -> str:
    t = _str(v, where)
    if t not in ("stream", "ray"):
        raise ConfigError(where, f"expected stream or ray, got {t!r}")
    return t


def _parse_backup(raw: Mapping[str, Any]) -> BackupConfig:
    w = "backup"
    _check_keys(raw, {f.name for f in fields(BackupConfig)}, w)
    d = BackupConfig()
    interval = raw.get("interval", d.interval)
    return BackupConfig(
        directory=_str(raw.get("directory", d.directory), f"{w}.directory"),
        interval=0.0 if interval in (0, "0", "off") else _dur(interval, f"{w}.interval"),
        keep=_int(raw.get("keep", d.keep), f"{w}.keep", minimum=1),
    )


_RETRY_KEYS = {"retry_initial": "initial", "retry_factor": "factor", "retry_max_delay": "max_delay",
               "retry_jitter": "jitter", "max_age": "max_age", "dns_retry_initial": "dns_initial"}


def _parse_queue(raw: Mapping[str, Any]) -> QueueConfig:
    w = "queue"
    scalar = {f.name for f in fields(QueueConfig)} - {"retry"}
    _check_keys(raw, scalar | set(_RETRY_KEYS), w)
    d = QueueConfig()
    r = d.retry
    retry_kwargs: dict[str, float] = {}
    for key, attr in _RETRY_KEYS.items():
        if key in raw:
            if attr in ("factor", "jitter"):
                retry_kwargs[attr] = _float(raw[key], f"{w}.{key}")
            else:
                retry_kwargs[attr] = _dur(raw[key], f"{w}.{key}")
    try:
        retry = replace(r, **retry_kwargs)
    except ValueError as e:
        raise ConfigError(f"{w}.retry_*", str(e)) from None
    return QueueConfig(
        retry=retry,
        max_message_size=_size(raw.get("max_message_size", d.max_message_size),
                               f"{w}.max_message_size"),
        max_messages=_int(raw.get("max_messages", d.max_messages), f"{w}.max_messages", minimum=1),
        max_bytes=_size(raw.get("max_bytes", d.max_bytes), f"{w}.max_bytes"),
        dispatch_interval=_dur(raw.get("dispatch_interval", d.dispatch_interval),
                               f"{w}.dispatch_interval"),
        dispatch_batch=_int(raw.get("dispatch_batch", d.dispatch_batch), f"{w}.dispatch_batch",
                            minimum=1),
        inflight_timeout=_dur(raw.get("inflight_timeout", d.inflight_timeout),
                              f"{w}.inflight_timeout"),
        status_cache=_int(raw.get("status_cache", d.status_cache), f"{w}.status_cache"),
        idempotency_window=_dur(raw.get("idempotency_window", d.idempotency_window),
                                f"{w}.idempotency_window"),
        shards=_int(raw.get("shards", d.shards), f"{w}.shards", minimum=1, maximum=256),
    )


def _parse_dns(raw: Mapping[str, Any]) -> DnsConfig:
    w = "dns"
    _check_keys(raw, {f.name for f in fields(DnsConfig)}, w)
    d = DnsConfig()
    ns = raw.get("nameservers", list(d.nameservers))
    if isinstance(ns, str):
        ns = [ns]
    if not isinstance(ns, list):
        raise ConfigError(f"{w}.nameservers", f"expected a list of IP addresses, got {ns!r}")
    for i, a in enumerate(ns):
        try:
            ipaddress.ip_address(a)
        except (ValueError, TypeError):
            raise ConfigError(f"{w}.nameservers[{i}]", f"not an IP address: {a!r}") from None
    dc = DnsConfig(
        nameservers=tuple(ns),
        port=_int(raw.get("port", d.port), f"{w}.port", minimum=1, maximum=65535),
        timeout=_dur(raw.get("timeout", d.timeout), f"{w}.timeout"),
        min_ttl=_dur(raw.get("min_ttl", d.min_ttl), f"{w}.min_ttl", positive=False),
        max_ttl=_dur(raw.get("max_ttl", d.max_ttl), f"{w}.max_ttl"),
        max_concurrent=_int(raw.get("max_concurrent", d.max_concurrent),
                            f"{w}.max_concurrent", minimum=1, maximum=10_000),
        retry_initial=_dur(raw.get("retry_initial", d.retry_initial), f"{w}.retry_initial"),
        retry_max_delay=_dur(raw.get("retry_max_delay", d.retry_max_delay),
                             f"{w}.retry_max_delay"),
        retry_budget=_dur(raw.get("retry_budget", d.retry_budget), f"{w}.retry_budget",
                          positive=False),
        refresh_ahead=_dur(raw.get("refresh_ahead", d.refresh_ahead), f"{w}.refresh_ahead",
                           positive=False),
        servfail_ttl=_dur(raw.get("servfail_ttl", d.servfail_ttl), f"{w}.servfail_ttl"),
        ipv6=_bool(raw.get("ipv6", d.ipv6), f"{w}.ipv6"),
    )
    try:
        dc.policy()
    except ValueError as e:
        raise ConfigError(w, str(e)) from None
    return dc


def _parse_delivery(raw: Mapping[str, Any]) -> DeliveryConfig:
    w = "delivery"
    _check_keys(raw, {f.name for f in fields(DeliveryConfig)}, w)
    d = DeliveryConfig()
    kw: dict[str, Any] = {}
    for f in fields(DeliveryConfig):
        if f.name not in raw:
            continue
        key = f"{w}.{f.name}"
        if f.name == "smtp_port":
            kw[f.name] = _int(raw[f.name], key, minimum=1, maximum=65535)
        elif f.name == "throttle_actors":
            v = raw[f.name]
            if isinstance(v, str):
                if v != "auto":
                    raise ConfigError(key, f'expected "auto" or a number of actors, got {v!r}')
                kw[f.name] = v
            else:
                kw[f.name] = _int(v, key, minimum=1, maximum=64)
        elif f.name == "throttle_max_sites":
            kw[f.name] = _int(raw[f.name], key, minimum=100)
        elif f.name == "hot_site_ready":
            kw[f.name] = _int(raw[f.name], key, minimum=0)
        elif f.name == "hot_site_relays":
            kw[f.name] = _int(raw[f.name], key, minimum=1, maximum=256)
        elif f.name == "max_connections":
            kw[f.name] = _int(raw[f.name], key, minimum=1, maximum=100_000)
        elif f.name == "max_rcpts_per_transaction":
            # RFC 5321 §4.5.3.1.8: a server must take at least 100 recipients
            kw[f.name] = _int(raw[f.name], key, minimum=1, maximum=1000)
        elif f.name == "allow_networks":
            kw[f.name] = _networks(raw[f.name], key)
        elif f.name == "tls_ca_file":
            kw[f.name] = _ca_file(raw[f.name], key)
        elif f.name in ("mta_sts", "dane"):
            kw[f.name] = _bool(raw[f.name], key)
        elif f.name == "mta_sts_port":
            kw[f.name] = _int(raw[f.name], key, minimum=1, maximum=65535)
        else:
            kw[f.name] = _dur(raw[f.name], key)
    out = replace(d, **kw)
    if out.site_backoff_max < out.site_backoff:
        raise ConfigError(f"{w}.site_backoff_max", "must be >= delivery.site_backoff")
    return out


def _networks(v: Any, key: str) -> tuple[str, ...]:
    """A list of networks ("127.0.0.0/8", "::1"), kept as canonical text."""
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise ConfigError(key, f"expected a list of networks such as '127.0.0.0/8', got {v!r}")
    try:
        return tuple(str(n) for n in parse_networks([_str(x, f"{key}[{i}]")
                                                     for i, x in enumerate(v)], key))
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


def _ca_file(v: Any, key: str) -> str:
    path = _str(v, key)
    if path and not os.path.isfile(path):
        raise ConfigError(key, f"CA file not found: {path!r}")
    return path


def _parse_egress(raw: Any) -> tuple[EgressSource, ...]:
    if raw is None:
        return (EgressSource(),)
    if not isinstance(raw, list) or not raw:
        raise ConfigError("egress", "expected a non-empty array of tables ([[egress]])")
    out = []
    seen: set[str] = set()
    for i, e in enumerate(raw):
        w = f"egress[{i}]"
        if not isinstance(e, Mapping):
            raise ConfigError(w, "expected a table")
        _check_keys(e, {"name", "bind_address", "ehlo_name", "node_label", "warmup"}, w)
        name = _str(e.get("name", "default"), f"{w}.name")
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"{w}.name", f"use letters, digits, '-', '_' or '.', got {name!r}")
        if name in seen:
            raise ConfigError(f"{w}.name", f"duplicate egress source {name!r}")
        seen.add(name)
        bind = _str(e.get("bind_address", ""), f"{w}.bind_address")
        if bind:
            try:
                ipaddress.ip_address(bind)
            except ValueError:
                raise ConfigError(f"{w}.bind_address", f"not an IP address: {bind!r}") from None
        ehlo = _str(e.get("ehlo_name", "localhost"), f"{w}.ehlo_name")
        if not ehlo or any(c.isspace() for c in ehlo):
            raise ConfigError(f"{w}.ehlo_name", f"must be a host name, got {ehlo!r}")
        label = _str(e.get("node_label", ""), f"{w}.node_label")
        if label and not all(c.isalnum() or c in "-_." for c in label):
            raise ConfigError(f"{w}.node_label",
                              f"use letters, digits, '-', '_' or '.', got {label!r}")
        warmup = _str(e.get("warmup", ""), f"{w}.warmup")
        out.append(EgressSource(name=name, bind_address=bind, ehlo_name=ehlo, node_label=label,
                                warmup=warmup))
    return tuple(out)


def _parse_egress_pools(raw: Any, egress: tuple[EgressSource, ...]
                        ) -> tuple[EgressPool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("egress_pool", "expected an array of tables ([[egress_pool]])")
    known = {e.name for e in egress}
    out: list[EgressPool] = []
    owner: dict[str, str] = {}
    for i, p in enumerate(raw):
        w = f"egress_pool[{i}]"
        if not isinstance(p, Mapping):
            raise ConfigError(w, "expected a table")
        _check_keys(p, {"name", "sources", "sender_domains"}, w)
        name = _str(p.get("name", ""), f"{w}.name")
        if not name or any(x.name == name for x in out):
            raise ConfigError(f"{w}.name", f"needs a name of its own, got {name!r}")
        srcs = p.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise ConfigError(f"{w}.sources", 'expected a list such as ["ip1:3", "ip2"]')
        weights: list[tuple[str, float]] = []
        for j, t in enumerate(srcs):
            try:
                src, weight = EgressPool.parse_source(_str(t, f"{w}.sources[{j}]"))
            except ValueError as e:
                raise ConfigError(f"{w}.sources[{j}]", str(e)) from None
            if src not in known:
                raise ConfigError(f"{w}.sources[{j}]", f"unknown egress source {src!r}")
            if any(s == src for s, _ in weights):
                raise ConfigError(f"{w}.sources[{j}]", f"source {src!r} listed twice")
            weights.append((src, weight))
        doms = p.get("sender_domains", [])
        if not isinstance(doms, list):
            raise ConfigError(f"{w}.sender_domains", "expected a list of domains")
        domains = []
        for j, d in enumerate(doms):
            d = _str(d, f"{w}.sender_domains[{j}]").lower().rstrip(".")
            if not d or "@" in d or any(c.isspace() for c in d):
                raise ConfigError(f"{w}.sender_domains[{j}]", f"not a domain: {d!r}")
            if d in owner:
                raise ConfigError(f"{w}.sender_domains[{j}]",
                                  f"{d!r} is already in egress pool {owner[d]!r}")
            owner[d] = name
            domains.append(d)
        out.append(EgressPool(name, tuple(weights), tuple(domains)))
    return tuple(out)


_LIMIT_KEYS = {"rate", "max_connections", "deliveries_per_connection", "tls", "dedicated",
               "sources", "relays"}
#: [[site]] keys that are not limits
_SITE_KEYS = {"domain", "mx_suffix", "tls_ca_file"}


def _parse_limits(raw: Mapping[str, Any], base: SiteLimits, w: str,
                  egress: tuple[EgressSource, ...]) -> SiteLimits:
    kw: dict[str, Any] = {}
    if "rate" in raw:
        rates = raw["rate"]
        if isinstance(rates, str):
            rates = [rates]
        if not isinstance(rates, list) or not rates:
            raise ConfigError(f"{w}.rate", "expected a rate such as '100/s' or a list of them")
        parsed = []
        for i, r in enumerate(rates):
            try:
                parsed.append(RateSpec.parse(_str(r, f"{w}.rate[{i}]")))
            except ValueError as e:
                raise ConfigError(f"{w}.rate[{i}]" if len(rates) > 1 else f"{w}.rate",
                                  str(e)) from None
        kw["rates"] = tuple(parsed)
    if "max_connections" in raw:
        kw["max_connections"] = _int(raw["max_connections"], f"{w}.max_connections", minimum=1,
                                     maximum=10_000)
    if "deliveries_per_connection" in raw:
        kw["deliveries_per_connection"] = _int(raw["deliveries_per_connection"],
                                               f"{w}.deliveries_per_connection", minimum=1)
    if "tls" in raw:
        tls = _str(raw["tls"], f"{w}.tls")
        if tls not in ("opportunistic", "required", "disabled"):
            raise ConfigError(f"{w}.tls", f"expected opportunistic, required or disabled, got {tls!r}")
        kw["tls"] = tls
    if "dedicated" in raw:
        kw["dedicated"] = _bool(raw["dedicated"], f"{w}.dedicated")
    if "relays" in raw:
        kw["relays"] = _int(raw["relays"], f"{w}.relays", minimum=0, maximum=256)
    if "sources" in raw:
        src = raw["sources"]
        if not isinstance(src, list) or not all(isinstance(s, str) for s in src):
            raise ConfigError(f"{w}.sources", "expected a list of egress source names")
        known = {e.name for e in egress}
        for s in src:
            if s not in known:
                raise ConfigError(f"{w}.sources", f"unknown egress source {s!r}")
        kw["sources"] = tuple(src)
    return replace(base, **kw)


def _parse_sites(raw: Any, defaults: SiteLimits,
                 egress: tuple[EgressSource, ...]) -> tuple[SiteOverride, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("site", "expected an array of tables ([[site]])")
    out = []
    for i, s in enumerate(raw):
        w = f"site[{i}]"
        if not isinstance(s, Mapping):
            raise ConfigError(w, "expected a table")
        _check_keys(s, _LIMIT_KEYS | _SITE_KEYS, w)
        domain = _str(s.get("domain", ""), f"{w}.domain").lower().rstrip(".")
        suffix = _str(s.get("mx_suffix", ""), f"{w}.mx_suffix").lower().rstrip(".")
        if bool(domain) == bool(suffix):
            raise ConfigError(w, "give exactly one of 'domain' or 'mx_suffix'")
        out.append(SiteOverride(limits=_parse_limits(s, defaults, w, egress), domain=domain,
                                mx_suffix=suffix,
                                tls_ca_file=_ca_file(s.get("tls_ca_file", ""),
                                                     f"{w}.tls_ca_file"),
                                tls_set="tls" in s))
    return tuple(out)


def _parse_routes(raw: Any) -> tuple[StaticRoute, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError("routes", "expected a table of domain = \"host:port\"")
    out = []
    for domain, target in raw.items():
        w = f"routes.{domain}"
        t = _str(target, w)
        host, sep, port_s = t.rpartition(":")
        if not sep or not host or not port_s.isdigit():
            raise ConfigError(w, f"expected 'host:port', got {t!r}")
        port = int(port_s)
        if not 1 <= port <= 65535:
            raise ConfigError(w, f"port out of range in {t!r}")
        out.append(StaticRoute(domain=domain.lower().rstrip("."), host=host.strip("[]"), port=port))
    return tuple(out)


def _parse_cluster(raw: Mapping[str, Any]) -> ClusterConfig:
    w = "cluster"
    _check_keys(raw, {f.name for f in fields(ClusterConfig)}, w)
    d = ClusterConfig()
    replicas = _int(raw.get("replicas", d.replicas), f"{w}.replicas", minimum=1, maximum=7)
    return ClusterConfig(namespace=_str(raw.get("namespace", d.namespace), f"{w}.namespace"),
                         replicas=replicas)


def _listeners(v: Any, key: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise ConfigError(key, f"expected a list of 'host:port', got {v!r}")
    out = []
    for i, item in enumerate(v):
        k = f"{key}[{i}]"
        host, sep, port = _str(item, k).rpartition(":")
        host = host.strip("[]")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(k, f"expected 'host:port', got {item!r}")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(k, f"the host must be an IP address, got {host!r}") from None
        out.append(item)
    return tuple(out)


def is_loopback(hostport: str) -> bool:
    host = hostport.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _rate_or_none(v: Any, key: str) -> RateSpec | None:
    if v in ("", None, "unlimited"):
        return None
    try:
        return RateSpec.parse(_str(v, key))
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


_USER_KEYS = {"name", "password_hash", "domains", "rate", "max_connections"}


def _parse_users(raw: Any, where: str) -> tuple[SubmissionUser, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(where, "expected an array of tables")
    out: list[SubmissionUser] = []
    seen: set[str] = set()
    for i, u in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(u, Mapping):
            raise ConfigError(w, "expected a table")
        _check_keys(u, _USER_KEYS, w)
        for req in ("name", "password_hash", "domains"):
            if req not in u:
                raise ConfigError(f"{w}.{req}", "missing")
        name = _str(u["name"], f"{w}.name")
        if name in seen:
            raise ConfigError(f"{w}.name", f"user {name!r} defined twice")
        seen.add(name)
        if not isinstance(u["password_hash"], str):
            # never echo what was there: it may be a password typed in the wrong place
            raise ConfigError(f"{w}.password_hash", "expected a string")
        doms = u["domains"]
        if isinstance(doms, str):
            doms = [doms]
        if not isinstance(doms, list) or not all(isinstance(d, str) for d in doms):
            raise ConfigError(f"{w}.domains", "expected a list of domain names")
        mc = u.get("max_connections")
        try:
            out.append(SubmissionUser(
                name=name, password_hash=u["password_hash"], domains=tuple(doms),
                rate=_rate_or_none(u.get("rate"), f"{w}.rate"),
                max_connections=None if mc is None else _int(mc, f"{w}.max_connections",
                                                              minimum=1)))
        except ConfigError:
            raise
        except PasswordHashError as e:
            raise ConfigError(f"{w}.password_hash", str(e)) from None
        except ValueError as e:
            field_name, _, problem = str(e).partition(": ")
            raise ConfigError(f"{w}.{field_name}", problem or str(e)) from None
    return tuple(out)


def _parse_api_keys(raw: Any, where: str) -> tuple[ApiKey, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(where, "expected an array of tables")
    out: list[ApiKey] = []
    for i, k in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(k, Mapping):
            raise ConfigError(w, "expected a table")
        _check_keys(k, {"name", "key_hash", "domains", "events"}, w)
        for req in ("name", "key_hash", "domains"):
            if req not in k:
                raise ConfigError(f"{w}.{req}", "missing")
        doms = k["domains"]
        if isinstance(doms, str):
            doms = [doms]
        if not isinstance(doms, list) or not all(isinstance(d, str) for d in doms):
            raise ConfigError(f"{w}.domains", "expected a list of domain names")
        try:
            out.append(ApiKey(name=_str(k["name"], f"{w}.name"),
                              key_hash=k["key_hash"] if isinstance(k["key_hash"], str) else "",
                              domains=tuple(doms),
                              events=_bool(k.get("events", False), f"{w}.events")))
        except ConfigError:
            raise
        except ValueError as e:
            field_name, _, problem = str(e).partition(": ")
            raise ConfigError(f"{w}.{field_name}", problem or str(e)) from None
    if len({k.key_hash for k in out}) != len(out):
        raise ConfigError(where, "two api keys have the same key_hash")
    return tuple(out)


def load_users_file(path: str | os.PathLike[str]) -> tuple[SubmissionUser, ...]:
    """The ``[[user]]`` tables of a users file (same keys as ``[[ingress.user]]``)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"ingress.users_file ({p})", f"cannot read: {e.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"ingress.users_file ({p})", f"not a TOML file: {e}") from None
    _check_keys(raw, {"user"}, f"{p}")
    return _parse_users(raw.get("user", []), f"{p}: user")


def _parse_ingress(raw: Mapping[str, Any] | None, queue: QueueConfig) -> IngressConfig:
    if raw is None:
        return IngressConfig()
    w = "ingress"
    allowed = {f.name for f in fields(IngressConfig)} - {"enabled", "users", "api_keys"} | \
        {"user", "api_key"}
    _check_keys(raw, allowed, w)
    d = IngressConfig()
    kw: dict[str, Any] = {"enabled": True}
    kw["hostname"] = _str(raw.get("hostname", d.hostname), f"{w}.hostname")
    if not kw["hostname"] or any(c.isspace() or c in "<>()" for c in kw["hostname"]):
        raise ConfigError(f"{w}.hostname", f"must be a host name, got {kw['hostname']!r}")
    kw["submission"] = _listeners(raw.get("submission", []), f"{w}.submission")
    kw["submissions"] = _listeners(raw.get("submissions", []), f"{w}.submissions")
    kw["http"] = _listeners(raw.get("http", []), f"{w}.http")
    if not kw["submission"] and not kw["submissions"] and not kw["http"]:
        raise ConfigError(f"{w}.submission", "give at least one listener ('host:port') in "
                          "ingress.submission (STARTTLS), ingress.submissions (TLS) or "
                          "ingress.http")
    kw["api_keys"] = _parse_api_keys(raw.get("api_key"), f"{w}.api_key")
    if "http_max_body" in raw:
        kw["http_max_body"] = _size(raw["http_max_body"], f"{w}.http_max_body")
    kw["cert_file"] = _str(raw.get("cert_file", ""), f"{w}.cert_file")
    kw["key_file"] = _str(raw.get("key_file", ""), f"{w}.key_file")
    kw["auth"] = _bool(raw.get("auth", True), f"{w}.auth")
    kw["users"] = _parse_users(raw.get("user"), f"{w}.user")
    kw["users_file"] = _str(raw.get("users_file", ""), f"{w}.users_file")
    for k in ("max_recipients", "max_connections_per_ip", "max_connections_per_user",
              "max_hops", "batch_max", "batch_concurrency"):
        if k in raw:
            kw[k] = _int(raw[k], f"{w}.{k}", minimum=1)
    if kw.get("max_recipients", d.max_recipients) > 1000:
        raise ConfigError(f"{w}.max_recipients", "at most 1000 (a message's limit)")
    if "max_message_size" in raw:
        kw["max_message_size"] = _size(raw["max_message_size"], f"{w}.max_message_size")
        if kw["max_message_size"] > queue.max_message_size:
            raise ConfigError(f"{w}.max_message_size", "over queue.max_message_size "
                              f"({queue.max_message_size})")
    for k in ("message_rate_per_ip", "message_rate_per_user"):
        if k in raw:
            kw[k] = _rate_or_none(raw[k], f"{w}.{k}")
    for k in ("batch_window", "command_timeout", "proxy_timeout"):
        if k in raw:
            kw[k] = _dur(raw[k], f"{w}.{k}")
    kw.update(_parse_proxy(raw, kw, w))
    out = replace(d, **kw)
    if out.cert_file or out.key_file:
        if not (out.cert_file and out.key_file):
            raise ConfigError(f"{w}.key_file" if out.cert_file else f"{w}.cert_file",
                              "cert_file and key_file go together")
    if out.http:
        if not out.api_keys:
            raise ConfigError(f"{w}.api_key", "the HTTP API needs at least one "
                              "[[ingress.api_key]]")
        exposed = [a for a in out.http if not is_loopback(a)]
        if exposed and not out.cert_file:
            raise ConfigError(f"{w}.http", f"{exposed[0]} is not a loopback address: API keys "
                              "would cross the network in clear text; give cert_file and "
                              "key_file (HTTPS)")
    smtp = out.submission + out.submissions
    if out.auth and smtp:
        if not out.cert_file:
            raise ConfigError(f"{w}.cert_file", "AUTH is offered only over TLS: give "
                              "cert_file and key_file (or auth = false on loopback only)")
        if not out.users and not out.users_file:
            raise ConfigError(f"{w}.user", "auth is on but no users: add [[ingress.user]] "
                              "tables or ingress.users_file")
    elif not out.auth:
        open_to = [a for a in smtp if not is_loopback(a)]
        if open_to:
            raise ConfigError(f"{w}.auth", f"false, but {open_to[0]} is not a loopback "
                              "address: without authentication anyone who reaches it could "
                              "send as anyone (an open relay)")
    if out.submissions and not out.cert_file:
        raise ConfigError(f"{w}.submissions", "implicit TLS needs cert_file and key_file")
    return out


def _parse_proxy(raw: Mapping[str, Any], kw: dict[str, Any], w: str) -> dict[str, Any]:
    """``proxy_protocol`` (true: every STARTTLS listener; or a list of any listeners:
    submission, submissions, http) and the ``proxy_networks`` trusted to send the header (and,
    to an HTTP listener, ``X-Forwarded-For``)."""
    v = raw.get("proxy_protocol", False)
    k = f"{w}.proxy_protocol"
    if isinstance(v, bool):
        listeners = tuple(kw["submission"]) if v else ()
    else:
        listeners = _listeners(v, k)
        known = (*kw["submission"], *kw["submissions"], *kw["http"])
        for i, a in enumerate(listeners):
            if a not in known:
                raise ConfigError(f"{k}[{i}]", f"{a} is not one of ingress.submission, "
                                  "ingress.submissions or ingress.http")
    nets = raw.get("proxy_networks", [])
    kn = f"{w}.proxy_networks"
    if isinstance(nets, str):
        nets = [nets]
    if not isinstance(nets, list):
        raise ConfigError(kn, f"expected a list of networks like '10.0.0.0/24', got {nets!r}")
    out = []
    for i, n in enumerate(nets):
        try:
            out.append(str(ipaddress.ip_network(_str(n, f"{kn}[{i}]"), strict=False)))
        except ValueError:
            raise ConfigError(f"{kn}[{i}]", f"not a network like '10.0.0.0/24': {n!r}") from None
    if listeners and not out:
        raise ConfigError(kn, "proxy_protocol is on: list the load balancers' source networks "
                          "(anyone else could claim any client address)")
    if out and not listeners and not kw["http"]:
        raise ConfigError(k, "proxy_networks is set but no listener takes a PROXY header "
                          "(nor an X-Forwarded-For: there is no ingress.http): set "
                          "proxy_protocol = true (or a list of listeners)")
    return {"proxy_protocol": listeners, "proxy_networks": tuple(out)}


_DKIM_ALGORITHMS = ("rsa", "ed25519")
_POLICIES = ("if-key", "required")


def _domain_name(v: Any, key: str) -> str:
    d = _str(v, key).strip().lower().rstrip(".")
    if not d or "." not in d or any(c.isspace() or c in "@/\\" for c in d):
        raise ConfigError(key, f"expected a domain name such as example.com, got {v!r}")
    return d


def _header_list(v: Any, key: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(h, str) and h for h in v):
        raise ConfigError(key, "expected a list of header field names")
    names = tuple(dict.fromkeys(h.strip().lower() for h in v))
    for h in names:
        if not h or any(not (33 <= ord(c) <= 126) or c == ":" for c in h):
            raise ConfigError(key, f"not a header field name: {h!r}")
    if "from" not in names:
        raise ConfigError(key, "must include From (RFC 6376 §5.4: From is always signed)")
    if "dkim-signature" in names:
        raise ConfigError(key, "DKIM-Signature cannot be signed")
    return names


def _parse_dkim(raw: Mapping[str, Any]) -> DkimConfig:
    w = "dkim"
    _check_keys(raw, {"key", "key_directory", "sign", "policy", "parent_domains", "headers",
                      "expire_after", "reload_interval"}, w)
    d = DkimConfig()
    sign = _str(raw.get("sign", d.sign), f"{w}.sign")
    if sign not in _POLICIES:
        raise ConfigError(f"{w}.sign", f"expected \"if-key\" or \"required\", got {sign!r}")
    pol_raw = raw.get("policy", {})
    if not isinstance(pol_raw, Mapping):
        raise ConfigError(f"{w}.policy", "expected a table of domain = \"if-key\" | \"required\"")
    policies: dict[str, str] = {}
    for dom, p in pol_raw.items():
        k = f"{w}.policy.{dom}"
        if isinstance(p, Mapping):           # [dkim.policy."example.com"] sign = "required"
            _check_keys(p, {"sign"}, k)
            p = p.get("sign", sign)
            k += ".sign"
        if _str(p, k) not in _POLICIES:
            raise ConfigError(k, f"expected \"if-key\" or \"required\", got {p!r}")
        policies[_domain_name(dom, f"{w}.policy")] = p
    headers = _header_list(raw["headers"], f"{w}.headers") if "headers" in raw else d.headers
    expire = raw.get("expire_after", 0)
    expire_after = 0.0 if expire in (0, "0", "off") else _dur(expire, f"{w}.expire_after")
    keys_raw = raw.get("key", [])
    if not isinstance(keys_raw, list):
        raise ConfigError(f"{w}.key", "expected an array of tables ([[dkim.key]])")
    keys = []
    seen: set[tuple[str, str]] = set()
    for i, kr in enumerate(keys_raw):
        k = f"{w}.key[{i}]"
        if not isinstance(kr, Mapping):
            raise ConfigError(k, "expected a table")
        _check_keys(kr, {"domain", "selector", "algorithm", "key_file", "headers",
                         "expire_after", "identity"}, k)
        for req in ("domain", "selector", "key_file"):
            if req not in kr:
                raise ConfigError(f"{k}.{req}", "missing (required)")
        domain = _domain_name(kr["domain"], f"{k}.domain")
        selector = _str(kr["selector"], f"{k}.selector")
        if not is_valid_selector(selector):
            raise ConfigError(f"{k}.selector", f"{selector!r} is not a DNS name: use letters, "
                              "digits and inner '-' in labels of 1-63 characters, separated "
                              "by dots (RFC 6376 §3.1)")
        alg = _str(kr.get("algorithm", "rsa"), f"{k}.algorithm")
        if alg not in _DKIM_ALGORITHMS:
            raise ConfigError(f"{k}.algorithm", f"expected rsa or ed25519, got {alg!r}")
        if (domain, selector) in seen:
            raise ConfigError(f"{k}.selector", f"{selector!r} is listed twice for {domain}")
        seen.add((domain, selector))
        identity = kr.get("identity")
        if identity is not None:
            identity = _str(identity, f"{k}.identity")
            idom = identity.rpartition("@")[2].lower()
            if "@" not in identity or not (idom == domain or idom.endswith("." + domain)):
                raise ConfigError(f"{k}.identity", f"{identity!r} must be [local]@{domain} or "
                                  f"@ a subdomain of it (RFC 6376 §3.5)")
        ex = kr.get("expire_after")
        keys.append(DkimKeyConfig(
            domain=domain, selector=selector, algorithm=alg,
            key_file=_str(kr["key_file"], f"{k}.key_file"),
            headers=_header_list(kr["headers"], f"{k}.headers") if "headers" in kr else None,
            expire_after=None if ex is None else (0.0 if ex in (0, "0", "off")
                                                  else _dur(ex, f"{k}.expire_after")),
            identity=identity))
    return DkimConfig(
        keys=tuple(keys),
        key_directory=_str(raw.get("key_directory", ""), f"{w}.key_directory"),
        sign=sign, policy=tuple(sorted(policies.items())),
        parent_domains=_bool(raw.get("parent_domains", d.parent_domains),
                             f"{w}.parent_domains"),
        headers=headers, expire_after=expire_after,
        reload_interval=_dur(raw.get("reload_interval", d.reload_interval),
                             f"{w}.reload_interval"))


_log = logging.getLogger("raymta.config")


def _ingress_paths_from(cfg: Config, base: Path) -> Config:
    """Relative ingress certificate, key and users file paths taken relative to the config
    file's directory (the ingress actors run with other working directories)."""
    ing = cfg.ingress

    def absolute(path: str) -> str:
        return path if not path or os.path.isabs(path) else str((base / path).resolve())
    return replace(cfg, ingress=replace(ing, cert_file=absolute(ing.cert_file),
                                        key_file=absolute(ing.key_file),
                                        users_file=absolute(ing.users_file)))


def _dkim_paths_from(cfg: Config, base: Path) -> Config:
    """Relative DKIM key paths taken relative to the config file's directory (relays run in
    other processes, with other working directories)."""
    dk = cfg.dkim

    def absolute(path: str) -> str:
        return path if not path or os.path.isabs(path) else str((base / path).resolve())
    keys = tuple(replace(k, key_file=absolute(k.key_file)) for k in dk.keys)
    return replace(cfg, dkim=replace(dk, keys=keys, key_directory=absolute(dk.key_directory)))


def check_dkim_keys(cfg: Config) -> tuple[Config, list[str]]:
    """Load every DKIM key the config names (and those in ``dkim.key_directory``, which are
    added to ``dkim.keys``); returns the config and warnings (RSA keys of 1024-2047 bits).
    A key that cannot be used raises :class:`ConfigError` naming the entry and the file
    (never the key). Reads files: called by :func:`load_config` and before deploying."""
    dk = cfg.dkim
    if not dk.keys and not dk.key_directory:
        return cfg, []
    from cluster.adapters.dkim_keys import KeyFileError, load_private_key, scan_key_directory
    keys = [k for k in dk.keys if not k.from_directory]
    if dk.key_directory:
        try:
            found = scan_key_directory(dk.key_directory)
        except KeyFileError as e:
            raise ConfigError("dkim.key_directory", str(e)) from None
        listed = {(k.domain, k.selector) for k in keys}
        keys += [DkimKeyConfig(domain=s.domain, selector=s.selector, algorithm=s.algorithm,
                               key_file=s.key_file, from_directory=True)
                 for s in found if (s.domain, s.selector) not in listed]
    warnings: list[str] = []
    for i, k in enumerate(keys):
        where = f"dkim.key[{i}].key_file" if not k.from_directory else "dkim.key_directory"
        try:
            _key, alg, _bits, warn = load_private_key(k.key_file)
        except KeyFileError as e:
            raise ConfigError(where, f"{k.domain}/{k.selector}: {e}") from None
        if alg != k.algorithm:
            raise ConfigError(where, f"{k.domain}/{k.selector}: {k.key_file} holds an {alg} "
                                     f"key, configured as {k.algorithm}")
        warnings += [f"dkim {k.domain}/{k.selector}: {w}" for w in warn]
    return replace(cfg, dkim=replace(dk, keys=tuple(keys))), warnings




def _parse_classification(raw: Mapping[str, Any], base: Path | None) -> ClassificationConfig:
    w = "classification"
    _check_keys(raw, {"rules_file"}, w)
    if "rules_file" not in raw:
        return ClassificationConfig()
    name = _str(raw["rules_file"], f"{w}.rules_file")
    path = Path(name)
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{w}.rules_file", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{w}.rules_file", f"{path} is not UTF-8: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{w}.rules_file", f"{path} is not valid TOML: {e}") from None
    try:
        rules = rules_from_toml(doc, str(path))
    except RuleError as e:   # names the file and the rule
        raise ConfigError(f"{w}.rules_file", str(e)) from None
    return ClassificationConfig(rules_file=str(path), rules=rules)


def _parse_shaping(raw: Mapping[str, Any], base: Path | None) -> ShapingConfig:
    w = "shaping"
    _check_keys(raw, {"enabled", "rules_file", "max_keys"}, w)
    enabled = _bool(raw.get("enabled", True), f"{w}.enabled")
    max_keys = _int(raw.get("max_keys", 10_000), f"{w}.max_keys", minimum=10,
                    maximum=10_000_000)
    if "rules_file" not in raw:
        return ShapingConfig(enabled=enabled, max_keys=max_keys)
    path = Path(_str(raw["rules_file"], f"{w}.rules_file"))
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{w}.rules_file", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{w}.rules_file", f"{path} is not UTF-8: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{w}.rules_file", f"{path} is not valid TOML: {e}") from None
    try:
        rules = shaping_rules_from_toml(doc, str(path), shipped_shaping_rules())
    except ShapingError as e:   # names the file and the rule
        raise ConfigError(f"{w}.rules_file", str(e)) from None
    return ShapingConfig(enabled=enabled, rules_file=str(path), max_keys=max_keys, rules=rules)


def _parse_warmups(raw: Any, egress: tuple[EgressSource, ...], shaping: ShapingConfig
                   ) -> tuple[WarmupSchedule, ...]:
    """``[warmup.NAME]`` plans, each used by some ``[[egress]] warmup = "NAME"``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("warmup", "expected tables [warmup.NAME]")
    providers = sorted(shaping.rules.providers)
    out = []
    for name, t in raw.items():
        try:
            out.append(parse_schedule(name, t, providers))
        except WarmupError as e:
            raise ConfigError(e.key, e.problem) from None
    names = {s.name for s in out}
    used = set()
    for i, e in enumerate(egress):
        if e.warmup and e.warmup not in names:
            raise ConfigError(f"egress[{i}].warmup", f"unknown warm-up plan {e.warmup!r} "
                              f"(defined: {', '.join(sorted(names)) or 'none'})")
        used.add(e.warmup)
    for s in out:
        if s.name not in used:
            raise ConfigError(f"warmup.{s.name}", "no [[egress]] source uses this plan "
                              "(set warmup = \"" + s.name + "\" on one)")
    return tuple(out)


_TOP = {"warmup", "spool", "queue", "dns", "delivery", "egress", "egress_pool", "site_defaults", "site", "routes", "cluster",
        "replication", "backup", "classification", "suppression", "dkim", "bounce",
        "unsubscribe", "ingress", "metrics", "dsn", "webhooks", "shaping"}


def parse_config(raw: Mapping[str, Any], base: Path | None = None) -> Config:
    """Build a :class:`Config` from a parsed TOML document (a dict). Relative file names in it
    are taken from ``base`` (the config file's directory), else the working directory."""
    _check_keys(raw, _TOP, "")
    egress = _parse_egress(raw.get("egress"))
    bounce = _parse_bounce(_table(raw, "bounce", ""), base)
    sd_raw = _table(raw, "site_defaults", "")
    _check_keys(sd_raw, _LIMIT_KEYS, "site_defaults")
    site_defaults = _parse_limits(sd_raw, SiteLimits(), "site_defaults", egress)
    queue = _parse_queue(_table(raw, "queue", ""))
    ingress_raw = _table(raw, "ingress", "") if "ingress" in raw else None
    shaping = _parse_shaping(_table(raw, "shaping", ""), base)
    return Config(
        spool=_parse_spool(_table(raw, "spool", "")),
        queue=queue,
        dns=_parse_dns(_table(raw, "dns", "")),
        delivery=_parse_delivery(_table(raw, "delivery", "")),
        egress=egress,
        egress_pools=_parse_egress_pools(raw.get("egress_pool"), egress),
        warmups=_parse_warmups(raw.get("warmup"), egress, shaping),
        site_defaults=site_defaults,
        sites=_parse_sites(raw.get("site"), site_defaults, egress),
        routes=_parse_routes(raw.get("routes")),
        cluster=_parse_cluster(_table(raw, "cluster", "")),
        replication=_parse_replication(_table(raw, "replication", "")),
        backup=_parse_backup(_table(raw, "backup", "")),
        ingress=_parse_ingress(ingress_raw, queue),
        classification=_parse_classification(_table(raw, "classification", ""), base),
        suppression=_parse_suppression(_table(raw, "suppression", "")),
        dkim=_parse_dkim(_table(raw, "dkim", "")),
        bounce=bounce,
        unsubscribe=_parse_unsubscribe(raw.get("unsubscribe"), bounce, base),
        metrics=_parse_metrics(_table(raw, "metrics", ""), base),
        dsn=_parse_dsn(_table(raw, "dsn", "")),
        webhooks=_parse_webhooks(raw.get("webhooks"), base),
        shaping=shaping,
    )


def _parse_dsn(raw: Mapping[str, Any]) -> DsnConfig:
    w = "dsn"
    _check_keys(raw, {f.name for f in fields(DsnConfig)}, w)
    d = DsnConfig()
    host = _str(raw.get("hostname", d.hostname), f"{w}.hostname")
    if host and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
        raise ConfigError(f"{w}.hostname", f"must be a host name, got {host!r}")
    coalesce = _dur(raw.get("coalesce", d.coalesce), f"{w}.coalesce", positive=False)
    if not 0 <= coalesce <= 3600:
        raise ConfigError(f"{w}.coalesce", f"must be between 0 and 1h, got {coalesce}")
    return DsnConfig(smtp=_bool(raw.get("smtp", d.smtp), f"{w}.smtp"),
                     api=_bool(raw.get("api", d.api), f"{w}.api"), hostname=host,
                     coalesce=coalesce)


def _verp_secret(v: Any, key: str) -> bytes:
    # never put the value in the error: it is a secret
    if not isinstance(v, str) or len(v.encode()) < 16:
        raise ConfigError(key, "expected a string of at least 16 bytes (e.g. 32 random bytes "
                          "as hex; the value is not shown)")
    return v.encode()


def _read_verp_key_file(name: str, base: Path | None, key: str) -> list[tuple[str, bytes]]:
    """A secret file: one ``<key id> <secret>`` a line (``#`` comments); the first signs."""
    path = Path(name)
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kid, _, secret = line.partition(" ")
        if not secret.strip():
            raise ConfigError(key, f"{path} line {n}: expected '<key id> <secret>'")
        out.append((kid, _verp_secret(secret.strip(), f"{key} ({path} line {n})")))
    return out


def _parse_hmac_keys(raw: Mapping[str, Any], w: str, base: Path | None) -> VerpKeys:
    """``keys = [{id, secret}, ...]`` and/or ``key_file``: the first listed signs."""
    pairs: list[tuple[str, bytes]] = []
    keys_raw = raw.get("keys", [])
    if not isinstance(keys_raw, list):
        raise ConfigError(f"{w}.keys", "expected an array of {id = ..., secret = ...} tables")
    for i, kr in enumerate(keys_raw):
        k = f"{w}.keys[{i}]"
        if not isinstance(kr, Mapping):
            raise ConfigError(k, "expected a table {id = ..., secret = ...}")
        _check_keys(kr, {"id", "secret"}, k)
        if "id" not in kr or "secret" not in kr:
            raise ConfigError(k, "needs both id and secret")
        pairs.append((_str(kr["id"], f"{k}.id"), _verp_secret(kr["secret"], f"{k}.secret")))
    if "key_file" in raw:
        pairs += _read_verp_key_file(_str(raw["key_file"], f"{w}.key_file"), base,
                                     f"{w}.key_file")
    if not pairs:
        raise ConfigError(f"{w}.keys", "no key: give keys = [{id, secret}] or key_file")
    seen: dict[str, bytes] = {}
    for kid, secret in pairs:
        if kid in seen:
            raise ConfigError(f"{w}.keys", f"key id {kid!r} is listed twice")
        seen[kid] = secret
    try:
        return VerpKeys(current=pairs[0][0], keys=seen)
    except VerpError as e:   # names the key id, never the secret
        raise ConfigError(f"{w}.keys", str(e)) from None


def _parse_bounce(raw: Mapping[str, Any], base: Path | None) -> BounceConfig:
    w = "bounce"
    _check_keys(raw, {f.name for f in fields(BounceConfig)} | {"key_file"}, w)
    d = BounceConfig()
    if not raw:
        return d
    if "domain" not in raw:
        raise ConfigError(f"{w}.domain", "missing (required: the return-path domain)")
    domain = _domain_name(raw["domain"], f"{w}.domain")
    keys = _parse_hmac_keys(raw, w, base)
    prefix = _str(raw.get("prefix", d.prefix), f"{w}.prefix").lower()
    from cluster.core.verp import encode
    try:   # the prefix and domain must make a VERP address
        encode("0" * 26, keys, prefix=prefix, domain=domain)
    except VerpError as e:
        raise ConfigError(f"{w}.prefix", str(e)) from None
    fbl = _str(raw.get("fbl_address", ""), f"{w}.fbl_address").strip().lower()
    if fbl and ("@" not in fbl or fbl.startswith("@") or fbl.endswith("@")):
        raise ConfigError(f"{w}.fbl_address", f"expected an address, got {fbl!r}")
    host = _str(raw.get("listen_host", d.listen_host), f"{w}.listen_host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{w}.listen_host", f"expected an IP address, got {host!r}") from None
    return BounceConfig(
        domain=domain, prefix=prefix, keys=keys, listen_host=host,
        listen_port=_int(raw.get("listen_port", d.listen_port), f"{w}.listen_port",
                         minimum=0, maximum=65535),
        fbl_address=fbl,
        max_message_size=_size(raw.get("max_message_size", d.max_message_size),
                               f"{w}.max_message_size"),
        report_timeout=_dur(raw.get("report_timeout", d.report_timeout),
                            f"{w}.report_timeout"),
        http_port=_int(raw.get("http_port", d.http_port), f"{w}.http_port", minimum=0,
                       maximum=65535))


def _parse_unsubscribe(raw: Any, bounce: BounceConfig,
                       base: Path | None) -> tuple[UnsubscribeConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("unsubscribe", "expected an array of tables ([[unsubscribe]])")
    out: list[UnsubscribeConfig] = []
    for i, u in enumerate(raw):
        w = f"unsubscribe[{i}]"
        if not isinstance(u, Mapping):
            raise ConfigError(w, "expected a table")
        _check_keys(u, {"domain", "url_base", "mailto", "keys", "key_file"}, w)
        if "domain" not in u:
            raise ConfigError(f"{w}.domain", "missing (required: the sender domain)")
        domain = _domain_name(u["domain"], f"{w}.domain")
        if any(x.domain == domain for x in out):
            raise ConfigError(f"{w}.domain", f"{domain} is listed twice")
        url = _str(u.get("url_base", ""), f"{w}.url_base")
        if url and not url.startswith("https://"):
            raise ConfigError(f"{w}.url_base", "must be an https:// URL (RFC 8058 §3.1)")
        mailto = _bool(u.get("mailto", True), f"{w}.mailto")
        if mailto and not bounce.enabled:
            raise ConfigError(f"{w}.mailto", "needs [bounce] (the address is at the bounce "
                              "domain): set [bounce] or mailto = false")
        if not url and not mailto:
            raise ConfigError(w, "give url_base, mailto = true, or both")
        out.append(UnsubscribeConfig(domain=domain, url_base=url, mailto=mailto,
                                     keys=_parse_hmac_keys(u, w, base)))
    return tuple(out)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_metrics(raw: Mapping[str, Any], base: Path | None) -> MetricsConfig:
    w = "metrics"
    _check_keys(raw, {f.name for f in fields(MetricsConfig)}, w)
    d = MetricsConfig()
    host = _str(raw.get("host", d.host), f"{w}.host").strip()
    if not host:
        raise ConfigError(f"{w}.host", "must not be empty (127.0.0.1 keeps it on loopback)")
    password_file = _str(raw.get("password_file", d.password_file), f"{w}.password_file")
    password = _str(raw.get("password", d.password), f"{w}.password")
    if password_file:
        path = Path(password_file)
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            password = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"{w}.password_file", f"cannot read {path}: {e.strerror}") from None
        password_file = str(path)
    username = _str(raw.get("username", d.username), f"{w}.username")
    if bool(username) != bool(password):
        raise ConfigError(f"{w}.username", "basic auth needs both a username and a password "
                          "(password or password_file)")
    enabled = _bool(raw.get("enabled", d.enabled), f"{w}.enabled")
    if enabled and not _is_loopback(host) and not username:
        raise ConfigError(f"{w}.host", f"{host!r} is not a loopback address: the endpoint "
                          "would be open to the network; set metrics.username and "
                          "metrics.password_file (HTTP basic auth), or keep 127.0.0.1")
    return MetricsConfig(
        enabled=enabled, host=host,
        port=_int(raw.get("port", d.port), f"{w}.port", maximum=65535),
        username=username, password=password, password_file=password_file,
        interval=_dur(raw.get("interval", d.interval), f"{w}.interval"),
        top_sites=_int(raw.get("top_sites", d.top_sites), f"{w}.top_sites", minimum=1,
                       maximum=1000))


def _parse_suppression(raw: Mapping[str, Any]) -> SuppressionConfig:
    w = "suppression"
    _check_keys(raw, {f.name for f in fields(SuppressionConfig)}, w)
    d = SuppressionConfig()
    on_submit = _str(raw.get("on_submit", d.on_submit), f"{w}.on_submit")
    if on_submit not in ("refuse", "drop"):
        raise ConfigError(f"{w}.on_submit", f"must be 'refuse' or 'drop', not {on_submit!r}")
    return SuppressionConfig(
        on_submit=on_submit,
        hard_bounce_ttl=_dur(raw.get("hard_bounce_ttl", d.hard_bounce_ttl),
                             f"{w}.hard_bounce_ttl"),
        from_bounces=_bool(raw.get("from_bounces", d.from_bounces), f"{w}.from_bounces"))


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read a TOML config file; ``None`` gives the defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(str(p), f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), f"not UTF-8: {e}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), f"invalid TOML: {e}") from None
    cfg, warnings = check_dkim_keys(_dkim_paths_from(parse_config(raw, p.parent), p.parent))
    cfg = _ingress_paths_from(cfg, p.parent)
    for w in warnings:
        _log.warning("config %s", w)
    return cfg


_WEBHOOK_KEYS = {"name", "url", "secret", "secret_file", "events", "batch_size", "concurrency",
                 "timeout", "retry_initial", "retry_max_delay", "retry_for", "jitter"}


def _parse_webhooks(raw: Any, base: Path | None) -> tuple[WebhookEndpoint, ...]:
    """``[[webhooks]]``: endpoints that get events POSTed (cluster/core/webhooks.py)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("webhooks", "expected an array of tables ([[webhooks]])")
    out: list[WebhookEndpoint] = []
    for i, w_raw in enumerate(raw):
        w = f"webhooks[{i}]"
        if not isinstance(w_raw, Mapping):
            raise ConfigError(w, "expected a table")
        _check_keys(w_raw, _WEBHOOK_KEYS, w)
        for req in ("name", "url"):
            if req not in w_raw:
                raise ConfigError(f"{w}.{req}", "missing (required)")
        name = _str(w_raw["name"], f"{w}.name")
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"{w}.name", f"{name!r}: 1-64 letters, digits, '-', '_', '.'")
        if any(x.name == name for x in out):
            raise ConfigError(f"{w}.name", f"{name} is listed twice")
        url = _str(w_raw["url"], f"{w}.url")
        from urllib.parse import urlsplit
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{w}.url", f"{url!r}: expected an http:// or https:// URL "
                              "with a host")
        if ("secret" in w_raw) == ("secret_file" in w_raw):
            raise ConfigError(f"{w}.secret", "give exactly one of secret and secret_file")
        if "secret" in w_raw:
            secret = _verp_secret(w_raw["secret"], f"{w}.secret")
        else:
            path = Path(_str(w_raw["secret_file"], f"{w}.secret_file"))
            if base is not None and not path.is_absolute():
                path = base / path
            try:
                text = path.read_text("utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{w}.secret_file", f"cannot read {path}: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
            secret = _verp_secret(text, f"{w}.secret_file ({path})")
        names = w_raw.get("events", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{w}.events", "expected a list of event names")
        try:
            events = resolve_event_names(names)
        except ValueError as e:
            raise ConfigError(f"{w}.events", str(e)) from None
        d = WebhookEndpoint(name=name, url=url, secret=b"")
        initial = _dur(w_raw.get("retry_initial", d.retry_initial), f"{w}.retry_initial")
        max_delay = _dur(w_raw.get("retry_max_delay", d.retry_max_delay),
                         f"{w}.retry_max_delay")
        if max_delay < initial:
            raise ConfigError(f"{w}.retry_max_delay", f"must be >= retry_initial ({initial:g}s)")
        jitter = _float(w_raw.get("jitter", d.jitter), f"{w}.jitter")
        if jitter >= 1:
            raise ConfigError(f"{w}.jitter", f"must be below 1, got {jitter}")
        out.append(WebhookEndpoint(
            name=name, url=url, secret=secret, events=events,
            batch_size=_int(w_raw.get("batch_size", d.batch_size), f"{w}.batch_size",
                            minimum=1, maximum=1000),
            concurrency=_int(w_raw.get("concurrency", d.concurrency), f"{w}.concurrency",
                             minimum=1, maximum=64),
            timeout=_dur(w_raw.get("timeout", d.timeout), f"{w}.timeout"),
            retry_initial=initial, retry_max_delay=max_delay,
            retry_for=_dur(w_raw.get("retry_for", d.retry_for), f"{w}.retry_for"),
            jitter=jitter))
    return tuple(out)
