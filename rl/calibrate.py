"""Calibrate the simulated user from prepared sequences (`python -m jobs.prepare` output).

    log = load_prepared("outputs/beauty/data")       # full sequences: train + valid + test
    cal = calibrate(log)                              # what the log says
    cfg, changed = apply_calibration(EnvConfig(), cal, data)   # data: SimulatorData (optional)

Measured on the log (`calibrate`), consecutive events on the same item (Taobao's pv -> cart ->
buy) counted once, an event's category being its item's most specific one (the highest
category index = the rarest, since indices go by decreasing count; a top-level category shared
by a whole catalogue would make every step a "stay"):
  - stay_prob[n-1] = P(the next event stays in the same category | the last n events were in
    it), n = 1..5 (5 = "5 or more"), within sessions;
  - session lengths: sessions split at gaps > 30 min where timestamps are unix seconds; where
    they are positions (Amazon), a user's whole (truncated to max_len + 2) sequence;
  - log_odds_by_type: the Mantel-Haenszel log odds ratio, users as strata, of staying after a
    run of >= 2 versus a run of 1, for the users in the bottom / middle / top third of logged
    exploration (`rl.users.history_exploration`). The pooled stay curve confounds satiation
    with selection (focused users make the long runs), and all logs show momentum (stays get
    likelier with run length, partly the logging feed's own doing); within users, and between
    the focused and the exploring third, both cancel. Measured (focused -> explorer third):
    MovieLens-100K 0.92 / 0.46 / -0.08, Amazon Beauty 0.09 / -0.76 / -2.17, Taobao 10k slice
    1.43 / 1.82 / 1.18 (114 users: noise).

Calibrated (`apply_calibration`):
  - types.sensitivity_explorer, from logs with real sessions (unix timestamps) only: the
    explorer third's log odds lie d below the focused third's; under logit P(stay) = a -
    beta * s, s the bounded satiation after the run, that is a sensitivity gap beta_e - beta_f
    = d / (s(n >= 2) - s(1)). sensitivity_focused keeps its assumed 0 (the momentum is not
    modelled). MovieLens gives ~4.4 (the default is 4.0), the Taobao slice 0.9.
  - leaving.base, by simulation: every logged event is a click, so a logged session is the
    clicks of one simulated session; bisection on base until the simulator's mean clicks per
    session under the logging policy (relevance order, lam = 0: assumed) equal the log's mean
    session length, with a warning when even base = 0 falls short. Without SimulatorData, the
    closed form base = clicks_per_slate / mean_session_events.
  - the per-user type: P(explorer) comes from the user's own logged exploration
    (`rl.users.draw_user_types`), wherever the simulator data is built.
Assumed (no identifying signal in an implicit-feedback log without impressions): the no-click
utilities, preference weights, position bias, continue and purchase curves, leaving.increment
and cap, the satiation decay (recovery), exposure vs click increments, the focused sensitivity
and the prior explorer share.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from rec import storage
from rec.data.outputs import item_category_table
from rec.rerank import RerankConfig
from rl.config import EnvConfig
from rl.env import DiversityEnv
from rl.simdata import SimulatorData, recent_items
from rl.users import history_exploration

SESSION_GAP_S = 1800  # a new session after 30 min without events
MAX_RUN = 5  # stay probabilities for run lengths 1..MAX_RUN (the last bucket: >= MAX_RUN)


@dataclass
class SequenceLog:
    """Full per-user sequences of a prepared dataset (train + valid target + test target)."""

    items: list[np.ndarray]  # per user (L_u,) int64 item indices in time order
    timestamps: list[np.ndarray]  # per user (L_u,) int64 unix seconds or positions
    item_categories: np.ndarray  # (n_items + 1, C) int64 category indices, 0-padded
    timestamp_kind: str  # "unix" or "position"


@dataclass
class Calibration:
    """What the log says (see the module docstring)."""

    stay_prob: np.ndarray  # (MAX_RUN,) P(stay | run length n = 1..MAX_RUN)
    stay_count: np.ndarray  # (MAX_RUN,) events behind each probability
    log_odds_by_type: np.ndarray  # (3,) MH log OR of staying, run >= 2 vs 1, per third of
    # logged exploration (focused -> explorer); < 0: satiation
    session_mean: float  # events per session (consecutive repeats of an item counted once)
    session_median: float
    session_p90: float
    n_sessions: int
    timestamp_kind: str


def load_prepared(output_dir: str | Path) -> SequenceLog:
    """Read a prepared-data directory into full per-user sequences, users in user_id order.

    Each sequence is what prepare kept: the most recent max_len + 2 events of the user."""
    out = output_dir  # a local path or a URI (rec/storage.py)
    meta = json.loads(storage.read_text(storage.join(out, "meta.json")))
    train = storage.read_parquet(
        storage.join(out, "train"), columns=["user_id", "items", "timestamps"]
    )
    held = [
        storage.read_parquet(
            storage.join(out, s), columns=["user_id", "target_item", "target_timestamp"]
        )
        for s in ("valid", "test")
    ]
    full = (
        train.join(held[0], on="user_id")
        .join(held[1], on="user_id", suffix="_test")
        .sort("user_id")
        .select(
            pl.concat_list("items", "target_item", "target_item_test").alias("items"),
            pl.concat_list("timestamps", "target_timestamp", "target_timestamp_test").alias("ts"),
        )
    )
    items = storage.read_parquet(storage.join(out, "vocab", "items.parquet"))
    return SequenceLog(
        items=[np.asarray(x, dtype=np.int64) for x in full["items"].to_list()],
        timestamps=[np.asarray(x, dtype=np.int64) for x in full["ts"].to_list()],
        item_categories=item_category_table(items),
        timestamp_kind=meta["timestamp_kind"],
    )


def calibrate(log: SequenceLog) -> Calibration:
    """Stay probabilities, within-user log odds and session lengths of a log."""
    cats, session, user = _events(log)
    stay, count = stay_probabilities(cats, session)
    lengths = np.bincount(session)
    lengths = lengths[lengths > 0]
    if not len(lengths):
        raise ValueError("the log has no events to calibrate on")
    return Calibration(
        stay_prob=stay,
        stay_count=count,
        log_odds_by_type=_log_odds_by_type(log, cats, session, user),
        session_mean=float(lengths.mean()),
        session_median=float(np.median(lengths)),
        session_p90=float(np.percentile(lengths, 90)),
        n_sessions=int(len(lengths)),
        timestamp_kind=log.timestamp_kind,
    )


def _events(log: SequenceLog) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (E,) most specific category, (E,) global session id and (E,) user of every event,
    with consecutive repeats of the same item dropped."""
    specific = log.item_categories.max(1)  # (n_items + 1,) the rarest category of each item
    cats, sessions, users, next_id = [], [], [], 0
    for u, (items, ts) in enumerate(zip(log.items, log.timestamps, strict=True)):
        keep = np.ones(len(items), dtype=bool)
        keep[1:] = items[1:] != items[:-1]
        items, ts = items[keep], ts[keep]
        if not len(items):
            continue
        if log.timestamp_kind == "unix":
            sid = np.concatenate([[0], np.cumsum(np.diff(ts) > SESSION_GAP_S)])
        else:
            sid = np.zeros(len(items), dtype=np.int64)
        cats.append(specific[items])
        sessions.append(sid + next_id)
        users.append(np.full(len(items), u))
        next_id += int(sid[-1]) + 1
    if not cats:
        return (np.zeros(0, np.int64),) * 3
    return np.concatenate(cats), np.concatenate(sessions), np.concatenate(users)


def _runs(cats: np.ndarray, session: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (E,) run length n at each event, (E,) whether a next event in the session exists,
    (E,) whether it stays in the category."""
    new_run = np.ones(len(cats), dtype=bool)
    new_run[1:] = (cats[1:] != cats[:-1]) | (session[1:] != session[:-1])
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(cats)), 0))
    run_len = np.arange(len(cats)) - run_start + 1
    has_next = np.zeros(len(cats), dtype=bool)
    has_next[:-1] = session[1:] == session[:-1]
    stays = np.zeros(len(cats), dtype=bool)
    stays[:-1] = ~new_run[1:] & has_next[:-1]
    return run_len, has_next, stays


def stay_probabilities(cats: np.ndarray, session: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E,) categories and (E,) session ids (events in order) -> (MAX_RUN,) P(stay | run n) and
    (MAX_RUN,) counts; a run counts consecutive events of one category within a session."""
    run_len, has_next, stays = _runs(cats, session)
    bucket = np.minimum(run_len, MAX_RUN)[has_next] - 1
    count = np.bincount(bucket, minlength=MAX_RUN).astype(np.int64)
    hits = np.bincount(bucket, weights=stays[has_next], minlength=MAX_RUN)
    prob = np.divide(hits, count, out=np.full(MAX_RUN, np.nan), where=count > 0)
    return prob, count


def within_user_log_odds(cats: np.ndarray, session: np.ndarray, user: np.ndarray) -> float:
    """Mantel-Haenszel log odds ratio, users as strata, of staying after a run >= 2 vs a run of
    1 (NaN where no user has both)."""
    run_len, has_next, stays = _runs(cats, session)
    n_users = int(user.max()) + 1 if len(user) else 0

    def per_user(mask: np.ndarray) -> np.ndarray:
        return np.bincount(user[mask & has_next], minlength=n_users).astype(np.float64)

    long = run_len >= 2
    a, b = per_user(long & stays), per_user(long & ~stays)
    c, d = per_user(~long & stays), per_user(~long & ~stays)
    n = np.maximum(a + b + c + d, 1.0)
    num, den = (a * d / n).sum(), (b * c / n).sum()
    return float(np.log(num / den)) if num > 0 and den > 0 else float("nan")


def _log_odds_by_type(
    log: SequenceLog, cats: np.ndarray, session: np.ndarray, user: np.ndarray
) -> np.ndarray:
    """(3,) within-user log odds for the thirds of users by logged exploration."""
    hist = recent_items(log.items, max((len(x) for x in log.items), default=1))  # (U, L)
    entropy, overlap = history_exploration(hist, log.item_categories)
    score = 0.5 * entropy + 0.5 * (1.0 - overlap)  # as rl.users.draw_user_types ranks users
    third = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3]))  # (U,) 0 focused .. 2
    out = np.full(3, np.nan)
    for g in range(3):
        mask = third[user] == g
        if mask.any():
            out[g] = within_user_log_odds(cats[mask], session[mask], user[mask])
    return out


def fit_sensitivity_gap(cal: Calibration, cfg: EnvConfig) -> float | None:
    """sensitivity_explorer - sensitivity_focused implied by the log odds of the exploring vs
    the focused third, or None where not identifiable (positions, not sessions; no gap)."""
    gap = cal.log_odds_by_type[0] - cal.log_odds_by_type[2]
    if cal.timestamp_kind != "unix" or not np.isfinite(gap) or gap <= 0:
        return None
    decay = 0.5 * (cfg.types.decay_focused + cfg.types.decay_explorer)
    s = _satiation_after_runs(cfg.satiation.click_increment, decay, MAX_RUN)  # (MAX_RUN,)
    counts = cal.stay_count[1:].astype(np.float64)  # the >= 2 bucket's mix of run lengths
    s_long = float((s[1:] * counts).sum() / counts.sum()) if counts.sum() else float(s[1])
    return float(gap / max(s_long - float(s[0]), 1e-9))


def _satiation_after_runs(click_increment: float, decay: float, n: int) -> np.ndarray:
    """(n,) bounded satiation of a category after 1..n consecutive clicks on it, one per slate."""
    out, s = np.zeros(n), 0.0
    for i in range(n):
        s = 1.0 - (1.0 - s) * (1.0 - click_increment)
        out[i] = s
        s *= decay
    return out


def fit_leave_base(
    data: SimulatorData,
    cfg: EnvConfig,
    target_clicks: float,
    *,
    lam: float = 0.0,
    episodes: int = 300,
    iterations: int = 10,
    seed: int = 0,
    rerank_cfg: RerankConfig | None = None,
) -> float:
    """Bisection on leaving.base in [0, 0.9] until mean clicks per simulated session at a
    fixed lam match target_clicks (the same episode seeds for every base, so the estimate is
    monotone in base up to noise). Warns when even base = 0 gives shorter sessions: then the
    no-click leaving or max_steps, not base, is what ends them."""
    lo, hi = 0.0, 0.9
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        trial = replace(cfg, leaving=replace(cfg.leaving, base=mid, cap=max(cfg.leaving.cap, mid)))
        if mean_clicks(data, trial, lam, episodes, seed, rerank_cfg) > target_clicks:
            lo = mid  # sessions too long: leave more often
        else:
            hi = mid
    if lo == 0.0:
        warnings.warn(
            f"leaving.base: {target_clicks:.2f} clicks per session are out of reach even at "
            f"base ~0 (increment={cfg.leaving.increment}, max_steps={cfg.max_steps})",
            stacklevel=2,
        )
    return 0.5 * (lo + hi)


def mean_clicks(
    data: SimulatorData,
    cfg: EnvConfig,
    lam: float,
    episodes: int,
    seed: int,
    rerank_cfg: RerankConfig | None = None,
) -> float:
    """Mean clicks per episode with a fixed lam (continuous actions, seeds seed..seed+episodes)."""
    env = DiversityEnv(data, replace(cfg, action_mode="continuous"), rerank_cfg=rerank_cfg)
    action = np.array([lam], dtype=np.float32)
    total = 0
    for e in range(episodes):
        env.reset(seed=seed + e)
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(action)
            total += info["clicks"]
            done = terminated or truncated
    return total / episodes


def apply_calibration(
    cfg: EnvConfig,
    cal: Calibration,
    data: SimulatorData | None = None,
    rerank_cfg: RerankConfig | None = None,
) -> tuple[EnvConfig, dict[str, float]]:
    """-> (a copy of cfg with the calibrated fields set, {field: new value}); rerank_cfg is how
    the env picks slates while fitting (the run's `rerank:` section)."""
    changed: dict[str, float] = {}
    types, leaving = cfg.types, cfg.leaving
    gap = fit_sensitivity_gap(cal, cfg)
    if gap is not None:
        types = replace(types, sensitivity_explorer=types.sensitivity_focused + gap)
        changed["types.sensitivity_explorer"] = types.sensitivity_explorer
    cfg = replace(cfg, types=types)
    if data is not None:
        base = fit_leave_base(data, cfg, cal.session_mean, rerank_cfg=rerank_cfg)
    else:
        cont = 0.5 * (cfg.types.continue_focused + cfg.types.continue_explorer)
        clicks_per_slate = 1.0 / (1.0 - min(cont, 0.9))
        base = float(np.clip(clicks_per_slate / cal.session_mean, 0.02, 0.5))
    leaving = replace(leaving, base=base, cap=max(leaving.cap, base))
    changed["leaving.base"] = base
    return replace(cfg, leaving=leaving), changed
