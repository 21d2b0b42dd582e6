"""Per-user work on one hash partition of users, and the global vocabularies (polars, no Ray).

The prepare pipeline partitions events by a hash of the user id, so each partition ("bucket")
holds whole users and every per-user step runs locally on it:

    clean_bucket      dedupe, sort by time, drop users too short to split
    item_stats        partial item counts of a bucket, merged by `build_vocab`
    kcore_counts      one pass of iterated k-core filtering
    build_sequences   per-user sequences of vocabulary indices, most recent max_len + 2 kept
    split_views       leave-last-out: train / valid / test rows

Vocabularies give index 0 to padding and number items (and categories) from 1 by decreasing
count, ties by raw id, so the index order is the popularity order.
"""

from __future__ import annotations

import polars as pl

from rec.data.schema import BEHAVIOR_TOKENS, RATING_HIGH_THRESHOLD

EVENT_KEY = ["user_id", "item_id", "behavior", "timestamp"]


def bucket_expr(n_buckets: int) -> pl.Expr:
    """The hash partition of a user (stable within one polars version)."""
    return (pl.col("user_id").hash(seed=17) % n_buckets).cast(pl.Int32).alias("bucket")


def clean_bucket(
    events: pl.DataFrame, dedupe: bool, min_user_events: int
) -> tuple[pl.DataFrame, dict]:
    """Sort each user's events by (timestamp, read order); drop exact duplicates and short users."""
    n_in = events.height
    events = events.sort(["user_id", "timestamp", "seq_no"])
    if dedupe:
        events = events.unique(subset=EVENT_KEY, keep="first", maintain_order=True)
    n_dedup = events.height
    counts = events.group_by("user_id").len()
    short = counts.filter(pl.col("len") < min_user_events)
    events = events.join(short.select("user_id"), on="user_id", how="anti", maintain_order="left")
    info = {
        "rows_in": n_in,
        "duplicates_removed": n_in - n_dedup,
        "users_too_short": short.height,
        "events_of_short_users": int(short["len"].sum() or 0),
    }
    return events, info


def item_stats(events: pl.DataFrame) -> pl.DataFrame:
    """(item_id, count, category_ids) over a bucket's events; categories from the first event."""
    return events.group_by("item_id", maintain_order=True).agg(
        pl.len().cast(pl.Int64).alias("count"), pl.col("category_ids").first()
    )


def kcore_counts(
    events: pl.DataFrame, items: pl.DataFrame, k: int, min_user_events: int
) -> pl.DataFrame:
    """One k-core pass on a bucket: keep events of `items`, then users with enough events;
    return the item counts that remain."""
    kept = events.join(items.select("item_id"), on="item_id", how="semi")
    users = kept.group_by("user_id").len().filter(pl.col("len") >= max(k, min_user_events))
    kept = kept.join(users.select("user_id"), on="user_id", how="semi")
    return item_stats(kept)


def build_vocab(stats: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Item and category vocabularies from merged item stats.

    items:      item_idx (1..), item_id, count, category_idx (list of category indices)
    categories: category_idx (1..), category_id, count (events of items in the category)
    """
    cats = (
        stats.select("category_ids", "count")
        .explode("category_ids")
        .drop_nulls("category_ids")
        .group_by("category_ids")
        .agg(pl.col("count").sum())
        .rename({"category_ids": "category_id"})
        .sort(["count", "category_id"], descending=[True, False])
        .with_row_index("category_idx", offset=1)
        .with_columns(pl.col("category_idx").cast(pl.Int32))
    )
    cat_map = dict(zip(cats["category_id"].to_list(), cats["category_idx"].to_list(), strict=True))
    items = (
        stats.sort(["count", "item_id"], descending=[True, False])
        .with_row_index("item_idx", offset=1)
        .with_columns(
            pl.col("item_idx").cast(pl.Int32),
            pl.col("category_ids")
            .list.eval(pl.element().replace_strict(cat_map, return_dtype=pl.Int32, default=None))
            .list.drop_nulls()
            .alias("category_idx"),
        )
        .select("item_idx", "item_id", "count", "category_idx", "category_ids")
    )
    return items, cats.select("category_idx", "category_id", "count")


def behavior_token() -> pl.Expr:
    """Canonical (behavior, value) -> behavior token; ratings split at RATING_HIGH_THRESHOLD."""
    plain = pl.col("behavior").replace_strict(BEHAVIOR_TOKENS, default=0, return_dtype=pl.Int8)
    rating = (
        pl.when(pl.col("value") >= RATING_HIGH_THRESHOLD)
        .then(pl.lit(BEHAVIOR_TOKENS["rating_high"], pl.Int8))
        .otherwise(pl.lit(BEHAVIOR_TOKENS["rating_low"], pl.Int8))
    )
    return pl.when(pl.col("behavior") == "rating").then(rating).otherwise(plain)


def build_sequences(
    events: pl.DataFrame, item_index: pl.DataFrame, max_len: int, min_user_events: int
) -> pl.DataFrame:
    """Events of whole users -> one row per user with time-ordered lists.

    Columns: user_id, items (list<int32> vocab indices), behaviors (list<int8> tokens),
    timestamps (list<int64>), n_events (events before truncation). Items outside the
    vocabulary (k-core) are dropped first; users left with < min_user_events are dropped.
    """
    ev = (
        events.join(item_index.select("item_id", "item_idx"), on="item_id", how="inner")
        .with_columns(behavior_token().alias("token"))
        .sort(["user_id", "timestamp", "seq_no"])
    )
    seqs = ev.group_by("user_id", maintain_order=True).agg(
        pl.col("item_idx").alias("items"),
        pl.col("token").alias("behaviors"),
        pl.col("timestamp").alias("timestamps"),
        pl.len().cast(pl.Int64).alias("n_events"),
    )
    keep = max_len + 2
    return seqs.filter(pl.col("n_events") >= min_user_events).with_columns(
        pl.col(c).list.tail(keep) for c in ("items", "behaviors", "timestamps")
    )


def split_views(seqs: pl.DataFrame, max_len: int) -> dict[str, pl.DataFrame]:
    """Leave-last-out: test target = last event, valid target = second to last, train = rest.

    train: user_id, items/behaviors/timestamps = seq[:-2] (the model predicts each next item)
    valid: history = seq[:-2][-max_len:], target_* = seq[-2]
    test:  history = seq[:-1][-max_len:], target_* = seq[-1]
    """
    cols = ("items", "behaviors", "timestamps")
    n = pl.col("items").list.len()
    train = seqs.select("user_id", "n_events", *[pl.col(c).list.head(n - 2) for c in cols])

    def held_out(drop: int) -> pl.DataFrame:
        history = [pl.col(c).list.head(n - drop).list.tail(max_len) for c in cols]
        targets = [
            pl.col(c).list.get(-drop).alias(f"target_{c[:-1]}")
            for c in ("items", "behaviors", "timestamps")
        ]
        return seqs.select("user_id", "n_events", *history, *targets)

    return {"train": train, "valid": held_out(2), "test": held_out(1)}
