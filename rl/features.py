"""The policy's observation, one code path for the simulator and the server (numpy, no Ray).

`DiversityEnv` keeps a `SessionTrace` and the user's state and builds every observation with
`observation`; a live request builds the same vector with `session_observation` by replaying
the session so far (the slates shown, their clicks in click order and lam) through the same
`SessionTrace` and the same satiation update of `rl.session_user.SessionUser` (`replay`), with
the world's fitted parameters (`EnvConfig.session`, saved in the policy's policy.json). Same
code, same order of floating-point operations: the served observation equals the env's at
that step bit for bit (tests/test_policy.py), so the served policy is the one the env trained.

Only the session user model can be replayed: the "types" user's satiation depends on its
hidden, per-user decay and on purchases, which no request carries (a ValueError says so).

Observation: Box(0, 1, (12,), float32), in the order of `OBS_FIELDS` (rl/env.py describes
each field).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from rl.config import EnvConfig, LeavingConfig
from rl.session_user import SessionUser
from rl.users import category_weights, history_exploration

OBS_FIELDS = (
    "shown_entropy",
    "clicked_entropy",
    "satiation_max",
    "satiation_mean",
    "progress",
    "diversity_head",
    "margin_top",
    "margin_tail",
    "unsatisfied",
    "last_clicks",
    "history_entropy",
    "last_lam",
)


class SessionTrace:
    """The session's observable state, updated one slate at a time: the category mass of the
    last `window` slates shown, the category mass clicked this session, slates shown so far,
    the last slate's clicks and lam."""

    def __init__(self, width: int, window: int) -> None:
        """width: category ids are < width (0 = padding); window: env.entropy_window."""
        self.window = window
        self.recent: deque[tuple[np.ndarray, int]] = deque()
        self.shown_mass, self.shown_entries = np.zeros(width), 0  # (width,) window sum
        self.clicked_mass, self.clicked_entries = np.zeros(width), 0  # (width,) this session
        self.clicked_entropy = 0.0
        self.t, self.last_clicks, self.last_lam = 0, 0, 0.0

    def record(self, cats: np.ndarray, weights: np.ndarray, clicked: np.ndarray, lam: float):
        """One slate: (k, C) category ids and weights, (c,) clicked slot positions (slate
        order), the lam it was re-ranked with."""
        self.t += 1
        mass = np.bincount(cats.ravel(), weights.ravel(), len(self.shown_mass))  # (width,)
        entries = int(np.count_nonzero(cats))
        self.recent.append((mass, entries))
        self.shown_mass += mass
        self.shown_entries += entries
        if len(self.recent) > self.window:  # a running sum: the same dust in env and server
            old_mass, old_entries = self.recent.popleft()
            self.shown_mass -= old_mass
            self.shown_entries -= old_entries
        if len(clicked):
            self.clicked_mass += np.bincount(
                cats[clicked].ravel(), weights[clicked].ravel(), len(self.clicked_mass)
            )
            self.clicked_entries += int(np.count_nonzero(cats[clicked]))
            self.clicked_entropy = normalised_entropy(self.clicked_mass, self.clicked_entries)
        self.last_clicks, self.last_lam = len(clicked), lam


def streak_cap(leaving: LeavingConfig) -> float:
    """The no-click streak at which P(leave) reaches its cap: the unit of obs "unsatisfied"."""
    if not leaving.increment:
        return 1.0
    return max(1.0, math.ceil((leaving.cap - leaving.base) / leaving.increment))


def observation(
    trace: SessionTrace,
    user,
    remaining: np.ndarray,
    span: float,
    diversity_head: float,
    history_entropy: float,
    cfg: EnvConfig,
) -> np.ndarray:
    """The (12,) float32 observation in `OBS_FIELDS` order. user: its satiation (C + 1,),
    touched (C + 1,) and unsatisfied streak; remaining (A,) the unshown candidates' scores in
    descending order; span: top-1 minus top-N score of the user's N candidates."""
    sat = user.satiation
    touched = sat[user.touched]
    margin_top = margin_tail = 0.0
    if remaining.size:
        top10 = remaining[min(9, remaining.size - 1)]
        top50 = remaining[min(49, remaining.size - 1)]
        margin_top, margin_tail = (remaining[0] - top10) / span, (top10 - top50) / span
    values = [
        normalised_entropy(trace.shown_mass, trace.shown_entries),
        trace.clicked_entropy,
        float(sat.max()),
        float(touched.mean()) if touched.size else 0.0,
        trace.t / cfg.max_steps,
        diversity_head,
        margin_top,
        margin_tail,
        min(user.unsatisfied / streak_cap(cfg.leaving), 1.0),
        trace.last_clicks / cfg.choice.max_clicks,
        history_entropy,
        trace.last_lam,
    ]
    # Every value is in [0, 1] by construction (the progress can reach exactly 1).
    return np.array(values, dtype=np.float32)


@dataclass
class SessionRecord:
    """A session so far, as a request carries it: per slate shown, its (k,) item indices in
    slate order, the (c,) clicked ones in click order, and its lam."""

    slates: list[np.ndarray] = field(default_factory=list)
    clicked: list[np.ndarray] = field(default_factory=list)
    lams: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.slates) == len(self.clicked) == len(self.lams):
            raise ValueError("session: slates, clicked and lams must have one entry per slate")
        rows = zip(self.slates, self.clicked, self.lams, strict=True)
        for i, (slate, clicked, lam) in enumerate(rows):
            items, picks = np.asarray(slate).tolist(), np.asarray(clicked).tolist()
            if len(set(items)) != len(items):
                raise ValueError(f"session[{i}].items must not repeat an item")
            if not set(picks) <= set(items):
                raise ValueError(f"session[{i}].clicked must be items of that slate")
            if len(set(picks)) != len(picks):
                raise ValueError(f"session[{i}].clicked must not repeat an item")
            if not 0.0 <= float(lam) <= 1.0:
                raise ValueError(f"session[{i}].lam must be in [0, 1], got {lam!r}")


def replay(
    session: SessionRecord,
    item_categories: np.ndarray,
    cfg: EnvConfig,
    n_categories: int | None = None,
) -> tuple[SessionTrace, SessionUser]:
    """The env's session state after `session`: its trace and the session user's satiation
    and no-click streak (the hidden intent is not needed by the observation). n_categories:
    the catalogue's largest category index (None: scanned from item_categories)."""
    if cfg.user_model != "session":
        raise ValueError(
            f"a session can be replayed only under env.user_model='session' (this policy's is "
            f"{cfg.user_model!r}: its satiation is hidden per-user state)"
        )
    n_cat = catalogue_categories(item_categories, n_categories)
    user = SessionUser(n_cat, cfg.k, cfg.session, cfg.choice, np.zeros(1))
    trace = SessionTrace(n_cat + 1, cfg.entropy_window)
    for slate, clicked, lam in zip(session.slates, session.clicked, session.lams, strict=True):
        slate = np.asarray(slate, dtype=np.int64)  # (k,)
        slot = {int(item): j for j, item in enumerate(slate.tolist())}
        order = np.array([slot[int(i)] for i in np.asarray(clicked).tolist()], np.int64)
        # Row-wise weights of the slate's rows only: the catalogue's would be n_items x C
        # floats per request (100s of MB at Taobao's size) for the same k rows.
        cats = item_categories[slate]  # (k, C)
        w = category_weights(cats)  # (k, C)
        user.replay(cats, w, order)  # satiation in click order, as the user clicked
        trace.record(cats, w, np.sort(order), float(lam))
    return trace, user


def session_observation(
    history_items: np.ndarray,
    item_categories: np.ndarray,
    diversity_head: float,
    cand_scores: np.ndarray,
    cfg: EnvConfig,
    shown: np.ndarray | None = None,
    session: SessionRecord | None = None,
    n_categories: int | None = None,
) -> np.ndarray:
    """history_items (L,) int64 item indices (0-padded ok), item_categories (n_items + 1, C),
    diversity_head in [0, 1], cand_scores (N,) the ranker's candidate scores (any order),
    shown (N,) bool aligned with them (True: shown this session and not recycled, so no longer
    a candidate), session: what was shown and clicked so far -> (12,) float32, the env's
    observation at that step (`rl.env.OBS_FIELDS` layout). n_categories: the catalogue's
    largest category index, computed once by a server (None: scanned here, a pass over the
    whole catalogue)."""
    scores = np.asarray(cand_scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError("cand_scores must be a non-empty 1-d array of finite scores")
    if not 0.0 <= float(diversity_head) <= 1.0:
        raise ValueError(f"diversity_head must be in [0, 1], got {diversity_head!r}")
    gone = np.zeros(scores.size, bool) if shown is None else np.asarray(shown, dtype=bool)
    if gone.shape != scores.shape:
        raise ValueError(f"shown must have the shape of cand_scores {scores.shape}: {gone.shape}")
    order = np.argsort(-scores, kind="stable")[: cfg.n_candidates]  # the env's pool, in order
    top = scores[order]  # (n,) descending
    span = max(float(top[0] - top[-1]), 1e-12)
    hist = np.asarray(history_items, dtype=np.int64).reshape(1, -1)
    hist_entropy, _ = history_exploration(hist, item_categories)
    if session is not None and session.slates:
        trace, user = replay(session, item_categories, cfg, n_categories)
    else:  # a session's start: what DiversityEnv.reset shows (any user model)
        width = catalogue_categories(item_categories, n_categories) + 1
        trace, user = SessionTrace(width, cfg.entropy_window), _Fresh(width)
    remaining = top[~gone[order]]  # (A,) descending
    return observation(
        trace, user, remaining, span, float(diversity_head), float(hist_entropy[0]), cfg
    )


def catalogue_categories(item_categories: np.ndarray, n_categories: int | None) -> int:
    """The largest category index of the catalogue (the env's satiation width - 1)."""
    return int(np.max(item_categories)) if n_categories is None else int(n_categories)


def normalised_entropy(mass: np.ndarray, entries: int) -> float:
    """Entropy of a (C + 1,) non-negative mass vector over its maximum, log(entries)."""
    if entries < 2:
        return 0.0
    p = mass[mass > 1e-12]  # the running window sum may leave rounding dust behind
    p = p / p.sum()
    return min(float(-(p * np.log(p)).sum() / math.log(entries)), 1.0)


class _Fresh:
    """A user at the start of a session: no satiation, nothing touched, no streak."""

    def __init__(self, width: int) -> None:
        self.satiation, self.touched = np.zeros(width), np.zeros(width, bool)
        self.unsatisfied = 0


def request_observation(
    history_items: np.ndarray,
    item_categories: np.ndarray,
    diversity_head: float,
    cand_scores: np.ndarray,
    cfg: EnvConfig,
) -> np.ndarray:
    """The observation of a session's first slate (`DiversityEnv.reset`'s): no session yet."""
    return session_observation(history_items, item_categories, diversity_head, cand_scores, cfg)
