"""Ray Tune (ASHA) sweep over the recommender's training: lr, dropout, width, loss weights.

    python -m jobs.tune --config jobs/configs/smoke.yaml output_dir=outputs/tune

Each trial runs the same Ray Train + DeepSpeed training as jobs.train (jobs/sweep.py: the
sweep's settings under `tune:`, its trials, the Tune run), and ASHA stops weak trials early.
Prepares the data into <output_dir>/data first if it is not there. Writes <output_dir>/best.yaml
(the run config with the best trial's values, ready for `jobs.train --config`) and
<output_dir>/tune_results.json (every trial's values and best valid NDCG@10). Each trial logs
its epochs as jobs.train does: an MLflow run named by its trial id in <output_dir>/mlruns,
tensorboard/<trial>/, trials/<trial>/training_curves.png.
"""

from __future__ import annotations

import json
import sys

from jobs.common import check_locations, init_ray, main_guard, parse_args
from jobs.config import RunConfig
from jobs.sweep import sweep
from rec import storage
from rec.config_loader import dump_yaml
from rec.logs import get_logger

log = get_logger("tune")


def run(cfg: RunConfig) -> dict:
    check_locations(cfg)
    init_ray(cfg.ray)
    out = storage.absolute(cfg.output_dir)  # a local path or a URI
    report, best_cfg = sweep(cfg)
    dump_yaml(best_cfg, storage.join(out, "best.yaml"))
    storage.write_text(storage.join(out, "tune_results.json"), json.dumps(report, indent=2))
    print(json.dumps(report["best"], indent=2))
    log.info("best config: %s", storage.join(out, "best.yaml"))
    return report


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    sys.exit(main())
