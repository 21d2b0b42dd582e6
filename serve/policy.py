"""The RL lam policy at serving time: request state -> observation -> lam (no Ray).

    scorer = PolicyScorer("outputs/policy", catalog.categories)
    lams = scorer.choose([history], [ranked], [shown], [session])   # (B,) float64 in [0, 1]

The observation is `rl.features.session_observation`: the env's observation at this step of
the session (layout `rl.env.OBS_FIELDS`), rebuilt from what the request carries: the history,
the ranker's candidates (all N, with a mask of those shown this session) and the session so
far (`session`: slates, clicks, lam), replayed with the world's fitted session parameters
saved in the policy's policy.json. Without a session it is the first slate's observation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rl.features import SessionRecord
from serve.engine import Ranked


def session_record(catalog, slates) -> SessionRecord | None:
    """A request's `session` (serve.schemas.ShownSlate list, raw ids) -> item indices (unknown
    ids dropped, as for `history`), or None without one."""
    if not slates:
        return None
    rows = [(catalog.to_indices(s.items)[0], catalog.to_indices(s.clicked)[0]) for s in slates]
    return SessionRecord([r[0] for r in rows], [r[1] for r in rows], [s.lam for s in slates])


class PolicyScorer:
    """Wraps `rl.policy.LamPolicy` loaded from a train_policy job's output directory (a local
    folder: serve/cache.py copies a URI's first)."""

    def __init__(self, policy_dir: str | Path, item_categories: np.ndarray) -> None:
        """item_categories (n_items + 1, C) int64 category indices (serve.catalog.Catalog)."""
        # Imported here: a server without a policy never needs RLlib's module machinery.
        from rl.features import session_observation
        from rl.policy import LamPolicy

        if not Path(policy_dir).is_dir():
            raise ValueError(f"policy_dir {str(policy_dir)!r} is not a directory")
        self.policy = LamPolicy.load(policy_dir)
        self._observe = session_observation
        self.item_categories = item_categories
        # Once per replica, not per request: a scan of the whole catalogue (4M rows at Taobao's).
        self.n_categories = int(np.max(item_categories))

    def observations(
        self,
        histories: list[np.ndarray],
        ranked: list[Ranked],
        shown: list[np.ndarray | None] | None = None,
        sessions: list[SessionRecord | None] | None = None,
    ) -> np.ndarray:
        """B requests -> (B, obs_dim) float32. ranked: all N candidates' scores; shown[b]: (N,)
        bool, True where a candidate was shown this session (None: none); sessions[b]: the
        session so far (None: its first slate)."""
        n = len(histories)
        shown, sessions = shown or [None] * n, sessions or [None] * n
        if self.policy.env_cfg.user_model != "session" and any(s and s.slates for s in sessions):
            from serve.frontend import RequestError  # a 422: the client can send no session

            raise RequestError(
                "session", "this policy's user model ('types') has hidden satiation: send none"
            )
        rows = [
            self._observe(
                np.asarray(hist, dtype=np.int64),
                self.item_categories,
                float(r.diversity),
                np.asarray(r.scores, dtype=np.float64),
                self.policy.env_cfg,
                mask,
                session,
                self.n_categories,
            )
            for hist, r, mask, session in zip(histories, ranked, shown, sessions, strict=True)
        ]
        return np.stack(rows).astype(np.float32)

    def choose(
        self,
        histories: list[np.ndarray],
        ranked: list[Ranked],
        shown: list[np.ndarray | None] | None = None,
        sessions: list[SessionRecord | None] | None = None,
    ) -> np.ndarray:
        """(B,) float64 lam in [0, 1] for B requests (arguments as in `observations`)."""
        obs = self.observations(histories, ranked, shown, sessions)
        lam = np.asarray(self.policy.choose(obs), np.float64)
        return np.clip(lam, 0.0, 1.0)
