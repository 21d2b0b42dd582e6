"""Prepared splits in memory (plain numpy/polars, no Ray): the catalogue tables the model and
the metrics need, and a whole split as padded examples.

    tables = load_item_tables("outputs/beauty/data")     # categories, train counts, meta.json
    rows = collate(load_examples("outputs/beauty/data", "test", max_len=50))  # Batch (U, 50)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rec import storage
from rec.data.batch import make_examples
from rec.data.outputs import item_category_table


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
    """prepared_dir: a local path or a URI (rec/storage.py)."""
    meta = json.loads(storage.read_text(storage.join(prepared_dir, "meta.json")))
    items = storage.read_parquet(storage.join(prepared_dir, "vocab", "items.parquet"))
    categories = item_category_table(items, max(1, meta["max_categories_per_item"]))
    train = storage.read_parquet(storage.join(prepared_dir, "train"), columns=["items"])
    flat = train["items"].explode().drop_nulls().to_numpy()
    counts = np.bincount(flat, minlength=categories.shape[0]).astype(np.int64)
    return ItemTables(categories, counts, meta)


def load_examples(prepared_dir: str | Path, split: str, max_len: int) -> dict[str, np.ndarray]:
    """A whole split as padded example arrays (B, max_len), rows sorted by user_id (small
    splits, single process; `collate` makes them a Batch)."""
    frame = storage.read_parquet(storage.join(prepared_dir, split)).sort("user_id")
    return make_examples(frame.to_dict(as_series=False), max_len)
