"""Re-rank retrieved candidates for relevance and diversity: MMR and greedy DPP (numpy only).

Both methods take, per request, relevance scores for N candidates plus either item vectors
(cosine similarity) or a ready similarity matrix, and return k candidate positions in
selection order. `lam` in [0, 1] is the diversity weight: 0 = pure relevance order,
1 = as diverse as the method can make the list.

    picks = dpp(scores, k=10, lam=0.3, vectors=emb)          # (B, N), (B, N, D) -> (B, 10)
    picks = mmr(scores, k=10, lam=0.3, similarity=sim)       # (B, N), (B, N, N) -> (B, 10)
    picks = rerank(scores, 10, 0.3, RerankConfig(), vectors=emb)  # the method `cfg` names

Shared conventions:
- Relevance is min-max normalised per request to r in [0, 1] (a constant row gives r = 0), so
  lam trades the same amount of relevance against diversity whatever the score scale.
- Work happens in "rank space": candidates sorted by raw score (stable, so ties keep the
  lower index first). Every argmax therefore breaks ties towards the more relevant item and
  the relevance fill is a prefix of the ranking.
- If N < k the result has min(k, N) columns (every candidate, re-ordered); no -1 padding,
  since -1 is a valid numpy index and would silently pick the last item.
- Item vectors that are all zero (and, for Jaccard, items without categories) count as
  similar to nothing but themselves: such an item looks maximally novel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

# A DPP candidate whose conditional variance d^2 falls to EPS x its own diagonal is (up to
# rounding) spanned by the items already chosen; dividing by sqrt(d^2) would only amplify noise.
# Float32 inputs use a looser threshold (see `_rank`).
EPS = 1e-9
# Large batches run in chunks whose per-step working set (vectors + Cholesky rows) stays
# cache-sized: measured ~2-3x faster per request than one (64, 1000, ...) sweep at k = 50.
CHUNK_BYTES = 4 << 20

RowFn = Callable[[np.ndarray], np.ndarray]  # (B,) rank positions -> (B, N) similarity rows


Method = Literal["none", "mmr", "dpp"]
Similarity = Literal["embedding", "category"]
# The one list of re-ranking method names (configs, the frontier's sweep, error messages).
METHODS: tuple[Method, ...] = get_args(Method)
SIMILARITIES: tuple[Similarity, ...] = get_args(Similarity)


@dataclass
class RerankConfig:
    """How retrieved candidates are re-ranked: the run config's `rerank:` section, shared by
    serving (serve/), the frontier (rec/frontier.py) and the simulator (rl/env.py)."""

    method: Method = "dpp"  # "none" keeps the relevance order
    similarity: Similarity = "embedding"  # cosine of the model's item vectors / category Jaccard
    # Mix the similarity with the identity, S' = (1 - a) S + a I (still PSD, unit diagonal).
    # Category Jaccard gives identical rows to items with the same category set, so DPP
    # (log det = -inf) drops every such duplicate at any lam > 0: a jump, not a trade-off.
    # a > 0 makes a duplicate costly instead of impossible (MMR only sees S scaled by 1 - a).
    identity_mix: float = 0.0
    # DPP relevance scale: quality q = exp(theta * r) with theta = theta_max * (1 - lam) / lam,
    # i.e. theta = theta_max at lam = 0.5 and theta -> inf as lam -> 0 (see `dpp`).
    theta_max: float = 1.0
    n_candidates: int = 100  # candidates the retrieval stage hands to the re-ranker

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"rerank.method must be one of {METHODS}, got {self.method!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(
                f"rerank.similarity must be one of {SIMILARITIES}, got {self.similarity!r}"
            )
        if not 0.0 <= self.identity_mix < 1.0:
            raise ValueError(f"rerank.identity_mix must be in [0, 1): {self.identity_mix!r}")
        if not (np.isfinite(self.theta_max) and self.theta_max >= 0):
            raise ValueError(f"rerank.theta_max must be finite and >= 0: {self.theta_max!r}")
        if self.n_candidates < 1:
            raise ValueError(f"rerank.n_candidates must be >= 1, got {self.n_candidates!r}")


# ----------------------------------------------------------------------------- similarity


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
    """(B, N, D) float -> (B, N, N) float64 cosine similarity.

    A zero vector has similarity 0 with every other item and 1 with itself (unit diagonal
    keeps the matrix PSD and usable as a DPP kernel).
    """
    v = _as_float("vectors", vectors, ndim=3).astype(np.float64)  # (B, N, D)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)  # (B, N, 1)
    unit = np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)  # zero rows stay zero
    sim = unit @ unit.transpose(0, 2, 1)  # (B, N, N)
    idx = np.arange(sim.shape[1])
    sim[:, idx, idx] = 1.0
    return sim


def category_jaccard_similarity(cat_ids: np.ndarray) -> np.ndarray:
    """(B, N, C) int category ids, 0 = padding -> (B, N, N) float64 Jaccard overlap of the sets.

    Repeated ids in one item count once. Items without categories have similarity 0 with
    others and 1 with themselves (the Jaccard kernel is PSD; a unit diagonal keeps it so).
    """
    cats = np.asarray(cat_ids)
    if cats.ndim != 3 or not np.issubdtype(cats.dtype, np.integer):
        raise ValueError(
            f"cat_ids must be a (B, N, C) integer array, got {cats.dtype} {cats.shape}"
        )
    if cats.size and cats.min() < 0:
        raise ValueError(f"cat_ids must be >= 0 (0 = padding), got min {cats.min()!r}")
    cats = np.sort(cats, axis=-1)
    cats[..., 1:][cats[..., 1:] == cats[..., :-1]] = 0  # sets: drop repeats
    present = cats != 0  # (B, N, C)
    size = present.sum(-1)  # (B, N)
    inter = np.zeros(cats.shape[:2] + cats.shape[1:2], dtype=np.int64)  # (B, N, N)
    # C is small (a handful of categories per item): C^2 broadcast compares beat a one-hot
    # over the whole category vocabulary.
    for c in range(cats.shape[2]):
        a = cats[:, :, None, c]  # (B, N, 1)
        for c2 in range(cats.shape[2]):
            inter += (a == cats[:, None, :, c2]) & present[:, :, None, c]
    union = size[:, :, None] + size[:, None, :] - inter  # (B, N, N)
    sim = np.divide(inter, union, out=np.zeros(union.shape), where=union > 0)
    idx = np.arange(sim.shape[1])
    sim[:, idx, idx] = 1.0
    return sim


# ----------------------------------------------------------------------------- public API


def mmr(
    scores: np.ndarray,
    k: int,
    lam: float | np.ndarray,
    *,
    vectors: np.ndarray | None = None,
    similarity: np.ndarray | None = None,
) -> np.ndarray:
    """Maximal marginal relevance (Carbonell & Goldstein, 1998), batched.

    scores (B, N) float; exactly one of vectors (B, N, D) float (cosine similarity) or
    similarity (B, N, N) float (row j = similarity of chosen j to each candidate); k >= 0;
    lam float or (B,) in [0, 1]. Returns (B, min(k, N)) int64 candidate positions.

    First pick: the most relevant item. Then, greedily,
        argmax_i  (1 - lam) * r_i - lam * max_{j chosen} S[j, i],   r = min-max normalised scores.
    lam = 0 is the relevance order exactly; ties go to the more relevant candidate.
    """
    return _chunked(_mmr_greedy, scores, k, lam, vectors, similarity)


def dpp(
    scores: np.ndarray,
    k: int,
    lam: float | np.ndarray,
    *,
    vectors: np.ndarray | None = None,
    similarity: np.ndarray | None = None,
    theta_max: float = RerankConfig.theta_max,
) -> np.ndarray:
    """Greedy MAP inference for a DPP (Chen, Zhang & Zhou, NeurIPS 2018), batched.

    Inputs and output as in `mmr`; similarity must be symmetric PSD (cosine and Jaccard are).

    Kernel L = diag(q) S diag(q) with quality q_i = exp(theta * r_i), r = min-max normalised
    scores, so log det L_Y = 2 theta sum_{i in Y} r_i + log det S_Y. Each step adds the item
    with the largest gain log det L_{Y+i} - log det L_Y = 2 theta r_i + log d_i^2, where d_i^2
    is the Schur complement of i in S given Y, kept by an incremental Cholesky (O(k^2 N) per
    request; S, not L, so exp(theta r) never overflows). The mapping from lam is

        theta = theta_max * (1 - lam) / lam,

    and multiplying the gain by lam (argmax unchanged) shows the trade-off it encodes:
    (1 - lam) * 2 * theta_max * r_i + lam * log d_i^2.
    lam = 1: theta = 0, the greedy maximises log det S_Y alone (the most diverse list).
    lam = 0: the diversity term vanishes; returned as the relevance order exactly (the limit of
    the greedy as theta -> inf, and the only choice when duplicates make log d^2 = -inf).
    Once every remaining candidate has d_i^2 <= eps * S_ii (eps = EPS, or ~1e-4 for float32
    input: the list spans all that S can express, e.g. k > embedding rank, or only duplicates
    are left), the rest is filled in relevance order.
    """
    if not (np.isfinite(theta_max) and theta_max >= 0):
        raise ValueError(f"theta_max must be a finite number >= 0, got {theta_max!r}")
    return _chunked(_dpp_greedy, scores, k, lam, vectors, similarity, theta_max=theta_max)


def relevance_order(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, N) scores -> (B, min(k, N)) int64 positions by descending score (ties: lower index)."""
    s = _as_float("scores", scores, ndim=2)
    return np.argsort(-s, axis=1, kind="stable")[:, : _check_k(k)]


def similarity_inputs(
    cfg: RerankConfig, *, vectors: np.ndarray | None = None, cat_ids: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The re-rankers' similarity argument under `cfg.similarity` and `cfg.identity_mix`.

    "embedding" needs vectors (B, N, D), "category" cat_ids (B, N, C). Returns {"vectors":
    (B, N, D)} (cosine computed inside the re-ranker) or {"similarity": (B, N, N) float64}.
    Build it once and pass it to `rerank` as `**kernel` when many calls share the candidates.
    """
    if cfg.similarity == "embedding":
        if vectors is None:
            raise ValueError("rerank.similarity='embedding' needs vectors (B, N, D)")
        if cfg.identity_mix == 0.0:
            return {"vectors": vectors}
        sim = cosine_similarity(vectors)  # (B, N, N)
    elif cfg.similarity == "category":
        if cat_ids is None:
            raise ValueError("rerank.similarity='category' needs cat_ids (B, N, C)")
        sim = category_jaccard_similarity(cat_ids)  # (B, N, N)
    else:
        raise ValueError(f"rerank.similarity must be one of {SIMILARITIES}: {cfg.similarity!r}")
    if cfg.identity_mix > 0.0:
        diag = np.arange(sim.shape[1])
        sim *= 1.0 - cfg.identity_mix
        sim[:, diag, diag] = 1.0
    return {"similarity": sim}


def rerank(
    scores: np.ndarray,
    k: int,
    lam: float | np.ndarray,
    cfg: RerankConfig,
    *,
    vectors: np.ndarray | None = None,
    cat_ids: np.ndarray | None = None,
    similarity: np.ndarray | None = None,
) -> np.ndarray:
    """Dispatch on `cfg`: (B, N) scores -> (B, min(k, N)) int64 candidate positions.

    cfg.similarity "embedding" needs vectors (B, N, D); "category" needs cat_ids (B, N, C);
    a ready similarity (B, N, N) (from `similarity_inputs(cfg, ...)`) is used as given.
    """
    if cfg.method == "none":
        return relevance_order(scores, k)
    if similarity is not None:
        kernel = {"similarity": similarity}
    else:
        kernel = similarity_inputs(cfg, vectors=vectors, cat_ids=cat_ids)
    if cfg.method == "mmr":
        return mmr(scores, k, lam, **kernel)
    if cfg.method == "dpp":
        return dpp(scores, k, lam, theta_max=cfg.theta_max, **kernel)
    raise ValueError(f"rerank.method must be one of {METHODS}, got {cfg.method!r}")


# ----------------------------------------------------------------------------- greedy cores


def _mmr_greedy(p: _Ranked) -> np.ndarray:
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


def _dpp_greedy(p: _Ranked, theta_max: float) -> np.ndarray:
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


def _chunked(
    core: Callable[..., np.ndarray],
    scores: np.ndarray,
    k: int,
    lam: float | np.ndarray,
    vectors: np.ndarray | None,
    similarity: np.ndarray | None,
    **kwargs: float,
) -> np.ndarray:
    """Validate the whole batch, then run `core` on cache-sized chunks of requests."""
    s = _as_float("scores", scores, ndim=2).astype(np.float64, copy=False)
    bsz, n = s.shape
    k = min(_check_k(k), n)
    lam_b = _check_lam(lam, bsz)
    if (vectors is None) == (similarity is None):
        raise ValueError("pass exactly one of vectors (B, N, D) or similarity (B, N, N)")
    if vectors is not None:
        src = _as_float("vectors", vectors, ndim=3)  # float32 stays float32: half the traffic
        if src.shape[:2] != (bsz, n):
            raise ValueError(f"vectors must be (B, N, D) = ({bsz}, {n}, D), got {src.shape}")
        per_request = n * (src.shape[2] * src.itemsize + 8 * k + 64)
    else:
        src = np.asarray(similarity)
        if src.shape != (bsz, n, n):
            raise ValueError(f"similarity must be (B, N, N) = ({bsz}, {n}, {n}), got {src.shape}")
        src = _as_float("similarity", src, ndim=3)
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


def _as_float(name: str, x: np.ndarray, ndim: int) -> np.ndarray:
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


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    return int(k)


def _check_lam(lam: float | np.ndarray, bsz: int) -> np.ndarray:
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
