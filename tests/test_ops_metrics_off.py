"""``[metrics] enabled = false``: no exporter actor, no raymta metric on Ray's endpoint, no
tallies kept; mail flows as usual (the "off" side of the cost measurement)."""

from __future__ import annotations

import dataclasses
import urllib.request

import pytest

from tests.conftest import pipeline_config, pipeline_zone, raw_message

# own_ray: Ray's metrics endpoint keeps the series of earlier tests' actors
pytestmark = [pytest.mark.timeout(300), pytest.mark.own_ray]


def test_metrics_off_deploys_no_exporter_and_exports_nothing(tmp_path, dns_server, sinks):
    import ray

    from actors.metrics_exporter import EXPORTER_NAME
    from cluster.client import MailCluster
    domains = pipeline_zone(dns_server)
    cfg = pipeline_config(str(tmp_path / "spool"), dns_server.port, sinks.port)
    cfg = dataclasses.replace(cfg, metrics=dataclasses.replace(cfg.metrics, enabled=False))
    mc = MailCluster.connect(config=cfg, num_cpus=2)
    try:
        msgs = [{"sender": "b@origin.test", "recipients": [f"off{i}@{domains[i % 20]}"],
                 "raw": raw_message(i, f"off{i}@{domains[i % 20]}")} for i in range(200)]
        assert all(r.accepted for r in mc.submit(msgs))
        assert mc.wait_until_idle(timeout=120)
        assert mc.stats()["delivered"] == 200
        assert EXPORTER_NAME not in mc.handles
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        assert EXPORTER_NAME not in names and "coordinator:0" in names
        for st in mc.stats()["shards"]:
            assert st["metrics"]["events"] == []
            assert sum(st["metrics"]["submit_latency"]["buckets"]) == 0
        port = ray.nodes()[0]["MetricsExportPort"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "ray_" in text            # Ray's own metrics are there ...
        assert "ray_raymta_" not in text     # ... raymta's are not
    finally:
        mc.close()
