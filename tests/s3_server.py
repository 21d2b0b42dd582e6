"""A real S3 server for tests: `moto_server` (PyPI `moto[server]`) as its own process on loopback.

Fixtures (load with `pytest_plugins = ["tests.s3_server"]`):

    s3_server       session: one server on 127.0.0.1, port chosen by the OS; stopped at the end
    s3              function: the AWS variables pointed at it, a fresh bucket; yields `S3Env`
    s3_server_auth  function: a second server that enforces credentials (moto's IAM check),
                    for tests of bad keys; the bucket `locked` exists on it

The code under test speaks HTTP to the server; nothing is patched in-process. The AWS
variables are set with monkeypatch, so each test gets them back as they were, and
~/.aws is hidden (AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE point at nothing).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_DEADLINE_S = 30.0
ACCESS_KEY, SECRET_KEY, REGION = "testing-key", "testing-secret", "us-east-1"
_ANNOUNCE = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")


@dataclass
class MotoServer:
    process: subprocess.Popen
    endpoint: str  # http://127.0.0.1:PORT
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class S3Env:
    endpoint: str
    bucket: str

    @property
    def uri(self) -> str:
        """`s3://<bucket>`: join paths under it with rec.storage.join."""
        return f"s3://{self.bucket}"


def _moto_server_command() -> list[str]:
    # This interpreter's moto, never a `moto_server` found on PATH: another install (moto
    # 5.2.1 of the system Python here) answers pyarrow's CompleteMultipartUpload with an error.
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto not installed: pip install 'moto[server]'")
    return [sys.executable, "-m", "moto.server"]


def start_moto(log: Path, env: dict[str, str] | None = None) -> MotoServer:
    """Start moto_server on 127.0.0.1 with port 0 (the OS picks a free one, so no race);
    read the port it announces, then poll until it answers, within START_DEADLINE_S."""
    log_file = log.open("wb")
    process = subprocess.Popen(
        [*_moto_server_command(), "-H", "127.0.0.1", "-p", "0"],
        stdout=log_file,
        stderr=subprocess.STDOUT,  # a file, not a pipe: a full pipe would stall the server
        env={**os.environ, **(env or {})},
    )
    log_file.close()
    deadline = time.monotonic() + START_DEADLINE_S
    endpoint = None
    while time.monotonic() < deadline and process.poll() is None:
        if endpoint is None and (m := _ANNOUNCE.search(log.read_text(errors="replace"))):
            endpoint = f"http://127.0.0.1:{m.group(1)}"
        if endpoint is not None and _answers(endpoint):
            return MotoServer(process, endpoint, log)
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=10)
    raise RuntimeError(f"moto_server did not answer within {START_DEADLINE_S}s; log {log}")


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is serving
    except OSError:
        return False


def create_bucket(endpoint: str, bucket: str) -> None:
    """One plain PUT: moto accepts it unsigned (and as the one free action on an auth server)."""
    request = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200, response.status


def point_aws_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, tmp: Path) -> None:
    """The standard AWS variables for `endpoint`; everything else that could steer them unset."""
    for var in (
        "AWS_ENDPOINT_URL_S3",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_REGION",
        "AWS_SESSION_TOKEN",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never wait on instance metadata
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Env:
    point_aws_at(monkeypatch, s3_server.endpoint, tmp_path)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_server.endpoint, bucket)
    return S3Env(s3_server.endpoint, bucket)


@pytest.fixture
def s3_server_auth(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[S3Env]:
    # moto checks keys against its IAM after this many free actions: one, to create the bucket.
    server = start_moto(tmp_path / "moto-auth.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "1"})
    try:
        create_bucket(server.endpoint, "locked")
        point_aws_at(monkeypatch, server.endpoint, tmp_path)
        yield S3Env(server.endpoint, "locked")
    finally:
        server.stop()


def checkpoint_states(output_dir: str) -> list[dict]:
    """The `state.json` of every Ray Train checkpoint a train job kept under `output_dir`
    (local or URI), by epoch: what the resume tests compare."""
    import json

    from rec import storage

    runs = storage.join(output_dir, "ray", "train")
    states = [
        json.loads(storage.read_text(storage.join(c, "state.json")))
        for c in storage.listdir(runs)
        if c.rsplit("/", 1)[-1].startswith("checkpoint_") and not c.endswith(".json")
    ]
    return sorted(states, key=lambda s: s["epoch"])
