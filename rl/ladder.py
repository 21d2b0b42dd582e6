"""The ladder of ceilings for a per-request lam (numpy only, no Ray): how much can choosing lam
per request gain at all in this simulated world, before asking whether PPO gets it.

    lad = ladder(data, cfg, tune_users, test_users, episodes=500, seed=0, policy=arm)

Rungs, each evaluated on the test users' episodes (episode e of every arm: reset seed
seed + e, the same user and random stream: common random numbers), chosen on the tune users:
  - best_fixed: the lam of the grid with the best mean return on the tune users;
  - per_type_oracle: each hidden type (the session user's starting intent; the
    focused/explorer type of the "types" user) gets its own best fixed lam (chosen on tune);
  - context_ceiling: per request, the return-to-go of every lam is measured by rollouts from
    the same state (state copied, random stream included; the best fixed lam afterwards);
    a ridge regression from the policy's observation (quadratic features) predicts each lam's
    advantage, and the greedy policy on its predictions plays the test episodes. Its R^2
    (held-out states) says how much of the per-request best lam the observation explains;
  - ppo: the given policy arm, if any.
Means carry 95 % normal CIs; gains over best_fixed carry cluster-bootstrap CIs over users
(episodes of one user are not independent).
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import replace

import numpy as np

from rl.arms import Arm, ArmResult, fixed, mean_ci, play
from rl.config import N_LAM_LEVELS, EnvConfig
from rl.env import DiversityEnv

GRID = np.linspace(0.0, 1.0, N_LAM_LEVELS)
_ARRAYS = ("_free", "_clicked", "_shown_mass", "_clicked_mass")


def halves(users: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of users into (tune, test) halves."""
    perm = np.random.default_rng(seed).permutation(np.asarray(users))
    return np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])


def cluster_ci(x: np.ndarray, users: np.ndarray, boots: int = 1000, seed: int = 0):
    """95 % percentile CI of mean(x), resampling users (with all their episodes)."""
    uniq, inv = np.unique(users, return_inverse=True)
    sums, counts = np.bincount(inv, x), np.bincount(inv).astype(np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(uniq), (boots, len(uniq)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def episode_types(data, cfg: EnvConfig, users: np.ndarray, episodes: int, seed: int):
    """(E,) the hidden type of episode e (reset with seed + e, as rl.arms.play does)."""
    env = DiversityEnv(data, replace(cfg, action_mode="continuous"), users=users)
    key = "intent" if cfg.user_model == "session" else "explorer"
    return np.array([int(env.reset(seed=seed + e)[1][key]) for e in range(episodes)])


def _copy_state(state: dict) -> dict:
    """A copy of an env's __dict__ whose mutable session state is independent."""
    out = dict(state)
    for k in _ARRAYS:
        out[k] = state[k].copy()
    out["_recent"] = deque((m.copy(), n) for m, n in state["_recent"])
    out["user"] = copy.deepcopy(state["user"])
    out["_np_random"] = copy.deepcopy(state["_np_random"])
    return out


def rollout_values(
    data,
    cfg: EnvConfig,
    users: np.ndarray,
    base_lam: float,
    n_states: int,
    seed: int,
    rerank_cfg=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """States visited by the base lam on `users` -> (S, 12) observations, (S, 11) return-to-go
    of each grid lam played once there (then base_lam), (S,) the state's user."""
    env = DiversityEnv(
        data, replace(cfg, action_mode="continuous"), users=users, rerank_cfg=rerank_cfg
    )
    base = np.array([base_lam], np.float32)
    obs_out, val_out, user_out, e = [], [], [], 0
    while len(obs_out) < n_states:
        obs, info = env.reset(seed=seed + e)
        e, done = e + 1, False
        while not done and len(obs_out) < n_states:
            snap = _copy_state(env.__dict__)
            row = np.zeros(len(GRID))
            for i, lam in enumerate(GRID):
                env.__dict__.update(_copy_state(snap))
                row[i] = _return_to_go(env, lam, base)
            env.__dict__.update(snap)
            obs_out.append(obs)
            val_out.append(row)
            user_out.append(info["user"])
            obs, _, te, tr, _ = env.step(base)
            done = te or tr
    return np.array(obs_out), np.array(val_out), np.array(user_out)


def _return_to_go(env: DiversityEnv, lam: float, base: np.ndarray) -> float:
    _, total, te, tr, _ = env.step(np.array([lam], np.float32))
    while not (te or tr):
        _, r, te, tr, _ = env.step(base)
        total += r
    return float(total)


def quad_features(obs: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones(len(obs)), obs, obs**2])


def fit_advantage(obs, values, ridge: float = 1.0):
    """Ridge regression of each lam's advantage (value - the state's mean value) on quadratic
    observation features -> coefficients (F, 11)."""
    x = quad_features(obs)
    adv = values - values.mean(1, keepdims=True)
    return np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ adv)


def r_squared(obs, values, coef) -> float:
    adv = values - values.mean(1, keepdims=True)
    resid = adv - quad_features(obs) @ coef
    total = float(((adv - adv.mean(0)) ** 2).sum())
    return float(1.0 - (resid**2).sum() / total) if total > 1e-12 else float("nan")


def greedy_arm(coef) -> Arm:
    return lambda obs, rng: float(GRID[int(np.argmax(quad_features(obs[None]) @ coef))])


def _summary(r: ArmResult, best: ArmResult, seed: int) -> dict:
    mean, half = mean_ci(r.returns)
    diff = r.returns - best.returns
    lo, hi = cluster_ci(diff, r.users, seed=seed)
    base = float(best.returns.mean())
    return {
        "mean": mean,
        "ci95": half,
        "gain": float(diff.mean()) / base,
        "gain_ci95": [lo / base, hi / base],
    }


def ladder(
    data,
    cfg: EnvConfig,
    tune_users: np.ndarray,
    test_users: np.ndarray,
    episodes: int,
    seed: int,
    *,
    n_states: int = 400,
    policy: Arm | None = None,
    rerank_cfg=None,
) -> dict:
    """The rungs of the module docstring -> a JSON-ready dict (policy_eval.json `ladder`)."""
    tune_seed, test_seed = seed, seed + 50_000

    def grid_results(users, s):
        return {lam: play(data, cfg, users, fixed(lam), episodes, s, rerank_cfg) for lam in GRID}

    tune, test = grid_results(tune_users, tune_seed), grid_results(test_users, test_seed)
    best_lam = float(max(GRID, key=lambda lam: tune[lam].returns.mean()))
    best = test[best_lam]
    out = {
        "split": {
            "tune_users": int(len(tune_users)),
            "test_users": int(len(test_users)),
            "episodes": episodes,
        },
        "best_fixed": {"lam": best_lam} | _summary(best, best, seed),
    }
    # per-type oracle: each hidden type's best fixed lam, chosen on the tune users
    t_tune = episode_types(data, cfg, tune_users, episodes, tune_seed)
    t_test = episode_types(data, cfg, test_users, episodes, test_seed)
    oracle = replace(best, returns=best.returns.copy())
    per_type = {}
    for typ in np.unique(np.concatenate([t_tune, t_test])):
        mask = t_tune == typ
        lam = (
            best_lam
            if not mask.any()
            else float(max(GRID, key=lambda g: tune[g].returns[mask].mean()))
        )
        per_type[str(int(typ))] = lam
        oracle.returns[t_test == typ] = test[lam].returns[t_test == typ]
    out["per_type_oracle"] = {"lam_by_type": per_type} | _summary(oracle, best, seed)
    # observable-context ceiling: rollouts on tune users, ridge policy, played on test
    obs, val, who = rollout_values(data, cfg, tune_users, best_lam, n_states, tune_seed, rerank_cfg)
    half = np.isin(who, np.unique(who)[::2])
    r2 = r_squared(obs[~half], val[~half], fit_advantage(obs[half], val[half]))
    coef = fit_advantage(obs, val)
    ctx = play(data, cfg, test_users, greedy_arm(coef), episodes, test_seed, rerank_cfg)
    gap = val.max(1) - val[:, list(GRID).index(best_lam)]
    out["context_ceiling"] = _summary(ctx, best, seed) | {
        "r2_heldout_states": r2,
        "states": int(len(obs)),
        "mean_lam": float(ctx.lam.mean()),
        # optimistic: the max over 11 single noisy rollouts, an upper bound, not a policy
        "rollout_max_gain_optimistic": float(gap.mean() / max(val.mean(), 1e-12)),
    }
    ceiling_gain = out["context_ceiling"]["gain"]
    out["context_ceiling_beats_best_fixed"] = out["context_ceiling"]["gain_ci95"][0] > 0
    if policy is not None:
        ppo = play(data, cfg, test_users, policy, episodes, test_seed, rerank_cfg)
        out["ppo"] = _summary(ppo, best, seed) | {"seeds": 1}
        share = out["ppo"]["gain"] / ceiling_gain if ceiling_gain > 0 else float("nan")
        out["ppo_share_of_context_ceiling"] = share
    return out
