"""Metrics: the [metrics] config, the pure queue shape, and a live cluster's two endpoints
(raymta's own, served by the head's exporter, and Ray's, which the Ray dashboard reads)."""

from __future__ import annotations

import base64
import dataclasses
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import faults_reply, pipeline_config, pipeline_zone, raw_message, wait_for

# own_ray: it reads Ray's metrics endpoint, which keeps the series of earlier tests' actors
pytestmark = [pytest.mark.timeout(300), pytest.mark.own_ray]


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize("section, error", [
    ({"host": "0.0.0.0"}, "metrics.host: '0.0.0.0' is not a loopback address"),
    ({"host": "10.0.0.10", "username": "prom"}, "metrics.username: basic auth needs both"),
    ({"password": "x"}, "metrics.username: basic auth needs both"),
    ({"port": 70000}, "metrics.port: must be between 0 and 65535"),
    ({"interval": "0s"}, "metrics.interval: must be greater than zero"),
    ({"top_sites": 0}, "metrics.top_sites: must be between 1 and 1000"),
    ({"bind": "127.0.0.1"}, "metrics.bind: unknown key"),
    ({"enabled": "yes"}, "metrics.enabled: expected true or false"),
])
def test_bad_metrics_config_is_refused_naming_the_key(section, error):
    from cluster.config import ConfigError, parse_config
    with pytest.raises(ConfigError) as e:
        parse_config({"metrics": section})
    assert error in str(e.value)


def test_metrics_config_defaults_and_auth(tmp_path):
    from cluster.config import Config, load_config
    m = Config().metrics
    assert (m.enabled, m.host, m.port, m.interval, m.top_sites) == (True, "127.0.0.1", 9464,
                                                                   5.0, 20)
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "c.toml").write_text('[metrics]\nhost = "10.0.0.10"\nusername = "prom"\n'
                                     'password_file = "pw"\n')
    m = load_config(tmp_path / "c.toml").metrics
    assert (m.host, m.username, m.password) == ("10.0.0.10", "prom", "s3cret")
    assert "s3cret" not in repr(m)
    # off: no endpoint at all, so any host is harmless
    (tmp_path / "off.toml").write_text('[metrics]\nenabled = false\nhost = "0.0.0.0"\n')
    assert load_config(tmp_path / "off.toml").metrics.enabled is False


# ------------------------------------------------------------------------------- pure parts
class _M:
    def __init__(self, site: str, domain: str, created: float, state: str = "queued") -> None:
        self.site, self.domain, self.created, self.state = site, domain, created, state


def test_queue_shape_buckets_ages_and_bounds_sites():
    from cluster.core.queue_shape import age_bucket, merge_shapes, queue_shape
    assert [age_bucket(a) for a in (0, 299, 300, 1199, 4799, 14399, 86399, 86400, 1e9)] == [
        "0-5m", "0-5m", "5-10m", "10-20m", "40-80m", "80m-4h", "4h-1d", "1d+", "1d+"]
    now = 100_000.0
    msgs = ([_M("gmail", "gmail.com", now - 10)] * 5 + [_M("", "yahoo.com", now - 700)] * 3 +
            [_M("", "a.test", now - 90_000)] + [_M("", "b.test", now - 30)])
    sh = queue_shape(msgs, now, top=2)
    assert sh["total"] == 10
    assert sh["sites"] == {"gmail": 5, "yahoo.com": 3, "other": 2}
    assert sh["ages"] == {"0-5m": 6, "10-20m": 3, "1d+": 1}
    assert sh["oldest_age"] == 90_000
    assert sh["site_ages"]["other"] == {"1d+": 1, "0-5m": 1}
    both = merge_shapes([sh, queue_shape([_M("", "b.test", now - 5)] * 4, now, top=2)], top=2)
    # b.test is big over the sum: it takes yahoo.com's place among the top 2
    assert both["sites"] == {"gmail": 5, "b.test": 4, "other": 5}
    assert both["total"] == 14 and both["oldest_age"] == 90_000
    assert queue_shape([], now)["oldest_age"] == 0.0


def test_queue_shape_of_a_big_queue_is_sampled_within_bounds():
    import time as _t

    from cluster.core.queue_shape import queue_shape
    now = 1e6
    msgs = {i: _M("", f"d{i % 4}.test", now - 100_000 + i * 0.1) for i in range(200_000)}
    t = _t.perf_counter()
    sh = queue_shape(msgs.values(), now, top=10, limit=20_000)
    took = _t.perf_counter() - t
    assert 18_000 < sh["sampled"] < 22_000 and sh["total"] == 200_000
    # round-robin domains (the pattern a strided sample aliases with): each ~a quarter
    assert set(sh["sites"]) == {f"d{k}.test" for k in range(4)}
    assert all(abs(n - 50_000) < 2_500 for n in sh["sites"].values()), sh["sites"]
    assert sh["oldest_age"] == 100_000            # the first message, always looked at
    assert abs(sum(sh["ages"].values()) - 200_000) < 10
    assert took < 0.5, f"{took:.3f} s"


def test_bounded_labels_keep_the_first_names_and_fold_the_rest():
    from actors.metrics import BoundedLabels
    lab = BoundedLabels(2)
    assert [lab(s) for s in ("a", "b", "c", "a", "d", "b")] == ["a", "b", "other", "a", "other",
                                                                "b"]


def test_counters_carry_over_a_restart_of_their_source():
    from actors.metrics_exporter import _Carry
    c = _Carry()
    assert c.update("coordinator:0", 100, {"x": 5}) == {"x": 5}
    assert c.update("coordinator:0", 100, {"x": 7}) == {"x": 7}
    # restarted (new pid): its tallies start again from 0; the total goes on from 7
    assert c.update("coordinator:0", 200, {"x": 2}) == {"x": 9}
    assert c.update("coordinator:0", 200, {"x": 3, "y": 1}) == {"x": 10, "y": 1}


def test_basic_auth_guards_a_non_loopback_endpoint():
    """(Served on 127.0.0.1 here: the auth check is the same whatever the host.)"""
    from actors.metrics_exporter import MetricsExporter
    from cluster.config import parse_config
    cfg = parse_config({"metrics": {"port": 0, "username": "prom", "password": "pw"}})
    ex = MetricsExporter(cfg)
    ex._serve()
    try:
        def get(auth: str | None) -> int:
            req = urllib.request.Request(ex._url)
            if auth is not None:
                req.add_header("Authorization", "Basic " + base64.b64encode(
                    auth.encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code
        assert ex._url.startswith("http://127.0.0.1:")
        assert get(None) == 401
        assert get("prom:wrong") == 401
        assert get("prom:pw") == 200
    finally:
        ex.close()


# ------------------------------------------------------------------------------- live cluster
def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` of a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: dict, name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, {}).items()
               if all(dict(labels).get(k) == want for k, want in match.items()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, dns_server, sinks):
    from cluster.client import MailCluster
    names = pipeline_zone(dns_server)
    sinks.rcpt_reply = faults_reply
    cfg = pipeline_config(str(tmp_path_factory.mktemp("spool")), dns_server.port, sinks.port)
    cfg = dataclasses.replace(cfg, metrics=dataclasses.replace(cfg.metrics, port=0,
                                                               interval=1.0, top_sites=5))
    mc = MailCluster.connect(config=cfg, num_cpus=2)
    try:
        yield {"mc": mc, "domains": names}
    finally:
        mc.close()
        sinks.rcpt_reply = None


def test_exporter_serves_every_family_with_true_figures(cluster):
    import ray

    from actors.metrics_exporter import EXPORTED, EXPORTER_NAME
    mc, domains = cluster["mc"], cluster["domains"]
    n, unknown = 600, 0
    msgs = []
    for i in range(n):
        local = "unknown" if i % 50 == 7 else "user"
        unknown += local == "unknown"
        rcpt = f"{local}{i}@{domains[i % len(domains)]}"
        msgs.append({"sender": "b@origin.test", "recipients": [rcpt],
                     "raw": raw_message(i, rcpt)})
    calls = 0
    for k in range(0, n, 100):
        assert all(r.accepted for r in mc.submit(msgs[k:k + 100]))
        calls += 1
    assert mc.wait_until_idle(timeout=120), mc.stats()
    # 30 messages held for an hour: they are the queue's shape
    held = [{"sender": "b@origin.test", "recipients": [f"held{i}@{domains[0]}"],
             "raw": raw_message(i, f"held{i}@{domains[0]}"), "not_before": time.time() + 3600}
            for i in range(30)]
    held_ids = [i for r in mc.submit(held) for i in r.ids]
    url = ray.get(mc.handles[EXPORTER_NAME].status.remote())["url"]
    assert url.startswith("http://127.0.0.1:")

    def settled():
        s = scrape(url)
        return s if (total(s, "raymta_messages_total", event="Delivery") == n - unknown and
                     total(s, "raymta_queue_messages", state="live") == 30) else None
    s = wait_for(settled, 30, "the exporter to show the run", poll=0.5)
    try:
        for name, (kind, labels, _doc) in EXPORTED.items():
            sample = {"histogram": name + "_count"}.get(kind, name)
            assert sample in s, f"{name} not served"
            for lbls in s[sample]:
                assert {k for k, _ in lbls} == set(labels), (name, lbls)
        assert total(s, "raymta_messages_total", event="Reception") == n + 30
        assert total(s, "raymta_messages_total", event="Bounce") == unknown
        assert total(s, "raymta_messages_total", event="Bounce",
                     category="invalid-recipient") == unknown
        assert total(s, "raymta_relay_results_total", outcome="delivered") == n - unknown
        assert total(s, "raymta_relay_results_total", outcome="permanent") == unknown
        # one observation per submit call, none per message
        assert total(s, "raymta_submit_latency_seconds_count") == calls + 1
        assert total(s, "raymta_submit_latency_seconds_bucket", le="+Inf") == calls + 1
        assert 0 < total(s, "raymta_submit_latency_seconds_sum") < 60
        # bounded: 20 domains on 3 sites here, top 5 -> at most 5 names + other + none
        sites = {dict(lb)["site"] for lb in s["raymta_messages_total"]}
        assert len(sites - {"other", "none"}) <= 5
        assert total(s, "raymta_queue_site_messages", site=domains[0]) == 30
        assert total(s, "raymta_queue_age_messages", age="0-5m") == 30
        assert total(s, "raymta_queue_messages", state="deferred") == 30
        assert 0 < total(s, "raymta_queue_oldest_message_age_seconds") < 300
        assert total(s, "raymta_shard_quorum") == mc.cfg.queue.shards
        assert total(s, "raymta_shard_copies_in_sync") == mc.cfg.queue.shards * 3
        assert total(s, "raymta_nodes_alive") == 1
        assert total(s, "raymta_relay_connections_opened_total", tls="no") > 0
        # per-site TLS figures: the sinks offer no STARTTLS, so every connection is plaintext
        assert total(s, "raymta_relay_tls_total", kind="plaintext") == \
            total(s, "raymta_relay_connections_opened_total")
        assert len({dict(lb)["site"] for lb in s["raymta_relay_tls_total"]} - {"other"}) <= 5
        assert all(v > 0 for v in s["raymta_spool_size_bytes"].values())
        assert total(s, "raymta_throttle_granted_total") >= n
        assert time.time() - total(s, "raymta_exporter_last_gather_timestamp_seconds") < 10
    finally:
        mc.cancel(held_ids)


def test_rays_endpoint_has_the_per_actor_metrics(cluster):
    import ray
    port = ray.nodes()[0]["MetricsExportPort"]
    want = ("ray_raymta_submit_latency_seconds_bucket", "ray_raymta_site_events_total",
            "ray_raymta_relay_results_total", "ray_raymta_events_total",
            "ray_raymta_relay_connections_opened_total", "ray_raymta_throttle_granted_total")

    missing: list[str] = []

    def ready():
        s = scrape(f"http://127.0.0.1:{port}/metrics")
        missing[:] = [w for w in want if w not in s]
        return s if not missing else None
    try:
        s = wait_for(ready, 60, "raymta's Ray metrics", poll=2)
    except AssertionError as e:
        raise AssertionError(f"{e}; missing: {missing}") from None
    assert total(s, "ray_raymta_site_events_total", type="Delivery") > 0
