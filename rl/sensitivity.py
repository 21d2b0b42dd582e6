"""The ladder across what the log cannot identify: sensitivity.json and sensitivity.md (numpy
only, no Ray).

    table = sensitivity(data, env_cfg, fit_rows, tune, test, target, min_events, SensitivityConfig())
    write_sensitivity(table, out_dir)

An implicit-feedback log has no impressions, so how much a shown-but-unclicked slate tires a
user (session.w_exp), how much a click does (session.w_click) and the overall satiation scale
are assumptions. Each cell of w_exp x w_click x sensitivity scale:
  - keeps what the log identifies: the EM fit identifies sensitivity * w_click (the stay
    hazard sees satiation only through their product), so sensitivity_base/slope are
    rescaled by fitted w_click / cell w_click, then multiplied by the cell's scale; the leave
    intercept is re-fitted (rl/moments.py bisection, fewer episodes) so simulated sessions
    keep the fit users' length;
  - runs the ladder without PPO (best fixed, per-type oracle, context ceiling, full oracle)
    on smaller budgets than the main ladder (`episodes`, `n_states`, `oracle_episodes`).
Cells whose sessions cannot reach the log's length even at the lowest leave intercept are
marked (`matches_log_length`: within 10 %): the log speaks against them.
PPO is worth training only where the context ceiling beats the best fixed lam with a 95 % CI
above 0 (`ppo_worth_training`); cheap enough for the job: ~10-20 s a cell on 2 CPUs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rl.config import EnvConfig
from rl.ladder import ladder
from rl.moments import fit_moments
from rl.realism import strict_json


@dataclass
class SensitivityConfig:
    """The sweep of jobs.train_policy's sensitivity table (empty w_exp: no table)."""

    w_exp: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0])
    w_click: list[float] = field(default_factory=lambda: [0.5, 1.0])
    sensitivity_scale: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])
    # Budgets sized so jobs.train_policy fits ~15 min on 2 CPUs (24 cells).
    episodes: int = 50  # per arm and cell, on the tune and on the test users
    n_states: int = 30  # rollout states of the context ceiling
    rollouts: int = 2  # rollouts per state and lam
    oracle_episodes: int = 10
    fit_episodes: int = 60  # per bisection step of the leave intercept
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.episodes, self.n_states, self.oracle_episodes, self.fit_episodes) < 1:
            raise ValueError("sensitivity budgets (episodes, n_states, ...) must be >= 1")
        values = [*self.w_exp, *self.w_click, *self.sensitivity_scale]
        if any(v < 0 for v in values):
            raise ValueError(f"sensitivity values must be >= 0, got {values}")


def cell_config(cfg: EnvConfig, w_exp: float, w_click: float, scale: float) -> EnvConfig:
    """The fitted env config moved to one cell (module docstring: what stays identified)."""
    s = cfg.session
    keep = s.w_click / w_click if w_click > 0 else 0.0  # sensitivity * w_click is identified
    return replace(
        cfg,
        session=replace(
            s,
            w_exp=w_exp,
            w_click=w_click,
            sensitivity_base=s.sensitivity_base * keep * scale,
            sensitivity_slope=s.sensitivity_slope * keep * scale,
        ),
    )


def sensitivity(
    data,
    cfg: EnvConfig,
    fit_rows: np.ndarray,
    tune: np.ndarray,
    test: np.ndarray,
    target: dict,
    min_events: int,
    sc: SensitivityConfig,
    rerank_cfg=None,
) -> dict:
    """Every cell -> {"cells": [...], "fitted": the fitted cell's values, budgets}."""
    cells = []
    for w_exp in sc.w_exp:
        for w_click in sc.w_click:
            for scale in sc.sensitivity_scale:
                cell = cell_config(cfg, w_exp, w_click, scale)
                cell, events = _refit_leaving(
                    data, cell, fit_rows, target, min_events, sc, rerank_cfg
                )
                lad = ladder(
                    data, cell, tune, test, sc.episodes, sc.seed,
                    n_states=sc.n_states, oracle_episodes=sc.oracle_episodes, rollouts=sc.rollouts,
                    rerank_cfg=rerank_cfg,
                )  # fmt: skip
                row = _row(w_exp, w_click, scale, cell, lad)
                want = target["events_per_session"]
                # a cell whose sessions cannot reach the log's length is implausible
                row |= {"events_per_session": events, "log_events_per_session": want,
                        "matches_log_length": bool(abs(events - want) <= 0.1 * want)}  # fmt: skip
                cells.append(row)
    return {
        "cells": cells,
        "fitted": {"w_exp": cfg.session.w_exp, "w_click": cfg.session.w_click, "scale": 1.0},
        "budget": {
            "episodes": sc.episodes,
            "n_states": sc.n_states,
            "oracle_episodes": sc.oracle_episodes,
            "tune_users": int(len(tune)),
            "test_users": int(len(test)),
        },
        "ppo": "trained only where ppo_worth_training (context ceiling CI above 0)",
    }


def _refit_leaving(data, cfg, rows, target, min_events, sc, rerank_cfg):
    """-> (the cell with its leave intercept re-fitted, the events per session it reaches)."""
    only = {"events_per_session": target["events_per_session"]}
    session, out = fit_moments(
        data, cfg, rows, only, min_events, episodes=sc.fit_episodes, iterations=6,
        rounds=1, seed=sc.seed, rerank_cfg=rerank_cfg, names=("leave_intercept",),
    )  # fmt: skip
    return replace(cfg, session=session), float(out["simulated"]["events_per_session"])


def _row(w_exp, w_click, scale, cell: EnvConfig, lad: dict) -> dict:
    ctx = lad["context_ceiling"]
    return {
        "w_exp": w_exp,
        "w_click": w_click,
        "sensitivity_scale": scale,
        "leave_intercept": cell.session.leave_intercept,
        "best_fixed_lam": lad["best_fixed"]["lam"],
        "best_fixed_return": lad["best_fixed"]["mean"],
        "per_type_gain": lad["per_type_oracle"]["gain"],
        "context_gain": ctx["gain"],
        "context_gain_ci95": ctx["gain_ci95"],
        "context_r2": ctx["r2_heldout_states"],
        "full_oracle_gain": lad["full_oracle"]["gain"],
        "ppo_worth_training": bool(lad["context_ceiling_beats_best_fixed"]),
    }


def write_sensitivity(table: dict, out_dir: Path) -> tuple[Path, Path]:
    """sensitivity.json and sensitivity.md in out_dir."""
    out_dir = Path(out_dir)
    js, md = out_dir / "sensitivity.json", out_dir / "sensitivity.md"
    js.write_text(json.dumps(strict_json(table), indent=2, allow_nan=False) + "\n")
    md.write_text(markdown(table))
    return js, md


def markdown(table: dict) -> str:
    """The table as markdown: one row per cell, gains in % of the best fixed lam's return."""
    head = (
        "| w_exp | w_click | sens x | best lam | return | per-type | context [95% CI] | R^2 "
        "| full oracle | PPO worth it | events/session (log) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for c in table["cells"]:
        lo, hi = c["context_gain_ci95"]
        rows.append(
            f"| {c['w_exp']:g} | {c['w_click']:g} | {c['sensitivity_scale']:g} "
            f"| {c['best_fixed_lam']:.1f} | {c['best_fixed_return']:.2f} "
            f"| {100 * c['per_type_gain']:+.1f}% | {100 * c['context_gain']:+.1f}% "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {_num(c['context_r2'])} "
            f"| {100 * c['full_oracle_gain']:+.1f}% | {'yes' if c['ppo_worth_training'] else 'no'} "
            f"| {c['events_per_session']:.1f} ({c['log_events_per_session']:.1f}) |"
        )
    return head + "\n".join(rows) + "\n"


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2f}"
