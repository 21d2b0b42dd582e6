"""`SimulatorData`: every per-user and per-item array the environment needs, built once.

In production these come from the trained ranker (candidates, scores, diversity head), the
prepared data (histories, category table) and the ground truth (`rl/groundtruth.py`, fitted
on full sequences): `SimulatorData.build` assembles them and draws the user types.
`SimulatorData.synthetic` makes a plausible clustered world for tests and benchmarks without
any of them.

    data = SimulatorData.synthetic(n_users=500, n_items=3000, n_categories=30, seed=0)
    data = SimulatorData.build(candidates=c, scores=s, diversity_head=h,
                               history_items=recent_items(histories, 50), item_categories=t,
                               item_vectors=v, ground_truth=fit_als(full_sequences, n_items))
    env = DiversityEnv(data, EnvConfig())
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rl.config import TypeConfig
from rl.groundtruth import GroundTruth
from rl.users import UserTypes, draw_user_types, history_exploration

MAX_LIKED = 6  # most categories a synthetic user likes (explorers: many)


@dataclass
class SimulatorData:
    """Arrays for U users over a catalogue of n_items (item index 0 = padding everywhere).

    candidates (U, N) int64: the ranker's top-N item indices (1..n_items) for each user's
    history, in any order; scores (U, N) float: the ranker's score of each candidate;
    diversity_head (U,) float in [0, 1]: the ranker's diversity-head output for the user;
    history_items (U, L) int64: the user's most recent history items, 0-padded (their
    categories come from item_categories); item_categories (n_items + 1, C) int64: category
    indices per item, 0-padded; item_vectors (n_items + 1, D) float32: what the DPP's cosine
    similarity uses; user_factors (U, F), item_factors (n_items + 1, F) float32: the ground
    truth (never the ranker); types: per-user type parameters (`rl.users.UserTypes`).
    """

    candidates: np.ndarray
    scores: np.ndarray
    diversity_head: np.ndarray
    history_items: np.ndarray
    item_categories: np.ndarray
    item_vectors: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    types: UserTypes
    # (n_items + 1,) standardised log popularity in the fit users' log (None: unknown, 0)
    item_popularity: np.ndarray | None = None

    def __post_init__(self) -> None:
        n_users, n_cand = np.shape(self.candidates)
        n_rows = np.shape(self.item_categories)[0]
        expect = {
            "scores": (n_users, n_cand),
            "diversity_head": (n_users,),
            "history_items": (n_users, None),
            "item_categories": (n_rows, None),
            "item_vectors": (n_rows, None),
            "user_factors": (n_users, None),
            "item_factors": (n_rows, np.shape(self.user_factors)[-1]),
            "types.explorer": (n_users,),
        }
        for name, shape in expect.items():
            got = np.shape(self.types.explorer if "." in name else getattr(self, name))
            if len(got) != len(shape) or any(
                e is not None and g != e for g, e in zip(got, shape, strict=True)
            ):
                raise ValueError(f"SimulatorData.{name} must have shape {shape}, got {got}")
        cands = np.asarray(self.candidates)
        if cands.size and (cands.min() < 1 or cands.max() >= n_rows):
            raise ValueError(f"SimulatorData.candidates must be in [1, {n_rows - 1}]")
        head = np.asarray(self.diversity_head)
        if head.size and not ((head >= 0) & (head <= 1)).all():
            raise ValueError("SimulatorData.diversity_head must lie in [0, 1]")
        if not np.isfinite(np.asarray(self.scores, dtype=np.float64)).all():
            raise ValueError("SimulatorData.scores contains NaN or inf")

    @property
    def n_users(self) -> int:
        return int(np.shape(self.candidates)[0])

    @property
    def n_items(self) -> int:
        return int(np.shape(self.item_categories)[0]) - 1

    @property
    def n_categories(self) -> int:
        return int(np.max(self.item_categories))

    @classmethod
    def build(
        cls,
        *,
        candidates: np.ndarray,
        scores: np.ndarray,
        diversity_head: np.ndarray,
        history_items: np.ndarray,
        item_categories: np.ndarray,
        item_vectors: np.ndarray,
        ground_truth: GroundTruth,
        types: TypeConfig | None = None,
        seed: int = 0,
    ) -> SimulatorData:
        """Assemble real inputs (shapes as in the class docstring; row u of every per-user array
        and of ground_truth.user_factors is the same user) and draw the user types from the
        histories."""
        rng = np.random.default_rng(seed)
        return cls(
            candidates=np.asarray(candidates, dtype=np.int64),
            scores=np.asarray(scores, dtype=np.float32),
            diversity_head=np.asarray(diversity_head, dtype=np.float32),
            history_items=np.asarray(history_items, dtype=np.int64),
            item_categories=np.asarray(item_categories, dtype=np.int64),
            item_vectors=np.asarray(item_vectors, dtype=np.float32),
            user_factors=ground_truth.user_factors,
            item_factors=ground_truth.item_factors,
            types=draw_user_types(history_items, item_categories, types or TypeConfig(), rng),
        )

    @classmethod
    def synthetic(
        cls,
        n_users: int = 500,
        n_items: int = 3000,
        n_categories: int = 30,
        seed: int = 0,
        *,
        n_candidates: int = 100,
        history_len: int = 30,
        dim: int = 16,
        types: TypeConfig | None = None,
    ) -> SimulatorData:
        """A clustered world: items in lognormal-sized categories (20 % with a second one),
        vectors and ground-truth factors near their category's centre; users with a latent
        exploration rate that sets how many categories they like and how their history
        wanders; a noisy, popularity-biased ranker proposes the top n_candidates."""
        if n_items < max(n_categories, n_candidates):
            raise ValueError(f"n_items ({n_items!r}) must be >= n_categories and n_candidates")
        rng = np.random.default_rng(seed)
        cats = _synthetic_categories(n_items, n_categories, rng)  # (n_items + 1, 2)
        vectors = _near_centres(cats, n_categories, dim, 0.6, rng)  # ranker's item space
        # The ground truth's own space, tighter clusters: what a user likes is mostly which
        # category, so a focused user's candidates are nearly interchangeable.
        item_f = _near_centres(cats, n_categories, dim, 0.25, rng)
        explore = rng.beta(0.6, 0.9, size=n_users)  # latent taste for variety
        liked = _liked_categories(explore, n_categories, rng)  # (U, MAX_LIKED), 0 = none
        centres = _category_means(item_f, cats[:, 0], n_categories)  # (C + 1, F)
        user_f = centres[liked].sum(1) / np.maximum((liked > 0).sum(1, keepdims=True), 1)
        user_f = 2.0 * user_f + 0.3 * rng.standard_normal(user_f.shape)  # (U, F)
        history = _synthetic_histories(cats[:, 0], liked, explore, history_len, rng)  # (U, L)
        popularity = 0.5 * rng.standard_normal(n_items + 1)  # log popularity the ranker overfits
        aff = user_f @ item_f[1:].T  # (U, n_items)
        noise = 0.35 * aff.std(1, keepdims=True) * rng.standard_normal(aff.shape)
        ranker = aff + popularity[1:] + noise  # the ranker: right on average, noisy, biased
        top = np.argpartition(-ranker, n_candidates - 1, axis=1)[:, :n_candidates]  # (U, N)
        entropy, _ = history_exploration(history, cats)
        head = np.clip(entropy + 0.15 * rng.standard_normal(n_users), 0.0, 1.0)
        return cls(
            candidates=(top + 1).astype(np.int64),
            scores=np.take_along_axis(ranker, top, 1).astype(np.float32),
            diversity_head=head.astype(np.float32),
            history_items=history,
            item_categories=cats,
            item_vectors=vectors.astype(np.float32),
            user_factors=user_f.astype(np.float32),
            item_factors=item_f.astype(np.float32),
            types=draw_user_types(history, cats, types or TypeConfig(), rng),
        )


def recent_items(sequences: list[np.ndarray], length: int) -> np.ndarray:
    """Per-user item-index sequences -> (U, length) int64, each user's last `length` items
    right-aligned (most recent last), 0-padded on the left."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for u, seq in enumerate(sequences):
        tail = np.asarray(seq, dtype=np.int64)[-length:] if length else np.zeros(0, np.int64)
        out[u, length - len(tail) :] = tail
    return out


def _synthetic_categories(n_items: int, n_cat: int, rng: np.random.Generator) -> np.ndarray:
    """(n_items + 1, 2) int64: a primary category per item (every category non-empty, sizes
    lognormal) and, for 20 % of items, a different secondary one."""
    sizes = rng.lognormal(0.0, 0.8, size=n_cat)
    rest = 1 + rng.choice(n_cat, n_items - n_cat, p=sizes / sizes.sum())
    primary = rng.permutation(np.concatenate([np.arange(1, n_cat + 1), rest]))
    table = np.zeros((n_items + 1, 2), dtype=np.int64)
    table[1:, 0] = primary
    if n_cat > 1:  # a shift in 1..C-1 never lands on the primary itself
        second = 1 + (primary - 1 + rng.integers(1, n_cat, size=n_items)) % n_cat
        table[1:, 1] = np.where(rng.random(n_items) < 0.2, second, 0)
    return table


def _near_centres(
    cats: np.ndarray, n_cat: int, dim: int, spread: float, rng: np.random.Generator
) -> np.ndarray:
    """(n_items + 1, dim) float64: category centre (+ half the secondary's) + noise; row 0 = 0."""
    centre = np.vstack([np.zeros(dim), rng.standard_normal((n_cat, dim))])  # (C + 1, dim)
    out = centre[cats[:, 0]] + 0.5 * centre[cats[:, 1]]
    out += spread * rng.standard_normal(out.shape)
    out[0] = 0.0
    return out


def _category_means(factors: np.ndarray, primary: np.ndarray, n_cat: int) -> np.ndarray:
    """(C + 1, F) mean factor of each category's items (by primary category); row 0 = 0."""
    sums = np.zeros((n_cat + 1, factors.shape[1]))
    np.add.at(sums, primary[1:], factors[1:])
    counts = np.bincount(primary[1:], minlength=n_cat + 1)[:, None]
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)


def _liked_categories(explore: np.ndarray, n_cat: int, rng: np.random.Generator) -> np.ndarray:
    """(U,) exploration rates -> (U, MAX_LIKED) distinct liked categories, 0-padded: 1 +
    Binomial(MAX_LIKED - 1, e) of them (at most n_cat)."""
    width = min(MAX_LIKED, n_cat)
    n_liked = 1 + rng.binomial(width - 1, explore)
    picks = 1 + np.argsort(rng.random((len(explore), n_cat)), axis=1)[:, :width]
    return np.where(np.arange(width) < n_liked[:, None], picks, 0)


def _synthetic_histories(
    primary: np.ndarray,
    liked: np.ndarray,
    explore: np.ndarray,
    length: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(U, length) item indices: each event from a liked category w.p. 1 - e, else a random one;
    the item uniform within that category."""
    n_users, n_cat = len(explore), int(primary.max())
    n_liked = (liked > 0).sum(1)
    pick = liked[np.arange(n_users)[:, None], rng.integers(0, n_liked[:, None], (n_users, length))]
    wander = rng.random((n_users, length)) < explore[:, None]
    cat = np.where(wander, rng.integers(1, n_cat + 1, (n_users, length)), pick)  # (U, L)
    order = np.argsort(primary[1:], kind="stable") + 1  # items grouped by category
    counts = np.bincount(primary[1:], minlength=n_cat + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offset = (rng.random(cat.shape) * counts[cat]).astype(np.int64)
    return order[starts[cat] + offset].astype(np.int64)
