"""cluster.yaml (three regions) and cluster-onprem.yaml: valid for Ray's launcher (the JSON
schema in the Ray wheel, and Ray's own prepare/validate), every node mapped to a region with
its egress and ingress, three regions each with workers, token auth on, dashboard on loopback."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

FILES = {"cluster.yaml": "regions-cloud.conf", "cluster-onprem.yaml": "regions-onprem.conf"}
MAPS = REPO_ROOT / "ops" / "cluster"


def schema() -> dict:
    import ray
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def load(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / name).read_text())


def node_map(conf: str) -> dict[str, list[str]]:
    out = {}
    for line in (MAPS / conf).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            ip, *rest = line.split()
            out[ip] = rest
    return out


@pytest.mark.parametrize("name", FILES)
def test_launcher_file_matches_the_schema_in_the_ray_wheel(name):
    import jsonschema
    doc = load(name)
    jsonschema.validate(doc, schema())
    broken = copy.deepcopy(doc)
    broken["provider"].pop("type")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema())
    broken = copy.deepcopy(doc)
    broken["max_workers"] = "six"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema())


@pytest.mark.parametrize("name", FILES)
def test_ray_launcher_prepares_and_validates_it(name):
    """What `ray up` does first (no machine is contacted)."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    doc = load(name)
    prepared = prepare_config(doc)     # fills Ray's defaults, as `ray up` does before it checks
    validate_config(prepared)
    nt = prepared["available_node_types"]["local.cluster.node"]
    assert nt["min_workers"] == nt["max_workers"] == len(doc["provider"]["worker_ips"])


@pytest.mark.parametrize("name, conf", FILES.items())
def test_three_regions_each_with_workers_egress_and_ingress(name, conf):
    doc = load(name)
    m = node_map(conf)
    ips = [doc["provider"]["head_ip"]] + doc["provider"]["worker_ips"]
    assert set(ips) == set(m), set(ips) ^ set(m)
    assert m[doc["provider"]["head_ip"]][1] == "head"
    workers = {ip: m[ip] for ip in doc["provider"]["worker_ips"]}
    regions = {r[0] for r in workers.values()}
    assert len(regions) == 3, regions
    # a shard's 3 copies can sit in 3 regions, and each region keeps a copy if a node dies
    # in another: every region has a worker; the whole cluster can lose a region
    for region in regions:
        assert sum(1 for r in workers.values() if r[0] == region) >= 1
    for ip, (region, role, egress, ehlo, ingress) in workers.items():
        assert role == "worker"
        assert egress != "-" and ehlo != "-" and ingress != "-", ip
    assert len({r[2] for r in workers.values()}) == len(workers)   # one egress IP each


@pytest.mark.parametrize("name, conf", FILES.items())
def test_node_labels_script_gives_every_node_valid_ray_labels(tmp_path, name, conf):
    from ray._private.label_utils import parse_node_labels_from_yaml_file, validate_node_labels
    script = MAPS / "node-labels.sh"
    for ip, (region, role, *_rest) in node_map(conf).items():
        out = tmp_path / ip
        r = subprocess.run(["sh", str(script), str(MAPS / conf), str(out), ip],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        labels = parse_node_labels_from_yaml_file(str(out / "ray-labels.yaml"))
        validate_node_labels(labels)
        assert labels["region"] == region and labels["raymta.io/role"] == role
        assert json.loads((out / "ray-resources.json").read_text()) == {f"region:{region}": 1}
    r = subprocess.run(["sh", str(script), str(MAPS / conf), str(tmp_path / "x"), "10.99.0.1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "10.99.0.1 is not in" in r.stderr


@pytest.mark.parametrize("name", FILES)
def test_token_auth_on_and_dashboard_on_loopback(name):
    doc = load(name)
    text = (REPO_ROOT / name).read_text()
    head = " ".join(doc["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in text
    assert "ray get-auth-token --generate" in doc["head_setup_commands"]
    assert "RAY_AUTH_MODE=disabled" not in text
    for cmd in doc["worker_start_ray_commands"][1:] + doc["head_start_ray_commands"][1:]:
        assert "--labels-file=/etc/raymta/ray-labels.yaml" in cmd
    assert os.access(MAPS / "node-labels.sh", os.X_OK)
