"""The policy's observation for a live request (no Ray), the same vector `DiversityEnv.reset`
gives a simulated user, so a policy trained in the simulator sees at serving what it saw in
training.

A request to the stateless endpoint is treated as the first slate of a session: nothing shown
or clicked yet in this session (fields 0-4 and 8-9 and 11 are 0); what the request does carry
is the user's history (history_entropy), the ranker's diversity head and the candidates'
score margins. `tests/test_policy.py` checks equality with the environment's reset
observation.
"""

from __future__ import annotations

import numpy as np

from rl.config import EnvConfig
from rl.env import OBS_FIELDS
from rl.users import history_exploration


def request_observation(
    history_items: np.ndarray,
    item_categories: np.ndarray,
    diversity_head: float,
    cand_scores: np.ndarray,
    cfg: EnvConfig,
) -> np.ndarray:
    """history_items (L,) int64 item indices (0-padded ok), item_categories (n_items + 1, C),
    diversity_head in [0, 1], cand_scores (N,) the ranker's candidate scores (any order)
    -> (12,) float32 in the layout of `rl.env.OBS_FIELDS`."""
    scores = np.sort(np.asarray(cand_scores, dtype=np.float64))[::-1][: cfg.n_candidates]
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError("cand_scores must be a non-empty array of finite scores")
    if not 0.0 <= float(diversity_head) <= 1.0:
        raise ValueError(f"diversity_head must be in [0, 1], got {diversity_head!r}")
    span = max(float(scores[0] - scores[-1]), 1e-12)
    top10, top50 = scores[min(9, scores.size - 1)], scores[min(49, scores.size - 1)]
    hist = np.asarray(history_items, dtype=np.int64).reshape(1, -1)
    hist_entropy, _ = history_exploration(hist, item_categories)
    obs = np.zeros(len(OBS_FIELDS), dtype=np.float32)
    obs[OBS_FIELDS.index("diversity_head")] = float(diversity_head)
    obs[OBS_FIELDS.index("margin_top")] = (scores[0] - top10) / span
    obs[OBS_FIELDS.index("margin_tail")] = (top10 - top50) / span
    obs[OBS_FIELDS.index("history_entropy")] = float(hist_entropy[0])
    return obs
