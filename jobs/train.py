"""Train the multi-task transformer recommender with Ray Train + DeepSpeed, then evaluate it.

    python -m jobs.train --config jobs/configs/beauty.yaml output_dir=outputs/beauty

Prepares the data into <output_dir>/data first if it is not there. Writes:
  <output_dir>/export/       serving export (model.safetensors + model_config.json + vocab/,
                             backbone/: the Llama decoder for transformers' from_pretrained),
                             published as a new version v-.../ with MANIFEST.json; CURRENT
                             names it (verify: python -m rec.artifacts <output_dir>/export)
  <output_dir>/training_curves.png  loss per head, valid NDCG/Recall/ILD@10 per epoch
  <output_dir>/mlruns/, tensorboard/train/  per-epoch metrics (MLflow file store, TensorBoard)
  <output_dir>/metrics.json  test.* (history included, as S3-Rec/RecBole), test_unseen.*
                             (history excluded), popular.test.*, best valid.*, timings
  <output_dir>/ray/          Ray Train run: DeepSpeed checkpoints per epoch
"""

from __future__ import annotations

import json
import sys
import time

from jobs.common import check_locations, init_ray, main_guard, parse_args
from jobs.config import RunConfig
from jobs.training import final_test_metrics, publish_best, train_spec
from rec import artifacts, storage
from rec.config_loader import ConfigError
from rec.data.splits import load_item_tables
from rec.logs import get_logger
from rec.sparse_table import check_resume
from rec.train import describe, fit

log = get_logger("train")
SUMMARY_PREFIXES = ("test.", "popular.test.", "best.valid.")  # the metrics printed at the end


def run(cfg: RunConfig) -> dict:
    check_locations(cfg)
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    out = storage.absolute(cfg.output_dir)  # a local path or a URI (s3://...)
    spec = train_spec(cfg, storage_dir=storage.join(out, "ray"))
    prepared = spec.prepared_dir
    # A fresh run each time: Ray Train would otherwise continue an earlier run stored under
    # the same name. To continue one on purpose, pass train.resume_from=<checkpoint dir>.
    run_dir = storage.join(out, "ray", "train")
    resume = cfg.train.resume_from
    if resume and (storage.absolute(resume) + "/").startswith(run_dir + "/"):
        raise ConfigError(f"train.resume_from is inside {run_dir}, which a run clears first: "
                          "copy the checkpoint elsewhere or use another output_dir")  # fmt: skip
    if resume:  # a damaged checkpoint: one line before Ray Train starts, not a worker traceback
        artifacts.verify(storage.absolute(resume))
    storage.delete(run_dir)
    info = describe(spec, load_item_tables(prepared))
    log.info("%s parameters, item table %s; data %s", f"{info['parameters']:,}",
             info["item_table"], prepared)  # fmt: skip
    if resume:  # the same item table as the checkpoint's (rec/sparse_table.py)
        check_resume(storage.absolute(resume), info["item_table"])
    result = fit(spec)
    if result.error:
        raise result.error
    export = publish_best(result, prepared, storage.join(out, "export"), cfg)
    metrics = final_test_metrics(export, prepared, cfg.train.eval_batch_size, cfg.eval)
    metrics |= {"parameters": info["parameters"], "seconds": round(time.perf_counter() - t0, 1)}
    metrics_path = storage.join(out, "metrics.json")
    storage.write_text(metrics_path, json.dumps(metrics, indent=2, sort_keys=True))
    summary = {k: v for k, v in metrics.items() if k.startswith(SUMMARY_PREFIXES)}
    print(json.dumps(summary, indent=2))  # the result, on stdout as it is
    log.info("wrote %s, training_curves.png and the serving export %s", metrics_path, export)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    sys.exit(main())
