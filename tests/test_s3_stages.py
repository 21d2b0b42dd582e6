"""The data and training stages on object storage: a real S3 server (moto, over HTTP) holds
the raw log and every artefact; the job's working directory stays empty.

prepare -> train -> evaluate -> train_policy run through jobs.pipeline with `data.path` and
`output_dir` on s3://; run again, `pipeline.resume` skips what is done and `pipeline.skip` what
it names; `train.resume_from` takes a checkpoint URI; a bucket that does not exist stops a job
with one line and exit 2. (A training worker killed mid-run resuming from its checkpoint on
S3: tests/test_two_node.py.)
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest

from jobs import pipeline
from jobs import train as train_job
from jobs.config import RunConfig
from rec import artifacts, storage
from rec.config_loader import load_config
from rec.data import readers, textio
from rec.data.config import DataConfig
from rec.data.synthetic import generate
from tests.conftest import ROOT, TAOBAO, need

pytest_plugins = ["tests.s3_server"]

SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
FAST = [  # the smoke run, smaller still where it does not change what is tested
    "train.epochs=1",
    "frontier.max_users=100",
    "policy.iterations=2",
    "policy.eval_episodes=50",
    "pipeline.skip=[serve]",
]


@pytest.fixture(scope="module")
def s3_ray(s3_server, ray_local, tmp_path_factory):
    """The AWS variables pointed at the S3 server, a bucket, and a local Ray whose workers get
    the same variables (a Ray started earlier in the session did not have them)."""
    from tests.cluster_helpers import start_session_ray
    from tests.s3_server import create_bucket, point_aws_at

    tmp = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        point_aws_at(mp, s3_server.endpoint, tmp)
        create_bucket(s3_server.endpoint, "stages")
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        ray_local.shutdown()
        # On loopback like the session's Ray (and a job's): the later tests reuse this one.
        start_session_ray(runtime_env={"env_vars": env})
        yield "s3://stages"
    # A fresh Ray for the later tests: this one's workers point AWS at a server that is about
    # to stop, and its Train controllers may still be in their 30 s graceful shutdown; a
    # `serve.start` on that Ray once waited 12 min for its controller (full suite, session 7).
    ray_local.shutdown()
    start_session_ray()


def in_empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def leftovers(cwd: Path) -> list[str]:
    """What a job left in its working directory, logs excepted."""
    return sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.suffix != ".log")


@pytest.fixture(scope="module")
def pipeline_run(s3_ray, tmp_path_factory):
    """The smoke pipeline (without serving) with its log and every output on S3."""
    tmp = tmp_path_factory.mktemp("pipeline")
    logs = storage.join(s3_ray, "logs", "synthetic")
    generate(load_config(RunConfig, SMOKE).data.synthetic, tmp / "raw")
    storage.upload_dir(tmp / "raw", logs)
    out = storage.join(s3_ray, "runs", "r1")
    overrides = [f"data.path={logs}", "data.format=parquet", f"output_dir={out}", *FAST]
    with pytest.MonkeyPatch.context() as mp:
        cwd = in_empty_cwd(tmp, mp)
        summary = pipeline.run(load_config(RunConfig, SMOKE, overrides))
    return out, summary, cwd, overrides


@pytest.mark.ray
def test_pipeline_stages_read_and_write_s3(pipeline_run):
    out, summary, cwd, _ = pipeline_run
    # data/, export/ and policy/ are artefact roots (rec/artifacts.py): their files are in
    # the version CURRENT names.
    data, export, policy = (
        artifacts.resolve(storage.join(out, rel))
        for rel in ("model/data", "model/export", "policy")
    )
    for root, names in (
        (data, ("meta.json", "stats.json", "vocab/items.parquet")),
        (export, ("model.safetensors", "model_config.json", "vocab/items.parquet")),
        (export, ("checkpoint.json",)),
        (policy, ("policy.json",)),
        (out, ("model/metrics.json", "frontier/frontier.json", "frontier/frontier.png")),
        (out, ("policy/policy_eval.json", "policy/policy_eval.png", "policy/world.npz")),
        (out, ("pipeline_summary.json",)),
    ):
        for name in names:
            assert storage.exists(storage.join(root, name)), (root, name)
    for split in ("train", "valid", "test"):
        assert storage.glob(storage.join(data, split), "*.parquet"), split
    assert storage.glob(storage.join(policy, "rl_module"), "*")
    for work in ("_staging", "_clean", "_errors"):  # prepare's work files, under output_dir
        assert not storage.exists(storage.join(out, "model", "data", work)), work
    # Ray Train's run storage and the DeepSpeed checkpoints are on S3 too.
    ckpt = json.loads(storage.read_text(storage.join(export, "checkpoint.json")))
    assert ckpt["checkpoint"].startswith(f"{out}/model/ray/train/checkpoint_")
    assert storage.glob(ckpt["checkpoint"], "deepspeed/*")
    stats = json.loads(storage.read_text(storage.join(data, "stats.json")))
    assert stats["n_users"] > 100 and stats["rows_quarantined"] == 0
    saved = json.loads(storage.read_text(storage.join(out, "pipeline_summary.json")))
    quality = saved["quality"]
    assert quality == summary["quality"] and quality["test.ndcg@10"] <= 1
    # one epoch already beats recommending the most popular items (2-3x on this data)
    assert quality["test.ndcg@10"] > quality["popular.test.ndcg@10"] > 0, quality
    assert saved["frontier"] and "gain_over_best_fixed" in saved["policy"]
    assert set(summary["stage_seconds"]) == {"prepare", "train", "evaluate", "policy"}
    assert leftovers(cwd) == []  # no `s3:` folder, no outputs in the job's cwd


def mtime_ns(uri: str) -> int:
    """When an object was last written (S3: whole seconds)."""
    fs, path = storage.filesystem(uri)
    return fs.get_file_info(path).mtime_ns


@pytest.mark.ray
def test_pipeline_resume_and_skip(pipeline_run, tmp_path, monkeypatch, capsys):
    """pipeline.resume (default true): a second run over the same output_dir finds every
    stage's result and runs none again; pipeline.resume=false runs every stage that
    pipeline.skip does not name, and only those."""
    out, first, _, base = pipeline_run
    cwd = in_empty_cwd(tmp_path, monkeypatch)
    metrics = storage.join(out, "model", "metrics.json")
    stamp = mtime_ns(metrics)
    capsys.readouterr()
    again = pipeline.run(load_config(RunConfig, SMOKE, base))
    logs = capsys.readouterr().out
    assert again["stage_seconds"] == {} and again["quality"] == first["quality"]
    for stage in ("prepare", "train", "evaluate", "policy"):
        assert f"[pipeline] {stage}: skipped (done)" in logs, stage
    assert mtime_ns(metrics) == stamp  # train's result not rewritten

    frontier = storage.join(out, "frontier", "frontier.json")
    before = mtime_ns(frontier)
    skip = "pipeline.skip=[prepare,train,policy,serve]"
    only = pipeline.run(load_config(RunConfig, SMOKE, [*base, "pipeline.resume=false", skip]))
    logs = capsys.readouterr().out
    assert list(only["stage_seconds"]) == ["evaluate"] and mtime_ns(metrics) == stamp
    assert mtime_ns(frontier) > before  # evaluate did run again (S3 mtimes: 1 s resolution)
    for stage in ("prepare", "train", "policy"):
        assert f"[pipeline] {stage}: skipped (config)" in logs, stage
    assert leftovers(cwd) == []


@pytest.mark.ray
def test_resume_from_a_checkpoint_uri(pipeline_run, tmp_path, monkeypatch):
    """train.resume_from=s3://...: the run continues from the first run's best checkpoint."""
    out = pipeline_run[0]
    export = artifacts.resolve(storage.join(out, "model", "export"))
    ckpt = json.loads(storage.read_text(storage.join(export, "checkpoint.json")))
    cwd = in_empty_cwd(tmp_path, monkeypatch)
    overrides = [
        f"output_dir={storage.join(out, 'resumed')}",
        f"train.prepared_dir={storage.join(out, 'model', 'data')}",
        f"train.resume_from={ckpt['checkpoint']}",
        "train.epochs=2",
    ]
    metrics = train_job.run(load_config(RunConfig, SMOKE, overrides))
    assert metrics["best.epoch"] == 2 and metrics["best.step"] == 2 * ckpt["step"]
    assert leftovers(cwd) == []


@pytest.mark.ray
def test_missing_bucket_stops_a_job_with_one_line(s3_ray, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", str(SMOKE)]
    cmd += ["data.path=s3://no-such-bucket/logs/UserBehavior.csv.gz", "output_dir=s3://stages/x"]
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: s3://no-such-bucket/logs/"), lines
    assert "does not exist" in lines[0]
    assert leftovers(cwd) == []


def test_raw_csv_gz_and_byte_ranges_read_the_same_from_s3(s3, tmp_path):
    """The readers' chunks of a Taobao log on S3 hold exactly the rows of the local file."""
    local = need(TAOBAO)
    uri = storage.join(s3.uri, "logs", local.name)
    storage.upload_dir(local, uri)

    def rows(path: str) -> pl.DataFrame:
        cfg = replace(DataConfig(), format="taobao", path=path)
        plan = readers.plan(cfg)
        return pl.concat(
            pl.from_arrow(events)
            for chunk in plan.chunks
            for events, _ in readers.read_chunk(chunk, cfg, plan.files)
        )

    assert rows(uri).equals(rows(str(local)))
    # A plain CSV cut into byte ranges: every line read once, from S3 as from disk.
    plain = tmp_path / "log.csv"
    plain.write_bytes(gzip.decompress(local.read_bytes()))
    storage.upload_dir(plain, storage.join(s3.uri, "plain.csv"))
    got = [
        b
        for ch in textio.plan_text_chunks(storage.join(s3.uri, "plain.csv"), 50_000)
        for _, b in textio.iter_blocks(ch)
    ]
    assert len(got) > 5 and b"".join(got) == plain.read_bytes()
