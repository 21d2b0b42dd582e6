"""RLlib PPO training of the lam policy (the distributing layer, as rec/train.py is the ranker's).

`fit` reads top to bottom: build the PPO algorithm (env runners on Ray, each building its
simulator from the saved world with `rl.world.make_env`) -> iterate `train()` (sample
episodes, optimise) -> log the episode return -> save the final RLModule, which loads
without the Algorithm, its env runners or the simulator (`rl.policy.LamPolicy.load`).
PPO: on-policy and stable with few knobs for a small discrete action (11 lam levels) and
short episodes; no replay buffer to size. The learning rate decays linearly to
lr * lr_final_fraction and the entropy bonus to 0 over the run (explore early, commit to one
lam late: the greedy policy of a flat-return world is a constant only if the logits settle).
Early stopping: with `select` (an arm's result on the tune users, the same seeded episodes
every time, so iterations are compared on common random numbers) the module is scored every
`eval_every` iterations and the best-scoring one is saved; training stops after `patience`
scores without improvement. Without `select` the last module is saved.
Warm start (`warm_lam`): before the first iteration the learner's module becomes the constant
policy warm_lam (rl.policy.warm_start_module; its weights then set on every env runner), is
scored as iteration 0 and saved. An iterate is kept only if it also beats the warm start on
the tune episodes with a paired cluster-bootstrap CI above 0: the best of ~10 noisy scores
beats a constant by luck alone (the winner's curse), and that luck is a loss on test users.
The curve row of the saved module carries "kept": true (iteration 0: PPO found nothing
better than the constant).
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
from rl.arms import ArmResult
from rl.config import EnvConfig
from rl.ladder import cluster_ci
from rl.policy import LamPolicy, PolicyConfig, policy_head_layer, warm_start_module
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
    select: Callable[[Callable], ArmResult] | None = None,
    warm_lam: float | None = None,
) -> list[dict]:
    """Train PPO on the current Ray cluster for at most `cfg.iterations` on the world saved
    at world_path (rl.world.save_world), episodes drawn from `users` (training users only);
    save the selected RLModule to module_dir (module docstring). -> the training curve, one
    dict per iteration (with "tune_return" where the module was scored; iteration 0: the
    warm start)."""
    spec = {
        "world": storage.absolute(world_path),  # a local file or a URI (each runner copies)
        "env": asdict(env_cfg),
        "rerank": asdict(rerank_cfg or RerankConfig()),  # how the env re-ranks its slates
        "users": np.asarray(users).tolist(),
        "seed": cfg.seed,
    }
    algo = build_ppo(cfg, spec)
    curve, kept, warm, stale = [], None, None, 0
    if warm_lam is not None:
        _warm_start(algo, warm_lam, env_cfg.action_mode)
        curve.append({"iteration": 0, "warm_start_lam": float(warm_lam)})
        if select is not None:
            kept = warm = _score(algo, env_cfg, select, curve[-1], None, None)
            _save(algo, module_dir)
    for it in range(1, cfg.iterations + 1):
        row = _iteration(algo, it)
        curve.append(row)
        if select is not None and (it % cfg.eval_every == 0 or it == cfg.iterations):
            better = _score(algo, env_cfg, select, row, kept, warm)
            if better is not None:
                kept, stale = better, 0
                _save(algo, module_dir)
            else:
                stale += 1
            if stale >= cfg.patience:
                break
    if select is None:
        _save(algo, module_dir)
    else:
        kept[0]["kept"] = True
    algo.stop()
    return curve


def _score(algo: Algorithm, env_cfg: EnvConfig, select, row: dict, kept, warm):
    """Score the current module on the tune episodes into `row` -> (row, result) if it
    replaces `kept` (the kept (row, result); None: nothing kept yet), else None. With a
    warm start (its (row, result)) an iterate must also beat it with a paired CI above 0
    (module docstring); row["tune_gain_ci95_low"]: that CI's low end, relative."""
    res = select(LamPolicy(algo.get_module(), env_cfg).arm())
    row["tune_return"] = score = float(res.returns.mean())
    better = kept is None or score > kept[0]["tune_return"]
    if warm is not None and kept is not None:
        lo, _ = cluster_ci(res.returns - warm[1].returns, res.users)
        row["tune_gain_ci95_low"] = lo / max(abs(warm[0]["tune_return"]), 1e-12)
        better = better and lo > 0
    log.info("iter %3d  tune return %7.3f%s", row["iteration"], score, "  kept" if better else "")
    return (row, res) if better else None


def _warm_start(algo: Algorithm, lam: float, action_mode: str) -> None:
    """The learner's module becomes the constant policy lam (its optimiser holds the same
    parameters), then every env runner, local and remote, gets the learner's inference
    weights; raises if a runner's policy head differs from the learner's."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    def on_learner(learner) -> np.ndarray:
        module = learner.module[DEFAULT_MODULE_ID]
        warm_start_module(module, lam, action_mode)
        return _head_bias(module)

    want = [r.get() for r in algo.learner_group.foreach_learner(on_learner)]
    state = algo.learner_group.get_state(
        components=[f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}"], inference_only=True
    )[COMPONENT_LEARNER][COMPONENT_RL_MODULE]
    # Without a weights sequence number the runners apply the state whatever their own:
    # `sync_weights` is skipped by a runner already at the learner's number (Ray 2.60,
    # SingleAgentEnvRunner.set_state), and no update has happened yet to raise it.
    algo.env_runner_group.foreach_env_runner(lambda er: er.set_state({COMPONENT_RL_MODULE: state}))
    got = algo.env_runner_group.foreach_env_runner(lambda er: _head_bias(_single(er.module)))
    if not all(np.array_equal(g, want[0]) for g in got + want):
        raise RuntimeError("warm start: an env runner did not receive the learner's weights")


def _single(module):
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule

    return module[DEFAULT_MODULE_ID] if isinstance(module, MultiRLModule) else module


def _head_bias(module) -> np.ndarray:
    return policy_head_layer(module).bias.detach().cpu().numpy().copy()


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
