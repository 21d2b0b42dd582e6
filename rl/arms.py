"""Judge lam-choosing arms on held-out simulated users (numpy only, no Ray).

Every arm plays the same episodes: episode e resets the environment with seed `seed + e`,
so it meets the same user with the same random stream (common random numbers). Differences
between arms are then paired, and their confidence intervals are much tighter than those of
the arms' means.

An arm is a function (obs (12,), rng) -> lam in [0, 1]: a fixed lam, a random lam, or a
learned policy (`rl.policy.LamPolicy.choose`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from rec.rerank import RerankConfig
from rl.config import EnvConfig
from rl.env import DiversityEnv
from rl.simdata import SimulatorData

Arm = Callable[[np.ndarray, np.random.Generator], float]
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


@dataclass
class ArmResult:
    """Per-episode outcomes of one arm, each (E,)."""

    returns: np.ndarray
    clicks: np.ndarray
    lengths: np.ndarray  # slates shown
    ild: np.ndarray  # mean ILD of the episode's slates
    lam: np.ndarray  # mean lam the arm chose
    users: np.ndarray  # the episode's user (int)

    def summary(self) -> dict[str, float]:
        mean, half = mean_ci(self.returns)
        return {
            "mean_return": mean,
            "ci95": half,
            "clicks": float(self.clicks.mean()),
            "session_length": float(self.lengths.mean()),
            "ild": float(self.ild.mean()),
            "mean_lam": float(self.lam.mean()),
            "episodes": int(len(self.returns)),
        }


def mean_ci(x: np.ndarray) -> tuple[float, float]:
    """-> (mean, half-width of its 95 % normal confidence interval)."""
    x = np.asarray(x, dtype=np.float64)
    sd = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return float(x.mean()), Z95 * sd / math.sqrt(max(len(x), 1))


def fixed(lam: float) -> Arm:
    return lambda obs, rng: lam


def random_lam(obs: np.ndarray, rng: np.random.Generator) -> float:
    """A new uniform lam for every slate."""
    return float(rng.random())


def play(
    data: SimulatorData,
    cfg: EnvConfig,
    users: np.ndarray,
    arm: Arm,
    episodes: int,
    seed: int,
    rerank_cfg: RerankConfig | None = None,
) -> ArmResult:
    """Run `episodes` sessions of held-out `users` with the arm choosing every slate's lam
    (slates re-ranked under rerank_cfg, the run's `rerank:` section)."""
    rng = np.random.default_rng(seed + 7919)  # the arm's own randomness (random lam)
    return play_env(data, cfg, users, lambda env, obs: arm(obs, rng), episodes, seed, rerank_cfg)


def play_env(
    data: SimulatorData,
    cfg: EnvConfig,
    users: np.ndarray,
    choose: Callable[[DiversityEnv, np.ndarray], float],
    episodes: int,
    seed: int,
    rerank_cfg: RerankConfig | None = None,
) -> ArmResult:
    """As `play`, the chooser seeing the env too: choose(env, obs) -> lam (the ladder's rungs
    that read the simulated user's hidden state)."""
    env = DiversityEnv(
        data, replace(cfg, action_mode="continuous"), users=users, rerank_cfg=rerank_cfg
    )
    out = np.zeros((6, episodes))
    for e in range(episodes):
        obs, info = env.reset(seed=seed + e)
        done, ret, clicks, steps, ild, lam_sum = False, 0.0, 0, 0, 0.0, 0.0
        while not done:
            lam = float(choose(env, obs))
            obs, reward, terminated, truncated, info = env.step(np.array([lam], np.float32))
            ret += reward
            clicks += info["clicks"]
            steps += 1
            ild += info["ild"]
            lam_sum += info["lam"]
            done = terminated or truncated
        out[:, e] = (ret, clicks, steps, ild / steps, lam_sum / steps, info["user"])
    return ArmResult(*out[:5], users=out[5].astype(np.int64))


def paired_gain(a: ArmResult, b: ArmResult) -> dict[str, float]:
    """Relative gain of a over b with the 95 % CI of the paired mean difference."""
    diff, half = mean_ci(a.returns - b.returns)
    base = float(b.returns.mean())
    return {
        "gain": diff / base if base else float("nan"),
        "diff": diff,
        "diff_ci95": half,
        "gain_ci95_low": (diff - half) / base if base else float("nan"),
        "gain_ci95_high": (diff + half) / base if base else float("nan"),
    }


def split_users(n_users: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (train users, held-out users): a seeded disjoint split of 0..n_users-1."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    perm = np.random.default_rng(seed).permutation(n_users)
    n_eval = max(1, int(round(eval_fraction * n_users)))
    if n_eval >= n_users:
        raise ValueError(f"{n_users} users cannot be split into train and held-out")
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])
