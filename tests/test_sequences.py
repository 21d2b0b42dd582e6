"""Per-user sequence building and the leave-last-out split (pure polars)."""

from __future__ import annotations

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from rec.data.batch import gap_tokens, make_examples
from rec.data.schema import BEHAVIOR_TOKENS
from rec.data.sequences import build_sequences, build_vocab, clean_bucket, item_stats, split_views


def events_frame(rows):
    return pl.DataFrame(
        rows,
        schema={
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "behavior": pl.String,
            "timestamp": pl.Int64,
        },
        orient="row",
    ).with_columns(
        pl.lit([7], pl.List(pl.Int64)).alias("category_ids"),
        pl.lit(None, pl.Float32).alias("value"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("seq_no"),
    )


def prepared(rows, max_len=50, min_events=3):
    clean, info = clean_bucket(events_frame(rows), True, min_events)
    items, _ = build_vocab(item_stats(clean))
    seqs = build_sequences(clean, items, max_len, min_events)
    return items, seqs, split_views(seqs, max_len), info


def test_leave_last_out_by_hand():
    # user 1 events out of order in the file; user 2 too short to split.
    rows = [
        (1, 30, "pv", 3),
        (1, 10, "pv", 1),
        (1, 20, "cart", 2),
        (1, 40, "buy", 4),
        (1, 50, "pv", 5),
        (2, 10, "pv", 9),
    ]
    items, seqs, views, info = prepared(rows)
    idx = dict(zip(items["item_id"], items["item_idx"], strict=True))
    assert info["users_too_short"] == 1
    assert views["train"].row(0, named=True)["items"] == [idx[10], idx[20], idx[30]]
    valid = views["valid"].row(0, named=True)
    assert valid["items"] == [idx[10], idx[20], idx[30]] and valid["target_item"] == idx[40]
    assert valid["target_behavior"] == BEHAVIOR_TOKENS["buy"]
    test = views["test"].row(0, named=True)
    assert test["items"] == [idx[10], idx[20], idx[30], idx[40]] and test["target_item"] == idx[50]
    assert test["behaviors"] == [1, 2, 1, 4] and test["timestamps"] == [1, 2, 3, 4]


def test_duplicates_removed_and_ties_keep_file_order():
    rows = [
        (1, 10, "pv", 1),
        (1, 10, "pv", 1),
        (1, 11, "pv", 1),
        (1, 12, "pv", 1),
        (1, 13, "pv", 2),
    ]
    items, seqs, _, info = prepared(rows)
    assert info["duplicates_removed"] == 1
    idx = dict(zip(items["item_id"], items["item_idx"], strict=True))
    assert seqs.row(0, named=True)["items"] == [idx[i] for i in (10, 11, 12, 13)]


def test_vocab_is_popularity_ordered_with_padding_zero():
    rows = (
        [(u, 5, "pv", u) for u in range(4)]
        + [(u, 6, "pv", 10 + u) for u in range(3)]
        + [(0, 7, "pv", 50)] * 1
    )
    clean, _ = clean_bucket(events_frame(rows), True, 1)
    items, cats = build_vocab(item_stats(clean))
    assert items["item_id"].to_list() == [5, 6, 7] and items["item_idx"].to_list() == [1, 2, 3]
    assert cats["category_idx"].to_list() == [1] and items["category_idx"].to_list() == [[1]] * 3


event = st.tuples(
    st.integers(0, 5),
    st.integers(0, 30),
    st.sampled_from(["pv", "cart", "fav", "buy"]),
    st.integers(0, 40),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(event, min_size=0, max_size=120), st.integers(1, 8))
def test_sequence_properties(rows, max_len):
    items, seqs, views, _ = prepared(rows, max_len=max_len)
    frame = events_frame(rows).unique(subset=["user_id", "item_id", "behavior", "timestamp"])
    counts = dict(frame.group_by("user_id").len().iter_rows())
    assert sorted(seqs["user_id"]) == sorted(u for u, n in counts.items() if n >= 3)
    for row in seqs.iter_rows(named=True):
        n = counts[row["user_id"]]
        assert row["n_events"] == n and len(row["items"]) == min(n, max_len + 2)
        assert row["timestamps"] == sorted(row["timestamps"])  # time order
        assert all(1 <= i <= items.height for i in row["items"])  # 0 is padding only
    for tr, va, te in zip(
        *(views[s].iter_rows(named=True) for s in ("train", "valid", "test")), strict=True
    ):
        assert tr["user_id"] == va["user_id"] == te["user_id"]
        assert len(va["items"]) <= max_len and len(te["items"]) <= max_len
        assert te["items"][-1] == va["target_item"]  # test history ends with the valid target
        assert va["items"] == tr["items"][-max_len:]
        assert len(tr["items"]) >= 1


def test_make_examples_shift_and_left_pad():
    batch = {
        "items": [np.array([3, 4, 5])],
        "behaviors": [np.array([1, 2, 1])],
        "timestamps": [np.array([0, 1, 9])],
    }
    ex = make_examples(batch, max_len=4)
    assert ex["items"].tolist() == [[0, 0, 3, 4]] and ex["targets"].tolist() == [[0, 0, 4, 5]]
    assert ex["target_behaviors"].tolist() == [[0, 0, 2, 1]]
    batch |= {"target_item": [7], "target_behavior": [4]}
    ex = make_examples(batch, max_len=4)
    assert ex["items"].tolist() == [[0, 3, 4, 5]] and ex["targets"].tolist() == [[0, 0, 0, 7]]
    assert gap_tokens(np.array([5, 5, 6, 1000])).tolist() == [1, 2, 3, 12]
