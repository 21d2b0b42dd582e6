"""Full-ranking evaluation of a model over batches (plain torch, no Ray).

    rows = collate(load_examples(prepared, "test", model.cfg.max_len))
    metrics = evaluate(model, length_batches(rows, 256), tables, "test", popular=True)

Used by the Ray Train loop for per-epoch validation (each rank its shard, merged), by the final
test evaluation on the serving export and by the re-ranking frontier.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from rec.data.batch import Batch
from rec.data.splits import ItemTables
from rec.metrics import RankingEvaluator, popularity_scores


@torch.no_grad()
def evaluate(
    model,
    batches: Iterable[tuple[np.ndarray, Batch]],
    tables: ItemTables,
    prefix: str,
    popular: bool = False,
    merge_ranks: bool = False,
) -> dict[str, float]:
    """Full-ranking metrics of `model.score_next` over eval batches, both protocols.

    batches: (row indices, Batch) pairs as `rec.data.batch.length_batches` yields them (the
        indices are not needed: metrics do not depend on the row order).
    popular: also the most-popular baseline (train counts) under `popular.<prefix>`.
    merge_ranks: every torch.distributed rank evaluated its own shard; merge them all first.
    """
    device = next(model.parameters()).device  # batches follow the model (CPU or GPU)
    cats = torch.as_tensor(tables.categories)
    counts = torch.as_tensor(tables.train_counts)
    ev = RankingEvaluator(cats, counts)
    pop = RankingEvaluator(cats, counts) if popular else None
    counts = counts.to(device)
    was_training = model.training
    model.eval()
    for _, batch in batches:
        batch = batch.to(device)
        targets = batch.targets[:, -1]
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
