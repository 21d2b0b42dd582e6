"""What serving knows about items and users, from a train job's output directory (no Ray).
Local folders only: serve/cache.py makes the node-local copy of a URI first.

    catalog = Catalog.load("outputs/beauty/export")       # vocab/ + data_meta.json
    idx, unknown = catalog.to_indices([301, 775, 999999])  # raw ids -> indices; unknowns reported
    users = UserHistories.load("outputs/beauty/data")      # optional: user_id -> logged history

Item indices are the model's (1..n_items, 0 = padding); raw ids are the source's. Requests
carry item ids only, so their history events get the behavior token the prepared data names in
its meta ("request_behavior", written by prepare from the dataset format's reader: the plain
interaction, e.g. "pv" for Taobao, "review" for Amazon, "rating_high" for MovieLens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from rec.data.outputs import item_category_table
from rec.data.schema import BEHAVIOR_TOKENS


@dataclass
class Catalog:
    """Item vocabulary, categories and popularity of one export.

    item_ids (n_items + 1,) int64 raw id per index (row 0: -1); categories (n_items + 1, C)
    int64 category indices, 0-padded; category_ids (n_categories + 1,) int64 raw id per category
    index; counts (n_items + 1,) int64 interactions per item in the prepared log (row 0: 0).
    """

    item_ids: np.ndarray
    categories: np.ndarray
    category_ids: np.ndarray
    counts: np.ndarray
    behavior: int  # behavior token for request history events
    index_of: dict[int, int]  # raw item id -> index

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @classmethod
    def load(cls, export_dir: str | Path) -> Catalog:
        export_dir = Path(export_dir)
        for name in ("vocab/items.parquet", "vocab/categories.parquet", "data_meta.json"):
            if not (export_dir / name).is_file():
                raise ValueError(f"export {str(export_dir)!r} has no {name}")
        meta = json.loads((export_dir / "data_meta.json").read_text())
        items = pl.read_parquet(export_dir / "vocab" / "items.parquet").sort("item_idx")
        cats = pl.read_parquet(export_dir / "vocab" / "categories.parquet").sort("category_idx")
        if items["item_idx"].to_list() != list(range(1, items.height + 1)):
            raise ValueError(f"{export_dir}/vocab/items.parquet: item_idx is not 1..n_items")
        item_ids = np.concatenate([[-1], items["item_id"].to_numpy()]).astype(np.int64)
        category_ids = np.zeros(cats.height + 1, dtype=np.int64)
        category_ids[cats["category_idx"].to_numpy()] = cats["category_id"].to_numpy()
        counts = np.concatenate([[0], items["count"].to_numpy()]).astype(np.int64)
        table = item_category_table(items, max(1, meta["max_categories_per_item"]))
        behavior = request_behavior(meta, export_dir / "data_meta.json")
        index_of = {int(raw): i for i, raw in enumerate(item_ids[1:].tolist(), start=1)}
        return cls(item_ids, table, category_ids, counts, behavior, index_of)

    def to_indices(self, raw_ids: list[int]) -> tuple[np.ndarray, list[int]]:
        """Raw ids -> ((L,) int64 indices of the known ones, in order; the unknown raw ids)."""
        known, unknown = [], []
        for raw in raw_ids:
            idx = self.index_of.get(raw)
            if idx is None:
                unknown.append(raw)
            else:
                known.append(idx)
        return np.asarray(known, dtype=np.int64), unknown

    def raw_categories(self, idx: int) -> list[int]:
        """Raw category ids of item index `idx` (its category slots without padding)."""
        row = self.categories[idx]
        return self.category_ids[row[row > 0]].tolist()

    def describe(self, idx: int) -> dict:
        """The public description of one item: raw id, categories, popularity."""
        return {
            "id": int(self.item_ids[idx]),
            "categories": self.raw_categories(idx),
            "popularity": int(self.counts[idx]),
        }


def request_behavior(meta: dict, path: Path) -> int:
    """The behavior token of request history events, from the prepared data's meta."""
    name = meta.get("request_behavior")
    if name is None:
        raise ValueError(
            f"{path} has no 'request_behavior' key (the behavior token name request events "
            "get); prepare the data again with the current jobs.prepare"
        )
    if name not in BEHAVIOR_TOKENS:
        raise ValueError(
            f"{path}: request_behavior={name!r} is not a behavior token; "
            f"known: {sorted(BEHAVIOR_TOKENS)}"
        )
    return BEHAVIOR_TOKENS[name]


class UserHistories:
    """user_id -> the user's logged item indices in time order (train + valid + test events)."""

    def __init__(self, histories: dict[int, np.ndarray]) -> None:
        self._histories = histories

    def __len__(self) -> int:
        return len(self._histories)

    def get(self, user_id: int) -> np.ndarray | None:
        """(L,) int64 item indices, or None for a user the log does not know."""
        return self._histories.get(user_id)

    @classmethod
    def load(cls, prepared_dir: str | Path | None, max_len: int) -> UserHistories:
        """From a prepared directory's test split (history + held-out item = the whole log);
        an absent directory gives an empty store (every user is then a cold start)."""
        if prepared_dir is None or not (Path(prepared_dir) / "test").is_dir():
            return cls({})
        return cls.from_split(Path(prepared_dir) / "test", max_len)

    @classmethod
    def from_split(cls, test_dir: str | Path | None, max_len: int) -> UserHistories:
        """From a local test split folder (parquet files); None gives an empty store."""
        if test_dir is None:
            return cls({})
        frame = pl.read_parquet(
            Path(test_dir) / "*.parquet", columns=["user_id", "items", "target_item"]
        )
        histories = {}
        for user, items, target in frame.iter_rows():
            seq = np.asarray([*items, target], dtype=np.int64)
            histories[int(user)] = seq[-max_len:]
        return cls(histories)
