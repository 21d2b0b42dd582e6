"""The greedy cores behind rec/rerank.py's MMR and DPP, and the checks on their inputs.

Work happens in "rank space" (candidates sorted by raw score, see rec/rerank.py's docstring):
`chunked` validates a batch, cuts it into cache-sized chunks, `_rank` puts each chunk in rank
space, and a core (`mmr_greedy`, `dpp_greedy`) picks k positions per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# A DPP candidate whose conditional variance d^2 falls to EPS x its own diagonal is (up to
# rounding) spanned by the items already chosen; dividing by sqrt(d^2) would only amplify noise.
# Float32 inputs use a looser threshold (see `_rank`).
EPS = 1e-9
# Large batches run in chunks whose per-step working set (vectors + Cholesky rows) stays
# cache-sized: measured ~2-3x faster per request than one (64, 1000, ...) sweep at k = 50.
CHUNK_BYTES = 4 << 20

RowFn = Callable[[np.ndarray], np.ndarray]  # (B,) rank positions -> (B, N) similarity rows


def mmr_greedy(p: _Ranked) -> np.ndarray:
    """MMR on one chunk in rank space -> (B, k) int64 candidate positions."""
    bsz, n = p.r.shape
    rows = np.arange(bsz)
    picks = np.zeros((bsz, p.k), dtype=np.int64)  # rank positions; the first pick is position 0
    if p.k == 0:
        return _to_candidates(p.perm, picks)
    rel = (1.0 - p.lam)[:, None] * p.r  # (B, N)
    rel[:, 0] = -np.inf  # chosen items get -inf relevance: cheaper than a mask per step
    lam_col = p.lam[:, None]  # (B, 1)
    max_sim = np.full((bsz, n), -np.inf)  # (B, N) max similarity to the chosen set
    for t in range(1, p.k):
        np.maximum(max_sim, p.row(picks[:, t - 1]), out=max_sim)
        j = (rel - lam_col * max_sim).argmax(1)  # (B,) max_sim is finite here, so no NaN
        picks[:, t] = j
        rel[rows, j] = -np.inf
    return _to_candidates(p.perm, picks)


def dpp_greedy(p: _Ranked, theta_max: float) -> np.ndarray:
    """Chen et al.'s incremental-Cholesky greedy on one chunk -> (B, k) int64 positions."""
    (bsz, n), k = p.r.shape, p.k
    rows = np.arange(bsz)
    picks = np.zeros((bsz, k), dtype=np.int64)
    if k == 0:
        return _to_candidates(p.perm, picks)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # 2 theta, capped so 2 theta r stays finite as lam -> 0 (lam = 0 rows are replaced below)
        two_theta = np.minimum(2.0 * theta_max * (1.0 - p.lam) / p.lam, 1e300)
        two_theta[p.lam == 0.0] = 0.0
        rel = two_theta[:, None] * p.r  # (B, N)
        floor = p.eps * np.maximum(p.diag, 0.0)  # (B, N) breakdown threshold per candidate
        d2 = p.diag.copy()  # (B, N) conditional variances d_i^2; chosen items are set to 0
        cis = np.zeros((bsz, k, n))  # (B, k, N) Cholesky rows: S_ij = <cis[:, :, i], cis[:, :, j]>
        for t in range(k):
            d2_ok = np.where(d2 > floor, d2, 0.0)  # (B, N) 0 = not eligible -> log = -inf
            j = (rel + np.log(d2_ok)).argmax(1)  # (B,) log det L_{Y+j} - log det L_Y
            d2_j = d2_ok[rows, j]  # (B,)
            alive = d2_j > 0.0  # False: nothing left to add by diversity in this row
            all_alive = bool(alive.all())
            if not all_alive:
                j = np.where(alive, j, _first_unpicked(picks[:, :t], n))
            picks[:, t] = j
            if t + 1 == k:
                break
            # Chen et al. eq. (8)-(9): e_i = (S_ji - <c_j, c_i>) / d_j ;  d_i^2 -= e_i^2
            c_j = cis[rows, :t, j]  # (B, t)
            dot = np.matmul(c_j[:, None, :], cis[:, :t, :])[:, 0, :]  # (B, N)
            e = (p.row(j) - dot) / np.sqrt(d2_j)[:, None]  # (B, N)
            if not all_alive:
                e[~alive] = 0.0  # finished rows only fill by relevance; keep their state finite
            cis[:, t, :] = e
            d2 -= e * e
            d2[rows, j] = 0.0
    out = _to_candidates(p.perm, picks)
    zero = p.lam == 0.0
    if zero.any():
        out[zero] = p.perm[zero, :k]
    return out


# ----------------------------------------------------------------------------- internals


@dataclass
class _Ranked:
    """One validated batch in rank space (candidates sorted by descending raw score).

    r (B, N) float64 normalised relevance, non-increasing along N; perm (B, N) int64 rank ->
    candidate; diag (B, N) float64 S_ii; row maps (B,) rank positions to (B, N) float64 rows of
    S; lam (B,) float64; k = min(k, N); eps the DPP breakdown threshold (relative to S_ii).
    """

    r: np.ndarray
    perm: np.ndarray
    diag: np.ndarray
    row: RowFn
    lam: np.ndarray
    k: int
    eps: float


def chunked(
    core: Callable[..., np.ndarray],
    scores: np.ndarray,
    k: int,
    lam: float | np.ndarray,
    vectors: np.ndarray | None,
    similarity: np.ndarray | None,
    **kwargs: float,
) -> np.ndarray:
    """Validate the whole batch, then run `core` on cache-sized chunks of requests."""
    s = as_float("scores", scores, ndim=2).astype(np.float64, copy=False)
    bsz, n = s.shape
    k = min(check_k(k), n)
    lam_b = check_lam(lam, bsz)
    if (vectors is None) == (similarity is None):
        raise ValueError("pass exactly one of vectors (B, N, D) or similarity (B, N, N)")
    if vectors is not None:
        src = as_float("vectors", vectors, ndim=3)  # float32 stays float32: half the traffic
        if src.shape[:2] != (bsz, n):
            raise ValueError(f"vectors must be (B, N, D) = ({bsz}, {n}, D), got {src.shape}")
        per_request = n * (src.shape[2] * src.itemsize + 8 * k + 64)
    else:
        src = np.asarray(similarity)
        if src.shape != (bsz, n, n):
            raise ValueError(f"similarity must be (B, N, N) = ({bsz}, {n}, {n}), got {src.shape}")
        src = as_float("similarity", src, ndim=3)
        per_request = n * (8 * k + 64)  # only k rows of S are ever read
    step, is_vec = max(1, CHUNK_BYTES // max(per_request, 1)), vectors is not None
    parts = [
        core(_rank(s[i : i + step], k, lam_b[i : i + step], src[i : i + step], is_vec), **kwargs)
        for i in range(0, bsz, step)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, k), dtype=np.int64)


def _rank(s: np.ndarray, k: int, lam: np.ndarray, src: np.ndarray, is_vectors: bool) -> _Ranked:
    """Validated (B, N) scores, (B,) lam and vectors (B, N, D) or similarity (B, N, N) ->
    the chunk in rank space (see `_Ranked`)."""
    bsz, n = s.shape
    perm = np.argsort(-s, axis=1, kind="stable")  # (B, N) rank -> candidate
    lo = s.min(1, keepdims=True) if n else np.zeros((bsz, 1))  # (B, 1)
    hi = s.max(1, keepdims=True) if n else lo
    # Halve first so hi - lo cannot overflow for huge finite scores.
    span = 0.5 * hi - 0.5 * lo  # (B, 1)
    r = np.divide(0.5 * s - 0.5 * lo, span, out=np.zeros_like(s), where=span > 0)
    r = np.take_along_axis(r, perm, axis=1)  # (B, N) non-increasing
    bidx = np.arange(bsz)
    bcol = bidx[:, None]  # (B, 1)
    if is_vectors:
        sq = np.einsum("bnd,bnd->bn", src, src).astype(np.float64)  # (B, N) squared norms
        inv = np.divide(1.0, np.sqrt(sq), out=np.zeros_like(sq), where=sq > 0)
        inv = np.take_along_axis(inv, perm, axis=1)  # (B, N) rank order
        diag = np.ones((bsz, n))

        # Cosine rows on the fly: k mat-vecs over the raw vectors cost O(k N D) per request and
        # never copy the (B, N, D) input (neither normalised nor permuted).
        def row(j: np.ndarray) -> np.ndarray:
            vj = src[bidx, perm[bidx, j], :, None]  # (B, D, 1)
            return np.matmul(src, vj)[bcol, perm, 0] * (inv * inv[bidx, j][:, None])  # (B, N)

    else:
        diag = np.take_along_axis(np.diagonal(src, axis1=1, axis2=2), perm, 1).astype(np.float64)

        def row(j: np.ndarray) -> np.ndarray:
            return src[bcol, perm[bidx, j][:, None], perm].astype(np.float64)  # (B, N)

    # Float32 similarities carry ~1e-7 relative error, which survives into d^2; below about
    # 1e3 machine epsilons a "residual" is rounding noise, not a new direction.
    eps = max(EPS, 1e3 * float(np.finfo(src.dtype).eps))
    return _Ranked(r, perm, diag, row, lam, k, eps)


def _first_unpicked(picks: np.ndarray, n: int) -> np.ndarray:
    """(B, t) rank positions already picked -> (B,) the lowest (most relevant) one not picked."""
    free = np.ones((picks.shape[0], n), dtype=bool)
    free[np.arange(picks.shape[0])[:, None], picks] = False
    return free.argmax(1)


def _to_candidates(perm: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """(B, N) rank -> candidate map and (B, k) rank positions -> (B, k) int64 candidates."""
    return np.take_along_axis(perm, picks, axis=1).astype(np.int64, copy=False)


def as_float(name: str, x: np.ndarray, ndim: int) -> np.ndarray:
    """Check dtype, rank and finiteness; return float32 as is, anything else as float64."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.dtype != np.float32:
        arr = arr.astype(np.float64, copy=False)
    # One pass: a sum is non-finite if any entry is NaN/inf (or on overflow, checked exactly).
    if not np.isfinite(arr.sum()) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    return int(k)


def check_lam(lam: float | np.ndarray, bsz: int) -> np.ndarray:
    """float or (B,) -> (B,) float64 in [0, 1]."""
    try:
        arr = np.asarray(lam, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"lam must be a float or a (B,) array in [0, 1], got {lam!r}") from None
    if arr.ndim == 0:
        arr = np.full(bsz, float(arr))
    elif arr.shape != (bsz,):
        raise ValueError(f"lam must be a float or have shape (B,) = ({bsz},), got {arr.shape}")
    if not ((arr >= 0.0) & (arr <= 1.0)).all():  # NaN fails both comparisons
        raise ValueError(f"lam must lie in [0, 1], got {lam!r}")
    return arr
