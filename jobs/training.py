"""What jobs.train and the sweep (jobs/sweep.py) share around `rec.train.fit`: the data a run
trains on and its TrainSpec before, the best checkpoint's serving export and its test
metrics after.

    spec = train_spec(cfg, storage_dir=out / "ray")    # prepares the data if it is missing
    export = publish_best(fit(spec), Path(spec.prepared_dir), out / "export")
    metrics = final_test_metrics(export, Path(spec.prepared_dir), batch_size=256)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import ray.train
import torch

from jobs.common import prepared_dir
from jobs.config import RunConfig
from rec.data.batch import collate, length_batches
from rec.data.splits import load_examples, load_item_tables
from rec.evaluation import evaluate
from rec.export import load_export
from rec.model import ModelConfig
from rec.ray_prepare import prepare
from rec.train import SCORE, TrainSpec, count_steps_per_epoch

ROOT = Path(__file__).resolve().parents[1]


def train_spec(cfg: RunConfig, storage_dir: Path) -> TrainSpec:
    """The TrainSpec of a run; its prepared data (`jobs.common.prepared_dir`) is made first
    when it is not there yet. storage_dir: where Ray Train keeps this run's checkpoints."""
    prepared = prepared_dir(cfg)
    if not (prepared / "meta.json").is_file():
        prepare(cfg.data, prepared)
    meta = json.loads((prepared / "meta.json").read_text())
    return TrainSpec(
        model=model_for_data(cfg.model, meta),
        train=cfg.train,
        prepared_dir=str(prepared),
        steps_per_epoch=count_steps_per_epoch(prepared, cfg.train),
        storage_dir=str(storage_dir),
        extensions_dir=str(ROOT / ".cache" / "torch_extensions"),
    )


def model_for_data(model: ModelConfig, meta: dict) -> ModelConfig:
    """The model follows the prepared data: its max_len, and no time gaps without timestamps."""
    model = replace(model, max_len=meta["max_len"])
    if meta["timestamp_kind"] != "unix":
        model = replace(model, use_time_gaps=False)
    return model


def publish_best(result: ray.train.Result, prepared: Path, dest: Path) -> Path:
    """Copy the best checkpoint's serving export (by valid NDCG@10) and the vocabularies."""
    scored = [(m.get(SCORE, float("-inf")), c) for c, m in result.best_checkpoints]
    best = max(scored, key=lambda x: x[0])[1] if scored else result.checkpoint
    shutil.rmtree(dest, ignore_errors=True)
    with best.as_directory() as d:
        shutil.copytree(Path(d) / "export", dest)
        state = json.loads((Path(d) / "state.json").read_text())
    shutil.copytree(prepared / "vocab", dest / "vocab")
    shutil.copy(prepared / "meta.json", dest / "data_meta.json")
    (dest / "checkpoint.json").write_text(json.dumps({"checkpoint": best.path, **state}))
    return dest


def final_test_metrics(export: Path, prepared: Path, batch_size: int) -> dict:
    """Full-ranking test metrics of the exported model, in this plain process (no DeepSpeed),
    plus the best checkpoint's training metrics as `best.*`.

    On a GPU machine the driver scores on the GPU with TF32 matmuls: a 1B model over every
    test user would take over an hour on its CPUs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = load_export(export, device=device)
    tables = load_item_tables(prepared)
    test = collate(load_examples(prepared, "test", model.cfg.max_len))
    metrics = evaluate(model, length_batches(test, batch_size), tables, "test", popular=True)
    trained = json.loads((export / "model_config.json").read_text())["extra"]["metrics"]
    return metrics | {f"best.{k}": v for k, v in trained.items()}
