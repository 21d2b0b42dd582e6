"""What jobs.train and the sweep (jobs/sweep.py) share around `rec.train.fit`: the data a run
trains on and its TrainSpec before, the best checkpoint's serving export and its test
metrics after.

    spec = train_spec(cfg, storage_dir=join(out, "ray"))  # prepares the data if missing
    export = publish_best(fit(spec), spec.prepared_dir, join(out, "export"))
    metrics = final_test_metrics(export, spec.prepared_dir, batch_size=256)

Every path here is a local path or a URI (rec/storage.py); the export is built in a local
temporary folder and then published in one place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import ray.train
import torch

from jobs.common import prepared_dir
from jobs.config import RunConfig
from rec import storage
from rec.data.batch import collate, length_batches
from rec.data.splits import load_examples, load_item_tables
from rec.evaluation import evaluate
from rec.export import load_export
from rec.model import ModelConfig
from rec.ray_prepare import prepare
from rec.train import SCORE, TrainSpec, count_steps_per_epoch

ROOT = Path(__file__).resolve().parents[1]


def train_spec(cfg: RunConfig, storage_dir: str | Path) -> TrainSpec:
    """The TrainSpec of a run; its prepared data (`jobs.common.prepared_dir`) is made first
    when it is not there yet. storage_dir: where Ray Train keeps this run's checkpoints."""
    prepared = prepared_dir(cfg)
    if not storage.exists(storage.join(prepared, "meta.json")):
        prepare(cfg.data, prepared)
    meta = json.loads(storage.read_text(storage.join(prepared, "meta.json")))
    return TrainSpec(
        model=model_for_data(cfg.model, meta),
        train=cfg.train,
        prepared_dir=prepared,
        steps_per_epoch=count_steps_per_epoch(prepared, cfg.train),
        storage_dir=storage.absolute(storage_dir),
        extensions_dir=str(ROOT / ".cache" / "torch_extensions"),
    )


def model_for_data(model: ModelConfig, meta: dict) -> ModelConfig:
    """The model follows the prepared data: its max_len, and no time gaps without timestamps."""
    model = replace(model, max_len=meta["max_len"])
    if meta["timestamp_kind"] != "unix":
        model = replace(model, use_time_gaps=False)
    return model


def publish_best(result: ray.train.Result, prepared: str, dest: str) -> str:
    """Publish the best checkpoint's serving export (by valid NDCG@10) with the vocabularies
    at `dest` (local or URI): built in a local temporary folder, then moved or uploaded."""
    scored = [(m.get(SCORE, float("-inf")), c) for c, m in result.best_checkpoints]
    best = max(scored, key=lambda x: x[0])[1] if scored else result.checkpoint
    with tempfile.TemporaryDirectory(prefix="raydiv-export-") as tmp:
        build = Path(tmp) / "export"
        with best.as_directory() as d:
            shutil.copytree(Path(d) / "export", build)
            state = json.loads((Path(d) / "state.json").read_text())
        storage.download_dir(storage.join(prepared, "vocab"), build / "vocab")
        meta = storage.read_bytes(storage.join(prepared, "meta.json"))
        (build / "data_meta.json").write_bytes(meta)
        checkpoint = storage.to_uri(best.filesystem, best.path)
        (build / "checkpoint.json").write_text(json.dumps({"checkpoint": checkpoint, **state}))
        storage.delete(dest)
        storage.upload_dir(build, dest)
    return dest


def final_test_metrics(export: str, prepared: str, batch_size: int) -> dict:
    """Full-ranking test metrics of the exported model, in this plain process (no DeepSpeed),
    plus the best checkpoint's training metrics as `best.*`.

    On a GPU machine the driver scores on the GPU with TF32 matmuls: a 1B model over every
    test user would take over an hour on its CPUs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    export = storage.local_copy(export, storage.default_cache())  # local paths as they are
    model = load_export(export, device=device)
    tables = load_item_tables(prepared)
    test = collate(load_examples(prepared, "test", model.cfg.max_len))
    metrics = evaluate(model, length_batches(test, batch_size), tables, "test", popular=True)
    trained = json.loads((export / "model_config.json").read_text())["extra"]["metrics"]
    return metrics | {f"best.{k}": v for k, v in trained.items()}
