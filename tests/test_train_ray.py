"""jobs.train end to end on a local Ray: 2 workers, DeepSpeed on CPU (gloo), tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import train as train_job
from jobs.config import RunConfig
from rec.config_loader import load_config
from tests.conftest import ROOT

SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    """The smoke data, prepared once for every training test here."""
    from rec.ray_prepare import prepare

    out = tmp_path_factory.mktemp("smoke") / "data"
    prepare(load_config(RunConfig, SMOKE).data, out)
    return out


def plain_python(code: str) -> str:
    """Run `code` in a fresh interpreter at the repo root; return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def smoke(tmp_path, prepared, *overrides):
    return load_config(
        RunConfig, SMOKE, [f"output_dir={tmp_path}", f"train.prepared_dir={prepared}", *overrides]
    )


def test_train_zero2_export_and_metrics(tmp_path, prepared):
    metrics = train_job.run(smoke(tmp_path, prepared))
    for key in (
        "test.ndcg@10",
        "test.recall@10",
        "test.ild@10",
        "test.catalog_coverage",
        "popular.test.ndcg@10",
        "test_unseen.ndcg@10",
        "best.valid.ndcg@10",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["test.ndcg@10"] > metrics["popular.test.ndcg@10"]  # learned something
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics

    # Export -> a fresh process (no Ray session, no DeepSpeed engine) -> the same test metrics.
    out = plain_python(
        "import json; from jobs.training import final_test_metrics; from pathlib import Path; "
        f"m = final_test_metrics(Path({str(tmp_path / 'export')!r}), Path({str(prepared)!r}), 256); "
        "print(json.dumps(m))"
    )
    again = json.loads(out.strip().splitlines()[-1])
    # Equal up to float summation order (the fresh process may use another thread count).
    for key in ("test.ndcg@10", "test.mrr", "test.recall@10"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), key

    # The export holds the same weights as the DeepSpeed ZeRO-2 checkpoint it came from.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    ckpt = json.loads((tmp_path / "export" / "checkpoint.json").read_text())["checkpoint"]
    ds = get_fp32_state_dict_from_zero_checkpoint(str(Path(ckpt) / "deepspeed"), tag="ds")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    for name, value in ds.items():
        assert torch.equal(exported[name], value.float()), name


def test_killed_worker_resumes_with_continuous_steps(tmp_path, prepared):
    cfg = smoke(
        tmp_path,
        prepared,
        "train.epochs=3",
        "train.inject_failure_at_step=7",
        "train.early_stop_patience=null",
    )
    train_job.run(cfg)
    assert (tmp_path / "ray" / "injected_failure").read_text() == "7"  # the failure did happen
    states = []
    for ckpt in sorted(p for p in (tmp_path / "ray" / "train").glob("checkpoint_*") if p.is_dir()):
        states.append(json.loads((ckpt / "state.json").read_text()))
    steps = [s["step"] for s in sorted(states, key=lambda s: s["epoch"])]
    epochs = sorted(s["epoch"] for s in states)
    assert epochs == [1, 2, 3]
    per_epoch = steps[0]
    assert steps == [per_epoch, 2 * per_epoch, 3 * per_epoch]


def test_zero3_bf16_path_runs_on_cpu(tmp_path, prepared):
    metrics = train_job.run(
        smoke(
            tmp_path,
            prepared,
            "train.epochs=1",
            "train.max_steps=3",
            "train.deepspeed.zero_stage=3",
            "train.deepspeed.precision=bf16",
            "train.shard_in_memory=false",  # the streaming path (the others copy shards)
        )
    )
    assert metrics["best.step"] == 3 and 0.0 <= metrics["test.ndcg@10"] <= 1.0


def test_tune_sweep_writes_best_config(tmp_path, prepared):
    from jobs import tune as tune_job

    cfg = smoke(
        tmp_path,
        prepared,
        "train.epochs=2",
        "train.num_workers=1",
        "train.max_steps=4",
        "tune.num_samples=2",
        "tune.max_concurrent=1",
        "train.cpus_per_worker=0.25",
        "tune.hidden_size=[16, 32]",
    )
    report = tune_job.run(cfg)
    assert len(report["trials"]) == 2 and all(
        t["valid.ndcg@10"] is not None for t in report["trials"]
    )
    best = load_config(RunConfig, tmp_path / "best.yaml")  # loads back as a run config
    assert best.model.hidden_size in (16, 32)
    assert best.train.lr == pytest.approx(report["best"]["lr"])
