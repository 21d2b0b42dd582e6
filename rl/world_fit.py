"""Fit the simulated user of a built world and check it against the log (numpy only, no Ray):
what jobs.train_policy runs between building the world and training the policy.

    env_cfg, model = fit_user_model(world, data, cfg.env, cfg.world, train_rows, cfg.rerank)
    report = realism_report(world, data, env_cfg, eval_rows, episodes=2000, seed=0)

Only the world's training users (rows of the world, mapped to the prepared data's users)
are fitted on; realism compares the held-out users' logged sessions with simulated sessions
of the same held-out users, so nothing is fitted on what it is judged on.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np

from rec.rerank import RerankConfig
from rl.calibrate import apply_calibration
from rl.config import EnvConfig
from rl.realism import log_sessions, realism_metrics, simulated_sessions
from rl.session_fit import fit_leave_intercept, fit_session_model
from rl.simdata import SimulatorData
from rl.world import World, WorldConfig


def fit_user_model(
    world: World,
    data: SimulatorData,
    env: EnvConfig,
    cfg: WorldConfig,
    train_rows: np.ndarray,
    rerank_cfg: RerankConfig | None = None,
) -> tuple[EnvConfig, dict]:
    """-> (env config with the fitted user, a JSON-ready description: world.json)."""
    if cfg.user_model == "types":
        fitted, changed = apply_calibration(env, world.calibration, data, rerank_cfg)
        return fitted, {"user_model": "types", "calibrated": changed}
    if world.log is None:
        raise ValueError("the session model is fitted on the log: build_world keeps it")
    log_users = world.users[np.asarray(train_rows)]
    fit = fit_session_model(world.log, users=log_users, base=env.session)
    fitted = replace(env, user_model="session", session=fit.session)
    intercept = fit_leave_intercept(
        data,
        fitted,
        fit.stats["session_mean"],
        episodes=cfg.fit_episodes,
        seed=0,
        rerank_cfg=rerank_cfg,
    )
    fitted = replace(fitted, session=replace(fitted.session, leave_intercept=intercept))
    out = fit.to_json()
    out["session"] = asdict(fitted.session)
    out["provenance"]["leave_intercept"]["value"] = intercept
    out["fit_users"] = {"world_rows": "training users", "count": int(len(log_users))}
    out["position_examination"] = {
        "choice.position_bias": env.choice.position_bias,
        "source": "assumed",
        "from": "no impressions: 1 / log2(pos + 2) examination (DCG's discount)",
    }
    return fitted, {"user_model": "session"} | out


def realism_report(
    world: World,
    data: SimulatorData,
    env: EnvConfig,
    eval_rows: np.ndarray,
    episodes: int,
    seed: int,
    rerank_cfg: RerankConfig | None = None,
) -> dict:
    """Held-out users' logged sessions vs their simulated sessions (rl/realism.py)."""
    if world.log is None:
        raise ValueError("the realism report needs the log: build_world keeps it")
    eval_rows = np.asarray(eval_rows)
    real = log_sessions(world.log, world.users[eval_rows])
    # Each held-out user gets as many simulated sessions as they have logged ones, scaled
    # down to the episode budget (at least one each).
    row_of = {int(u): i for i, u in enumerate(world.users[eval_rows])}
    pos = np.array([row_of[int(u)] for u in real.user], dtype=np.int64)
    real.user = eval_rows[pos]  # world rows, as the simulated sessions' users
    logged = np.bincount(pos, minlength=len(eval_rows))
    scale = min(1.0, episodes / max(int(logged.sum()), 1))
    counts = np.maximum(np.round(logged * scale), 1).astype(np.int64)
    sim = simulated_sessions(data, env, eval_rows, counts, seed, rerank_cfg)
    counts = np.bincount(np.concatenate(world.log.items), minlength=data.n_items + 1)
    report = realism_metrics(real, sim, np.log1p(counts), seed)
    return report | {
        "user_model": env.user_model,
        "policy": "lam = 0 (the ranker's order; logging-like, assumed)",
        "held_out_users": int(len(eval_rows)),
        "timestamp_kind": world.log.timestamp_kind,
    }
