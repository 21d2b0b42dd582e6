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
from tests.test_tracking import tracked_epochs

SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"

pytestmark = pytest.mark.ray  # every test here trains on the session's local Ray


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


def published(root: Path) -> Path:
    """The version an artefact root's CURRENT names (rec/artifacts.py): the export users get."""
    from rec import artifacts

    return Path(artifacts.resolve(str(root)))


def same_weights_as_checkpoint(export: Path) -> None:
    """The export holds the weights of the DeepSpeed checkpoint it names: its fp32 master
    weights consolidated from the ZeRO shards, whatever the training precision (under bf16
    not the bf16 parameters the model computed with)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    ckpt = json.loads((export / "checkpoint.json").read_text())["checkpoint"]
    ds = get_fp32_state_dict_from_zero_checkpoint(str(Path(ckpt) / "deepspeed"), tag="ds")
    exported = load_file(str(export / "model.safetensors"))
    assert set(exported) >= set(ds) and ds
    for name, value in ds.items():
        assert torch.equal(exported[name], value.float()), name


def test_validation_users_are_a_seeded_sample_at_scale(prepared):
    """train_spec's valid_max_users (eval.max_users at a large catalogue): the rank parts keep
    the first users of the fixed seeded order -- the same sample in every fit, another seed
    another sample -- and the streamed path thins the split the same way by a seeded draw."""
    from rec import artifacts
    from rec.ray_dataset import rank_parts, sampled_dataset

    data = artifacts.resolve(str(prepared))

    def rows(parts) -> list[bytes]:
        out = []
        for part in parts:
            for b in part.iter_batches(batch_format="numpy"):
                out += [
                    t.tobytes() + x.tobytes() for t, x in zip(b["targets"], b["items"], strict=True)
                ]
        return out

    every = rows(rank_parts(data, "valid", 2, 20, seed=0))
    some = rows(rank_parts(data, "valid", 2, 20, seed=0, max_rows=6))
    assert len(every) > 20 and len(some) == 6 and set(some) < set(every)
    assert rows(rank_parts(data, "valid", 2, 20, seed=0, max_rows=6)) == some
    assert set(rows(rank_parts(data, "valid", 2, 20, seed=1, max_rows=6))) != set(some)
    assert sampled_dataset(data, "valid", 20, None, seed=0).count() >= len(every)
    streamed = sampled_dataset(data, "valid", 20, len(every) // 4, seed=0).count()
    assert 0 < streamed < len(every)


EARLY_STOP = ["train.epochs=8", "train.early_stop_patience=0", "train.lr=0.01"]


def test_train_zero2_export_and_metrics(tmp_path, prepared):
    """Also early stopping: at a high learning rate validation peaks within a few epochs; with
    patience 0 the run stops at the first epoch that does not beat the best, and the export
    published is the best epoch's checkpoint, not the last one."""
    metrics = train_job.run(smoke(tmp_path, prepared, *EARLY_STOP))
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
    export = published(tmp_path / "export")
    same_weights_as_checkpoint(export)

    # Early stopping: the last checkpoint (always kept) is one epoch past the best (patience
    # 0), before the configured 8; its running best is the published checkpoint's own score.
    last = max(
        (json.loads((c / "state.json").read_text()) for c in checkpoints(tmp_path)),
        key=lambda state: state["epoch"],
    )
    chosen = json.loads((export / "checkpoint.json").read_text())
    own = json.loads((export / "model_config.json").read_text())["extra"]["metrics"]
    assert last["epoch"] < 8, "validation never stopped improving: no early stop to test"
    assert (chosen["epoch"], own["epoch"]) == (last["epoch"] - 1,) * 2, (chosen, last)
    assert own["valid.ndcg@10"] == last["best"] == metrics["best.valid.ndcg@10"]

    # Tracking (issue 18.1): every epoch once in MLflow and TensorBoard, curves drawn; the
    # export carries the backbone as a transformers directory, in its manifest (18.5).
    epochs = list(range(1, last["epoch"] + 1))
    assert tracked_epochs(tmp_path) == {"mlflow": epochs, "tensorboard": epochs, "curves": True}
    listed = {f["path"] for f in json.loads((export / "MANIFEST.json").read_text())["files"]}
    assert {"backbone/config.json", "backbone/model.safetensors"} <= listed


def checkpoints(run_dir: Path) -> list[Path]:
    """A run's Ray Train checkpoints in the order they were reported (names are timestamps)."""
    return sorted(p for p in (run_dir / "ray" / "train").glob("checkpoint_*") if p.is_dir())


def engine_steps(ckpt: Path) -> tuple[int, int]:
    """(DeepSpeed global_steps, Adam's step count) saved in a checkpoint: the engine state a
    restarted run continues, not the loop's own counters in state.json."""
    ds = ckpt / "deepspeed" / "ds"
    model = torch.load(ds / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    optim = torch.load(
        ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False, map_location="cpu"
    )
    adam = optim["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["step"]
    return int(model["global_steps"]), int(adam)


def test_killed_worker_resumes_with_continuous_steps(tmp_path, prepared):
    """Rank 1 dies at step 7 (in epoch 2: the smoke data has 5 steps an epoch). The run must
    resume from epoch 1's checkpoint, weights and optimizer included: the checkpoints reported
    after the failure start at epoch 2 with the engine's step counts continuing, and the
    weights equal a run resumed from that checkpoint by `train.resume_from` (the README's
    other resume path) -- not a run that started again from scratch."""
    cfg = smoke(
        tmp_path,
        prepared,
        "train.epochs=2",
        "train.inject_failure_at_step=7",
        "train.early_stop_patience=null",
    )
    train_job.run(cfg)
    marker = tmp_path / "ray" / "injected_failure"
    assert marker.read_text() == "7"  # the failure did happen
    ckpts = checkpoints(tmp_path)
    states = [json.loads((c / "state.json").read_text()) for c in ckpts]
    per_epoch = states[0]["step"]
    assert 0 < per_epoch < 7  # so the failure came after epoch 1's checkpoint
    # reported order: epoch 1 before the failure, then 2 (a restart from scratch would report
    # epoch 1 again after it)
    before = [c for c in ckpts if (c / "state.json").stat().st_mtime < marker.stat().st_mtime]
    assert [s["epoch"] for s in states] == [1, 2] and before == ckpts[:1]
    assert [s["step"] for s in states] == [per_epoch, 2 * per_epoch]
    for ckpt, state in zip(ckpts, states, strict=True):  # the engine resumed, not just counters
        assert engine_steps(ckpt) == (state["step"], state["step"]), ckpt.name

    # The same checkpoint resumed by train.resume_from for one epoch: the same epoch-2 state.
    again = tmp_path / "again"
    train_job.run(smoke(again, prepared, "train.epochs=2", f"train.resume_from={ckpts[0]}"))
    (resumed,) = checkpoints(again)  # epoch 1 is not trained again
    assert json.loads((resumed / "state.json").read_text())["epoch"] == 2
    assert engine_steps(resumed) == engine_steps(ckpts[1])
    start, failed, via_resume_from = (
        flat_weights(c / "export" / "model.safetensors") for c in (ckpts[0], ckpts[1], resumed)
    )
    # Both epoch-2 states are one epoch of the same rows, in the same order, on the same
    # ranks (rec/ray_dataset.py: rank_parts), from the same checkpoint: bit-identical. A run
    # that did not load the checkpoint's weights is a whole epoch of training away from it.
    assert not torch.equal(start, failed)
    assert torch.equal(failed, via_resume_from)
    # A restart re-does epoch 2: the tracking still holds each epoch once.
    assert tracked_epochs(tmp_path) == {"mlflow": [1, 2], "tensorboard": [1, 2], "curves": True}


def flat_weights(path: Path) -> torch.Tensor:
    """All tensors of a safetensors file, by name, as one float vector."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return torch.cat([tensors[name].flatten().float() for name in sorted(tensors)])


def test_zero3_bf16_path_runs_on_cpu(tmp_path, prepared):
    metrics = train_job.run(
        smoke(
            tmp_path,
            prepared,
            "train.epochs=1",
            "train.max_steps=3",
            "train.deepspeed.zero_stage=3",
            # The tiny model's tensors are all under DeepSpeed's default threshold (1e5
            # elements): without this nothing is sharded and the gather is never exercised.
            "train.deepspeed.param_persistence_threshold=0",
            "train.deepspeed.precision=bf16",
            "train.shard_in_memory=false",  # the streaming path (the others copy shards)
        )
    )
    assert metrics["best.step"] == 3 and 0.0 <= metrics["test.ndcg@10"] <= 1.0
    # The export gathered from the ZeRO-3 shards equals the checkpoint's consolidated fp32
    # master weights (not the bf16 parameters: issue 18.5).
    same_weights_as_checkpoint(published(tmp_path / "export"))


def test_tune_sweep_writes_best_config(tmp_path, prepared):
    from jobs import tune as tune_job

    cfg = smoke(
        tmp_path,
        prepared,
        "train.epochs=2",
        "train.num_workers=1",
        "train.max_steps=4",
        "tune.num_samples=2",
        "tune.max_concurrent=2",  # side by side: 2 x 0.25 CPU
        "train.cpus_per_worker=0.25",
        "tune.hidden_size=[16, 32]",
    )
    report = tune_job.run(cfg)
    assert len(report["trials"]) == 2 and all(
        t["valid.ndcg@10"] is not None for t in report["trials"]
    )
    # The trials' own results, as Tune recorded them (one JSON line per report), not the
    # job's summary: the best trial is the one whose last valid NDCG@10 is highest.
    own = []
    for result in (tmp_path / "tune").rglob("result.json"):
        lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        own.append((lines[-1]["valid.ndcg@10"], lines[-1]["config"]["trial"]))
    assert len(own) == 2 and own[0][0] != own[1][0], own  # else any pick is the top one
    top_score, top = max(own, key=lambda x: x[0])
    picked = (report["best"]["valid.ndcg@10"], report["best"]["lr"])
    assert picked == (top_score, top["lr"]), f"best {report['best']} is not the top of {own}"
    best = load_config(RunConfig, tmp_path / "best.yaml")  # loads back as a run config
    assert best.model.hidden_size == top["hidden_size"]
    assert best.model.dropout == pytest.approx(top["dropout"])  # YAML float round trip
    assert best.train.lr == pytest.approx(top["lr"])
    assert sorted(t["valid.ndcg@10"] for t in report["trials"]) == sorted(x[0] for x in own)


def test_sparse_item_table_trains_and_resumes_exactly(tmp_path, prepared):
    """train.item_table=auto with the sampled interest loss: the item rows train row-sparse
    (SparseAdam beside ZeRO-2, the touched rows all-gathered: rec/sparse_table.py) on 2
    workers. The run learns and evaluates; every checkpoint carries SparseAdam's state; and
    epoch 2 resumed from epoch 1's checkpoint by train.resume_from is bit-identical to the
    uninterrupted run's (weights, moments, step and LR schedule restored: moments restarted
    at zero would give other item rows)."""
    sparse = [
        "model.interest_loss=sampled",
        "model.n_negatives=64",
        "train.epochs=2",
        "train.early_stop_patience=null",
        "train.lr=0.01",
        "train.warmup_steps=2",
        "train.lr_schedule=cosine",
    ]
    metrics = train_job.run(smoke(tmp_path, prepared, *sparse))
    assert metrics["test.ndcg@10"] > metrics["popular.test.ndcg@10"], metrics  # learned
    ckpts = checkpoints(tmp_path)
    assert [json.loads((c / "state.json").read_text())["epoch"] for c in ckpts] == [1, 2]
    assert all((c / "sparse_item_table.safetensors").exists() for c in ckpts)
    again = tmp_path / "again"
    train_job.run(smoke(again, prepared, *sparse, f"train.resume_from={ckpts[0]}"))
    (resumed,) = checkpoints(again)
    start, straight, via_resume = (
        flat_weights(c / "export" / "model.safetensors") for c in (ckpts[0], ckpts[1], resumed)
    )
    assert not torch.equal(start, straight)
    assert torch.equal(straight, via_resume)
