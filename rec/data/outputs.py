"""The prepared-data directory: layout, vocabularies, stats. Shared by the Ray and local paths.

<output_dir>/
  train/ valid/ test/     parquet shards (rec/data/sequences.py: split_views)
  vocab/items.parquet     item_idx, item_id, count, category_idx, category_ids
  vocab/categories.parquet category_idx, category_id, count
  quarantine/             rows set aside, with source, offset, raw text and reason
  meta.json               what training and serving need: sizes, max_len, timestamp kind,
                          request_behavior (the token name serving gives request events)
  stats.json              counts of the run (no timings: equal input gives equal files)
  MANIFEST.json           every file's size and sha256 (rec/artifacts.py); jobs.prepare writes
                          all of this into a new version v-.../ of output_dir (CURRENT names it)
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from rec import storage
from rec.artifacts import MANIFEST
from rec.data.config import DataConfig
from rec.data.readers import get_format
from rec.data.schema import ENGAGED_TOKENS, QUARANTINE_REASONS

SPLITS = ("train", "valid", "test")
WORK_DIRS = ("_staging", "_clean", "_items", "_errors")


def reset_output(out: str) -> None:
    """Remove what an earlier run of prepare wrote here (not anything else). `out` is a local
    path or a URI (rec/storage.py), as everywhere in this module."""
    storage.check(out)
    storage.makedirs(out)
    names = (*SPLITS, "vocab", "quarantine", *WORK_DIRS, "stats.json", "meta.json", MANIFEST)
    for name in names:
        storage.delete(storage.join(out, name))


def write_vocab(out: str, items: pl.DataFrame, cats: pl.DataFrame) -> None:
    storage.write_parquet(items, storage.join(out, "vocab", "items.parquet"))
    storage.write_parquet(cats, storage.join(out, "vocab", "categories.parquet"))


def quarantine_counts(out: str) -> dict[str, int]:
    files = storage.glob(storage.join(out, "quarantine"), "*.parquet")
    counts = dict.fromkeys(QUARANTINE_REASONS, 0)
    if files:
        reasons = pl.concat([storage.read_parquet(f, ["reason"]) for f in files])
        agg = reasons.group_by("reason").len()
        for reason, n in agg.iter_rows():
            counts[reason] = int(n)
    return counts


def finish(
    out: str,
    cfg: DataConfig,
    rows_valid: int,
    clean_info: dict[str, int],
) -> dict:
    """Write meta.json and stats.json from what is now on disk; return the stats. Nothing
    run-dependent (timings, hosts) goes in: equal input and config give equal files."""
    items = storage.read_parquet(storage.join(out, "vocab", "items.parquet"))
    cats = storage.read_parquet(storage.join(out, "vocab", "categories.parquet"))
    users, interactions = 0, 0
    if storage.glob(storage.join(out, "test"), "*.parquet"):
        test = storage.read_parquet(storage.join(out, "test"), ["n_events"])
        users, interactions = test.height, test["n_events"].sum()
    engaged = any(  # file by file, stopping at the first hit (the driver never holds it all)
        storage.read_parquet(f, ["behaviors"])
        .select(pl.col("behaviors").explode().is_in(list(ENGAGED_TOKENS)).any())
        .item()
        for f in storage.glob(storage.join(out, "train"), "*.parquet")
    )
    quarantined = quarantine_counts(out)
    stats = {
        "rows_read": rows_valid + sum(quarantined.values()),
        "rows_valid": rows_valid,
        "rows_quarantined": sum(quarantined.values()),
        "quarantined_by_reason": quarantined,
        **clean_info,
        "n_users": int(users),
        "n_items": items.height,
        "n_categories": cats.height,
        "n_interactions": int(interactions or 0),
    }
    fmt = get_format(cfg.format)
    meta = {
        "format": cfg.format,
        "max_len": cfg.max_len,
        "timestamp_kind": fmt.timestamp_kind,
        "request_behavior": fmt.request_behavior,
        "n_items": items.height,
        "n_categories": cats.height,
        "max_categories_per_item": int(items["category_idx"].list.len().max() or 0),
        "has_engaged_behaviors": bool(engaged),
    }
    storage.write_text(storage.join(out, "meta.json"), json.dumps(meta, indent=2))
    storage.write_text(storage.join(out, "stats.json"), json.dumps(stats, indent=2))
    for name in WORK_DIRS:
        storage.delete(storage.join(out, name))
    return stats


def item_category_table(items: pl.DataFrame, max_categories: int | None = None) -> np.ndarray:
    """(n_items + 1, C) int64 category indices per item index, 0-padded; row 0 is padding."""
    cats = items.sort("item_idx")["category_idx"].to_list()
    width = max_categories or max((len(c) for c in cats), default=1) or 1
    table = np.zeros((len(cats) + 1, width), dtype=np.int64)
    for i, row in enumerate(cats, start=1):
        row = row[:width]
        table[i, : len(row)] = row
    return table
