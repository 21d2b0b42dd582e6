"""A two-node Ray cluster on this machine with every artefact on a real S3 server (moto).

A head (`ray start --head`, 1 CPU) and a worker node (`ray start --address`, its own temp
dir, 2 CPUs and the custom resource `worker_node`), both on 127.0.0.1, share no files: the
AWS_* variables go to both `ray start` processes (what an instance profile gives a cloud
node), and every path is an s3:// URI. Training workers and Serve replicas ask for
`worker_node`, so they can only run on the worker. Jobs go in through `ray job submit`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from rec import artifacts, storage
from tests.cluster_helpers import local_head, local_worker
from tests.conftest import ROOT
from tests.ports import free_port
from tests.s3_server import checkpoint_states, create_bucket, point_aws_at

pytestmark = pytest.mark.ray
pytest_plugins = ["tests.s3_server"]

WORKER = "worker_node"
SMOKE = "jobs/configs/smoke.yaml"
DEPLOYMENTS = ("ingress", "retriever", "ranker", "policy")
ON_WORKER = [f"serve.{d}.resources={{{WORKER}: 0.01}}" for d in DEPLOYMENTS]
TRAIN_ON_WORKER = [f"train.resources_per_worker={{{WORKER}: 1}}"]
PIPELINE_DEADLINE_S = 600  # issue 12: the submitted end-to-end run takes < 10 min on 2 cores


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """(head, worker, bucket URI): two nodes that reach the S3 server, and a fresh bucket."""
    tmp = tmp_path_factory.mktemp("two_node")
    with pytest.MonkeyPatch.context() as mp:
        point_aws_at(mp, s3_server.endpoint, tmp)
        create_bucket(s3_server.endpoint, "twonode")
        aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        with (
            local_head(num_cpus=1, env=aws, node_ip="127.0.0.1") as head,
            local_worker(head, num_cpus=2, resources={WORKER: 4}, env=aws) as worker,
        ):
            yield head, worker, "s3://twonode"


def runtime_env() -> dict:
    """runtime_env.yaml as `ray job submit --runtime-env` reads it from the repository root;
    DeepSpeed's ops from this checkout's build cache (compiling them would take minutes)."""
    _UPLOADED.update(repo_files())  # called right before each submit
    env = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())
    env["working_dir"] = str(ROOT)
    env["env_vars"]["TORCH_EXTENSIONS_DIR"] = str(ROOT / ".cache" / "torch_extensions")
    return env


def actors_on(head, prefix: str) -> dict[str, set[str]]:
    """class name -> node ids, for the actors (alive or dead) whose class starts with prefix."""
    resp = head.get("/api/v0/actors?limit=10000&detail=true", timeout=30)
    resp.raise_for_status()
    found: dict[str, set[str]] = {}
    for actor in resp.json()["data"]["result"]["result"]:
        if actor["class_name"].startswith(prefix):
            found.setdefault(actor["class_name"], set()).add(actor["node_id"])
    return found


def repo_files() -> set[str]:
    """What `--working-dir` uploads: the repository minus what .gitignore lists."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return set(listed)


_UPLOADED: set[str] = set()  # every repository file seen at a submit (the tree may change)


def written_under_working_dirs(*temp_dirs: Path) -> list[str]:
    """Files in the job's unpacked working dir (on every node) that the upload did not hold,
    logs excepted."""
    uploaded = _UPLOADED | repo_files()
    extra = set()
    for temp_dir in temp_dirs:
        for pkg in temp_dir.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*"):
            for path in pkg.rglob("*"):
                rel = str(path.relative_to(pkg))
                if path.is_file() and path.suffix != ".log" and rel not in uploaded:
                    extra.add(rel)
    return sorted(extra)


@pytest.fixture(scope="module")
def pipeline_job(cluster, tmp_path_factory):
    """The whole pipeline through `ray job submit` (raw log and every artefact on S3), waited
    for with a deadline; (output_dir URI, its pipeline_summary.json)."""
    from jobs.config import RunConfig
    from rec.config_loader import load_config
    from rec.data.synthetic import generate

    head, _, bucket = cluster
    tmp = tmp_path_factory.mktemp("pipeline")
    logs, out = storage.join(bucket, "logs", "synthetic"), storage.join(bucket, "runs", "r1")
    generate(load_config(RunConfig, ROOT / SMOKE).data.synthetic, tmp / "raw")
    storage.upload_dir(tmp / "raw", logs)
    port = free_port()
    entry = ["python", "-m", "jobs.pipeline", "--config", SMOKE, "data.format=parquet"]
    entry += [f"data.path={logs}", f"output_dir={out}", f"serve.port={port}"]
    entry += ["train.epochs=1", "frontier.max_users=100", "policy.iterations=2"]
    entry += ["policy.eval_episodes=50", *TRAIN_ON_WORKER, *ON_WORKER]
    job = head.submit(entry, runtime_env=runtime_env())
    head.wait(job, timeout=PIPELINE_DEADLINE_S)
    summary = json.loads(storage.read_text(storage.join(out, "pipeline_summary.json")))
    return out, summary, port, head.job_logs(job)


def test_pipeline_submitted_to_two_nodes_on_s3_ends_with_a_served_answer(cluster, pipeline_job):
    """Ray Train workers and Serve replicas ran on the worker node, the app answers over HTTP
    after the job, and nothing was written under the job's working dir on either node but
    logs."""
    head, worker, _ = cluster
    out, summary, port, logs = pipeline_job
    assert summary["answer"]["items"] and 0 < summary["quality"]["test.ndcg@10"] <= 1
    assert summary["endpoint"] == f"http://127.0.0.1:{port}"
    assert "[pipeline] try it:" in logs and summary["curl"] in logs
    body = json.loads(summary["curl"].split("-d '", 1)[1].rstrip("'"))
    answer = httpx.post(f"{summary['endpoint']}/recommend", json=body, timeout=60).json()
    # the app stays deployed after the job: the head's proxy answers, from the worker's replicas
    assert [item["id"] for item in answer["items"]] == summary["answer"]["items"]
    body = {"history": summary["answer"]["items"][:3], "k": 5, "lam": 0.5}
    got = httpx.post(f"{summary['endpoint']}/recommend", json=body, timeout=60)
    assert got.status_code == 200, got.text
    got = got.json()
    assert len(got["items"]) == 5 and got["lam_source"] == "request"
    assert not {item["id"] for item in got["items"]} & set(body["history"])
    bad = httpx.post(f"{summary['endpoint']}/recommend", json={"k": 0}, timeout=30)
    assert bad.status_code == 422 and "k" in bad.text
    # the replicas read the model, the users and the policy from S3
    health = httpx.get(f"{summary['endpoint']}/healthz", timeout=30).json()
    assert health["policy"] is True and health["n_users"] > 100, health
    trained = actors_on(head, "RayTrainWorker")
    assert trained and set().union(*trained.values()) == {worker.node_id}, trained
    replicas = actors_on(head, "ServeReplica:")
    assert {name.rsplit(":", 1)[-1] for name in replicas} == {
        "Ingress", "Retriever", "Ranker", "Policy"
    }  # fmt: skip
    assert set().union(*replicas.values()) == {worker.node_id}, replicas
    # `ray job submit --working-dir`: the repository went up, minus what .gitignore lists
    pkgs = head.temp_dir.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    pkg = next(p for p in pkgs if p.is_dir())
    assert (pkg / "jobs" / "pipeline.py").is_file()
    assert not (pkg / ".venv").exists() and not (pkg / "outputs").exists()
    for root, name in (("model/export", "model_config.json"), ("model/data", "meta.json")):
        assert storage.exists(storage.join(artifacts.resolve(storage.join(out, root)), name))
    assert storage.exists(
        storage.join(artifacts.resolve(storage.join(out, "policy")), "policy.json")
    )
    assert written_under_working_dirs(head.temp_dir, worker.temp_dir) == []


def test_killed_training_worker_resumes_from_its_checkpoint_on_s3(cluster, pipeline_job):
    """Rank 1 SIGKILLs itself at step 7 (train.inject_failure_at_step; epoch 2, the smoke data
    has 5 steps an epoch) on the worker node; the run restarts its workers and resumes from
    epoch 1's checkpoint on S3, steps intact (epoch 1 is not reported twice).
    (The resume point, engine state and weights of a resumed run: tests/test_train_ray.py.)"""
    head, worker, _ = cluster
    out = storage.join(pipeline_job[0], "kill")
    prepared = storage.join(pipeline_job[0], "model", "data")
    entry = ["python", "-m", "jobs.train", "--config", SMOKE, f"output_dir={out}"]
    entry += [f"train.prepared_dir={prepared}", "train.epochs=2", *TRAIN_ON_WORKER]
    entry += ["train.inject_failure_at_step=7", "train.early_stop_patience=null"]
    job = head.submit(entry, runtime_env=runtime_env())
    head.wait(job, timeout=PIPELINE_DEADLINE_S)
    assert storage.read_text(storage.join(out, "ray", "injected_failure")) == "7"
    states = checkpoint_states(out)
    assert [s["epoch"] for s in states] == [1, 2]
    per_epoch = states[0]["step"]
    assert per_epoch < 7  # the worker died in epoch 2, after epoch 1's checkpoint
    assert [s["step"] for s in states] == [per_epoch, 2 * per_epoch]
    assert written_under_working_dirs(head.temp_dir, worker.temp_dir) == []
