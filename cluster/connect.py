"""Finding the Ray cluster a command is for, before Ray is imported.

Owns: where "auto" points (``RAY_ADDRESS``, or the address the last ``ray start`` here wrote),
whether anything answers there (a TCP connect with a timeout, so a command that cannot reach a
cluster says so within seconds, naming the address, instead of letting ``ray.init`` retry for
minutes), starting a head on 127.0.0.1 for ``raymta up``, and the loopback environment. Ray reads
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is imported: that is why this module must
not import Ray, and why the CLI calls :func:`prepare` first.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path

__all__ = ["LOOPBACK_ENV", "NoCluster", "find_cluster", "prepare", "start_head",
           "use_loopback"]

#: what the embedded default sets so Ray binds and advertises 127.0.0.1 only
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def use_loopback() -> None:
    """Ray binds and advertises 127.0.0.1 only, in this process (if Ray is not imported yet)
    and in every process it starts."""
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def prepare(address: str) -> None:
    """Before Ray is imported: a cluster on this machine's loopback (or none yet, which
    ``raymta up`` starts on 127.0.0.1) gets the loopback environment; a cluster on other
    hosts (a real deployment) does not, or the driver would look for itself at 127.0.0.1."""
    try:
        target = find_cluster(address, timeout=1.0)
    except NoCluster:
        use_loopback()
        return
    host = target.removeprefix("ray://").rpartition(":")[0]
    if _is_loopback(host):
        use_loopback()


class NoCluster(ConnectionError):
    """No Ray cluster answers where one was looked for (the message names the address)."""


def _address_file() -> Path:
    """Where ``ray start`` writes the address of the cluster it started (Ray's own rule:
    ``$RAY_TMPDIR``, else ``$TMPDIR`` on Linux, else /tmp; then ``ray/ray_current_cluster``),
    found without importing Ray."""
    base = os.environ.get("RAY_TMPDIR") or (
        os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None) or "/tmp"
    return Path(base) / "ray" / "ray_current_cluster"


def find_cluster(address: str = "auto", *, timeout: float = 3.0) -> str:
    """The address of a Ray cluster that answers, for ``ray.init``: ``address`` itself
    ("host:port" or "ray://host:port"), or for "auto" ``RAY_ADDRESS`` or the address the last
    ``ray start`` on this machine wrote (Ray's ``ray_current_cluster`` file). Raises
    :class:`NoCluster` within ``timeout`` seconds, naming what it tried, instead of letting
    ``ray.init`` retry a dead or stale address for minutes."""
    import socket
    source = "given"
    if address == "auto":
        if os.environ.get("RAY_ADDRESS"):
            address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
        else:
            f = _address_file()
            try:
                address = f.read_text().strip()
            except OSError:
                raise NoCluster("no Ray cluster is running on this machine (no RAY_ADDRESS, "
                                f"no {f}): start one with `raymta up`") from None
            source = f"written to {f} by the last `ray start` here"
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise NoCluster(f"{address!r} ({source}) is not a Ray address (host:port or "
                        "ray://host:port)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise NoCluster(f"no Ray cluster answers at {hostport} ({source}): {e}") from None
    return address


def start_head(port: int = 6379) -> str:
    """``ray start --head`` bound to 127.0.0.1 (token auth on unless ``RAY_AUTH_MODE`` is
    "disabled"; raymta's system config); the GCS port is ``port`` when it is free, else any
    free one. Returns the address."""
    import socket
    import subprocess

    from cluster.deploy import RAY_CLUSTER_SYSTEM_CONFIG
    use_loopback()
    try:
        with socket.create_server(("127.0.0.1", port)):
            pass
    except OSError:
        with socket.create_server(("127.0.0.1", 0)) as s:
            port = s.getsockname()[1]
    if os.environ.get("RAY_AUTH_MODE", "") != "disabled":
        # `ray start` turns token auth on only when a token exists: make sure one does
        subprocess.run(["ray", "get-auth-token", "--generate"], check=True,
                       stdout=subprocess.DEVNULL)
    subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                    f"--system-config={json.dumps(RAY_CLUSTER_SYSTEM_CONFIG)}"], check=True)
    return f"127.0.0.1:{port}"
