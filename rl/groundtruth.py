"""Ground-truth preferences of the simulated users: implicit-feedback matrix factorisation.

Weighted ALS for implicit feedback (Hu, Koren & Volinsky, ICDM 2008), numpy only. Each user u
and item i get factors x_u, y_i in R^F; for the interaction counts r_ui,

    preference  p_ui = 1 if r_ui > 0 else 0,      confidence  c_ui = 1 + alpha * r_ui,
    minimise    sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + reg (|x|^2 + |y|^2),

alternating exact least-squares solves for all users, then all items. Per user the normal
equations use Hu et al.'s trick Y^T C_u Y = Y^T Y + Y^T (C_u - I) Y, so the cost is linear in
that user's non-zeros. The affinity of user u to item i is x_u . y_i.

Why this, and not the ranker's own scores, is what the simulated users like: if the users
clicked by the ranker's scores, a policy would be rewarded for agreeing with the ranker (lam = 0
would look right by construction, and the ranker's errors would be invisible). The ground truth
is kept independent of the ranker being optimised in three ways:
  1. a different model family: a bilinear factor model of co-occurrence, not a sequential
     transformer (its errors are not the ranker's errors);
  2. different data: it is fitted on each user's FULL sequence, train + valid + test items,
     so it knows the held-out items the ranker never trained on, and a ranker that predicts
     them scores well only by being right;
  3. it never sees the ranker's scores or candidates: the two meet only inside the env, where
     the ranker proposes and the ground truth decides.

    gt = fit_als(sequences, n_items, ALSConfig(factors=32))   # list of (L_u,) item indices
    gt.affinity(u, items)                                      # (M,) -> (M,) float64
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Rows of the (nnz, F, F) outer-product buffer per chunk: ~8 MB at F = 32, float64.
_CHUNK_NNZ = 1024


@dataclass
class ALSConfig:
    """Weighted ALS hyper-parameters (Hu et al. 2008 use alpha = 40 on watch counts; our
    counts are small integers, so confidence grows less steeply)."""

    factors: int = 32  # F, latent dimensions
    reg: float = 0.1  # L2 weight on every factor vector
    alpha: float = 10.0  # confidence slope: c = 1 + alpha * count
    iterations: int = 10  # alternating sweeps (user side + item side each)
    seed: int = 0  # initial factors

    def __post_init__(self) -> None:
        if self.factors < 1 or self.iterations < 1:
            raise ValueError(
                f"als.factors and als.iterations must be >= 1, got {self.factors!r}, "
                f"{self.iterations!r}"
            )
        if self.reg <= 0 or self.alpha < 0:
            raise ValueError(f"als.reg must be > 0 and alpha >= 0: {self.reg!r}, {self.alpha!r}")


@dataclass
class GroundTruth:
    """user_factors (U, F) float32; item_factors (n_items + 1, F) float32, row 0 (padding) 0."""

    user_factors: np.ndarray
    item_factors: np.ndarray

    def affinity(self, user: int, items: np.ndarray) -> np.ndarray:
        """(M,) item indices -> (M,) float64 affinities x_u . y_i of one user."""
        y = self.item_factors[np.asarray(items)].astype(np.float64)  # (M, F)
        return y @ self.user_factors[user].astype(np.float64)


@dataclass
class _Csr:
    """Counts in compressed rows: row r holds indices[indptr[r]:indptr[r+1]], counts data."""

    indptr: np.ndarray  # (R + 1,) int64
    indices: np.ndarray  # (nnz,) int64 column of each non-zero
    data: np.ndarray  # (nnz,) float64 interaction counts
    n_cols: int


def interaction_counts(sequences: list[np.ndarray], n_items: int) -> tuple[_Csr, _Csr]:
    """Per-user item-index sequences -> counts r_ui as (user-major, item-major) CSR.

    Items are 1..n_items (0 = padding, dropped); the item-major rows run over 0..n_items so
    item indices can be used directly (row 0 stays empty).
    """
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    users = np.repeat(np.arange(len(sequences), dtype=np.int64), lengths)
    items = (
        np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(users) else users
    )
    if items.size and (items.min() < 0 or items.max() > n_items):
        raise ValueError(
            f"item indices must be in [0, {n_items}], got {items.min()}..{items.max()}"
        )
    keep = items > 0
    keys, counts = np.unique(users[keep] * (n_items + 1) + items[keep], return_counts=True)
    u, i = keys // (n_items + 1), keys % (n_items + 1)  # sorted by user, then item
    by_user = _Csr(_indptr(u, len(sequences)), i, counts.astype(np.float64), n_items + 1)
    order = np.argsort(i, kind="stable")
    by_item = _Csr(_indptr(i[order], n_items + 1), u[order], by_user.data[order], len(sequences))
    return by_user, by_item


def fit_als(sequences: list[np.ndarray], n_items: int, cfg: ALSConfig | None = None) -> GroundTruth:
    """Fit weighted ALS on per-user item-index arrays (1..n_items) -> `GroundTruth`."""
    cfg = cfg or ALSConfig()
    by_user, by_item = interaction_counts(sequences, n_items)
    rng = np.random.default_rng(cfg.seed)
    x = 0.01 * rng.standard_normal((len(sequences), cfg.factors))  # (U, F)
    y = 0.01 * rng.standard_normal((n_items + 1, cfg.factors))  # (n_items + 1, F)
    for _ in range(cfg.iterations):
        x = solve_side(by_user, y, cfg.alpha, cfg.reg)
        y = solve_side(by_item, x, cfg.alpha, cfg.reg)
    y[0] = 0.0  # padding is nobody's item
    return GroundTruth(x.astype(np.float32), y.astype(np.float32))


def solve_side(rows: _Csr, other: np.ndarray, alpha: float, reg: float) -> np.ndarray:
    """One half-sweep: (R, F) float64 least-squares factors of every row given `other` (M, F).

    x_r = (O^T O + O_r^T (C_r - I) O_r + reg I)^-1 O_r^T c_r, batched over chunks of rows.
    """
    n_rows, f = len(rows.indptr) - 1, other.shape[1]
    gram = other.T @ other + reg * np.eye(f)  # (F, F) shared by every row
    out = np.zeros((n_rows, f))
    start = 0
    while start < n_rows:
        # Grow the chunk until it holds ~_CHUNK_NNZ non-zeros (at least one row).
        stop = int(np.searchsorted(rows.indptr, rows.indptr[start] + _CHUNK_NNZ, side="right"))
        stop = min(max(stop - 1, start + 1), n_rows)
        out[start:stop] = _solve_chunk(rows, other, gram, alpha, start, stop)
        start = stop
    return out


def _solve_chunk(
    rows: _Csr, other: np.ndarray, gram: np.ndarray, alpha: float, start: int, stop: int
) -> np.ndarray:
    """Rows start..stop -> (stop - start, F) solutions of their normal equations."""
    lo, hi = rows.indptr[start], rows.indptr[stop]
    o = other[rows.indices[lo:hi]]  # (nnz, F)
    c = 1.0 + alpha * rows.data[lo:hi]  # (nnz,) confidences
    outer = np.einsum("nf,ng->nfg", o * (c - 1.0)[:, None], o)  # (nnz, F, F)
    rhs_terms = o * c[:, None]  # (nnz, F): p = 1 on the non-zeros, 0 elsewhere
    a = np.broadcast_to(gram, (stop - start, *gram.shape)).copy()  # (B, F, F)
    b = np.zeros((stop - start, o.shape[1]))  # (B, F)
    counts = np.diff(rows.indptr[start : stop + 1])
    has = counts > 0  # rows without non-zeros keep b = 0 -> x = 0
    if hi > lo:
        seg = (rows.indptr[start:stop] - lo)[has]  # segment starts of non-empty rows
        a[has] += np.add.reduceat(outer, seg, axis=0)
        b[has] = np.add.reduceat(rhs_terms, seg, axis=0)
    return np.linalg.solve(a, b[:, :, None])[:, :, 0]


def _indptr(sorted_rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Row id of each non-zero (sorted) -> (n_rows + 1,) CSR row pointer."""
    return np.concatenate([[0], np.cumsum(np.bincount(sorted_rows, minlength=n_rows))]).astype(
        np.int64
    )
