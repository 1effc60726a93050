"""The shipped Prometheus alert rules: promtool checks them and runs their unit tests, every
metric they read is one raymta exports, and a real Prometheus scraping a running cluster fires
RaymtaDeliveriesStalled within 60 s of deliveries stopping.

Needs Debian's ``prometheus`` package (promtool and prometheus); ``.ci/run`` installs it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, pipeline_config, pipeline_zone, raw_message, wait_for

pytestmark = pytest.mark.timeout(420)

OPS = REPO_ROOT / "ops" / "prometheus"
RULES = OPS / "raymta-alerts.yml"
RULE_TESTS = OPS / "tests" / "raymta-alerts.test.yml"
ALERTS = {"RaymtaQueueLarge", "RaymtaOldestMessageOld", "RaymtaDeliveriesStalled",
          "RaymtaReplicationLag", "RaymtaShardWithoutQuorum", "RaymtaShardNotServing",
          "RaymtaFrequentLeaderChanges", "RaymtaBounceRateHigh", "RaymtaComplaintRateHigh",
          "RaymtaSpoolDiskNearlyFull", "RaymtaSpoolDiskFillingUp", "RaymtaNodeGone",
          "RaymtaMetricsDown"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package prometheus; .ci/run installs it)")
    return path


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules():
    r = run(tool("promtool"), "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in r.stdout


def test_every_alert_the_issue_asks_for_is_there_with_a_runbook_entry():
    import yaml
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == ALERTS
    runbook = (REPO_ROOT / "docs" / "operations.md").read_text()
    for r in rules:
        anchor = r["annotations"]["runbook"].split("#", 1)[1]
        assert f"### {anchor}".lower() in runbook.lower(), f"{r['alert']}: no runbook section"
        assert r["labels"]["severity"] in ("warning", "critical")


def test_promtool_unit_tests_pass_and_catch_a_broken_rule(tmp_path):
    promtool = tool("promtool")
    r = run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    # the tests are sharp: a stall window of 5 minutes instead of 30 s fails them
    (tmp_path / "tests").mkdir()
    (tmp_path / RULES.name).write_text(RULES.read_text().replace(
        '{event="Delivery"}[30s]', '{event="Delivery"}[5m]'))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    r = run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path / "tests")
    assert r.returncode != 0 and "RaymtaDeliveriesStalled" in r.stdout + r.stderr


def test_example_scrape_config_is_valid(tmp_path):
    text = (OPS / "prometheus.yml").read_text().replace("/etc/prometheus/raymta-alerts.yml",
                                                        str(RULES))
    (tmp_path / "prometheus.yml").write_text(text)
    r = run(tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def metric_names(expr: str) -> set[str]:
    """raymta_* metric names an expression (PromQL or Grafana's) reads."""
    return set(re.findall(r"\b(raymta_[a-z0-9_]+)", expr))


def exported_samples() -> set[str]:
    from actors.metrics_exporter import EXPORTED
    out = set()
    for name, (kind, _l, _d) in EXPORTED.items():
        out.add(name)
        if kind == "histogram":
            out |= {name + "_bucket", name + "_sum", name + "_count"}
    return out


def test_rules_read_only_metrics_raymta_exports():
    import yaml
    doc = yaml.safe_load(RULES.read_text())
    used = set()
    for g in doc["groups"]:
        for r in g["rules"]:
            used |= metric_names(r["expr"])
    assert used and used <= exported_samples(), used - exported_samples()


# ------------------------------------------------------------------------------- live
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """Debian's prometheus on 127.0.0.1, a temp dir, 1 s scrape and evaluation."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.dir = tmp
        self.port = free_port()
        (tmp / "prometheus.yml").write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "raymta",
                                "static_configs": [{"targets": [target]}]}]}))
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h"], stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            assert self.proc.poll() is None, (self.dir / "prometheus.log").read_text()[-3000:]
            return False

    def query(self, q: str) -> float | None:
        res = self.get("/api/v1/query", query=q)["data"]["result"]
        return float(res[0]["value"][1]) if res else None

    def alert_state(self, name: str) -> str | None:
        for a in self.get("/api/v1/alerts")["data"]["alerts"]:
            if a["labels"]["alertname"] == name:
                return a["state"]
        return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def test_real_prometheus_fires_deliveries_stalled_within_60s(tmp_path, dns_server, sinks):
    import ray

    from actors.metrics_exporter import EXPORTER_NAME
    from cluster.client import MailCluster
    tool("prometheus")
    domains = pipeline_zone(dns_server)
    cfg = pipeline_config(str(tmp_path / "spool"), dns_server.port, sinks.port)
    # a site told to slow down (the 421 below) stays paused for a minute: its mail waits ready
    cfg = dataclasses.replace(
        cfg, metrics=dataclasses.replace(cfg.metrics, port=0, interval=1.0),
        delivery=dataclasses.replace(cfg.delivery, site_backoff=60.0, site_backoff_max=60.0))
    mc = MailCluster.connect(config=cfg, num_cpus=2)
    prom = None
    try:
        url = ray.get(mc.handles[EXPORTER_NAME].status.remote())["url"]
        target = urllib.parse.urlparse(url).netloc
        assert target.startswith("127.0.0.1:")
        (tmp_path / "prom").mkdir()
        prom = Prometheus(tmp_path / "prom", target)
        wait_for(prom.ready, 60, "Prometheus to be ready", poll=0.5)

        def msgs(tag: str, n: int) -> list[dict]:
            return [{"sender": "b@origin.test", "recipients": [f"{tag}{i}@{domains[i % 20]}"],
                     "raw": raw_message(i, f"{tag}{i}@{domains[i % 20]}")} for i in range(n)]
        assert all(r.accepted for r in mc.submit(msgs("first", 200)))
        assert mc.wait_until_idle(timeout=120)
        wait_for(lambda: (prom.query('sum(raymta_messages_total{event="Delivery"})') or 0)
                 >= 200, 60, "Prometheus to see 200 deliveries", poll=1)
        assert prom.alert_state("RaymtaDeliveriesStalled") is None   # idle is not stalled

        # steady traffic (~100 msgs/s) before and after the stop, as in production
        stop_sending = threading.Event()
        refused: list[str] = []

        def sender() -> None:
            k = 0
            while not stop_sending.is_set():
                refused.extend(r.error for r in mc.submit(msgs(f"s{k}-", 25))
                               if not r.accepted)
                k += 1
                time.sleep(0.25)
        t = threading.Thread(target=sender, daemon=True)
        t.start()
        try:
            time.sleep(20)
            assert prom.alert_state("RaymtaDeliveriesStalled") is None, "fired while flowing"
            before = len(sinks.received)
            sinks.greeting_code = 421     # every MX host now turns every connection away
            t_stop = time.time()
            last = max(r.at for r in list(sinks.received))
            assert t_stop - last < 5, "deliveries were not flowing up to the stop"
            fired = wait_for(lambda: prom.alert_state("RaymtaDeliveriesStalled") == "firing"
                             and time.time(), 90, "RaymtaDeliveriesStalled to fire", poll=0.5)
        finally:
            stop_sending.set()
            t.join(30)
        last = max(r.at for r in list(sinks.received))
        print(f"\nRaymtaDeliveriesStalled fired {fired - t_stop:.1f} s after the sinks began "
              f"refusing ({fired - last:.1f} s after the last delivery; "
              f"{len(sinks.received) - before} delivered on warm connections meanwhile)")
        assert not refused, refused[:3]
        assert fired - t_stop < 60, f"fired {fired - t_stop:.1f} s after deliveries stopped"
        assert fired - last > 30, "fired before 30 s without a delivery had passed"
        assert prom.query('sum(raymta_queue_messages{state=~"ready|inflight"})') > 0
    finally:
        sinks.greeting_code = 220
        if prom is not None:
            prom.stop()
        mc.close()
