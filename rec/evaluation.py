"""Prepared splits in memory, batching, and full-ranking evaluation (plain torch, no Ray).

Used by the Ray Train loop for per-epoch validation, by the final test evaluation on the
serving export, by the bare-PyTorch benchmark and by the re-ranking frontier.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from rec.data.batch import Batch, collate, make_examples
from rec.data.outputs import item_category_table
from rec.heads import Recommender
from rec.metrics import RankingEvaluator, popularity_scores
from rec.model import DataDims, ModelConfig


@dataclass
class ItemTables:
    """What evaluation and the model need about the catalogue, from a prepared directory."""

    categories: np.ndarray  # (n_items + 1, C) int64 category indices, 0-padded
    train_counts: np.ndarray  # (n_items + 1,) int64 interactions in the train split
    meta: dict  # meta.json of the prepared data

    @property
    def n_items(self) -> int:
        return self.categories.shape[0] - 1


def load_item_tables(prepared_dir: str | Path) -> ItemTables:
    prepared_dir = Path(prepared_dir)
    meta = json.loads((prepared_dir / "meta.json").read_text())
    items = pl.read_parquet(prepared_dir / "vocab" / "items.parquet")
    categories = item_category_table(items, max(1, meta["max_categories_per_item"]))
    train = pl.read_parquet(prepared_dir / "train" / "*.parquet", columns=["items"])
    flat = train["items"].explode().drop_nulls().to_numpy()
    counts = np.bincount(flat, minlength=categories.shape[0]).astype(np.int64)
    return ItemTables(categories, counts, meta)


def build_recommender(cfg: ModelConfig, tables: ItemTables) -> Recommender:
    """A fresh model sized for the prepared data, with the sampled-softmax proposal set."""
    dims = DataDims(
        n_items=tables.n_items,
        n_categories=tables.meta["n_categories"],
        has_engaged=tables.meta["has_engaged_behaviors"],
    )
    rec = Recommender(cfg, dims, torch.as_tensor(tables.categories))
    rec.set_proposal(torch.as_tensor(tables.train_counts))
    return rec


def load_examples(prepared_dir: str | Path, split: str, max_len: int) -> dict[str, np.ndarray]:
    """A whole split as padded example arrays (B, max_len) (small splits, single process)."""
    frame = pl.read_parquet(Path(prepared_dir) / split / "*.parquet").sort("user_id")
    return make_examples(frame.to_dict(as_series=False), max_len)


def iter_batches(
    examples: dict[str, np.ndarray],
    batch_size: int,
    rng: np.random.Generator | None = None,
    length_buckets: int = 1,
) -> Iterator[Batch]:
    """Batches over example arrays; shuffled if `rng` is given.

    length_buckets > 1 groups rows of similar length: shuffle, cut into groups of
    `batch_size * length_buckets` rows, sort each group by length, split it into batches and
    shuffle the batch order. Left padding is then mostly trimmed away (Beauty's median
    history is 6 events in a 50-wide window), for the same examples per epoch.
    """
    n = len(examples["items"])
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if length_buckets > 1:
        lengths = (examples["items"] > 0).sum(1)
        group = batch_size * length_buckets
        chunks = []
        for s in range(0, n, group):
            idx = order[s : s + group]
            idx = idx[np.argsort(lengths[idx], kind="stable")]
            chunks += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        if rng is not None:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    else:
        chunks = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    for idx in chunks:
        yield collate({k: v[idx] for k, v in examples.items()})


def eval_batches(examples: dict[str, np.ndarray], batch_size: int) -> Iterator[Batch]:
    """All rows sorted by history length, then batched: eval scores don't depend on order,
    and sorted batches carry ~6x fewer padded tokens on Beauty."""
    return iter_batches(examples, batch_size, None, length_buckets=len(examples["items"]) + 1)


@torch.no_grad()
def evaluate(
    model, batches, tables: ItemTables, prefix: str, popular: bool = False
) -> dict[str, float]:
    """Full-ranking metrics of `model.score_next` over eval batches, both protocols.

    With popular=True, also the most-popular baseline (train counts) under `popular.<prefix>`.
    """
    device = next(model.parameters()).device  # batches follow the model (CPU or GPU)
    cats = torch.as_tensor(tables.categories)
    counts = torch.as_tensor(tables.train_counts)
    ev = RankingEvaluator(cats, counts)
    pop = RankingEvaluator(cats, counts) if popular else None
    counts = counts.to(device)
    was_training = model.training
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        targets = batch.targets[:, -1]
        ev.update(model.score_next(batch), targets, batch.items)
        if pop is not None:
            pop.update(popularity_scores(counts, batch.size), targets, batch.items)
    model.train(was_training)
    out = ev.compute(prefix)
    if pop is not None:
        out |= {f"popular.{k}": v for k, v in pop.compute(prefix).items()}
    return out
