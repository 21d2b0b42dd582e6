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

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from rec.rerank_greedy import as_float, check_k, chunked, dpp_greedy, mmr_greedy

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
    v = as_float("vectors", vectors, ndim=3).astype(np.float64)  # (B, N, D)
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
    return chunked(mmr_greedy, scores, k, lam, vectors, similarity)


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
    Once every remaining candidate has d_i^2 <= eps * S_ii (eps = rerank_greedy.EPS, or ~1e-4 for float32
    input: the list spans all that S can express, e.g. k > embedding rank, or only duplicates
    are left), the rest is filled in relevance order.
    """
    if not (np.isfinite(theta_max) and theta_max >= 0):
        raise ValueError(f"theta_max must be a finite number >= 0, got {theta_max!r}")
    return chunked(dpp_greedy, scores, k, lam, vectors, similarity, theta_max=theta_max)


def relevance_order(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, N) scores -> (B, min(k, N)) int64 positions by descending score (ties: lower index)."""
    s = as_float("scores", scores, ndim=2)
    return np.argsort(-s, axis=1, kind="stable")[:, : check_k(k)]


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
