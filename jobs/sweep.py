"""The hyper-parameter sweep behind jobs.tune: its settings (`tune:` in the run config), the
seeded trials, and the Ray Tune ASHA run over the same training as jobs.train.

    report, best_cfg = sweep(cfg)    # on the current Ray cluster

Each trial is a function trainable that runs `rec.train.fit` (Ray 2.60 refuses
`Tuner(TorchTrainer)`); Train's per-epoch validation reaches Tune through
`TuneReportCallback`, and ASHA stops weak trials early. Ray is imported inside `sweep` and
`_trial` only: the run config (jobs/config.py) holds SweepConfig, and every job loads that.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from rec import storage
from rec.model import LossWeights, ModelConfig

if TYPE_CHECKING:  # jobs.config imports SweepConfig from here
    from jobs.config import RunConfig
    from rec.train import TrainSpec


@dataclass
class SweepConfig:
    """A Ray Tune ASHA sweep over the training (jobs/tune.py)."""

    # Trials sampled from the space below, and how many run at once (each trial's Train
    # workers plus its Ray Data readers must fit: 1 on a 2-CPU machine, more on a cluster).
    num_samples: int = 8
    max_concurrent: int = 1
    # ASHA: every trial gets at least this many epochs; survivors are promoted by this factor.
    grace_epochs: int = 1
    reduction_factor: int = 2
    # Search space: log-uniform lr range, uniform dropout range, choices of width and of the
    # relevance / diversity loss weights (interest stays 1).
    lr: list[float] = field(default_factory=lambda: [3e-4, 3e-3])
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.5])
    hidden_size: list[int] = field(default_factory=lambda: [32, 64, 128])
    relevance_weight: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.5])
    diversity_weight: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3])
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ValueError("tune.num_samples and tune.max_concurrent must be >= 1")
        if len(self.lr) != 2 or not 0 < self.lr[0] <= self.lr[1]:
            raise ValueError(f"tune.lr must be [low, high] with 0 < low <= high, got {self.lr!r}")
        if len(self.dropout) != 2 or not 0 <= self.dropout[0] <= self.dropout[1] < 1:
            raise ValueError(f"tune.dropout must be [low, high] in [0, 1), got {self.dropout!r}")


def sweep(cfg: RunConfig) -> tuple[dict, RunConfig]:
    """Run the sweep's trials -> (report: the best trial's values and valid NDCG@10 and every
    trial's, the run config with the best trial's values). Trial runs go under
    <output_dir>/trials and <output_dir>/tune."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from jobs.training import train_spec
    from rec.tracking import create_experiment
    from rec.train import SCORE

    out = storage.absolute(cfg.output_dir)  # a local path or a URI
    base = train_spec(cfg, storage_dir=storage.join(out, "trials"))
    create_experiment(cfg.train.tracking, out)  # before trials run side by side
    tune_path, tune_fs = storage.for_ray(storage.join(out, "tune"))
    trainable = tune.with_resources(lambda params: _trial(base, params["trial"]), {"cpu": 0.01})
    tuner = tune.Tuner(
        trainable,
        # Trials are sampled here with a seeded rng, so a sweep is reproducible, and run as a
        # grid so that Tune's own concurrency limit applies.
        param_space={"trial": tune.grid_search(sample_trials(cfg.tune))},
        tune_config=tune.TuneConfig(
            metric=SCORE,
            mode="max",
            max_concurrent_trials=cfg.tune.max_concurrent,
            scheduler=ASHAScheduler(
                time_attr="epoch",
                max_t=cfg.train.epochs,
                grace_period=cfg.tune.grace_epochs,
                reduction_factor=cfg.tune.reduction_factor,
            ),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=tune_path, storage_filesystem=tune_fs),
    )
    grid = tuner.fit()
    best = grid.get_best_result(metric=SCORE, mode="max")
    trials = [
        {
            **r.config["trial"],
            SCORE: (r.metrics or {}).get(SCORE),
            "epochs": (r.metrics or {}).get("epoch"),
        }
        for r in grid
    ]
    report = {"best": {**best.config["trial"], SCORE: best.metrics[SCORE]}, "trials": trials}
    return report, with_trial(cfg, best.config["trial"])


def sample_trials(sweep: SweepConfig) -> list[dict]:
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


def with_trial(cfg: RunConfig, params: dict) -> RunConfig:
    """The run config with a trial's values, as jobs.train would read it from best.yaml."""
    return replace(cfg, model=_model(cfg.model, params), train=replace(cfg.train, lr=params["lr"]))


def _trial(base: TrainSpec, params: dict) -> None:
    """One trial (in a Tune worker): the base training with the trial's values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.training import tracking_target
    from rec.train import fit

    trial = tune.get_context().get_trial_id()
    spec = replace(
        base,
        model=_model(base.model, params),
        train=replace(base.train, lr=params["lr"]),
        storage_dir=storage.join(base.storage_dir, trial),
        tracking=base.tracking and tracking_target(base.tracking.root, trial),
    )
    fit(spec, name="train", callbacks=[TuneReportCallback()])


def _model(model: ModelConfig, params: dict) -> ModelConfig:
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
