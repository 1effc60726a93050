"""The README's operator commands exactly as typed — `raymta up`, `raymta status`,
`raymta down`, no `--address`, no `--config` — in a clean environment: no Ray running, no
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER set (the CLI must make Ray use loopback by itself), a
private temp directory (so Ray's "current cluster" file is this test's alone). Then the same
after a `ray start` left by someone else, and against a stale address: each says so within
seconds, naming the address.

Every Ray process a command starts is in the session of the command the test started
(`start_new_session`): the test ends that session, never `ray stop` (which would end every
Ray on the machine)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_cli import REPO, free_port, session_pids, show, stop_session

pytestmark = pytest.mark.timeout(600)


def clean_env(tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") or k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["TMPDIR"] = tmp                       # Ray's temp dir and address file: ours alone
    env["PYTHONPATH"] = str(REPO)
    return env


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240
        ) -> tuple[subprocess.CompletedProcess[str], int]:
    """A `raymta` command in a session of its own; returns it and its session id."""
    p = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), p.pid


@pytest.fixture
def private_tmp():
    # short: Ray's Unix socket paths live under it
    d = tempfile.mkdtemp(prefix="ru-", dir="/tmp")
    sessions: list[int] = []
    try:
        yield d, sessions
    finally:
        left = [pid for sid in sessions for pid in stop_session(sid)]
        subprocess.run(["rm", "-rf", d])
        assert not left, f"Ray processes survived: {left}"


def test_up_status_down_as_written_on_a_machine_with_no_ray(private_tmp, tmp_path):
    tmp, sessions = private_tmp
    env = clean_env(tmp)
    t0 = time.time()
    p, _ = run(["status"], env, tmp_path, timeout=60)
    assert p.returncode == 2 and "no Ray cluster is running on this machine" in p.stderr, show(p)
    assert time.time() - t0 < 30
    p, sid = run(["up"], env, tmp_path)
    sessions.append(sid)
    assert p.returncode == 0, show(p)
    assert "starting a Ray head node on 127.0.0.1" in p.stdout
    assert "coordinator:0" in p.stdout and (tmp_path / "raymta-spool").is_dir()
    addr = (Path(tmp) / "ray" / "ray_current_cluster").read_text().strip()
    assert addr.startswith("127.0.0.1:"), addr          # loopback, never the host's address
    p, _ = run(["status"], env, tmp_path, timeout=120)
    assert p.returncode == 0 and '"serving": true' in p.stdout, show(p)
    # the head runs with raymta's cluster settings: a lost node is noticed in ~3 s
    from cluster.deploy import RAY_CLUSTER_SYSTEM_CONFIG
    assert _gcs_config(sid) == RAY_CLUSTER_SYSTEM_CONFIG
    # a second `up` attaches to the running cluster instead of starting another
    p, sid2 = run(["up"], env, tmp_path)
    sessions.append(sid2)
    assert p.returncode == 0 and "starting a Ray head" not in p.stdout, show(p)
    p, _ = run(["down"], env, tmp_path, timeout=120)
    assert p.returncode == 0 and "stopped" in p.stdout, show(p)
    assert session_pids(sid), "the Ray head `up` started stays (down stops raymta only)"


def _gcs_config(sid: int) -> dict:
    """The system config the session's GCS server was started with (its --config_list)."""
    import base64
    import json
    for pid in session_pids(sid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"gcs_server"):
            for a in args:
                if a.startswith(b"--config_list="):
                    doc = json.loads(base64.b64decode(a.split(b"=", 1)[1]))
                    return {k: v for k, v in doc.items() if k in RAY_KEYS}
    raise AssertionError(f"no gcs_server in session {sid}")


RAY_KEYS = ("max_direct_call_object_size", "health_check_period_ms", "health_check_timeout_ms",
            "health_check_failure_threshold")


def test_up_attaches_to_a_ray_start_left_by_someone_else(private_tmp, tmp_path):
    tmp, sessions = private_tmp
    env = clean_env(tmp)
    port = free_port()
    env_ray = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env_ray, capture_output=True,
                   timeout=60)
    head = subprocess.Popen(
        ["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=false", "--disable-usage-stats", "--num-cpus=2",
         f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}"],
        cwd=tmp_path, env=env_ray, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    sessions.append(head.pid)
    out, _ = head.communicate(timeout=180)
    assert head.returncode == 0, out
    p, sid = run(["up"], env, tmp_path)
    sessions.append(sid)
    assert p.returncode == 0 and "starting a Ray head" not in p.stdout, show(p)
    p, _ = run(["status"], env, tmp_path, timeout=120)
    assert p.returncode == 0 and '"serving": true' in p.stdout, show(p)
    p, _ = run(["down"], env, tmp_path, timeout=120)
    assert p.returncode == 0, show(p)


def test_a_stale_or_wrong_address_is_named_within_seconds(private_tmp, tmp_path):
    tmp, _ = private_tmp
    env = clean_env(tmp)
    dead = free_port()
    (Path(tmp) / "ray").mkdir()
    (Path(tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead}")
    for args in (["status"], ["events"], ["down"], ["status", "--address", f"127.0.0.1:{dead}"]):
        t0 = time.time()
        p, _ = run(args, env, tmp_path, timeout=60)
        assert p.returncode == 2, show(p)
        assert f"no Ray cluster answers at 127.0.0.1:{dead}" in p.stderr, show(p)
        assert time.time() - t0 < 30, args
