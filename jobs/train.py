"""Train the multi-task transformer recommender with Ray Train + DeepSpeed, then evaluate it.

    python -m jobs.train --config jobs/configs/beauty.yaml output_dir=outputs/beauty

Prepares the data into <output_dir>/data first if it is not there. Writes:
  <output_dir>/export/       serving export: model.safetensors + model_config.json + vocab/
  <output_dir>/metrics.json  test.* (history included, as S3-Rec/RecBole), test_unseen.*
                             (history excluded), popular.test.*, best valid.*, timings
  <output_dir>/ray/          Ray Train run: DeepSpeed checkpoints per epoch
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from jobs.common import init_ray, main_guard, parse_args
from jobs.config import RunConfig
from rec.evaluation import eval_batches, evaluate, load_examples, load_item_tables
from rec.export import load_export
from rec.ray_prepare import prepare
from rec.train import SCORE, TrainSpec, count_steps_per_epoch, describe, fit

ROOT = Path(__file__).resolve().parents[1]


def run(cfg: RunConfig) -> dict:
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    out = Path(cfg.output_dir).resolve()
    prepared = Path(cfg.train.prepared_dir).resolve() if cfg.train.prepared_dir else out / "data"
    if not (prepared / "meta.json").is_file():
        prepare(cfg.data, prepared)
    tables = load_item_tables(prepared)
    spec = TrainSpec(
        model=model_config_for(cfg, tables.meta),
        train=cfg.train,
        prepared_dir=str(prepared),
        steps_per_epoch=count_steps_per_epoch(prepared, cfg.train),
        storage_dir=str(out / "ray"),
        extensions_dir=str(ROOT / ".cache" / "torch_extensions"),
    )
    # A fresh run each time: Ray Train would otherwise continue an earlier run stored under
    # the same name. To continue one on purpose, pass train.resume_from=<checkpoint dir>.
    shutil.rmtree(out / "ray" / "train", ignore_errors=True)
    info = describe(spec, tables)
    print(f"[train] {info['parameters']:,} parameters; data {prepared}", flush=True)
    result = fit(spec)
    if result.error:
        raise result.error
    export = publish_best(result, prepared, out / "export")
    metrics = test_metrics(export, prepared, cfg.train.eval_batch_size)
    metrics |= {"parameters": info["parameters"], "seconds": round(time.perf_counter() - t0, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print(
        json.dumps(
            {
                k: v
                for k, v in metrics.items()
                if k.startswith(("test.", "popular.test.", "best.valid."))
            },
            indent=2,
        )
    )
    print(f"[train] wrote {out / 'metrics.json'} and the serving export {export}")
    return metrics


def model_config_for(cfg: RunConfig, meta: dict):
    """The model follows the prepared data: its max_len, and no time gaps without timestamps."""
    model = replace(cfg.model, max_len=meta["max_len"])
    if meta["timestamp_kind"] != "unix":
        model = replace(model, use_time_gaps=False)
    return model


def publish_best(result, prepared: Path, dest: Path) -> Path:
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


def test_metrics(export: Path, prepared: Path, batch_size: int) -> dict:
    """Full-ranking test metrics of the exported model, in this plain process (no DeepSpeed).

    On a GPU machine the driver scores on the GPU with TF32 matmuls: a 1B model over every
    test user would take over an hour on its CPUs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = load_export(export, device=device)
    tables = load_item_tables(prepared)
    test = load_examples(prepared, "test", model.cfg.max_len)
    metrics = evaluate(model, eval_batches(test, batch_size), tables, "test", popular=True)
    trained = json.loads((export / "model_config.json").read_text())["extra"]["metrics"]
    return metrics | {f"best.{k}": v for k, v in trained.items()}


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    sys.exit(main())
