"""Full-ranking evaluation of a model over batches (plain torch, no Ray), at any catalogue size.

    rows = collate(load_examples(prepared, "test", model.cfg.max_len))
    rows = sample_users(rows, resolve_max_users(cfg.eval, tables.n_items), cfg.eval.seed)
    metrics = evaluate(model, length_batches(rows, 256), tables, "test", popular=True)

Used by the Ray Train loop for per-epoch validation (each rank its shard, merged), by the final
test evaluation on the serving export and by the re-ranking frontier.

Catalogues up to `item_chunk` items are scored in one (B, n_items + 1) matrix per batch. Larger
ones are ranked chunk by chunk over the items: per chunk of C items the (B, C) scores add to
each user's count of items ahead of the target (both protocols) and to a running top-k merge,
so no (users x items) matrix beyond one chunk exists; the metrics are the same (ranks are
"1 + other items scoring >= the target", the pessimistic ties of rec.metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from rec.data.batch import Batch
from rec.data.splits import ItemTables
from rec.logs import progress
from rec.metrics import RankingEvaluator, exclusion_set, popularity_scores

DEFAULT_ITEM_CHUNK = 65_536  # items per score chunk: 256 users x 64k items = 64 MB of fp32


@dataclass
class EvalConfig:
    """The `eval:` section: which test users the final evaluation ranks, and how."""

    # Test users ranked: "auto" = every user below `sample_above_items` items, else
    # `auto_users`; an int = a seeded sample of at most that many; null = every user.
    max_users: int | str | None = "auto"
    sample_above_items: int = 100_000  # "auto": sample from this catalogue size up
    auto_users: int = 10_000  # "auto": users sampled on a large catalogue
    seed: int = 0  # of the user sample (the same users for every model)
    item_chunk: int = DEFAULT_ITEM_CHUNK  # items scored at once; larger catalogues are chunked

    def __post_init__(self) -> None:
        if isinstance(self.max_users, str) and self.max_users != "auto":
            raise ValueError(f"eval.max_users must be 'auto', an int or null: {self.max_users!r}")
        if isinstance(self.max_users, int) and self.max_users < 1:
            raise ValueError(f"eval.max_users must be >= 1, got {self.max_users!r}")
        for name in ("sample_above_items", "auto_users", "item_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)!r}")


def resolve_max_users(cfg: EvalConfig, n_items: int) -> int | None:
    """eval.max_users with "auto" resolved by catalogue size; None = every user."""
    if cfg.max_users != "auto":
        return cfg.max_users
    return cfg.auto_users if n_items >= cfg.sample_above_items else None


def sample_users(rows: Batch, max_users: int | None, seed: int) -> Batch:
    """At most `max_users` rows (users) drawn without replacement by `seed`, in row order."""
    if max_users is None or rows.size <= max_users:
        return rows
    idx = np.sort(np.random.default_rng(seed).choice(rows.size, max_users, replace=False))
    return rows.take(idx)


@torch.no_grad()
def evaluate(
    model,
    batches: Iterable[tuple[np.ndarray, Batch]],
    tables: ItemTables,
    prefix: str,
    popular: bool = False,
    merge_ranks: bool = False,
    item_chunk: int = DEFAULT_ITEM_CHUNK,
) -> dict[str, float]:
    """Full-ranking metrics of `model.score_next` over eval batches, both protocols.

    batches: (row indices, Batch) pairs as `rec.data.batch.length_batches` yields them (the
        indices are not needed: metrics do not depend on the row order).
    popular: also the most-popular baseline (train counts) under `popular.<prefix>`.
    merge_ranks: every torch.distributed rank evaluated its own shard; merge them all first.
    item_chunk: catalogues larger than this are ranked chunk by chunk (module docstring).
    """
    device = next(model.parameters()).device  # batches follow the model (CPU or GPU)
    cats = torch.as_tensor(tables.categories)
    counts = torch.as_tensor(tables.train_counts)
    ev = RankingEvaluator(cats, counts)
    pop = RankingEvaluator(cats, counts) if popular else None
    counts = counts.to(device)
    chunked = tables.n_items > item_chunk
    table = model.item_table() if chunked else None  # (N + 1, D), once
    pop_scores = popularity_scores(counts, 1)[0] if chunked and popular else None  # (N + 1,)
    was_training = model.training
    model.eval()
    for _, batch in progress(batches, None, f"evaluate {prefix}"):
        batch = batch.to(device)
        targets = batch.targets[:, -1]
        if chunked:
            h = model.user_embedding(batch, table)  # (B, D)
            scorer = _model_scorer(model, table, h, batch.items)
            _update_chunked(ev, scorer, targets, batch.items, item_chunk)
            if pop is not None and pop_scores is not None:
                pop_scorer = _popular_scorer(pop_scores, len(targets))
                _update_chunked(pop, pop_scorer, targets, batch.items, item_chunk)
            continue
        ev.update(model.score_next(batch).float(), targets, batch.items)  # bf16 models too
        if pop is not None:
            pop.update(popularity_scores(counts, batch.size), targets, batch.items)
    model.train(was_training)
    if merge_ranks:
        ev = _merged_over_ranks(ev)
        pop = _merged_over_ranks(pop) if pop is not None else None
    out = ev.compute(prefix)
    if pop is not None:
        out |= {f"popular.{k}": v for k, v in pop.compute(prefix).items()}
    return out


# A scorer gives one batch's scores: chunk(lo, hi) -> (B, hi - lo) for items lo..hi-1, and
# at(idx (B, M)) -> (B, M) for given items; both the same numbers `score_next` would give.
Scorer = tuple[Callable[[int, int], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def _model_scorer(model, table: torch.Tensor, h: torch.Tensor, items: torch.Tensor) -> Scorer:
    """The model's own interest logits (`Recommender.next_item_scores`), by item range or for
    given items, in fp32 like the unchunked path's `.float()`."""

    def chunk(lo: int, hi: int) -> torch.Tensor:
        return model.next_item_scores(h, items, table, lo, hi).float()

    def at(idx: torch.Tensor) -> torch.Tensor:
        return model.next_item_scores_at(h, items, table, idx).float()

    return chunk, at


def _popular_scorer(pop: torch.Tensor, n_users: int) -> Scorer:
    """The most-popular baseline's scores (user-independent), as a scorer."""
    return (lambda lo, hi: pop[lo:hi].expand(n_users, -1)), (lambda idx: pop[idx])


def _update_chunked(
    ev: RankingEvaluator,
    scorer: Scorer,
    targets: torch.Tensor,
    history: torch.Tensor,
    item_chunk: int,
) -> None:
    """Rank every item 1..N chunk by chunk for one batch and add the result to `ev`."""
    chunk, at = scorer
    targets = targets.long()
    n_users, k = len(targets), min(ev.diversity_k, ev.n_items)
    target_scores = at(targets[:, None])  # (B, 1)
    if torch.isnan(target_scores).any():
        raise ValueError("scores: NaN at a target item; cannot rank it")
    exclude = exclusion_set(history.long(), targets)  # (B, T) distinct, 0 = none
    rows = torch.arange(n_users, device=targets.device)
    ahead = torch.zeros(n_users, dtype=torch.long, device=targets.device)  # other items >= t
    ahead_excluded = torch.zeros_like(ahead)  # of which history items (the unseen protocol)
    tops = [empty_top(n_users, k, target_scores) for _ in range(2)]  # full, unseen
    for lo in range(1, ev.n_items + 1, item_chunk):
        hi = min(lo + item_chunk, ev.n_items + 1)
        s = chunk(lo, hi)  # (B, C)
        ge = s >= target_scores  # (B, C)
        mine = (targets >= lo) & (targets < hi)  # the target itself is the "1 +"
        ge[rows[mine], targets[mine] - lo] = False
        excluded = in_chunk(exclude, lo, hi)  # (B, C) history items of the chunk
        ahead += ge.sum(1)
        ahead_excluded += (ge & excluded).sum(1)
        tops[0] = merge_top(tops[0], s, lo, k)
        tops[1] = merge_top(tops[1], s.masked_fill(excluded, float("-inf")), lo, k)
    ranks = 1 + ahead  # (B,)
    # Fewer than k items left after the exclusions: the surplus slots hold 0 (rec.metrics).
    unseen_top = tops[1][1].masked_fill(torch.isneginf(tops[1][0]), 0)
    ev.update_ranked(ranks, tops[0][1], ranks - ahead_excluded, unseen_top)


def in_chunk(exclude: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(B, T) item ids to exclude (0 = none) -> (B, hi - lo) bool: the chunk's columns whose item
    is in the row's set."""
    inside = (exclude >= lo) & (exclude < hi)  # (B, T); 0 (none) is never inside
    mask = torch.zeros(len(exclude), hi - lo, dtype=torch.bool, device=exclude.device)
    rows = torch.arange(len(exclude), device=exclude.device)[:, None].expand_as(exclude)
    mask[rows[inside], exclude[inside] - lo] = True
    return mask


def empty_top(n_users: int, k: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.full((n_users, 0), float("-inf"), dtype=like.dtype, device=like.device)
    return values, torch.zeros((n_users, 0), dtype=torch.long, device=like.device)


def merge_top(
    top: tuple[torch.Tensor, torch.Tensor], s: torch.Tensor, lo: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k: the best k of (values, item indices) so far and this chunk's scores."""
    part = s.topk(min(k, s.shape[1]), dim=1)  # (B, <=k)
    values = torch.cat([top[0], part.values], dim=1)
    items = torch.cat([top[1], part.indices + lo], dim=1)
    best = values.topk(min(k, values.shape[1]), dim=1)
    return best.values, items.gather(1, best.indices)


def _merged_over_ranks(ev: RankingEvaluator) -> RankingEvaluator:
    """Every rank's evaluator merged into one (the same on every rank); itself when alone."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return ev
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, ev)
    merged = parts[0]
    for other in parts[1:]:
        merged.merge(other)
    return merged
