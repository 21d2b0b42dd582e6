"""Experiment tracking (rec/tracking.py): MLflow runs, TensorBoard events and training_curves.png
from a small per-epoch history, including a restart that re-does an epoch (no duplicates)."""

from __future__ import annotations

import os
import struct
from collections import Counter
from pathlib import Path

import pytest

from rec.tracking import Tracker, TrackingConfig, TrackingTarget, curves_figure, metric_name


def epoch_metrics(epoch: int) -> dict:
    """One epoch's loop metrics as rec/train.py reports them (valid.* only every 2nd epoch)."""
    out = {
        "epoch": epoch,
        "step": 5 * epoch,
        "train_seconds": 1.5,
        "train.loss": 9.0 - epoch,
        "train.loss_interest": 8.0 - epoch,
        "train.loss_diversity": 0.5 / epoch,
    }
    if epoch % 2 == 0:
        out |= {"valid.ndcg@10": 0.01 * epoch, "valid.recall@10": 0.02 * epoch}
        out |= {"valid.ild@10": 0.8, "best.valid.ndcg@10": 0.01 * epoch, "valid.mrr": float("nan")}
    return out


def target(root: Path) -> TrackingTarget:
    return TrackingTarget(str(root), "train", str(root / "training_curves.png"))


def tb_scalars(logdir: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TFRecord event files under logdir."""
    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):  # record: length u64, crc u32, payload, crc u32
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                found.append((v.tag, event.step, v.simple_value))
    return found


def mlflow_points(root: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every MLflow metric of a run as (step, value) points, read back through MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(root / "mlruns").resolve().as_uri())
    run = client.get_run(run_id)
    return {
        k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
        for k in run.data.metrics
    }


def tracked_epochs(root: Path, run_name: str = "train") -> dict[str, list[int]]:
    """The epochs a training job under output_dir `root` logged, per backend, duplicates kept:
    MLflow's train/loss steps (the run named `run_name`: "train" or a Tune trial's id) and
    TensorBoard's, and whether the curves were drawn. tests/test_train_ray.py checks these after a fit and after a restart."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as the tracker sets it
    client = MlflowClient(tracking_uri=(root / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name(TrackingConfig().experiment)
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    tb = tb_scalars(root / "tensorboard" / run_name)
    curves = root / ("" if run_name == "train" else f"trials/{run_name}") / "training_curves.png"
    png = curves.is_file() and curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return {
        "mlflow": [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")],
        "tensorboard": sorted(step for tag, step, _ in tb if tag == "train/loss"),
        "curves": png,
    }


def test_metric_names_are_valid_for_mlflow_and_grouped_for_tensorboard():
    assert metric_name("valid.ndcg@10") == "valid/ndcg_at_10"
    assert metric_name("best.valid.ndcg@10") == "best/valid.ndcg_at_10"
    assert metric_name("train_seconds") == "train_seconds"


def test_tracker_logs_each_epoch_once_across_a_restart(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the tracker sets it
    cfg, params = TrackingConfig(), {"train": {"lr": 0.01, "deepspeed": {"zero_stage": 2}}}
    history = [epoch_metrics(e) for e in (1, 2, 3)]
    # First attempt: logs epochs 1-3, then dies before epoch 3's checkpoint persisted.
    state = {"history": []}
    first = Tracker(cfg, target(tmp_path), params, state)
    for k in range(1, 4):
        first.log(history[:k])
    run_id = state["mlflow_run_id"]
    # The restarted attempt restores epoch 2's checkpoint (its state: history 1-2, run id),
    # re-does epoch 3 and goes on to epoch 4.
    restored = {"history": history[:2], "mlflow_run_id": run_id}
    second = Tracker(cfg, target(tmp_path), params, restored)
    full = [*history, epoch_metrics(4)]
    second.log(full[:3])
    second.log(full)
    second.close()
    assert restored["mlflow_run_id"] == run_id  # the same MLflow run continued

    points = mlflow_points(tmp_path, run_id)
    assert [s for s, _ in points["train/loss"]] == [1, 2, 3, 4]  # each epoch exactly once
    assert points["valid/ndcg_at_10"] == [(2, 0.02), (4, 0.04)]
    assert "valid/mrr" not in points and "epoch" not in points  # NaN dropped; epoch = step
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri()).get_run(run_id)
    assert run.data.params["train.deepspeed.zero_stage"] == "2"
    assert run.info.status == "FINISHED" and run.info.run_name == "train"

    scalars = tb_scalars(tmp_path / "tensorboard" / "train")
    counts = Counter((tag, step) for tag, step, _ in scalars)
    assert counts[("train/loss", 3)] == 1 and set(counts.values()) == {1}
    assert sorted(s for t, s, _ in scalars if t == "valid/recall_at_10") == [2, 4]
    assert ("train/loss_interest", 4, pytest.approx(4.0)) in scalars

    png = (tmp_path / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_into_another_store_backfills_a_new_run(tmp_path):
    """train.resume_from into another output_dir: that store lacks the run id in the state, so
    a new run gets the whole restored history, then the new epochs."""
    old, new = tmp_path / "old", tmp_path / "new"
    state = {"history": []}
    Tracker(TrackingConfig(), target(old), {}, state).log([epoch_metrics(1)])
    restored = {**state, "history": [epoch_metrics(1), epoch_metrics(2)]}
    tracker = Tracker(TrackingConfig(tensorboard=False), target(new), {}, restored)
    tracker.log([*restored["history"], epoch_metrics(3)])
    tracker.close()
    assert restored["mlflow_run_id"] != state["mlflow_run_id"]
    points = mlflow_points(new, restored["mlflow_run_id"])
    assert [s for s, _ in points["step"]] == [1, 2, 3]
    assert not (new / "tensorboard").exists()


def test_curves_show_every_head_loss_and_the_valid_metrics():
    history = [epoch_metrics(e) for e in (1, 2, 3, 4)]
    losses, relevance, diversity = curves_figure(history).axes
    assert {ln.get_label() for ln in losses.lines} == {
        "train.loss",
        "train.loss_diversity",
        "train.loss_interest",
    }
    assert [ln.get_label() for ln in relevance.lines] == ["valid.ndcg@10", "valid.recall@10"]
    assert [list(ln.get_xdata()) for ln in relevance.lines] == [[2, 4], [2, 4]]
    assert list(diversity.lines[0].get_ydata()) == [0.8, 0.8]
    assert list(losses.lines[0].get_xdata()) == [1, 2, 3, 4]


def test_one_log_format_and_a_progress_bar_on_request(capsys, monkeypatch):
    from rec.logs import get_logger, progress

    get_logger("pipeline").info("%s: skipped (%s)", "train", "done")
    line = capsys.readouterr().out.strip()
    date, clock, level, rest = line.split(" ", 3)  # 2026-11-29 12:00:00 INFO [pipeline] ...
    assert (len(date), len(clock), level, rest) == (
        10,
        8,
        "INFO",
        "[pipeline] train: skipped (done)",
    )
    monkeypatch.setenv("RAYDIV_PROGRESS", "1")
    assert list(progress(range(3), 3, "frontier")) == [0, 1, 2]
    assert "frontier:   0%| " in capsys.readouterr().err  # drawn (then cleared: leave=False)
    monkeypatch.setenv("RAYDIV_PROGRESS", "0")
    assert list(progress(range(3), 3, "frontier")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
