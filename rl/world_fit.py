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
from rl.moments import (
    fit_moments,
    item_counts,
    item_popularity,
    log_horizon,
    log_moments,
    min_logged_events,
)
from rl.realism import keep_long, log_sessions, realism_metrics, simulated_sessions
from rl.session_fit import fit_session_model
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
    train_rows = np.asarray(train_rows)
    log_users = world.users[train_rows]
    fit = fit_session_model(world.log, users=log_users, base=env.session)
    # Popularity from every logged user but the held-out world rows (they are judged on it).
    held = np.setdiff1d(world.users, log_users)
    counts = item_counts(world.log, np.setdiff1d(np.arange(len(world.log.items)), held))
    pop = item_popularity(counts)
    world.arrays["item_popularity"] = pop  # saved with the world: every env runner has it
    data.item_popularity = pop
    min_events = min_logged_events(world.log, log_users)
    target = log_moments(world.log, log_users, counts, min_events)
    # A horizon shorter than the log's long sittings makes every simulated session alike
    # (MovieLens: 20 slates against logged sessions of up to 102 events; length KS 0.35).
    horizon = max(env.max_steps, log_horizon(world.log, log_users))
    fitted = replace(env, user_model="session", session=fit.session, max_steps=horizon)
    session, moments = fit_moments(
        data, fitted, train_rows, target, min_events,
        episodes=cfg.fit_episodes, rounds=cfg.fit_rounds, seed=0, rerank_cfg=rerank_cfg,
    )  # fmt: skip
    fitted = replace(fitted, session=session)
    out = _describe(fit.to_json(), fitted, moments, min_events, env, len(log_users))
    return fitted, {"user_model": "session"} | out


def _describe(
    out: dict, fitted: EnvConfig, moments: dict, min_events: int, env: EnvConfig, n_users: int
) -> dict:
    """world.json's description of a fitted session user: every parameter with its source."""
    session = fitted.session
    out["session"] = asdict(session)
    moment_src = "simulated moments of the fit users at lam = 0 (rl/moments.py): "
    for name, what in (
        ("leave_intercept", "events per session"),
        ("popularity_weight", "mean log popularity of consumed items"),
        ("stick_offset", "P(next event in the same category)"),
        ("revisit_weight", "P(next event back in an earlier category of the session)"),
        ("leave_spread", "sd of log events per session"),
    ):
        out["provenance"][name] = {
            "value": getattr(session, name),
            "source": "fitted",
            "from": moment_src + what,
        }
    out["moments"] = moments
    out["log_selection"] = {
        "min_events": min_events,
        "from": "shortest logged session of the fit users (k-core whole sequences)"
        if min_events > 1
        else "sessions cut by time gaps: none",
    }
    out["horizon"] = {
        "env.max_steps": fitted.max_steps,
        "configured": env.max_steps,
        "from": "max(configured, 90th percentile of the fit users' logged session lengths)",
    }
    out["fit_users"] = {"world_rows": "training users", "count": int(n_users)}
    out["position_examination"] = {
        "choice.position_bias": env.choice.position_bias,
        "source": "assumed",
        "from": "no impressions: 1 / log2(pos + 2) examination (DCG's discount)",
    }
    return out


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
    # Each held-out user gets simulated sessions in proportion to their logged ones, scaled
    # to the episode budget (at least one each; more where the log's selection drops some).
    row_of = {int(u): i for i, u in enumerate(world.users[eval_rows])}
    pos = np.array([row_of[int(u)] for u in real.user], dtype=np.int64)
    real.user = eval_rows[pos]  # world rows, as the simulated sessions' users
    logged = np.bincount(pos, minlength=len(eval_rows))
    scale = episodes / max(int(logged.sum()), 1)
    counts = np.maximum(np.round(logged * scale), 1).astype(np.int64)
    sim = simulated_sessions(data, env, eval_rows, counts, seed, rerank_cfg)
    # the log's own selection (a k-core keeps no sequence shorter than its shortest)
    min_events = min_logged_events(
        world.log, world.users[np.setdiff1d(np.arange(len(world.users)), eval_rows)]
    )
    sim = keep_long(sim, min_events)
    # popularity counted without the held-out users' own events (which every real event would
    # otherwise carry at least once, and no simulated click does)
    others = np.setdiff1d(np.arange(len(world.log.items)), world.users[eval_rows])
    counts = item_counts(world.log, others)
    report = realism_metrics(real, sim, np.log1p(counts), seed)
    return report | {
        "user_model": env.user_model,
        "policy": "lam = 0 (the ranker's order; logging-like, assumed)",
        "held_out_users": int(len(eval_rows)),
        "min_events": min_events,
        "timestamp_kind": world.log.timestamp_kind,
    }
