"""The RL lam policy at serving time: request state -> observation -> lam (no Ray).

    scorer = PolicyScorer("outputs/policy", catalog.categories)
    lams = scorer.choose([history], [ranked])   # (B,) float64 in [0, 1]

The observation is `rl.features.request_observation` (the layout of `rl.env.OBS_FIELDS`, the
session fields at their start-of-session values), so the policy sees at serving time what it
saw at the first slate of a training episode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serve.engine import Ranked


class PolicyScorer:
    """Wraps `rl.policy.LamPolicy` loaded from a train_policy job's output directory (a local
    folder: serve/cache.py copies a URI's first)."""

    def __init__(self, policy_dir: str | Path, item_categories: np.ndarray) -> None:
        """item_categories (n_items + 1, C) int64 category indices (serve.catalog.Catalog)."""
        # Imported here: a server without a policy never needs RLlib's module machinery.
        from rl.features import request_observation
        from rl.policy import LamPolicy

        if not Path(policy_dir).is_dir():
            raise ValueError(f"policy_dir {str(policy_dir)!r} is not a directory")
        self.policy = LamPolicy.load(policy_dir)
        self._observe = request_observation
        self.item_categories = item_categories

    def observations(self, histories: list[np.ndarray], ranked: list[Ranked]) -> np.ndarray:
        """B requests -> (B, obs_dim) float32 observations."""
        rows = [
            self._observe(
                np.asarray(hist, dtype=np.int64),
                self.item_categories,
                float(r.diversity),
                np.sort(np.asarray(r.scores, dtype=np.float64))[::-1],  # descending
                self.policy.env_cfg,
            )
            for hist, r in zip(histories, ranked, strict=True)
        ]
        return np.stack(rows).astype(np.float32)

    def choose(self, histories: list[np.ndarray], ranked: list[Ranked]) -> np.ndarray:
        """(B,) float64 lam in [0, 1] for B requests."""
        lam = np.asarray(self.policy.choose(self.observations(histories, ranked)), np.float64)
        return np.clip(lam, 0.0, 1.0)
