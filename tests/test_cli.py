"""The ``raymta`` command line against a real ``ray start`` head, with Ray's token auth on.

One head (GCS and Ray client server on free loopback ports) serves the whole module: ``raymta
up`` deploys the detached actors, ``submit`` queues a .eml file and a JSON-lines file, the
loopback sinks receive them, ``status`` and ``events`` report them, a separate process submits
through the Ray client (``ray://``), and ``down`` stops the actors. Every command is a real
process (the ``raymta`` console script); nothing is mocked.

The head is started in a session of its own and stopped by ending exactly the processes of that
session (SIGTERM, then SIGKILL): ``ray stop`` would also stop every other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import pipeline_zone, wait_for

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "raymta"


# ------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every process the tests start: loopback-only Ray, no usage stats,
    this checkout importable (for the CLI and for the Ray workers the head starts), and no
    inherited RAY_ADDRESS / RAY_AUTH_MODE (token auth is Ray's default and stays on)."""
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(k, None)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def _tool(name: str) -> list[str] | None:
    path = Path(sys.executable).with_name(name)
    return [str(path)] if path.exists() else None


def raymta(*args: str, cwd: Path, timeout: float = 180,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``raymta`` console script (``python -m cluster.cli`` if it is not installed)."""
    cmd = (_tool("raymta") or [sys.executable, "-m", "cluster.cli"]) + list(args)
    return subprocess.run(cmd, cwd=cwd, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout)


def show(p: subprocess.CompletedProcess[str]) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: the head and everything it started."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()   # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(d))
    return out


def stop_session(sid: int, grace: float = 3.0) -> list[int]:
    """End every process of the head's session; returns those still alive after SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        pids = session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while session_pids(sid) and time.time() < deadline:
            time.sleep(0.2)
    return session_pids(sid)


def have_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").exists())


def config_toml(spool: Path, dns_port: int, smtp_port: int) -> str:
    """The tests' pipeline settings (conftest.pipeline_config) as a raymta TOML file."""
    return textwrap.dedent(f"""\
        [spool]
        directory = "{spool}"

        [queue]
        retry_initial = "1s"
        retry_max_delay = "3s"
        dns_retry_initial = "1s"
        max_age = "10m"
        inflight_timeout = "60s"

        [dns]
        nameservers = ["127.0.0.1"]
        port = {dns_port}
        timeout = "1s"
        min_ttl = 1

        [delivery]
        smtp_port = {smtp_port}
        allow_networks = ["127.0.0.0/8"]
        connect_timeout = "2s"
        command_timeout = "10s"
        idle_timeout = "1s"
        site_backoff = "1s"
        site_backoff_max = "5s"
        lease_ttl = "6s"

        [[egress]]
        name = "default"
        ehlo_name = "relay.raymta.test"

        [site_defaults]
        rate = "5000/s"
        max_connections = 6
        """)


def accepted_ids(stdout: str) -> dict[int, list[str]]:
    """``[i] accepted id id ...`` lines of ``raymta submit`` → {i: ids}."""
    out = {}
    for ln in stdout.splitlines():
        m = re.fullmatch(r"\[(\d+)\] accepted (.+?)( \(duplicate\))?", ln)
        if m:
            out[int(m.group(1))] = m.group(2).split()
    return out


def status_summary(stdout: str) -> dict:
    """The JSON totals ``raymta status`` prints first (up to the first line that is ``}``)."""
    lines = stdout.splitlines()
    end = lines.index("}")
    return json.loads("\n".join(lines[:end + 1]))


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def head(tmp_path_factory, dns_server, sinks):
    """A Ray head from ``ray start --head`` on loopback (token auth on) and a config file."""
    pipeline_zone(dns_server)
    work = tmp_path_factory.mktemp("cli")
    spool = work / "spool"
    cfg = work / "raymta.toml"
    cfg.write_text(config_toml(spool, dns_server.port, sinks.port))
    if not have_token():
        # `ray start` turns token auth on only when a token exists; make the local dev one
        subprocess.run((_tool("ray") or ["ray"]) + ["get-auth-token", "--generate"],
                       env=child_env(), capture_output=True, check=True, timeout=60)
    gcs_port, client_port, agent_port = free_port(), free_port(), free_port()
    # a short temp dir of its own (Unix socket paths must stay short), removed afterwards
    temp_dir = tempfile.mkdtemp(prefix="rmta-")
    log = work / "ray-start.log"
    cmd = (_tool("ray") or ["ray"]) + [
        "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", "--include-dashboard=false",
        f"--ray-client-server-port={client_port}", "--disable-usage-stats", "--num-cpus=2",
        f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp_dir}"]
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=work, env=child_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    sid = proc.pid   # session leader: every Ray process of this head is in its session
    try:
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = None
        out = log.read_text()
        assert rc == 0, f"ray start exited {rc}:\n{out}"
        assert "Token authentication is enabled" in out, out
        print(f"\nray start --head: {time.time() - t0:.1f}s (session {sid}, "
              f"gcs 127.0.0.1:{gcs_port}, client 127.0.0.1:{client_port})")
        yield {"address": f"127.0.0.1:{gcs_port}", "client": f"ray://127.0.0.1:{client_port}",
               "config": cfg, "spool": spool, "work": work, "sinks": sinks, "sid": sid,
               "temp_dir": temp_dir}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = stop_session(sid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes survived the stop: {left}"


@pytest.fixture(scope="module")
def deployed(head):
    """``raymta up`` with an explicit GCS address."""
    t0 = time.time()
    p = raymta("up", "--config", str(head["config"]), "--address", head["address"],
               cwd=head["work"])
    print(f"raymta up: {time.time() - t0:.1f}s")
    assert p.returncode == 0, show(p)
    return {**head, "up": p}


@pytest.fixture(scope="module")
def submitted(deployed):
    """A .eml file (recipients from To and Cc) and a JSON-lines file of three messages, one of
    them malformed, submitted with ``raymta submit`` and delivered to the sinks."""
    work, sinks = deployed["work"], deployed["sinks"]
    eml = work / "hello.eml"
    eml.write_bytes(
        b"From: Sender <sender@origin.test>\r\n"
        b"To: Ann <ann@d0.test>\r\n"
        b"Cc: bob@d1.test\r\n"
        b"Subject: from a .eml file\r\n"
        b"Message-ID: <cli-eml-1@origin.test>\r\n"
        b"Date: Sat, 28 Nov 2026 05:00:00 +0000\r\n"
        b"\r\n"
        b"Hello from raymta submit.\r\n")
    jsonl = work / "batch.jsonl"
    jsonl.write_text("\n".join(json.dumps(m) for m in [
        {"sender": "bounces@origin.test", "recipients": ["carol@d2.test"],
         "from": "News <news@origin.test>", "subject": "jsonl 0", "text": "Hi Carol\n"},
        {"sender": "bounces@origin.test", "recipients": ["not an address"],
         "from": "News <news@origin.test>", "subject": "jsonl 1", "text": "never sent\n"},
        {"sender": "bounces@origin.test", "recipients": "dave@d3.test",
         "from": "News <news@origin.test>", "subject": "jsonl 2", "html": "<p>Hi Dave</p>",
         "tags": {"campaign": "cli"}},
    ]) + "\n")
    common = ["--config", str(deployed["config"]), "--address", deployed["address"]]
    t0 = time.time()
    p_eml = raymta("submit", *common, str(eml), cwd=work)
    p_jsonl = raymta("submit", *common, str(jsonl), cwd=work)
    t_sub = time.time() - t0
    want = ["ann@d0.test", "bob@d1.test", "carol@d2.test", "dave@d3.test"]
    if p_eml.returncode in (0, 1) and p_jsonl.returncode in (0, 1):
        wait_for(lambda: all(sinks.counts_by_rcpt()[r] >= 1 for r in want), 60,
                 "the sinks to receive the four accepted recipients")
    print(f"raymta submit x2: {t_sub:.1f}s; delivered after {time.time() - t0:.1f}s")
    return {**deployed, "eml": p_eml, "jsonl": p_jsonl, "want": want,
            "ids": {"eml": accepted_ids(p_eml.stdout), "jsonl": accepted_ids(p_jsonl.stdout)}}


# ------------------------------------------------------------------------------------ tests
def test_user_errors_are_one_line_messages_not_tracebacks(tmp_path):
    """Config and file problems: exit 2 and ``raymta: <what is wrong>``, before any Ray."""
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: a@origin.test\r\nTo: b@d0.test\r\nSubject: x\r\n\r\nhi\r\n")
    bad_value = tmp_path / "bad-value.toml"
    bad_value.write_text('[queue]\nretry_initial = "soon"\n')
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[queue\nretry_initial = 1s\n")
    missing = tmp_path / "missing.toml"
    nowhere = f"127.0.0.1:{free_port()}"   # never reached: these fail before Ray starts
    cases = [
        (["submit", "--config", str(missing), "--address", nowhere, str(eml)],
         f"raymta: config {missing}: cannot read: No such file or directory"),
        (["submit", "--config", str(bad_value), "--address", nowhere, str(eml)],
         "raymta: config queue.retry_initial: invalid duration 'soon'"),
        (["up", "--config", str(bad_toml), "--address", nowhere],
         f"raymta: config {bad_toml}: invalid TOML"),
        (["status", "--config", str(bad_value), "--address", nowhere],
         "raymta: config queue.retry_initial"),
        (["submit", "--address", nowhere, str(tmp_path / "nope.eml")],
         "raymta: [Errno 2] No such file or directory"),
    ]
    for args, expect in cases:
        p = raymta(*args, cwd=tmp_path, timeout=60)
        assert p.returncode == 2, show(p)
        assert expect in p.stderr, show(p)
        assert "Traceback" not in p.stderr, show(p)
        assert p.stdout == "", show(p)


def test_up_deploys_the_named_actors(deployed):
    out = deployed["up"].stdout
    assert f"raymta deployed in namespace {NAMESPACE!r}" in out, show(deployed["up"])
    names = [ln.strip() for ln in out.splitlines() if ln.startswith("  ")]
    assert "coordinator:0" in names and "throttle:pool:0" in names
    assert "throttle:pool:1" not in names    # one shared throttle by default
    assert [n for n in names if re.fullmatch(r"relay:[0-9a-f]{12}:default", n)], names
    assert f"spool: {deployed['spool'].resolve()}" in out
    # again, with the address only in RAY_ADDRESS (--address defaults to "auto"): attaches to
    # the same cluster and the same actors (deploy is idempotent)
    p = raymta("up", "--config", str(deployed["config"]), cwd=deployed["work"],
               env=child_env(RAY_ADDRESS=deployed["address"]))
    assert p.returncode == 0, show(p)
    again = [ln.strip() for ln in p.stdout.splitlines() if ln.startswith("  ")]
    assert again == names


def test_submit_eml_and_jsonl(submitted):
    p_eml, p_jsonl = submitted["eml"], submitted["jsonl"]
    # .eml: one message, recipients from To and Cc, sender from From
    assert p_eml.returncode == 0, show(p_eml)
    assert len(submitted["ids"]["eml"][0]) == 2, show(p_eml)
    # .jsonl: the malformed message is refused naming the field, the other two are accepted
    assert p_jsonl.returncode == 1, show(p_jsonl)
    assert "[1] refused: recipients[0]: missing @" in p_jsonl.stderr, show(p_jsonl)
    assert "Traceback" not in p_jsonl.stderr, show(p_jsonl)
    assert sorted(submitted["ids"]["jsonl"]) == [0, 2], show(p_jsonl)
    assert all(len(v) == 1 for v in submitted["ids"]["jsonl"].values())
    # delivered once each, with the envelope the files asked for
    sinks = submitted["sinks"]
    counts = sinks.counts_by_rcpt()
    assert all(counts[r] == 1 for r in submitted["want"]), counts
    got = {r.rcpt_to: r for r in sinks.received if r.rcpt_to in submitted["want"]}
    assert got["ann@d0.test"].mail_from == "sender@origin.test"
    assert got["ann@d0.test"].data == got["bob@d1.test"].data
    assert b"Hello from raymta submit." in got["ann@d0.test"].data
    assert got["carol@d2.test"].mail_from == "bounces@origin.test"
    assert b"<p>Hi Dave</p>" in got["dave@d3.test"].data
    assert not any("not an address" in r.rcpt_to for r in sinks.received)


def test_status_shows_counts_and_message_states(submitted):
    common = ["--config", str(submitted["config"]), "--address", submitted["address"]]
    p = raymta("status", *common, cwd=submitted["work"])
    assert p.returncode == 0, show(p)
    totals = status_summary(p.stdout)
    assert totals["accepted"] >= 4 and totals["delivered"] >= 4, totals
    assert totals["bounced"] == 0 and totals["live"] == 0, totals
    for shard in range(2):   # the defaults: 2 shards of 3 copies, each serving in epoch 1
        assert re.search(rf"^shard {shard}: live=0 ready=0 inflight=0 deferred=0 lsn=\d+ "
                         r"epoch=1 serving$", p.stdout, re.M), p.stdout
    assert re.search(r"^throttle:pool:0 \{", p.stdout, re.M), show(p)
    assert re.search(r"^relay:[0-9a-f]{12}:default \{", p.stdout, re.M), show(p)
    # by id, found through RAY_ADDRESS with the default --address auto and no --config
    ids = [i for v in submitted["ids"]["eml"].values() for i in v] + \
          [i for v in submitted["ids"]["jsonl"].values() for i in v]
    p = raymta("status", *ids, cwd=submitted["work"],
               env=child_env(RAY_ADDRESS=submitted["address"]))
    assert p.returncode == 0, show(p)
    lines = dict(ln.split(" ", 1) for ln in p.stdout.splitlines())
    assert list(lines) == ids, show(p)
    states = {mid: json.loads(v) for mid, v in lines.items()}
    assert all(s["state"] == "delivered" and s["code"] == 250 for s in states.values()), states
    assert {s["recipient"] for s in states.values()} == set(submitted["want"])


def test_events_print_json_lines(submitted):
    p = raymta("events", "--address", submitted["address"], cwd=submitted["work"])
    assert p.returncode == 0, show(p)
    evs = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
    ids = {i for part in ("eml", "jsonl") for v in submitted["ids"][part].values() for i in v}
    kinds = Counter(e["type"] for e in evs if e["id"] in ids)
    assert kinds["Reception"] == 4 and kinds["Delivery"] == 4, kinds
    assert all("seq" in e and e["shard"] in range(4) for e in evs)
    # --since: only what came after. seq counts per shard, so several events share a value;
    # take the middle of the distinct values below the highest, so some event comes after it
    below_top = sorted({e["seq"] for e in evs})[:-1]
    assert below_top, evs
    mid = below_top[len(below_top) // 2]
    p = raymta("events", "--address", submitted["address"], "--since", str(mid),
               cwd=submitted["work"])
    assert p.returncode == 0, show(p)
    later = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
    assert later and all(e["seq"] > mid for e in later)
    assert len(later) == sum(1 for e in evs if e["seq"] > mid)
    # --follow --since S where one shard has nothing after S: its old events must not come
    # back on the second poll (they did: its cursor fell back to 0)
    top = {sh: max(e["seq"] for e in evs if e["shard"] == sh) for sh in {e["shard"] for e in evs}}
    since = min(top.values())
    want = sorted((e["shard"], e["seq"], e["type"]) for e in evs if e["seq"] > since)
    cmd = (_tool("raymta") or [sys.executable, "-m", "cluster.cli"]) + [
        "events", "--follow", "--address", submitted["address"], "--since", str(since)]
    proc = subprocess.Popen(cmd, cwd=submitted["work"], env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    printed: list[str] = []      # its lines as they come (it flushes each event)

    def read() -> None:
        for ln in proc.stdout:   # type: ignore[union-attr]
            printed.append(ln)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # until the first poll has printed what it owes (process start and Ray connect take
        # most of the time), then four more polls of one second each: a cursor that fell back
        # would print old events again on the next one
        deadline = time.time() + 60     # (if they never come, the asserts below say what did)
        while (time.time() < deadline and proc.poll() is None
               and not set(want) <= {(e["shard"], e["seq"], e["type"]) for e in
                                     (json.loads(ln) for ln in list(printed) if ln.strip())}):
            time.sleep(0.2)
        time.sleep(4)
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(10)
        err = proc.stderr.read()   # type: ignore[union-attr]
    followed = [json.loads(ln) for ln in printed if ln.strip()]
    got = sorted((e["shard"], e["seq"], e["type"], e["id"]) for e in followed)
    assert all(e["seq"] > since for e in followed), (since, got, err[-2000:])
    assert len(got) == len(set(got)), got                  # nothing printed twice
    assert set(want) <= {g[:3] for g in got}, (want, got)


def test_suppress_add_list_import_export_remove(submitted):
    common = ["--config", str(submitted["config"]), "--address", submitted["address"]]
    work = submitted["work"]
    p = raymta("suppress", "add", "gone@d0.test", "--reason", "unsubscribe", "--scope",
               "origin.test", *common, cwd=work)
    assert p.returncode == 0 and "suppressed 1 addresses" in p.stdout, show(p)
    csv_in = work / "supp.csv"
    csv_in.write_text("address,reason,cause\nx1@d1.test,complaint,fbl\nx2@d1.test,,\n"
                      "not an address,manual,\n")
    p = raymta("suppress", "import", "--file", str(csv_in), *common, cwd=work)
    assert p.returncode == 1, show(p)            # one bad row: named, the others imported
    assert "imported 2 of 3 rows" in p.stdout and "rows[2]" in p.stdout, show(p)
    p = raymta("suppress", "list", "--prefix", "x", *common, cwd=work)
    listed = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert {(e["address"], e["reason"]) for e in listed} == {("x1@d1.test", "complaint"),
                                                              ("x2@d1.test", "manual")}
    out = work / "supp-out.csv"
    p = raymta("suppress", "export", "--file", str(out), *common, cwd=work)
    assert p.returncode == 0, show(p)
    lines = out.read_text().splitlines()
    assert lines[0] == "address,scope,reason,created,expires_at,cause" and len(lines) == 4
    assert any(ln.startswith("gone@d0.test,origin.test,unsubscribe,") for ln in lines)
    # the import of the export changes nothing and refuses nothing
    p = raymta("suppress", "import", "--file", str(out), *common, cwd=work)
    assert p.returncode == 0 and "imported 3 of 3" in p.stdout, show(p)
    p = raymta("suppress", "remove", "x1@d1.test", "x2@d1.test", "gone@d0.test", *common,
               cwd=work)
    assert p.returncode == 0 and "removed 2 suppressions" in p.stdout, show(p)  # gone: scoped
    p = raymta("suppress", "remove", "gone@d0.test", "--scope", "origin.test", *common,
               cwd=work)
    assert "removed 1" in p.stdout, show(p)


def test_operator_commands_queue_inspect_suspend_resume_bounce_config(submitted):
    common = ["--config", str(submitted["config"]), "--address", submitted["address"]]
    work, sinks = submitted["work"], submitted["sinks"]
    # config check: a good file, and a bad key named
    p = raymta("config", "check", str(submitted["config"]), cwd=work)
    assert p.returncode == 0 and ": ok (" in p.stdout, show(p)
    bad = work / "bad.toml"
    bad.write_text("[queue]\nretry_initial = \"soon\"\n")
    p = raymta("config", "check", str(bad), cwd=work)
    assert p.returncode == 2 and "queue.retry_initial" in p.stderr, show(p)
    # mail held for an hour to d7.test, and a suspended d8.test
    p = raymta("suspend", "d8.test", "--for", "2h", *common, cwd=work)
    assert p.returncode == 0 and "suspended d8.test for 2h" in p.stdout, show(p)
    held = time.time() + 3600
    jl = work / "ops.jsonl"
    jl.write_text("\n".join(json.dumps(m) for m in [
        {"sender": "s@origin.test", "recipients": [f"h{i}@d7.test"], "subject": f"held {i}",
         "text": "x\n", "not_before": held, "tags": {"campaign": "ops"}} for i in range(3)] + [
        {"sender": "s@origin.test", "recipients": ["w@d8.test"], "subject": "waits",
         "text": "y\n"}]) + "\n")
    p = raymta("submit", *common, str(jl), cwd=work)
    assert p.returncode == 0, show(p)
    ids = accepted_ids(p.stdout)
    p = raymta("queue", "--json", *common, cwd=work)
    shape = json.loads(p.stdout)
    assert shape["site_ages"]["d7.test"] == {"0-5m": 3}, shape
    assert shape["site_ages"]["d8.test"] == {"0-5m": 1}, shape
    p = raymta("queue", *common, cwd=work)
    assert "d7.test" in p.stdout and "TOTAL" in p.stdout, show(p)
    first = next(iter(ids.values()))[0]
    p = raymta("inspect", first, *common, cwd=work)
    assert p.returncode == 0 and "Subject: held" in p.stdout and "deferred" in p.stdout, show(p)
    p = raymta("inspect", "0" * 26, *common, cwd=work)
    assert p.returncode == 1 and "no message" in p.stderr
    time.sleep(3)
    assert sinks.counts_by_rcpt()["w@d8.test"] == 0       # suspended: it waits
    p = raymta("resume", "d8.test", *common, cwd=work)
    assert p.returncode == 0, show(p)
    wait_for(lambda: sinks.counts_by_rcpt()["w@d8.test"] == 1, 60, "d8.test resumed")
    p = raymta("bounce", "--tag", "campaign=ops", "--json", *common, cwd=work)
    assert json.loads(p.stdout) == {"cancelled": 3}, show(p)
    p = raymta("status", first, *common, cwd=work)
    assert "cancelled" in p.stdout, show(p)


CLIENT_SCRIPT = """
import json, sys, time
import ray
import ray.util.client
from cluster.client import MailCluster
mc = MailCluster.connect(sys.argv[1], config=sys.argv[2])
assert ray.util.client.ray.is_connected(), "not a Ray client connection"
res = mc.submit([{"sender": "bounces@origin.test", "recipients": [sys.argv[3]],
                  "from": "Client <client@origin.test>", "subject": "through ray://",
                  "text": "sent through the Ray client\\n"}])
assert res[0].accepted, res[0].error
deadline = time.time() + 60
while (mc.status(res[0].ids[0]) or {}).get("state") != "delivered" and time.time() < deadline:
    time.sleep(0.2)
print(json.dumps({"ids": res[0].ids, "status": mc.status(res[0].ids[0])}))
ray.shutdown()
"""


def test_ray_client_path_submits_and_delivers(deployed):
    """``MailCluster.connect("ray://...")`` from another process (this one keeps no Ray)."""
    rcpt = "client@d4.test"
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, deployed["client"],
                        str(deployed["config"]), rcpt], cwd=deployed["work"], env=child_env(),
                       capture_output=True, text=True, timeout=180)
    if p.returncode != 0:   # say why the head's client server failed, before it is removed
        logs = sorted(Path(deployed["temp_dir"]).rglob("ray_client_server*.err"))
        tails = "\n".join(f"== {f}\n" + "\n".join(f.read_text().splitlines()[-20:])
                          for f in logs)
        raise AssertionError(show(p) + "\n" + tails)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(out["ids"]) == 1 and out["status"]["state"] == "delivered", out
    wait_for(lambda: deployed["sinks"].counts_by_rcpt()[rcpt] == 1, 30, "the sink to get it")
    got = [r for r in deployed["sinks"].received if r.rcpt_to == rcpt]
    assert b"sent through the Ray client" in got[0].data
    print(f"ray:// client submit + delivery: {time.time() - t0:.1f}s")


def test_down_stops_the_actors_and_keeps_the_spool(deployed):
    # this runs last: it takes the deployment away
    p = raymta("down", "--address", deployed["address"], cwd=deployed["work"])
    assert p.returncode == 0, show(p)
    # 1 relay, 1 throttle, 2 shard leaders and their 4 replicas, the metrics exporter
    assert "stopped 9 raymta actors (the spool stays on disk)" in p.stdout, show(p)
    status = ["status", "--config", str(deployed["config"]), "--address", deployed["address"]]

    def gone():
        q = raymta(*status, cwd=deployed["work"])
        return q if q.returncode != 0 else None
    q = wait_for(gone, 60, "raymta status to fail after down", poll=0.5)
    assert q.returncode == 2, show(q)
    assert (f"raymta: no raymta deployment in namespace {NAMESPACE!r} at "
            f"{deployed['address']}: run `raymta up` first") in q.stderr, show(q)
    assert "Traceback" not in q.stderr, show(q)
    # no raymta actor is left in the cluster
    check = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print([a['name'] for a in ray.util.list_named_actors(all_namespaces=True) "
             "if a['namespace'] == 'raymta'])")
    r = subprocess.run([sys.executable, "-c", check, deployed["address"]],
                       cwd=deployed["work"], capture_output=True, text=True, timeout=120,
                       env=child_env(RAY_AUTH_MODE="token"))
    assert r.returncode == 0, show(r)
    assert r.stdout.strip().splitlines()[-1] == "[]", show(r)
    # the spool stays
    assert any(deployed["spool"].rglob("*")), "the spool directory is empty"
