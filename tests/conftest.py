"""Shared fixtures: real DNS and SMTP servers on loopback, and real local Ray clusters.

Every server and cluster a fixture starts is stopped when it ends. Ray is always started fresh
with ``address="local"`` bound to 127.0.0.1 (never attached to a leftover cluster); token
authentication stays on (Ray 2.60's default).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The shared test corpora (real bounces, replies, DKIM vectors...): RAYMTA_CORPORA, else
# ../shared/corpora beside the checkout. Tests reach them only through corpus().
REPO_ROOT = Path(__file__).resolve().parents[1]
CORPORA = Path(os.environ.get("RAYMTA_CORPORA") or REPO_ROOT.parent / "shared" / "corpora")


def corpus(*parts: str) -> Path:
    """The path of a corpus file or directory under :data:`CORPORA`.

    When it is absent the calling test is skipped, with a reason saying how to get the corpora;
    with ``RAYMTA_REQUIRE_CORPORA=1`` (set by ``.ci/run``) it fails instead, so CI never passes
    by skipping them.
    """
    path = CORPORA.joinpath(*parts)
    if not path.exists():
        reason = (f"test corpora not found: {path} is missing. Set RAYMTA_CORPORA to the corpora "
                  f"directory, or check out shared/ beside the repository (default "
                  f"{REPO_ROOT.parent / 'shared' / 'corpora'})")
        if os.environ.get("RAYMTA_REQUIRE_CORPORA", "") not in ("", "0"):
            pytest.fail(reason + " [RAYMTA_REQUIRE_CORPORA is set]")
        pytest.skip(reason)
    return path

# The pipeline topology: addresses of sinks (all on one port) and what each stands for.
MAIN_SINKS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
LIMITED_SINK = "127.0.0.5"      # limited.test: 2 connections, 50/s
GREET421_SINK = "127.0.0.6"     # primary MX of failover.test: answers 421 on connect
SECONDARY_SINK = "127.0.0.7"    # secondary MX of failover.test and primarydown.test
DOWN_ADDRESS = "127.0.0.8"      # primary MX of primarydown.test: nothing listens here
EGRESS_ADDRESS = "127.0.0.42"   # the egress source's bind address


def wait_for(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


#: Ray records the last head it started here (``address="auto"`` reads it); multi-node tests
#: put back what was there before them
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")


@contextlib.contextmanager
def multinode(namespace: str, workers: int = 0, head_cpus: int = 1,
              worker_cpus: int = 1) -> Iterator[Any]:
    """A ``ray.cluster_utils.Cluster`` on 127.0.0.1 with raymta's node-health settings: the
    head plus ``workers`` nodes, this process connected to it in ``namespace``. Yields the
    Cluster (add or remove nodes on it); shuts Ray and every node down at the end and puts back
    the address file a leftover cluster may have left."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster.deploy import NODE_HEALTH, RAY_SYSTEM_CONFIG
    saved = RAY_ADDRESS_FILE.read_bytes() if RAY_ADDRESS_FILE.exists() else None
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "include_dashboard": False,
            "_system_config": {**RAY_SYSTEM_CONFIG, **NODE_HEALTH}})
        for _ in range(workers):
            cluster.add_node(num_cpus=worker_cpus)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=namespace, log_to_driver=False)
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            RAY_ADDRESS_FILE.unlink(missing_ok=True)
        else:
            RAY_ADDRESS_FILE.write_bytes(saved)


class SharedRay:
    """One embedded Ray for the whole test session instead of one per ``MailCluster.connect()``.

    Starting and stopping a local Ray costs ~7 s of wall time and ~6.6 CPU seconds here
    (measured), and ~37 test modules each did it. When a test calls ``MailCluster.connect()``
    with the settings every single-node test uses (``num_cpus=2``, no dashboard, no extra Ray
    options), the first call starts Ray and later ones deploy into the same one; ``close()``
    then kills every raymta actor of the config's namespace (no restart), waits until their
    names are free, and clears raymta's keys in Ray's KV store (throttle pool view, drain
    marks), so the next test starts from an empty cluster exactly as it would on a fresh Ray.
    Anything else — a ``ray.cluster_utils.Cluster``, other settings, a test's own
    ``ray.shutdown()`` — stops the shared Ray first or finds it gone. The address file Ray
    writes is put back at once, so a ``raymta`` command run by a test never finds it.
    ``RAYMTA_TEST_SHARED_RAY=0`` turns this off (one Ray per connect, as before)."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None     # (num_cpus, namespace) of the shared Ray
        self.gcs: str | None = None
        self.allowed = True     # False in a module marked own_ray

    def active(self) -> bool:
        import ray
        if self.key is None or not ray.is_initialized():
            self.key = self.gcs = None
            return False
        if ray.get_runtime_context().gcs_address != self.gcs:   # someone else's Ray now
            self.key = self.gcs = None
            return False
        return True

    def release(self) -> None:
        import ray
        if self.active():
            ray.shutdown()
        self.key = self.gcs = None

    def init(self, real: Callable[..., Any], num_cpus: Any = None, *, dashboard: bool = False,
             namespace: str = "raymta", **kwargs: Any) -> Any:
        import ray
        key = (num_cpus, namespace)
        shareable = self.allowed and num_cpus == 2 and not dashboard and not kwargs
        if shareable and self.active() and self.key == key:
            return None
        self.release()
        saved = RAY_ADDRESS_FILE.read_bytes() if RAY_ADDRESS_FILE.exists() else None
        out = real(num_cpus, dashboard=dashboard, namespace=namespace, **kwargs)
        if shareable:
            self.key, self.gcs = key, ray.get_runtime_context().gcs_address
            if saved is None:
                RAY_ADDRESS_FILE.unlink(missing_ok=True)
            else:
                RAY_ADDRESS_FILE.write_bytes(saved)
        return out

    def clear(self, namespace: str) -> None:
        """Kill every named actor of ``namespace`` and wait for the names to be free; drop
        raymta's KV keys of that namespace."""
        import ray
        from ray.experimental.internal_kv import (_internal_kv_del, _internal_kv_list)

        def named() -> list[str]:
            return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["namespace"] == namespace]
        for name in named():
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        wait_for(lambda: not named(), 60, f"the actors of namespace {namespace!r} to go")
        kv = f"raymta:{namespace}"
        for key in _internal_kv_list("", namespace=kv):
            _internal_kv_del(key, namespace=kv)


SHARED_RAY = SharedRay()


@pytest.fixture(scope="module", autouse=True)
def _shared_ray_policy(request: Any) -> Iterator[None]:
    """A module marked ``own_ray`` gets a Ray of its own: whatever Ray-wide state its tests
    read (Ray's metrics endpoint keeps the series of actors long gone) is its own."""
    SHARED_RAY.allowed = request.node.get_closest_marker("own_ray") is None
    if not SHARED_RAY.allowed:
        SHARED_RAY.release()
    yield
    SHARED_RAY.allowed = True


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    """Modules marked ``own_ray`` run after all the others (each keeps its place among them,
    and every module's tests their order). Each one ends the shared Ray, so between two
    modules that share it, it would cost the next one a fresh start (~7 s of wall time and
    ~6.6 CPU seconds); run last, they end it once."""
    def own_ray(item: Any) -> bool:     # the module's mark: a module's tests stay together
        module = item.getparent(pytest.Module)
        return module is not None and module.get_closest_marker("own_ray") is not None
    items.sort(key=own_ray)


def pytest_configure(config: Any) -> None:
    if os.environ.get("RAYMTA_TEST_SHARED_RAY", "1") == "0":
        return
    import ray.cluster_utils

    import cluster.deploy
    from cluster.client import MailCluster
    real_init = cluster.deploy.init_local_ray
    real_close = MailCluster.close
    real_cluster_init = ray.cluster_utils.Cluster.__init__

    def init_local_ray(num_cpus: Any = None, **kwargs: Any) -> Any:
        return SHARED_RAY.init(real_init, num_cpus, **kwargs)

    def close(self: Any) -> None:
        if self.owns_ray and SHARED_RAY.active():
            for st in self._streams or []:
                st.close()
            SHARED_RAY.clear(self.cfg.cluster.namespace)
            return
        real_close(self)

    def cluster_init(self: Any, *args: Any, **kwargs: Any) -> None:
        SHARED_RAY.release()
        real_cluster_init(self, *args, **kwargs)

    real_ray_init = ray.init

    def ray_init(*args: Any, **kwargs: Any) -> Any:
        # a process holds one Ray connection: any other init ends the shared one first
        SHARED_RAY.release()
        return real_ray_init(*args, **kwargs)

    cluster.deploy.init_local_ray = init_local_ray
    MailCluster.close = close
    ray.cluster_utils.Cluster.__init__ = cluster_init
    ray.init = ray_init


def pytest_unconfigure(config: Any) -> None:
    SHARED_RAY.release()


def raw_message(i: int, rcpt: str, *, size: int = 600) -> bytes:
    body = (f"Line {i} of a test message.\r\n" * max(1, size // 28))
    return (f"From: Sender <sender@origin.test>\r\nTo: <{rcpt}>\r\n"
            f"Subject: test {i}\r\nMessage-ID: <m{i}.{rcpt}@origin.test>\r\n"
            f"Date: Sat, 28 Nov 2026 05:00:00 +0000\r\nX-Seq: {i}\r\n\r\n{body}"
            ".leading dot line survives dot-stuffing\r\n").encode()


@pytest.fixture(scope="module")
def dns_server():
    from cluster.devservers import LoopbackDNS
    d = LoopbackDNS().start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def sinks():
    from cluster.devservers import SinkGroup
    g = SinkGroup(MAIN_SINKS + [LIMITED_SINK, GREET421_SINK, SECONDARY_SINK]).start()
    try:
        yield g
    finally:
        g.stop()


def pipeline_zone(dns: Any, domains: int = 20) -> list[str]:
    for i, a in enumerate(MAIN_SINKS):
        dns.add_a(f"mx{i + 1}.sinks.test", a)
    names = [f"d{i}.test" for i in range(domains)]
    for i, d in enumerate(names):
        a, b = i % 3 + 1, (i + 1) % 3 + 1
        dns.add_mx(d, [(10, f"mx{a}.sinks.test"), (20, f"mx{b}.sinks.test")])
    dns.add_a("mx.limited.test", LIMITED_SINK)
    dns.add_mx("limited.test", [(10, "mx.limited.test")])
    dns.add_a("greet421.sinks.test", GREET421_SINK)
    dns.add_a("secondary.sinks.test", SECONDARY_SINK)
    dns.add_a("down.sinks.test", DOWN_ADDRESS)
    dns.add_mx("failover.test", [(10, "greet421.sinks.test"), (20, "secondary.sinks.test")])
    dns.add_mx("primarydown.test", [(5, "down.sinks.test"), (50, "secondary.sinks.test")])
    dns.add_mx("faults.test", [(10, "mx1.sinks.test")])
    dns.add_null_mx("nullmx.test")
    dns.add_a("mx.servfail.test", MAIN_SINKS[0])
    dns.add_mx("servfail.test", [(10, "mx.servfail.test")])
    dns.set_servfail("servfail.test")
    return names


def pipeline_config(spool: str, dns_port: int, smtp_port: int, **queue: Any) -> Any:
    from cluster.config import parse_config
    q = {"retry_initial": "1s", "retry_max_delay": "3s", "dns_retry_initial": "1s",
         "max_age": "10m", "inflight_timeout": "60s"}
    q.update(queue)
    return parse_config({
        "spool": {"directory": spool},
        "queue": q,
        "dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": "1s", "min_ttl": 1,
                "servfail_ttl": "2s"},
        # the sinks are on loopback: the MX address guard must be told so
        "delivery": {"smtp_port": smtp_port, "allow_networks": ["127.0.0.0/8"],
                     "connect_timeout": "2s", "command_timeout": "10s",
                     "idle_timeout": "1s", "site_backoff": "1s", "site_backoff_max": "5s",
                     "lease_ttl": "6s"},
        # a distinctive source address: the sinks see it as the peer of every session
        "egress": [{"name": "default", "ehlo_name": "relay.raymta.test",
                    "bind_address": EGRESS_ADDRESS}],
        "site_defaults": {"rate": "5000/s", "max_connections": 6},
        "site": [{"domain": "limited.test", "rate": "50/s,burst=5", "max_connections": 2,
                  "deliveries_per_connection": 40, "dedicated": True},
                 {"domain": "requiretls.test", "tls": "required"},
                 {"domain": "tlsok.test", "tls": "required"}],
    })


def faults_reply(rcpt: str, attempt: int) -> tuple[int, str] | None:
    """Per-recipient faults by local part (the sinks apply them)."""
    local = rcpt.split("@", 1)[0].lower()
    if local.startswith("tempfail") and attempt <= 2:
        return (451, "4.3.0 mailbox temporarily unavailable, try again")
    if local.startswith("unknown"):
        return (550, "5.1.1 <%s>: Recipient address rejected: User unknown" % rcpt)
    return None


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, dns_server, sinks):
    """A local Ray with raymta deployed against the loopback DNS and sinks."""
    from cluster.client import MailCluster
    names = pipeline_zone(dns_server)
    sinks.rcpt_reply = faults_reply
    sinks.by_address(GREET421_SINK).greeting_code = 421
    spool = str(tmp_path_factory.mktemp("spool"))
    cfg = pipeline_config(spool, dns_server.port, sinks.port)
    mc = MailCluster.connect(config=cfg, num_cpus=2)
    try:
        yield {"mc": mc, "dns": dns_server, "sinks": sinks, "domains": names, "cfg": cfg,
               "spool": spool}
    finally:
        mc.close()
