"""RLlib PPO training of the lam policy (the distributing layer, as rec/train.py is the ranker's).

`fit` reads top to bottom: build the PPO algorithm (env runners on Ray, each building its
simulator from the saved world with `rl.world.make_env`) -> iterate `train()` (sample
episodes, optimise) -> log the episode return -> save the final RLModule, which loads
without the Algorithm, its env runners or the simulator (`rl.policy.LamPolicy.load`).
PPO: on-policy and stable with few knobs for a small discrete action (11 lam levels) and
short episodes; no replay buffer to size. The learning rate decays linearly to
lr * lr_final_fraction and the entropy bonus to 0 over the run (explore early, commit to one
lam late: the greedy policy of a flat-return world is a constant only if the logits settle).
Early stopping: with `select` (the mean return of an arm on the tune users, the same seeded
episodes every time, so iterations are compared on common random numbers) the module is
scored every `eval_every` iterations and the best-scoring one is saved; training stops after
`patience` scores without improvement. Without `select` the last module is saved.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPOConfig
from ray.tune.registry import register_env

from rec import storage
from rec.logs import get_logger
from rec.rerank import RerankConfig
from rl.config import EnvConfig
from rl.policy import LamPolicy, PolicyConfig
from rl.world import make_env

log = get_logger("rllib")

ENV_NAME = "raydiv-diversity-env"


def fit(
    cfg: PolicyConfig,
    world_path: Path,
    env_cfg: EnvConfig,
    users: np.ndarray,
    module_dir: Path,
    rerank_cfg: RerankConfig | None = None,
    select: Callable[[Callable], float] | None = None,
) -> list[dict]:
    """Train PPO on the current Ray cluster for at most `cfg.iterations` on the world saved
    at world_path (rl.world.save_world), episodes drawn from `users` (training users only);
    save the selected RLModule to module_dir (module docstring). -> the training curve, one
    dict per iteration (with "tune_return" where the module was scored)."""
    spec = {
        "world": storage.absolute(world_path),  # a local file or a URI (each runner copies)
        "env": asdict(env_cfg),
        "rerank": asdict(rerank_cfg or RerankConfig()),  # how the env re-ranks its slates
        "users": np.asarray(users).tolist(),
        "seed": cfg.seed,
    }
    algo = build_ppo(cfg, spec)
    curve, best, stale = [], -np.inf, 0
    for it in range(1, cfg.iterations + 1):
        row = _iteration(algo, it)
        curve.append(row)
        if select is not None and (it % cfg.eval_every == 0 or it == cfg.iterations):
            row["tune_return"] = score = float(select(LamPolicy(algo.get_module(), env_cfg).arm()))
            log.info("iter %3d  tune return %7.3f (best %7.3f)", it, score, best)
            if score > best:
                best, stale = score, 0
                _save(algo, module_dir)
            else:
                stale += 1
            if stale >= cfg.patience:
                break
    if select is None:
        _save(algo, module_dir)
    algo.stop()
    return curve


def _iteration(algo: Algorithm, it: int) -> dict:
    runners = algo.train().get("env_runners", {})  # sample -> optimise
    row = {
        "iteration": it,
        "episode_return_mean": float(runners.get("episode_return_mean", float("nan"))),
        "episode_len_mean": float(runners.get("episode_len_mean", float("nan"))),
        "env_steps": int(runners.get("num_env_steps_sampled_lifetime", 0)),
    }
    log.info(
        "iter %3d  return %7.3f  len %5.2f  steps %d",
        it, row["episode_return_mean"], row["episode_len_mean"], row["env_steps"],
    )  # fmt: skip
    return row


def _save(algo: Algorithm, module_dir: Path) -> None:
    shutil.rmtree(module_dir, ignore_errors=True)
    algo.get_module().save_to_path(str(Path(module_dir).resolve()))


def build_ppo(cfg: PolicyConfig, spec: dict) -> Algorithm:
    """PPO on the new API stack, env runners created from `spec` (rl.world.make_env)."""
    register_env(ENV_NAME, make_env)
    steps = cfg.iterations * cfg.train_batch_size
    config = (
        PPOConfig()
        .environment(ENV_NAME, env_config=spec)
        .env_runners(num_env_runners=cfg.num_env_runners, num_cpus_per_env_runner=0.5)
        .learners(num_learners=0)
        .training(
            train_batch_size_per_learner=cfg.train_batch_size,
            minibatch_size=cfg.minibatch_size,
            num_epochs=cfg.num_epochs,
            lr=_linear(cfg.lr, cfg.lr * cfg.lr_final_fraction, steps),
            gamma=cfg.gamma,
            entropy_coeff=_linear(cfg.entropy_coeff, 0.0, steps),
        )
        .rl_module(model_config={"fcnet_hiddens": list(cfg.hidden), "vf_share_layers": False})
        .debugging(seed=cfg.seed)
    )
    return config.build_algo()


def _linear(start: float, end: float, steps: int) -> list[list[float]]:
    """RLlib's piecewise-linear schedule [[timestep, value], ...] from start to end."""
    return [[0, start], [steps, end]]
