"""`DiversityEnv`: a gymnasium environment in which a policy picks the DPP diversity weight lam
for each slate shown to a simulated user. numpy + gymnasium only (no Ray: RLlib wraps it).

Episode = one session of one user, drawn with `self.np_random` from a pool of users (or fixed
with `reset(options={"user": u})`). Each step:

1. action -> lam (discrete: Discrete(11), lam = action / 10; continuous: Box([0], [1]));
2. the ranker's candidates not yet shown this session are re-ranked with
   `rec.rerank.rerank(scores, k, lam, rerank_cfg, ...)`, the run's `rerank:` section that
   serving uses too (default: DPP, lam = 0 is the ranker's top-k), its similarity the cosine
   of the ranker's item vectors or, with `rerank.similarity=category`, the Jaccard overlap of
   the items' category sets;
3. the simulated user (`rl/users.py` or `rl/session_user.py`) responds: clicks, purchases,
   satiation, leave;
4. reward = clicks + purchase_weight * purchases.

Terminated when the user leaves; truncated after max_steps slates, or when fewer than k
candidates can be shown (`EnvConfig.on_exhausted`: "recycle" first returns shown-but-unclicked
candidates to the pool, a feed refresh; "end" truncates at once).

Modelling note: the pool is the user's N ranker candidates, and a shown item is used up. In
long sessions (small leaving.base) relevance-first burns the best candidates early, so
spreading them over slates pays for every user: on the synthetic world with leaving.base =
0.03 focused users' best fixed lam moves from 0 to ~0.6 (explorers stay at ~0.8); with
N = 300 they are back to indifferent between 0 and 0.6 and lose above.

Observation: Box(0, 1, (12,), float32), in the order of `OBS_FIELDS`:
   0 shown_entropy     category entropy of the items shown in the last `entropy_window` slates
   1 clicked_entropy   category entropy of the items clicked this session
   2 satiation_max     max satiation level over categories (levels are in [0, 1])
   3 satiation_mean    mean satiation level over the categories touched this session
   4 progress          slates shown / max_steps
   5 diversity_head    the ranker's diversity-head output for this user
   6 margin_top        (top-1 - top-10 score) of the remaining candidates / the user's score span
   7 margin_tail       (top-10 - top-50 score) of the remaining candidates / score span
   8 unsatisfied       consecutive no-click slates / the streak at which P(leave) hits its cap
   9 last_clicks       clicks on the last slate / max_clicks
  10 history_entropy   category entropy of the user's logged history
  11 last_lam          lam of the last slate (0 before the first)
Entropies are normalised by their maximum for that many category entries (so in [0, 1]).
The vector is built by `rl.features.observation` from a `SessionTrace` and the user's state:
the server rebuilds the same one from a request's session (`rl.features.session_observation`).

info (reset): user, explorer (the user's type: for analysis, never observed), and with the
session user its starting intent (0 focused, 1 browsing; hidden too). info (step): user,
clicks, purchases, ild (1 - mean pairwise Jaccard of the slate's category sets), lam,
leave_prob, slate (k,) item indices in slate order, clicked (c,) item indices in click order.
The user model is `EnvConfig.user_model`: "types" (rl/users.py) or "session", the log-fitted
session user of rl/session_user.py.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from rec.rerank import RerankConfig, rerank, similarity_inputs
from rl.config import N_LAM_LEVELS, EnvConfig
from rl.features import OBS_FIELDS, SessionTrace, observation
from rl.session_user import SessionUser
from rl.simdata import SimulatorData
from rl.users import SimulatedUser, category_weights, history_exploration

__all__ = ["OBS_FIELDS", "DiversityEnv", "slate_ild", "standardised_affinity"]


class DiversityEnv(gym.Env):
    """Choose lam per slate for one simulated user per episode (see the module docstring)."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        data: SimulatorData,
        cfg: EnvConfig | None = None,
        users: np.ndarray | None = None,
        rerank_cfg: RerankConfig | None = None,
    ) -> None:
        """data: the world; cfg: env section; users: (P,) the held-out user pool (default all);
        rerank_cfg: the run's `rerank:` section, how a slate is picked at the action's lam."""
        self.cfg = cfg = cfg or EnvConfig()
        self.rerank_cfg = rerank_cfg or RerankConfig()
        if data.candidates.shape[1] < cfg.n_candidates:
            raise ValueError(
                f"env.n_candidates={cfg.n_candidates!r} but SimulatorData has only "
                f"{data.candidates.shape[1]} candidates per user"
            )
        self.data = data
        self.pool = np.arange(data.n_users) if users is None else np.asarray(users, np.int64)
        if self.pool.size == 0 or self.pool.min() < 0 or self.pool.max() >= data.n_users:
            raise ValueError(f"users must be a non-empty subset of 0..{data.n_users - 1}")
        # Candidates sorted by descending ranker score once, so "remaining in order" is a mask.
        order = np.argsort(-data.scores, axis=1, kind="stable")[:, : cfg.n_candidates]
        self._cands = np.take_along_axis(data.candidates, order, 1)  # (U, N) item indices
        self._scores = np.take_along_axis(data.scores, order, 1).astype(np.float64)  # (U, N)
        self._span = np.maximum(self._scores[:, 0] - self._scores[:, -1], 1e-12)  # (U,)
        self._aff = standardised_affinity(data, self._cands)  # (U, N)
        self._weights = category_weights(data.item_categories)  # (n_items + 1, C)
        self._hist_entropy, _ = history_exploration(data.history_items, data.item_categories)
        if cfg.user_model == "session":
            self.user = SessionUser(
                data.n_categories, cfg.k, cfg.session, cfg.choice, self._hist_entropy
            )
        else:
            self.user = SimulatedUser(
                data.n_categories, cfg.k, cfg.satiation, cfg.choice, cfg.leaving
            )
        self.observation_space = gym.spaces.Box(0.0, 1.0, (len(OBS_FIELDS),), np.float32)
        if cfg.action_mode == "discrete":
            self.action_space = gym.spaces.Discrete(N_LAM_LEVELS)
        else:
            self.action_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)

    # ------------------------------------------------------------------------- gym API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a session: a user from the pool (or options["user"]) -> (obs, info)."""
        if seed is None and self._np_random is None:
            seed = self.cfg.seed  # None still means "fresh entropy", as in gymnasium
        super().reset(seed=seed)
        options = options or {}
        if "user" in options:
            u = int(options["user"])
            if not 0 <= u < self.data.n_users:
                raise ValueError(f"options['user'] must be in 0..{self.data.n_users - 1}: {u!r}")
        else:
            u = int(self.pool[self.np_random.integers(len(self.pool))])
        self._start_session(u)
        info = {"user": u, "explorer": bool(self.data.types.explorer[u])}
        if self.cfg.user_model == "session":
            info["intent"] = int(self.user.intent)  # 0 focused, 1 browsing (hidden)
        return self._observation(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Show one re-ranked slate at the action's lam -> (obs, reward, terminated, truncated,
        info)."""
        lam = self._lam(action)
        avail = np.flatnonzero(self._free)  # (A,) candidate positions, still in score order
        kernel = (
            {"similarity": self._sim[np.ix_(avail, avail)][None]}
            if self._sim is not None
            else {"vectors": self._vecs[:, avail]}
        )
        picks = rerank(self._user_scores[None, avail], self.cfg.k, lam, self.rerank_cfg, **kernel)
        slate = avail[picks[0]]  # (k,) candidate positions in slate order
        cats, weights = self._cats[slate], self._cat_w[slate]  # (k, C), (k, C)
        if self._user_pop is None:
            resp = self.user.respond(self._user_aff[slate], cats, weights, self.np_random)
        else:  # the session user's popularity term
            pop = self._user_pop[slate]
            resp = self.user.respond(self._user_aff[slate], cats, weights, self.np_random, pop)
        self._free[slate] = False
        self._n_free -= len(slate)
        clicked = np.flatnonzero(resp.clicks)  # (c,) slate positions
        n_clicks, n_buys = len(clicked), int(np.count_nonzero(resp.purchases))
        self._clicked[slate[clicked]] = True
        self._trace.record(cats, weights, clicked, lam)  # what a request's session replays
        reward = n_clicks + self.cfg.purchase_weight * n_buys
        terminated = resp.left
        truncated = not terminated and (self._trace.t >= self.cfg.max_steps or not self._refill())
        info = {
            "user": self._u,
            "clicks": n_clicks,
            "purchases": n_buys,
            "ild": slate_ild(cats, self.data.n_categories + 1),
            "lam": lam,
            "leave_prob": resp.leave_prob,
            "slate": self._item_ids[slate],
            # clicked item indices in click order (what a log of this session would hold)
            "clicked": self._item_ids[slate[clicked if resp.order is None else resp.order]],
        }
        return self._observation(), float(reward), terminated, truncated, info

    # ------------------------------------------------------------------------- mechanics

    def _start_session(self, u: int) -> None:
        """Gather user u's candidates, features and type; clear the session state."""
        d = self.data
        self._u = u
        self._item_ids = self._cands[u]  # (N,) item indices, descending ranker score
        self._user_scores = self._scores[u]  # (N,) float64
        self._vecs = d.item_vectors[self._item_ids][None]  # (1, N, D)
        self._cats = d.item_categories[self._item_ids]  # (N, C)
        # (N, N) similarity, once per session (None: the re-ranker's cosine of _vecs).
        kernel = similarity_inputs(self.rerank_cfg, vectors=self._vecs, cat_ids=self._cats[None])
        self._sim = kernel["similarity"][0] if "similarity" in kernel else None
        self._cat_w = self._weights[self._item_ids]  # (N, C)
        self._user_aff = self._aff[u]  # (N,)
        pop = d.item_popularity if self.cfg.user_model == "session" else None
        # centred on the user's candidates: the term moves clicks between items, not the
        # overall click rate (set by no_click and the leaving hazard)
        self._user_pop = None if pop is None else pop[self._item_ids] - pop[self._item_ids].mean()
        if self.cfg.user_model == "session":
            self.user.start(d.types, u, self.np_random)  # the intent draw is seeded too
        else:
            self.user.start(d.types, u)
        n = self.cfg.n_candidates
        self._free = np.ones(n, dtype=bool)  # not shown yet (or recycled)
        self._n_free = n
        self._clicked = np.zeros(n, dtype=bool)
        # Shown and clicked category mass, slates so far, last clicks and lam (obs 0, 1, 4,
        # 9, 11): rl/features.py, shared with the server's replay of a request's session.
        self._trace = SessionTrace(d.n_categories + 1, self.cfg.entropy_window)

    def _lam(self, action: Any) -> float:
        """Action -> lam in [0, 1]; continuous actions are clipped (RLlib does not squash)."""
        if self.cfg.action_mode == "discrete":
            a = int(np.asarray(action).reshape(()))
            if not 0 <= a < N_LAM_LEVELS:
                raise ValueError(f"discrete action must be in 0..{N_LAM_LEVELS - 1}, got {a!r}")
            return a / (N_LAM_LEVELS - 1)
        value = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        if not math.isfinite(value):
            raise ValueError(f"continuous action must be finite, got {action!r}")
        return min(max(value, 0.0), 1.0)

    def _refill(self) -> bool:
        """Make sure k candidates can be shown next; False if the session cannot go on."""
        if self._n_free >= self.cfg.k:
            return True
        if self.cfg.on_exhausted == "recycle":
            self._free = ~self._clicked  # a feed refresh: clicked items never come back
            self._n_free = int(np.count_nonzero(self._free))
            return self._n_free >= self.cfg.k
        return False

    def _observation(self) -> np.ndarray:
        """(12,) float32 in [0, 1]; layout in OBS_FIELDS (built by rl.features.observation)."""
        rem = self._user_scores[self._free]  # (A,) still in descending order
        head, hist = self.data.diversity_head[self._u], self._hist_entropy[self._u]
        return observation(self._trace, self.user, rem, self._span[self._u], head, hist, self.cfg)


def standardised_affinity(data: SimulatorData, cands: np.ndarray) -> np.ndarray:
    """(U, N) candidate item indices -> (U, N) float64 ground-truth affinities x_u . y_i in units
    of the user's catalogue-wide affinity sd, centred on their candidates' mean.

    Centred on the candidates: a slate's utility is relative to what this user's candidates
    offer, so the no-click utility means the same for every user and dataset. Scaled by the
    catalogue sd (closed form sqrt(x^T Cov(y) x)): moving to another category costs what it
    costs in the catalogue, not what it costs among near-identical candidates.
    """
    items = data.item_factors[1:].astype(np.float64)  # (n_items, F)
    cov = np.atleast_2d(np.cov(items, rowvar=False))  # (F, F)
    out = np.empty(cands.shape)
    step = 1024  # users per chunk: the (B, N, F) gather stays a few MB
    for lo in range(0, cands.shape[0], step):
        x = data.user_factors[lo : lo + step].astype(np.float64)  # (B, F)
        y = data.item_factors[cands[lo : lo + step]].astype(np.float64)  # (B, N, F)
        raw = np.einsum("bnf,bf->bn", y, x)  # (B, N)
        sd = np.sqrt(np.maximum(((x @ cov) * x).sum(1), 1e-24))  # (B,)
        out[lo : lo + step] = (raw - raw.mean(1, keepdims=True)) / sd[:, None]
    return out


def slate_ild(cats: np.ndarray, width: int) -> float:
    """(k, C) category ids (0 = padding, < width) -> 1 - mean pairwise Jaccard of the items'
    category sets (two items without categories count as dissimilar, as in rec.rerank)."""
    k = cats.shape[0]
    if k < 2:
        return 0.0
    member = np.zeros((k, width))  # (k, C + 1) one-hot: one small matmul gives intersections
    member[np.arange(k)[:, None], cats] = 1.0
    member[:, 0] = 0.0
    inter = member @ member.T  # (k, k)
    size = inter.diagonal()
    union = size[:, None] + size[None, :] - inter  # 0 only where both sets are empty
    jac = inter / np.maximum(union, 1.0)
    off = jac.sum() - float(np.count_nonzero(size))  # the diagonal is 1 exactly where size > 0
    return 1.0 - off / (k * (k - 1))
