"""A Ray started by a job (jobs.common.init_ray) or by the tests listens on loopback only.

Each case runs in its own Python process (a fresh Ray, whatever this session started), lists
the listening TCP sockets of that process and all its descendants (GCS, raylet, agents,
workers, the Serve proxy) and checks every address is 127.0.0.1 / ::1 (or ::ffff:127.0.0.1).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_port

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def listeners() -> list[dict]:
    """Listening TCP sockets of this process and its descendants."""
    import psutil

    me = psutil.Process()
    rows = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    rows.append({"ip": conn.laddr.ip, "port": conn.laddr.port, "proc": name})
        except psutil.Error:  # a worker that exited meanwhile
            continue
    return rows


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def probe(case: str) -> None:
    """Run inside the child process: start Ray as `case` says, print the listeners as JSON."""
    if case == "ray_imported_first":  # as in a test session or a notebook
        import ray  # noqa: F401
    from jobs.common import RayConfig, init_ray
    from serve.config import ServeConfig

    init_ray(RayConfig(num_cpus=1, include_dashboard=case == "dashboard"))
    import ray

    @ray.remote
    def node_ip() -> str:
        return ray.util.get_node_ip_address()

    ips = {ray.util.get_node_ip_address(), ray.get(node_ip.remote())}
    if case == "serve":  # the Serve HTTP proxy as jobs.serve starts it: ServeConfig's host
        from ray import serve

        serve.start(http_options={"host": ServeConfig().host, "port": free_port()})
    # Single-node mode is not left on in this process (a later `ray start --address` would fail).
    left = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    found = {"node_ips": sorted(ips), "listeners": listeners(), "env_left": left}
    print("LISTENERS " + json.dumps(found))
    ray.shutdown()


def run_case(case: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)  # a local Ray, as a job on a laptop starts it
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the job must set what it needs
    code = f"from tests.test_loopback import probe; probe({case!r})"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    lines = [x for x in out.stdout.splitlines() if x.startswith("LISTENERS ")]
    assert out.returncode == 0 and lines, f"probe {case} failed:\n{out.stdout}\n{out.stderr}"
    return json.loads(lines[-1].removeprefix("LISTENERS "))


def exposed(found: dict) -> list[dict]:
    return [row for row in found["listeners"] if not is_loopback(row["ip"])]


@pytest.mark.parametrize("case", ["job", "ray_imported_first", "dashboard", "serve"])
def test_local_ray_listens_on_loopback_only(case):
    found = run_case(case)
    assert found["node_ips"] == ["127.0.0.1"]
    assert found["env_left"] is None
    procs = {row["proc"] for row in found["listeners"]}
    assert {"gcs_server", "raylet"} <= procs, f"Ray's servers not found among {procs}"
    assert not exposed(found), f"listening beyond loopback: {exposed(found)}"
    if case == "serve":
        assert any(row["proc"].startswith("ray::ProxyActor") for row in found["listeners"])


def test_loopback_check_sees_a_wildcard_listener():
    # The check itself: a socket bound to every interface is caught.
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        found = {"listeners": listeners()}
    assert [row["port"] for row in exposed(found)] == [port]
    assert is_loopback("::ffff:127.0.0.1") and is_loopback("::1")
    assert not is_loopback("::") and not is_loopback("0.0.0.0")
