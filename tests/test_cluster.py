"""The step from a laptop to a cluster: cluster.yaml against Ray's own schema and autoscaling
with Ray's fake multi-node provider. (`ray job submit` of repo jobs with the working dir:
tests/test_two_node.py.)

Nothing here reaches a cloud: the AWS config is checked offline, the autoscaler launches worker
"nodes" as local processes. The Ray tests start their own head (tests/cluster_helpers.py) and
stop only its processes, so they run beside the session's `ray_local` fixture.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.cluster_helpers import local_head
from tests.conftest import ROOT

CLUSTER_YAML = ROOT / "cluster.yaml"
# GPUs per AWS instance type that cluster.yaml may use (AWS: "Accelerated computing" types).
AWS_GPUS = {
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.16xlarge": 1,
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6.12xlarge": 4, "g6.48xlarge": 8,
    "p4d.24xlarge": 8, "p5.48xlarge": 8,
}  # fmt: skip
SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": r"(?i)aws_secret_access_key|secret_key|SecretAccessKey",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "password": r"(?i)password\s*[:=]",
    "inline Ray token": r"RAY_AUTH_TOKEN\s*=",
    "long hex or base64 secret": r"\b[0-9a-f]{32,}\b|[A-Za-z0-9+/]{40,}={0,2}",
    "ssh private key path": r"ssh_private_key",
}


def load_cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validate_with_ray(config: dict) -> dict:
    """Ray 2.60's own checks, offline: defaults merged as `ray up` merges them, then the
    cluster-config JSON schema (ray/autoscaler/ray-schema.json) and its cross-field rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------- cluster.yaml (no Ray runtime)


def test_cluster_yaml_passes_rays_schema():
    prepared = validate_with_ray(load_cluster_yaml())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(max_worker=3),  # misspelt top-level key
        lambda c: c["available_node_types"]["gpu_train"].update(max_workers="two"),
        lambda c: c["available_node_types"]["gpu_infer"].pop("node_config"),
        lambda c: c.update(head_node_type="nope"),
        lambda c: c["available_node_types"]["gpu_infer"].update(min_workers=20),
    ],
    ids=["unknown-key", "wrong-type", "missing-node-config", "bad-head-type", "min-over-max"],
)
def test_schema_check_rejects_broken_configs(mutate):
    config = load_cluster_yaml()
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_with_ray(config)


def test_node_types_cpu_head_multi_and_single_gpu_workers():
    config = load_cluster_yaml()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"] not in AWS_GPUS
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpus = {name: AWS_GPUS.get(t["node_config"]["InstanceType"], 0) for name, t in workers.items()}
    assert any(n > 1 for n in gpus.values()), f"no multi-GPU training node type: {gpus}"
    assert any(n == 1 for n in gpus.values()), f"no single-GPU inference node type: {gpus}"
    for name, t in workers.items():
        assert t["min_workers"] <= t["max_workers"], name
        if gpus[name]:
            assert t["min_workers"] == 0, f"{name}: GPU nodes must scale from zero"
            assert t["max_workers"] >= 1, name
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 60


def test_setup_installs_pinned_cuda_torch_then_project():
    config = load_cluster_yaml()
    commands = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if '"torch==' in c)
    project_at = next(i for i, c in enumerate(commands) if "pip install" in c and "-e" in c)
    assert torch_at < project_at, "torch must be installed (pinned) before the project"
    assert "--index-url https://download.pytorch.org/whl/cu" in commands[torch_at]
    makefile_pin = re.search(r"TORCH_SPEC \?= (torch==\S+)", (ROOT / "Makefile").read_text())
    assert makefile_pin and makefile_pin.group(1) in commands[torch_at]
    # The image's Ray is the one the project pins (and the one these tests run).
    import ray

    ray_pin = re.search(r'"ray\[[^"]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(
        1
    )
    assert ray.__version__ == ray_pin
    assert f"rayproject/ray:{ray_pin}-" in config["docker"]["image"]
    assert any(remote.endswith("raydiv-rec") for remote in config["file_mounts"])
    assert "boto3" in " ".join(config["head_setup_commands"])


def test_token_auth_on_every_node_and_no_secrets_in_file():
    config = load_cluster_yaml()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    text = CLUSTER_YAML.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        match = re.search(pattern, text)
        assert match is None, f"cluster.yaml looks like it holds a {what}: {match.group(0)!r}"
    local_token = Path.home() / ".ray" / "auth_token"
    if local_token.exists() and local_token.read_text().strip():
        assert local_token.read_text().strip() not in text


def test_object_storage_instead_of_a_shared_disk():
    """Every node reaches the bucket through one instance profile; nothing mounts a shared
    filesystem; the README's cluster commands use s3:// and this file's runtime_env.yaml."""
    config = load_cluster_yaml()
    profiles = {
        name: t["node_config"].get("IamInstanceProfile")
        for name, t in config["available_node_types"].items()
    }
    assert set(map(str, profiles.values())) == {"{'Name': 'raydiv-rec-s3'}"}, profiles
    assert "aws iam create-instance-profile --instance-profile-name raydiv-rec-s3" in (
        CLUSTER_YAML.read_text()
    )
    commands = " ".join(
        " ".join(config.get(key) or [])
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                    "initialization_commands", "head_start_ray_commands",
                    "worker_start_ray_commands")
    )  # fmt: skip
    assert not re.search(r"(?i)\bnfs|efs|mount\b", commands), commands
    assert set(config["file_mounts"]) == {"~/raydiv-rec", "~/.ray/auth_token"}
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    assert "ray up -y cluster.yaml" in section and "--runtime-env runtime_env.yaml" in section
    assert "output_dir=s3://" in section and "data.path=s3://" in section
    assert "raydiv-rec-s3" in section and "/mnt/shared" not in section
    assert "curl" in section


def test_runtime_env_yaml_is_a_valid_ray_runtime_env_without_secrets():
    from ray.runtime_env import RuntimeEnv

    path = ROOT / "runtime_env.yaml"
    env = yaml.safe_load(path.read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert "TORCH_EXTENSIONS_DIR" in env["env_vars"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(
        env["env_vars"]
    )
    text = path.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        match = re.search(pattern, text)
        assert match is None, f"runtime_env.yaml looks like it holds a {what}: {match.group(0)!r}"


def test_secret_scan_catches_a_pasted_key():
    pasted = "provider:\n  aws_access_key_id: AKIAABCDEFGHIJKLMNOP\n"
    assert re.search(SECRET_PATTERNS["AWS access key id"], pasted)
    token = "a" * 8 + "0123456789abcdef" * 3
    assert re.search(SECRET_PATTERNS["long hex or base64 secret"], f"token: {token}")


# ------------------------------------------------------------- autoscaling (fake multi-node)

PROBE = """
import json, sys, time, ray
ray.init()
@ray.remote(num_cpus=1)
def where():
    time.sleep(4)  # hold the node so the two tasks must run side by side
    return ray.get_runtime_context().get_node_id()
shapes = json.loads(sys.argv[1])  # {"train": gpus, "serve": gpus}
refs = {k: where.options(num_gpus=g).remote() for k, g in shapes.items()}
print("PROBE", json.dumps({k: ray.get(r) for k, r in refs.items()}))
"""


def worker_gpus() -> dict[str, int]:
    """cluster.yaml's worker node types -> GPUs of their instance type."""
    config = load_cluster_yaml()
    types = config["available_node_types"]
    return {
        name: AWS_GPUS.get(t["node_config"]["InstanceType"], 0)
        for name, t in types.items()
        if name != config["head_node_type"]
    }


def fake_cluster_config(gcs_port: int) -> dict:
    """Ray's fake multi-node provider with cluster.yaml's worker node types: their names, the
    GPUs of their instance types and their min/max counts (capped at 2 nodes on this machine),
    each "node" shrunk to 1 CPU and a small object store; a 1-CPU head; workers leave after
    6 s idle.

    The config and environment ray.cluster_utils.AutoscalingCluster would build, built here:
    in the 2.60 wheel its constructor fails (it reads fake_multi_node/example.yaml, which the
    wheel does not ship) and its start() runs a machine-wide `ray stop --force`, which would
    also end the session's `ray_local` cluster."""
    import ray._private.services as services

    real = load_cluster_yaml()["available_node_types"]
    types = {"ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0}}
    for name, gpus in worker_gpus().items():
        types[name] = {
            "resources": {
                "CPU": 1,
                **({"GPU": gpus} if gpus else {}),
                "object_store_memory": 150 * 1024**2,
            },
            "node_config": {},
            "min_workers": real[name]["min_workers"],
            "max_workers": min(real[name]["max_workers"], 2),
        }
    return {
        "cluster_name": "fake_autoscaling_test",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # worker "nodes" join this head, not the default port 6379
            "gcs_address": f"{services.node_ip_address_from_perspective()}:{gcs_port}",
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.mark.ray
def test_autoscaler_adds_cluster_yaml_node_types_for_a_job_and_removes_them_when_idle(tmp_path):
    """A training-shaped task (all GPUs of the multi-GPU type) and a serving-shaped one (1 GPU)
    make the autoscaler launch one node of each of cluster.yaml's GPU types, from zero (which
    node the 1-GPU task then lands on is the scheduler's choice)."""
    from tests.ports import free_port

    gpus = worker_gpus()
    train_type = max(gpus, key=gpus.get)
    infer_type = next(name for name, n in gpus.items() if n == 1)
    shapes = {"train": gpus[train_type], "serve": 1}
    gcs_port = free_port()
    with local_head(
        num_cpus=1, autoscaling_config=fake_cluster_config(gcs_port), gcs_port=gcs_port
    ) as head:
        assert [n["is_head_node"] for n in head.alive_nodes()] == [True]
        job = head.submit(["python", "-c", PROBE, json.dumps(shapes)])
        grown = head.wait_for("2 GPU worker nodes", lambda: _gpu_workers(head), timeout=90)
        head.wait(job, timeout=120)
        ran_on = json.loads(head.job_logs(job).split("PROBE ", 1)[1].splitlines()[0])
        node_gpus = {n["node_id"]: n["resources_total"]["GPU"] for n in grown}
        # one node of each GPU type; the 1-GPU task may run on either, the other needs all 4
        assert sorted(node_gpus.values()) == sorted([gpus[infer_type], gpus[train_type]])
        assert node_gpus[ran_on["train"]] == gpus[train_type], (train_type, node_gpus)
        assert set(ran_on.values()) <= set(node_gpus)
        head.wait_for("scale back to the head", lambda: len(head.alive_nodes()) == 1, timeout=90)


def _gpu_workers(head) -> list[dict] | None:
    workers = [n for n in head.alive_nodes() if not n["is_head_node"]]
    ok = len(workers) == 2 and all(w["resources_total"].get("GPU") for w in workers)
    return workers if ok else None
