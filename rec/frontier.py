"""The relevance-diversity frontier: score once, re-rank many times, measure every list.

For every test user the model scores the whole catalogue once, chunk by chunk over the items
(`Recommender.next_item_scores` over `frontier.item_chunk` items at a time, a running top-n
merged as rec/evaluation.py does, so no users x items matrix exists at 4M items); the top
`rerank.n_candidates` become the candidate pool, and each method in {none, mmr, dpp}
(`rec.rerank.rerank` under the run's `rerank:` section) picks a list of `k` from that pool at
every lam of the grid. Each list is
measured with rec/metrics.py's definitions:

    ndcg@k, recall@k  position of the held-out target in the list (one target per user)
    ild@k             mean pairwise category-Jaccard distance (`ild_jaccard`)
    ild_emb@k         mean pairwise 1 - cosine of the model's item vectors (`ild_embedding`)
    cat_coverage@k    distinct categories in the list (a count)
    novelty@k         mean self-information -log2 p(item) of train popularity
    catalog_coverage  share of the catalogue in at least one user's list

`none` is the plain top-k of the model's scores, so its row equals the train job's
`test_unseen.*` (protocol "unseen") or `test.*` (protocol "full") metrics (a test checks it;
only exact score ties could differ: the evaluator counts them against the target, a list
puts one of them first). No Ray here: a single-process torch + numpy loop.

    result = compute_frontier(export_dir, prepared_dir, FrontierConfig(), RerankConfig())
    result["frontier"]["dpp"][3]  # {"lam": 0.2, "ndcg@10": ..., "ild@10": ..., ...}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from rec.config_loader import ConfigError
from rec.data.batch import SCORE_BATCH_SIZE, collate, length_batches
from rec.data.splits import ItemTables, load_examples, load_item_tables
from rec.evaluation import DEFAULT_ITEM_CHUNK, empty_top, in_chunk, merge_top
from rec.export import load_export
from rec.frontier_summary import summarize
from rec.logs import progress
from rec.metrics import (
    category_coverage,
    dedupe_categories,
    exclusion_set,
    ild_embedding,
    ild_jaccard,
    ndcg_at_k,
    novelty,
    recall_at_k,
    self_information,
)
from rec.recommender import Recommender
from rec.rerank import METHODS, Method, RerankConfig, Similarity, rerank, similarity_inputs


@dataclass
class FrontierConfig:
    """What `jobs.evaluate` sweeps: methods x lam grid over one candidate pool per user.

    Everything else comes from the run's `rerank:` section (theta_max, n_candidates, ...), so the
    frontier measures what serving does; only the two kernel fields below may override it.
    """

    # Sweep axis over `rerank.method`; "none" (the model's own order) is the reference.
    methods: list[Method] = field(default_factory=lambda: list(METHODS))
    # Sweep axis over lam in [0, 1]; denser at the low end, where both methods still keep most
    # of the relevance (lam = 0 reproduces `none`, a built-in check of the pipeline).
    lams: list[float] = field(
        default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
    )
    # List length: every metric is @k (<= rerank.n_candidates).
    k: int = 10
    # The kernel the frontier measures under, overriding `rerank.similarity` and
    # `rerank.identity_mix` for this sweep only (null: measure the served kernel). The
    # frontier compares kernels (bench/README.md); its published numbers use category Jaccard
    # + 10 % identity, which on Beauty buys ~2.5x more ILD@10 (a category metric) per NDCG
    # point than the item-vector cosine that serving and the env default to.
    similarity: Similarity | None = "category"
    identity_mix: float | None = 0.1
    # "unseen": the user's history is removed from the candidates (the target never is), as a
    # served list would never re-offer what the user already has; it matches `test_unseen.*`.
    # "full": history stays in (the S3-Rec/RecBole protocol of `test.*`).
    protocol: Literal["unseen", "full"] = "unseen"
    # Users scored per forward pass.
    batch_size: int = SCORE_BATCH_SIZE
    # Items scored at once (the candidate pool is merged over chunks; memory B x item_chunk).
    item_chunk: int = DEFAULT_ITEM_CHUNK
    # Evaluate a random subset of this many test users (quick runs); None = all of them.
    max_users: int | None = None
    # Seed of that subset.
    seed: int = 0
    # The target: largest relative NDCG@k loss allowed versus "none" ...
    max_ndcg_drop: float = 0.02
    # ... while ILD@k rises by at least this fraction.
    target_ild_gain: float = 0.25

    def __post_init__(self) -> None:
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"frontier.methods must be distinct and non-empty: {self.methods!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"frontier.methods: unknown method {bad[0]!r}; use one of {METHODS}")
        if not self.lams or any(not 0.0 <= lam <= 1.0 for lam in self.lams):
            raise ValueError(f"frontier.lams must be non-empty values in [0, 1]: {self.lams!r}")
        if len(set(self.lams)) != len(self.lams):
            raise ValueError(f"frontier.lams must be distinct: {self.lams!r}")
        if self.k < 1:
            raise ValueError(f"frontier.k must be >= 1, got {self.k!r}")
        if self.batch_size < 1:
            raise ValueError(f"frontier.batch_size must be >= 1, got {self.batch_size!r}")
        if self.item_chunk < 1:
            raise ValueError(f"frontier.item_chunk must be >= 1, got {self.item_chunk!r}")
        if self.max_users is not None and self.max_users < 1:
            raise ValueError(f"frontier.max_users must be >= 1 or null, got {self.max_users!r}")
        if self.identity_mix is not None and not 0.0 <= self.identity_mix < 1.0:
            raise ValueError(f"frontier.identity_mix must be in [0, 1): {self.identity_mix!r}")
        if not 0.0 <= self.max_ndcg_drop < 1.0:
            raise ValueError(f"frontier.max_ndcg_drop must be in [0, 1): {self.max_ndcg_drop!r}")

    def measured(self, rerank: RerankConfig) -> RerankConfig:
        """The re-ranking settings the sweep measures: `rerank` with the kernel overrides."""
        if not 1 <= self.k <= rerank.n_candidates:
            raise ValueError(
                f"frontier.k must be in [1, rerank.n_candidates={rerank.n_candidates}], "
                f"got {self.k!r}"
            )
        return replace(
            rerank,
            similarity=rerank.similarity if self.similarity is None else self.similarity,
            identity_mix=rerank.identity_mix if self.identity_mix is None else self.identity_mix,
        )

    def settings(self) -> list[tuple[str, float | None]]:
        """(method, lam) pairs in output order; "none" has no lam."""
        out: list[tuple[str, float | None]] = []
        for method in self.methods:
            out += [(method, None)] if method == "none" else [(method, lam) for lam in self.lams]
        return out


@dataclass
class Candidates:
    """One batch's candidate pools, best first: items (B, N) int64, scores (B, N) float32."""

    items: torch.Tensor
    scores: torch.Tensor
    targets: torch.Tensor  # (B,) int64 held-out next item


# Scores of one batch for items lo..hi-1: (lo, hi) -> (B, hi - lo), as `score_next` gives them.
ChunkScores = Callable[[int, int], torch.Tensor]


def candidate_pool(
    chunk: ChunkScores,
    n_items: int,
    targets: torch.Tensor,
    history: torch.Tensor,
    n: int,
    protocol: str,
    item_chunk: int = DEFAULT_ITEM_CHUNK,
) -> Candidates:
    """The top-n of items 1..n_items, scored `item_chunk` at a time with a running top-n (only
    one (B, item_chunk) block exists); with protocol "unseen" history is excluded exactly as
    `RankingEvaluator` does (`exclusion_set`: the target itself stays rankable)."""
    exclude = exclusion_set(history, targets) if protocol == "unseen" else None  # (B, T)
    top = empty_top(len(targets), n, torch.empty(0))
    for lo in range(1, n_items + 1, item_chunk):
        hi = min(lo + item_chunk, n_items + 1)
        s = chunk(lo, hi).float()  # (B, C)
        if exclude is not None:
            s = s.masked_fill(in_chunk(exclude, lo, hi), float("-inf"))
        top = merge_top(top, s, lo, n)  # values (B, <=n) sorted, item ids (B, <=n)
    if top[0].shape[1] < n or not bool(torch.isfinite(top[0]).all()):
        raise ConfigError(
            f"rerank.n_candidates={n}: fewer finite-scored items than that remain after "
            "removing the history; lower n_candidates"
        )
    return Candidates(top[1], top[0], targets)


def kernel_inputs(
    cands: Candidates, measured: RerankConfig, item_table: torch.Tensor, categories: torch.Tensor
) -> dict[str, np.ndarray]:
    """The re-rankers' similarity argument for a batch, built once and reused by every method
    and lam (`rec.rerank.similarity_inputs`: item vectors or a (B, N, N) float64 matrix)."""
    if measured.similarity == "embedding":
        return similarity_inputs(measured, vectors=item_table[cands.items].numpy())  # (B, N, D)
    return similarity_inputs(measured, cat_ids=categories[cands.items].numpy())  # (B, N, C)


def pick(
    method: str,
    lam: float | None,
    cands: Candidates,
    kernel: dict[str, np.ndarray],
    measured: RerankConfig,
    k: int,
) -> torch.Tensor:
    """(B, k) int64 item indices chosen by `method` at `lam` from the candidate pool."""
    scores = cands.scores.double().numpy()  # (B, N), already in score order
    cfg = replace(measured, method=method)  # the sweep axis over rerank.method
    pos = rerank(scores, k, 0.0 if lam is None else lam, cfg, **kernel)  # (B, k)
    return cands.items.gather(1, torch.from_numpy(pos))  # (B, k)


class ListMetrics:
    """Sums of per-user list metrics for one (method, lam), plus the paired NDCG difference
    to "none" (for its standard error)."""

    def __init__(self, n_items: int, k: int) -> None:
        self.k, self.n_users = k, 0
        self.sums: dict[str, float] = {}
        self.diff_sum = self.diff_sq = 0.0
        self.listed = torch.zeros(n_items + 1, dtype=torch.bool)
        self.seconds = 0.0

    def update(self, per_user: dict[str, torch.Tensor], lists: torch.Tensor, ref_ndcg) -> None:
        """per_user: name -> (B,) float64; lists (B, k); ref_ndcg (B,) the "none" NDCG."""
        for name, values in per_user.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        diff = per_user[f"ndcg@{self.k}"] - ref_ndcg  # (B,)
        self.diff_sum += float(diff.sum())
        self.diff_sq += float((diff * diff).sum())
        self.listed[lists.flatten()] = True
        self.n_users += lists.shape[0]

    def compute(self) -> dict[str, float]:
        n = self.n_users
        out = {name: total / n for name, total in self.sums.items()}
        out["catalog_coverage"] = int(self.listed[1:].sum()) / (self.listed.numel() - 1)
        mean = self.diff_sum / n
        var = max(self.diff_sq / n - mean * mean, 0.0)
        out[f"ndcg@{self.k}_diff_se"] = (var / max(n - 1, 1)) ** 0.5  # paired, vs "none"
        out["rerank_seconds"] = round(self.seconds, 3)
        return out


def list_metrics(
    lists: torch.Tensor,
    targets: torch.Tensor,
    categories: torch.Tensor,
    item_table: torch.Tensor,
    self_info: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """(B, k) lists, (B,) targets -> per-user (B,) float64 metrics (rec/metrics.py definitions)."""
    k = lists.shape[1]
    hit = lists == targets[:, None]  # (B, k); a list holds each item at most once
    position = hit.double().argmax(1) + 1  # (B,) 1-based; meaningless without a hit
    ranks = torch.where(hit.any(1), position, torch.full_like(position, k + 1))
    return {
        f"ndcg@{k}": ndcg_at_k(ranks, k),
        f"recall@{k}": recall_at_k(ranks, k),
        f"ild@{k}": ild_jaccard(lists, categories),
        f"ild_emb@{k}": ild_embedding(lists, item_table),
        f"cat_coverage@{k}": category_coverage(lists, categories),
        f"novelty@{k}": novelty(lists, self_info),
    }


@torch.no_grad()
def sweep(
    model: Recommender,
    examples: dict[str, np.ndarray],
    tables: ItemTables,
    cfg: FrontierConfig,
    measured: RerankConfig,
) -> dict[tuple[str, float | None], dict[str, float]]:
    """Score every example once, re-rank each batch with every (method, lam) under `measured`
    (`cfg.measured(rerank)`); mean metrics."""
    model.eval()
    table = model.item_table()  # (n_items + 1, D), once; scores use it as score_next does
    item_table = table.float()
    categories = dedupe_categories(torch.as_tensor(tables.categories).long())  # (n_items + 1, C)
    self_info = self_information(torch.as_tensor(tables.train_counts))
    settings = cfg.settings()
    acc = {s: ListMetrics(tables.n_items, cfg.k) for s in settings}
    n_batches = -(-len(examples["items"]) // cfg.batch_size)
    batches = length_batches(collate(examples), cfg.batch_size)
    for _, batch in progress(batches, n_batches, "frontier"):
        targets = batch.targets[:, -1].long()  # (B,)
        cands = candidate_pool(
            _chunk_scores(model, table, batch),
            tables.n_items,
            targets,
            batch.items.long(),
            measured.n_candidates,
            cfg.protocol,
            cfg.item_chunk,
        )
        kernel = kernel_inputs(cands, measured, item_table, categories)
        ref = list_metrics(cands.items[:, : cfg.k], targets, categories, item_table, self_info)
        for method, lam in settings:
            t0 = time.perf_counter()
            lists = pick(method, lam, cands, kernel, measured, cfg.k)  # (B, k)
            acc[(method, lam)].seconds += time.perf_counter() - t0
            per_user = (
                ref
                if method == "none"
                else list_metrics(lists, targets, categories, item_table, self_info)
            )
            acc[(method, lam)].update(per_user, lists, ref[f"ndcg@{cfg.k}"])
    return {s: a.compute() for s, a in acc.items()}


def _chunk_scores(model: Recommender, table: torch.Tensor, batch) -> ChunkScores:
    """The model's own interest logits (`Recommender.next_item_scores`) by item range."""
    h = model.user_embedding(batch, table)  # (B, D)
    return lambda lo, hi: model.next_item_scores(h, batch.items, table, lo, hi)


def select_users(examples: dict[str, np.ndarray], max_users: int | None, seed: int) -> dict:
    """A random subset of example rows (all of them when max_users is None or >= their count)."""
    n = len(examples["items"])
    if max_users is None or max_users >= n:
        return examples
    idx = np.sort(np.random.default_rng(seed).choice(n, max_users, replace=False))
    return {name: arr[idx] for name, arr in examples.items()}


def compute_frontier(
    export_dir: str | Path,
    prepared_dir: str | Path,
    cfg: FrontierConfig,
    rerank_cfg: RerankConfig | None = None,
) -> dict:
    """Load the serving export and the prepared test split; sweep; return the frontier.json
    content: {"config", "n_users", "protocol", "frontier": {method: [rows]}, "summary", ...}.

    rerank_cfg: the run's `rerank:` section (default: `RerankConfig()`); "config" records the
    frontier's own fields plus the kernel, theta_max and n_candidates it measured under."""
    t0 = time.perf_counter()
    try:
        measured = cfg.measured(rerank_cfg or RerankConfig())
    except ValueError as err:
        raise ConfigError(str(err)) from None
    model = load_export(export_dir)
    tables = load_item_tables(prepared_dir)
    if tables.n_items != model.dims.n_items:
        raise ValueError(
            f"export has {model.dims.n_items} items but {str(prepared_dir)!r} has "
            f"{tables.n_items}: model_dir's export and data do not belong together"
        )
    if measured.n_candidates > tables.n_items:
        raise ConfigError(
            f"rerank.n_candidates={measured.n_candidates} exceeds the catalogue ({tables.n_items})"
        )
    examples = load_examples(prepared_dir, "test", model.cfg.max_len)
    examples = select_users(examples, cfg.max_users, cfg.seed)
    # The reference is the model's own top k, whether or not "none" is among the methods.
    run_cfg = cfg if "none" in cfg.methods else _with_none(cfg)
    metrics = sweep(model, examples, tables, run_cfg, measured)
    reference = metrics[("none", None)]
    if "none" not in cfg.methods:
        metrics.pop(("none", None))
    frontier, summary = summarize(metrics, reference, cfg)
    return {
        "config": {**asdict(cfg), **_kernel_fields(measured)},
        "n_users": len(examples["items"]),
        "n_items": tables.n_items,
        "protocol": cfg.protocol,
        "frontier": frontier,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _kernel_fields(measured: RerankConfig) -> dict:
    keys = ("similarity", "identity_mix", "theta_max", "n_candidates")
    return {key: getattr(measured, key) for key in keys}


def _with_none(cfg: FrontierConfig) -> FrontierConfig:
    return FrontierConfig(**{**asdict(cfg), "methods": ["none", *cfg.methods]})
