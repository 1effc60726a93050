"""The Grafana dashboard: provisioning-ready, every query valid PromQL, and every metric it
names one the cluster exports (actors/metrics_exporter.py: EXPORTED; test_ops_metrics checks
that a live endpoint serves every one of those)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.test_ops_alerts import exported_samples, metric_names

GRAFANA = REPO_ROOT / "ops" / "grafana"
DASHBOARD = GRAFANA / "raymta-dashboard.json"


def queries() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in doc["panels"] if p["type"] != "row"
            for t in p["targets"]]


def test_dashboard_is_provisioning_ready():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "raymta-overview" and doc["title"] == "raymta"
    assert doc.get("id") is None       # provisioned dashboards must not carry a database id
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    # the data source is a variable: no uid of somebody's Grafana baked in
    assert [v["type"] for v in doc["templating"]["list"]] == ["datasource"]
    for p in doc["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "raymta.yml").read_text())
    assert prov["apiVersion"] == 1 and prov["providers"][0]["type"] == "file"


def test_every_metric_in_the_dashboard_is_exported():
    exported = exported_samples()
    seen = set()
    for title, expr in queries():
        names = metric_names(expr)
        assert names, f"{title}: {expr} names no raymta metric"
        assert names <= exported, f"{title}: not exported: {names - exported}"
        seen |= names
    # the dashboard shows the figures: queue by state, site and age, latency, lag...
    for must in ("raymta_queue_messages", "raymta_queue_site_messages",
                 "raymta_queue_age_messages", "raymta_submit_latency_seconds_bucket",
                 "raymta_replica_lag_seconds", "raymta_shard_epoch",
                 "raymta_relay_connections_opened_total", "raymta_throttle_suspensions_total",
                 "raymta_dkim_signatures_total", "raymta_suppression_entries",
                 "raymta_spool_free_bytes", "raymta_nodes_alive"):
        assert must in seen, must


def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each query as a recording rule (Grafana sends them as they are)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": expr} for i, (_t, expr) in enumerate(queries())]}]}
    (tmp_path / "q.yml").write_text(yaml.safe_dump(rules))
    r = subprocess.run([promtool, "check", "rules", str(tmp_path / "q.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # and it does catch a bad one
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (site (raymta_queue_site_messages)"}]}]}))
    r = subprocess.run([promtool, "check", "rules", str(tmp_path / "bad.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
