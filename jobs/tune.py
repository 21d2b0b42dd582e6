"""Ray Tune (ASHA) sweep over the recommender's training: lr, dropout, width, loss weights.

    python -m jobs.tune --config jobs/configs/smoke.yaml output_dir=outputs/tune

Each trial is a function trainable that runs the same Ray Train + DeepSpeed training as
jobs.train (Ray 2.60 refuses `Tuner(TorchTrainer)`); Train's per-epoch validation reaches Tune
through `TuneReportCallback`, and ASHA stops weak trials early. Writes <output_dir>/best.yaml
(the run config with the best trial's values, ready for `jobs.train --config`) and
<output_dir>/tune_results.json (every trial's values and best valid NDCG@10).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from jobs.common import init_ray, main_guard, parse_args
from jobs.config import RunConfig
from jobs.train import ROOT, model_config_for
from rec.config import dump_yaml
from rec.evaluation import load_item_tables
from rec.model import LossWeights
from rec.ray_prepare import prepare
from rec.train import SCORE, TrainSpec, count_steps_per_epoch, fit


def run(cfg: RunConfig) -> dict:
    init_ray(cfg.ray)
    out = Path(cfg.output_dir).resolve()
    prepared = Path(cfg.train.prepared_dir).resolve() if cfg.train.prepared_dir else out / "data"
    if not (prepared / "meta.json").is_file():
        prepare(cfg.data, prepared)
    base = TrainSpec(
        model=model_config_for(cfg, load_item_tables(prepared).meta),
        train=cfg.train,
        prepared_dir=str(prepared),
        steps_per_epoch=count_steps_per_epoch(prepared, cfg.train),
        storage_dir=str(out / "trials"),
        extensions_dir=str(ROOT / ".cache" / "torch_extensions"),
    )
    sweep = cfg.tune
    trainable = tune.with_resources(lambda params: _trial(base, params["trial"]), {"cpu": 0.01})
    tuner = tune.Tuner(
        trainable,
        # Trials are sampled here with a seeded rng, so a sweep is reproducible, and run as a
        # grid so that Tune's own concurrency limit applies.
        param_space={"trial": tune.grid_search(sample_trials(sweep))},
        tune_config=tune.TuneConfig(
            metric=SCORE,
            mode="max",
            max_concurrent_trials=sweep.max_concurrent,
            scheduler=ASHAScheduler(
                time_attr="epoch",
                max_t=cfg.train.epochs,
                grace_period=sweep.grace_epochs,
                reduction_factor=sweep.reduction_factor,
            ),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(out / "tune")),
    )
    grid = tuner.fit()
    best = grid.get_best_result(metric=SCORE, mode="max")
    best_cfg = _apply(cfg, best.config["trial"])
    dump_yaml(best_cfg, out / "best.yaml")
    trials = [
        {
            **r.config["trial"],
            SCORE: (r.metrics or {}).get(SCORE),
            "epochs": (r.metrics or {}).get("epoch"),
        }
        for r in grid
    ]
    report = {"best": {**best.config["trial"], SCORE: best.metrics[SCORE]}, "trials": trials}
    (out / "tune_results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["best"], indent=2))
    print(f"[tune] best config: {out / 'best.yaml'}")
    return report


def sample_trials(sweep) -> list[dict]:
    """`num_samples` points of the search space, drawn with the sweep's seed."""
    rng = np.random.default_rng(sweep.seed)
    lo, hi = np.log(sweep.lr[0]), np.log(sweep.lr[1])
    return [
        {
            "lr": float(np.exp(rng.uniform(lo, hi))),
            "dropout": float(rng.uniform(*sweep.dropout)),
            "hidden_size": int(rng.choice(sweep.hidden_size)),
            "relevance_weight": float(rng.choice(sweep.relevance_weight)),
            "diversity_weight": float(rng.choice(sweep.diversity_weight)),
        }
        for _ in range(sweep.num_samples)
    ]


def _trial(base: TrainSpec, params: dict) -> None:
    from ray import tune as ray_tune

    trial = ray_tune.get_context().get_trial_id()
    spec = replace(
        base, model=_model(base.model, params), train=replace(base.train, lr=params["lr"])
    )
    spec = replace(spec, storage_dir=str(Path(base.storage_dir) / trial))
    fit(spec, name="train", callbacks=[TuneReportCallback()])


def _model(model, params: dict):
    heads = max(1, min(model.architecture().n_heads, params["hidden_size"] // 16))
    weights = replace(
        model.loss_weights or LossWeights(),
        relevance=params["relevance_weight"],
        diversity=params["diversity_weight"],
    )
    return replace(
        model,
        dropout=params["dropout"],
        hidden_size=params["hidden_size"],
        n_heads=heads,
        loss_weights=weights,
    )


def _apply(cfg: RunConfig, params: dict) -> RunConfig:
    """The run config with a trial's values, as jobs.train would read it from best.yaml."""
    return replace(cfg, model=_model(cfg.model, params), train=replace(cfg.train, lr=params["lr"]))


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    sys.exit(main())
