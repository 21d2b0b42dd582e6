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

from rec import storage
from tests.cluster_helpers import BIN, free_port, local_head, local_worker
from tests.conftest import ROOT
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


def serve_shutdown(head) -> None:
    subprocess.run(
        [str(BIN / "serve"), "shutdown", "-a", head.dashboard_url, "-y"],
        env=head.env,
        check=True,
        capture_output=True,
        timeout=120,
    )


def wait_for_answer(head, url: str, body: dict, job: str, timeout: float) -> dict:
    def answer() -> dict | None:
        if head.job_status(job) in {"FAILED", "STOPPED"}:
            raise AssertionError(f"serve job ended:\n{head.job_logs(job)[-4000:]}")
        try:
            resp = httpx.post(f"{url}/recommend", json=body, timeout=30)
        except httpx.HTTPError:
            return None
        return resp.json() if resp.status_code == 200 else None

    return head.wait_for(f"an answer from {url}", answer, timeout=timeout, every=2)


def test_serve_replicas_on_the_worker_read_model_and_policy_from_s3(cluster, tmp_path):
    """jobs.serve with model_dir and policy_dir on S3: the replicas (on the worker node) copy
    them once into their node's cache and answer over HTTP through the head's proxy."""
    from tests.serve_support import make_model_dir, make_policy_dir

    head, worker, bucket = cluster
    model, policy = storage.join(bucket, "serve", "model"), storage.join(bucket, "serve", "policy")
    storage.upload_dir(make_model_dir(tmp_path / "model"), model)
    storage.upload_dir(make_policy_dir(tmp_path / "policy"), policy)
    port = free_port()
    entry = ["python", "-m", "jobs.serve", "--config", SMOKE, f"model_dir={model}"]
    entry += [f"policy_dir={policy}", f"serve.port={port}", "rerank.n_candidates=50"]
    entry += ["serve.max_k=20", *ON_WORKER]
    job = head.submit(entry, runtime_env=runtime_env())
    try:
        url = f"http://127.0.0.1:{port}"
        answer = wait_for_answer(head, url, {"user_id": 0, "history": [], "k": 5}, job, 300)
        assert len(answer["items"]) == 5 and answer["lam_source"] in {"policy", "cold_start"}
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        assert health["policy"] is True and health["n_users"] > 100  # users read from S3
        replicas = actors_on(head, "ServeReplica:")
        assert {name.rsplit(":", 1)[-1] for name in replicas} == {
            "Ingress", "Retriever", "Ranker", "Policy"
        }  # fmt: skip
        assert set().union(*replicas.values()) == {worker.node_id}, replicas
    finally:
        head.ray_cli("job", "stop", "--address", head.dashboard_url, job)
        serve_shutdown(head)
    assert written_under_working_dirs(head.temp_dir, worker.temp_dir) == []


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
    entry = ["python", "-m", "jobs.pipeline", "--config", SMOKE, "data.format=parquet"]
    entry += [f"data.path={logs}", f"output_dir={out}", f"serve.port={free_port()}"]
    entry += ["train.epochs=1", "frontier.max_users=100", "policy.iterations=2"]
    entry += ["policy.eval_episodes=50", *TRAIN_ON_WORKER, *ON_WORKER]
    job = head.submit(entry, runtime_env=runtime_env())
    head.wait(job, timeout=PIPELINE_DEADLINE_S)
    return out, json.loads(storage.read_text(storage.join(out, "pipeline_summary.json")))


def test_pipeline_submitted_to_two_nodes_on_s3_ends_with_a_served_answer(cluster, pipeline_job):
    """Ray Train workers and Serve replicas ran on the worker node, the app answers over HTTP
    after the job, and nothing was written under the job's working dir on either node but
    logs."""
    head, worker, _ = cluster
    out, summary = pipeline_job
    assert summary["answer"]["items"] and 0 < summary["quality"]["test.ndcg@10"] <= 1
    body = json.loads(summary["curl"].split("-d '", 1)[1].rstrip("'"))
    answer = httpx.post(f"{summary['endpoint']}/recommend", json=body, timeout=60).json()
    # the app stays deployed after the job: the head's proxy answers, from the worker's replicas
    assert [item["id"] for item in answer["items"]] == summary["answer"]["items"]
    trained = actors_on(head, "RayTrainWorker")
    assert trained and set().union(*trained.values()) == {worker.node_id}, trained
    replicas = actors_on(head, "ServeReplica:")
    assert replicas and set().union(*replicas.values()) == {worker.node_id}, replicas
    for rel in ("model/export/model_config.json", "model/data/meta.json", "policy/policy.json"):
        assert storage.exists(storage.join(out, rel)), rel
    assert written_under_working_dirs(head.temp_dir, worker.temp_dir) == []


def test_killed_training_worker_resumes_from_its_checkpoint_on_s3(cluster, pipeline_job):
    """Rank 1 SIGKILLs itself at step 7 (train.inject_failure_at_step) on the worker node; the
    run restarts its workers and resumes from the latest checkpoint on S3, steps intact."""
    head, worker, _ = cluster
    out = storage.join(pipeline_job[0], "kill")
    prepared = storage.join(pipeline_job[0], "model", "data")
    entry = ["python", "-m", "jobs.train", "--config", SMOKE, f"output_dir={out}"]
    entry += [f"train.prepared_dir={prepared}", "train.epochs=3", *TRAIN_ON_WORKER]
    entry += ["train.inject_failure_at_step=7", "train.early_stop_patience=null"]
    job = head.submit(entry, runtime_env=runtime_env())
    head.wait(job, timeout=PIPELINE_DEADLINE_S)
    assert storage.read_text(storage.join(out, "ray", "injected_failure")) == "7"
    states = checkpoint_states(out)
    assert [s["epoch"] for s in states] == [1, 2, 3]
    per_epoch = states[0]["step"]
    assert [s["step"] for s in states] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert written_under_working_dirs(head.temp_dir, worker.temp_dir) == []
