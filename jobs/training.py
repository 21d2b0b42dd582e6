"""What jobs.train and the sweep (jobs/sweep.py) share around `rec.train.fit`: the data a run
trains on and its TrainSpec before, the best checkpoint's serving export and its test
metrics after.

    spec = train_spec(cfg, storage_dir=join(out, "ray"))  # prepares the data if missing
    export = publish_best(fit(spec), spec.prepared_dir, join(out, "export"), cfg)
    metrics = final_test_metrics(export, spec.prepared_dir, batch_size=256)

Every path here is a local path or a URI (rec/storage.py). The prepared data is read from its
verified current version; the export is built in a local temporary folder and published as a
new version of `<out>/export` (rec/artifacts.py: MANIFEST.json, then CURRENT switches).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import ray.train
import torch

from jobs.common import prepared_dir
from jobs.config import RunConfig
from rec import ann, artifacts, storage
from rec.data.batch import collate, length_batches
from rec.data.splits import load_examples, load_item_tables
from rec.evaluation import EvalConfig, evaluate, resolve_max_users, sample_users
from rec.export import load_export, plain_llama, read_export_config, save_hf_backbone
from rec.logs import get_logger
from rec.model import ModelConfig
from rec.ray_checkpoints import lineage
from rec.ray_prepare import prepare
from rec.tracking import TrackingTarget
from rec.train import SCORE, TrainSpec, count_steps_per_epoch

ROOT = Path(__file__).resolve().parents[1]
log = get_logger("train")


def train_spec(cfg: RunConfig, storage_dir: str | Path) -> TrainSpec:
    """The TrainSpec of a run; its prepared data (`jobs.common.prepared_dir`) is made first
    when it is not there yet. storage_dir: where Ray Train keeps this run's checkpoints."""
    prepared = prepared_dir(cfg)
    if not artifacts.published(prepared):
        prepare(cfg.data, prepared)
    prepared = artifacts.verify(prepared).path  # the version every worker reads
    meta = json.loads(storage.read_text(storage.join(prepared, "meta.json")))
    return TrainSpec(
        model=model_for_data(cfg.model, meta),
        train=cfg.train,
        prepared_dir=prepared,
        steps_per_epoch=count_steps_per_epoch(prepared, cfg.train),
        storage_dir=storage.absolute(storage_dir),
        extensions_dir=str(ROOT / ".cache" / "torch_extensions"),
        tracking=tracking_target(storage.absolute(cfg.output_dir)),
        valid_max_users=resolve_max_users(cfg.eval, meta["n_items"]),
    )


def tracking_target(out: str, trial: str | None = None) -> TrackingTarget:
    """A run's MLflow / TensorBoard / curves locations under the job's output_dir `out`: a
    training job's `training_curves.png` beside its metrics.json, a sweep trial's under
    trials/<trial>/ (beside its checkpoints), all trials in one MLflow store."""
    if trial is None:
        return TrackingTarget(out, "train", storage.join(out, "training_curves.png"))
    return TrackingTarget(out, trial, storage.join(out, "trials", trial, "training_curves.png"))


def model_for_data(model: ModelConfig, meta: dict) -> ModelConfig:
    """The model follows the prepared data: its max_len, and no time gaps without timestamps."""
    model = replace(model, max_len=meta["max_len"])
    if meta["timestamp_kind"] != "unix":
        model = replace(model, use_time_gaps=False)
    return model


def publish_best(result: ray.train.Result, prepared: str, dest: str, cfg: RunConfig) -> str:
    """Publish the best checkpoint's serving export (by valid NDCG@10): `publish_export`."""
    # Continued with train.resume_from: the earlier run's validated epochs compete too.
    ckpts = [*result.best_checkpoints, *lineage(cfg.train.resume_from)]
    scored = [(m.get(SCORE, float("-inf")), c) for c, m in ckpts]
    best = max(scored, key=lambda x: x[0])[1] if scored else result.checkpoint
    with best.as_directory() as d:
        artifacts.verify(str(d))  # sealed by rec.ray_checkpoints: export only what is intact
        uri = storage.to_uri(best.filesystem, best.path)
        return publish_export(Path(d), uri, prepared, dest, dataclasses.asdict(cfg))


def publish_export(checkpoint_dir: Path, checkpoint: str, prepared: str, dest: str, config) -> str:
    """A checkpoint's export/ with the data's vocabularies and meta.json, published as a new
    version of the artefact root `dest` (local or URI; kind "export"): built in a local
    temporary folder, published with its MANIFEST.json, then CURRENT switches. Returns `dest`,
    the path users pass around (`python -m rec.artifacts DEST` verifies it)."""
    with tempfile.TemporaryDirectory(prefix="raydiv-export-") as tmp:
        build = Path(tmp) / "export"
        shutil.copytree(checkpoint_dir / "export", build)
        if plain_llama(read_export_config(build)[0]):  # else a layer transformers lacks
            save_hf_backbone(build)  # backbone/: the decoder as a transformers model directory
        else:
            log.info("no backbone/ in the export: model.freq_mix is not a plain Llama layer")
        state = json.loads((checkpoint_dir / "state.json").read_text())
        storage.download_dir(storage.join(prepared, "vocab"), build / "vocab")
        meta = storage.read_bytes(storage.join(prepared, "meta.json"))
        (build / "data_meta.json").write_bytes(meta)
        (build / "checkpoint.json").write_text(json.dumps({"checkpoint": checkpoint, **state}))
        serving = config.get("serve", {})  # an ANN index on a large catalogue, in the MANIFEST
        mode, min_items = serving.get("retrieval", "auto"), serving.get("ann_min_items")
        ann.add_to_export(build, mode, min_items or ann.DEFAULT_MIN_ITEMS)
        version = artifacts.publish(
            build, dest, kind="export", producer="jobs.train", config=config
        )
    log.info("published the export %s", version)
    return dest


def final_test_metrics(
    export: str, prepared: str, batch_size: int, eval_cfg: EvalConfig | None = None
) -> dict:
    """Full-ranking test metrics of the exported model, in this plain process (no DeepSpeed),
    plus the best checkpoint's training metrics as `best.*`.

    On a GPU machine the driver scores on the GPU with TF32 matmuls: a 1B model over every
    test user would take over an hour on its CPUs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    export, _ = artifacts.fetch_verified(str(export), storage.default_cache())
    prepared = artifacts.resolve(str(prepared))  # a version (as train_spec gives) is itself
    model = load_export(export, device=device)
    tables = load_item_tables(prepared)
    test = collate(load_examples(prepared, "test", model.cfg.max_len))
    ecfg = eval_cfg or EvalConfig()  # a seeded user sample on a large catalogue (rec.evaluation)
    test = sample_users(test, resolve_max_users(ecfg, tables.n_items), ecfg.seed)
    batches = length_batches(test, batch_size)
    metrics = evaluate(model, batches, tables, "test", popular=True, item_chunk=ecfg.item_chunk)
    metrics["test.n_users"] = test.size
    trained = json.loads((export / "model_config.json").read_text())["extra"]["metrics"]
    return metrics | {f"best.{k}": v for k, v in trained.items()}
