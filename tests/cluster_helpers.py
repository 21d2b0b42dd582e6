"""A real local Ray cluster for tests: `ray start --head` in its own process group, jobs through
the `ray job` CLI, state through the dashboard's HTTP API.

The test process itself never calls `ray.init`, so a session-wide `ray_local` fixture in the
same pytest run is left alone, and `stop()` ends only the processes this head started (never a
machine-wide `ray stop`). Token authentication stays on, with a fresh token per cluster.

    with local_head(num_cpus=2) as head:
        job = head.submit(["python", "-m", "jobs.prepare", "--config", CFG], working_dir=ROOT)
        assert head.wait(job, timeout=300) == "SUCCEEDED"

    with local_head(num_cpus=1, node_ip="127.0.0.1") as head, local_worker(
        head, num_cpus=2, resources={"worker_node": 4}
    ) as worker:                            # a second node (its own `ray start`, temp dir)
        ...

Ray 2.60 excludes what `.gitignore` (and `.rayignore`) list from the `--working-dir` upload, so
`.venv/`, `.cache/` and `outputs/` stay behind. Locally the job's `python` is this venv's: the
head runs with this interpreter's directory first on PATH and the job inherits it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from tests.ports import free_port

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def start_session_ray(**init_kwargs) -> str:
    """The test session's local Ray (2 CPUs, on loopback as a job's), with its dashboard: Ray's
    REST API behind `serve deploy` / `serve status` and the state API that Ray Train's
    controller polls. The dashboard gets a reserved port, exported as RAY_DASHBOARD_ADDRESS
    (the `serve` CLI's default address) so a CLI a test runs talks to this Ray. Returns it."""
    from jobs.common import RayConfig, start_local_ray

    address = f"http://127.0.0.1:{free_port()}"
    start_local_ray(
        RayConfig(num_cpus=2, include_dashboard=True),
        dashboard_port=int(address.rsplit(":", 1)[1]),
        log_to_driver=False,
        configure_logging=False,
        **init_kwargs,
    )
    os.environ["RAY_DASHBOARD_ADDRESS"] = address
    return address


class JobFailed(AssertionError):
    """A submitted job ended in a state other than the one expected (message holds its logs)."""


def cluster_env(token_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the head and every CLI call: token auth on, this venv first on PATH."""
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(key, None)  # an outer cluster's address or token must not leak in
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


@dataclass
class LocalHead:
    """A running `ray start --head --block` and what reaches it."""

    proc: subprocess.Popen
    gcs_port: int
    dashboard_port: int
    temp_dir: Path
    token_path: Path
    env: dict[str, str]
    log_path: Path

    @property
    def address(self) -> str:
        """GCS address, as `ray.init(address=...)` and RAY_ADDRESS take it. `ray start` always
        advertises the machine's address (it maps 127.0.0.1 to it), so this does too."""
        head = next(n for n in self.alive_nodes() if n["is_head_node"])
        return f"{head['node_ip']}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Where `ray job submit --address` and the HTTP API go."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`ray <args>` with this cluster's environment; raises with its output on failure."""
        proc = subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} -> {proc.returncode}\n{proc.stderr[-3000:]}")
        return proc

    def get(self, path: str, timeout: float = 10) -> httpx.Response:
        """GET on the dashboard with the bearer token (what the Ray SDK sends)."""
        headers = {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}
        return httpx.get(f"{self.dashboard_url}{path}", headers=headers, timeout=timeout)

    def submit(
        self,
        entrypoint: list[str],
        working_dir: Path | None = None,
        runtime_env: dict | None = None,
        submission_id: str | None = None,
        entrypoint_num_cpus: float | None = None,
    ) -> str:
        """`ray job submit --no-wait ... -- entrypoint`; returns the submission id."""
        job_id = submission_id or f"test_{secrets.token_hex(4)}"
        args = ["job", "submit", "--address", self.dashboard_url, "--submission-id", job_id]
        if working_dir is not None:
            args += ["--working-dir", str(working_dir)]
        if runtime_env:
            args += ["--runtime-env-json", json.dumps(runtime_env)]
        if entrypoint_num_cpus is not None:
            args += ["--entrypoint-num-cpus", str(entrypoint_num_cpus)]
        self.ray_cli(*args, "--no-wait", "--", *entrypoint)
        return job_id

    def job_status(self, job_id: str) -> str:
        """PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED."""
        resp = self.get(f"/api/jobs/{job_id}")
        resp.raise_for_status()
        return resp.json()["status"]

    def job_logs(self, job_id: str) -> str:
        resp = self.get(f"/api/jobs/{job_id}/logs")
        resp.raise_for_status()
        return resp.json()["logs"]

    def wait(self, job_id: str, timeout: float, expect: str = "SUCCEEDED") -> str:
        """Poll until the job ends; raise JobFailed (with its logs) unless it ends in `expect`."""
        deadline = time.monotonic() + timeout
        status = self.job_status(job_id)
        while status not in TERMINAL:
            if time.monotonic() > deadline:
                self.ray_cli("job", "stop", "--address", self.dashboard_url, job_id)
                raise JobFailed(
                    f"job {job_id} still {status} after {timeout}s\n{self._tail(job_id)}"
                )
            time.sleep(1.0)
            status = self.job_status(job_id)
        if status != expect:
            raise JobFailed(f"job {job_id} ended {status}, expected {expect}\n{self._tail(job_id)}")
        return status

    def _tail(self, job_id: str, chars: int = 6000) -> str:
        return self.job_logs(job_id)[-chars:]

    def alive_nodes(self) -> list[dict]:
        """The cluster's ALIVE nodes from the state API (node_id, node_ip, is_head_node, ...)."""
        resp = self.get("/api/v0/nodes?limit=1000&detail=true")
        resp.raise_for_status()
        nodes = resp.json()["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def wait_for(self, what: str, check, timeout: float, every: float = 1.0):
        """Poll `check()` until it returns something truthy; return it, or fail naming `what`."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout}s (head log: {self.log_path})")
            time.sleep(every)

    def stop(self, grace: float = 10, remove: bool = True) -> None:
        """End this head's processes only (see stop_node)."""
        stop_node(self.proc, self.temp_dir, grace, remove)


def stop_node(proc: subprocess.Popen, temp_dir: Path, grace: float = 10, remove: bool = True):
    """End one `ray start` node's processes only, as `ray stop` would but scoped to them:
    SIGTERM to `ray start`, its descendants and anything naming its temp dir (workers that left
    the process group), SIGKILL after `grace` s; then remove the temp dir unless `remove=False`."""
    pids = {proc.pid} | _descendants(proc.pid) | _using_dir(temp_dir)
    live = [p for p in map(_proc, pids - {os.getpid()}) if p is not None]
    for p in live:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(live, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    if remove:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _descendants(pid: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _using_dir(path: Path) -> set[int]:
    """Processes whose command line names `path` (Ray passes its session dir to every process,
    including workers that moved to their own process group)."""
    needle = str(path)
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = p.info["cmdline"] or []
        if any(needle in arg for arg in cmdline):
            found.add(p.info["pid"])
    return found


@contextmanager
def local_head(
    num_cpus: float = 2,
    autoscaling_config: dict | None = None,
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
    gcs_port: int | None = None,
    ready_timeout: float = 120,
    node_ip: str | None = None,
) -> Iterator[LocalHead]:
    """Start `ray start --head --block` with free ports and a fresh auth token; yield
    the running head; stop it (only it) on exit.

    autoscaling_config: a cluster config (dict) for the head's autoscaler, e.g. the fake
    multi-node provider's (then RAY_FAKE_CLUSTER=1 is set for it); gcs_port: when that config
    must name the port before the head exists; node_ip: the address the node advertises and
    binds (e.g. 127.0.0.1; default: the machine's).
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: unix socket paths
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    head_env = cluster_env(token_path, env)
    gcs_port, dashboard_port = gcs_port or free_port(), free_port()
    cmd = [
        RAY, "start", "--head", "--block",
        f"--num-cpus={num_cpus}",
        f"--port={gcs_port}",
        f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    if node_ip:
        cmd.append(f"--node-ip-address={node_ip}")
    if autoscaling_config is not None:
        config_path = temp_dir / "autoscaling.json"
        config_path.write_text(json.dumps(autoscaling_config))
        cmd.append(f"--autoscaling-config={config_path}")
        head_env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    log_path = temp_dir / "ray_start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = LocalHead(proc, gcs_port, dashboard_port, temp_dir, token_path, head_env, log_path)
    ok = False
    try:
        head.wait_for("dashboard up", lambda: _ready(head), timeout=ready_timeout, every=0.5)
        yield head
        ok = True
    finally:
        head.stop(remove=ok)  # on failure keep the logs (session_*/logs) for the report
        if not ok:
            print(f"[cluster] head logs kept in {temp_dir}", file=sys.stderr)


def _ready(head: LocalHead) -> bool:
    if head.proc.poll() is not None:
        raise RuntimeError(f"ray start exited {head.proc.returncode}:\n{head.log_path.read_text()}")
    try:
        return head.get("/api/version", timeout=2).status_code == 200 and bool(head.alive_nodes())
    except httpx.HTTPError:
        return False


@dataclass
class LocalWorker:
    """A running `ray start --address=<head> --block` (a second node) and its node id."""

    proc: subprocess.Popen
    temp_dir: Path
    log_path: Path
    node_id: str


@contextmanager
def local_worker(
    head: LocalHead,
    num_cpus: float = 1,
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
    ready_timeout: float = 120,
) -> Iterator[LocalWorker]:
    """Join a worker node to `head` on this machine, at the head's address, with its own temp
    dir and ports, the head's token and `env` (e.g. AWS_* variables, as an instance profile
    gives a cloud node); yield it once the head lists it ALIVE; stop only its processes."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))
    node_ip = head.address.rsplit(":", 1)[0]
    cmd = [
        RAY, "start", "--block",
        f"--address={head.address}",
        f"--node-ip-address={node_ip}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--disable-usage-stats",
    ]  # fmt: skip
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    before = {n["node_id"] for n in head.alive_nodes()}
    log_path = temp_dir / "ray_start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            env=cluster_env(head.token_path, env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def joined() -> str | None:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log_path.read_text()}")
        new = [n["node_id"] for n in head.alive_nodes() if n["node_id"] not in before]
        return new[0] if new else None

    ok = False
    try:
        node_id = head.wait_for("worker node joined", joined, timeout=ready_timeout)
        yield LocalWorker(proc, temp_dir, log_path, node_id)
        ok = True
    finally:
        stop_node(proc, temp_dir, remove=ok)
        if not ok:
            print(f"[cluster] worker logs kept in {temp_dir}", file=sys.stderr)
