"""The one batching path (rec/data/batch.py): Batch.take / cat, left_pad, trim_padding and
the length-bucketed iterator that training, evaluation and the RL world share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rec.data.batch import Batch, left_pad, length_batches, trim_padding


def rows_with_ids(lengths: list[int], width: int = 8) -> Batch:
    """Row i: `lengths[i]` real items equal to i + 1, and i + 1 in every column of the other
    fields (so a row names itself, even an empty one)."""
    items = torch.as_tensor(
        left_pad([np.full(min(n, width), i + 1) for i, n in enumerate(lengths)], width)
    )
    ids = torch.arange(1, len(lengths) + 1)[:, None].expand(len(lengths), width).contiguous()
    return Batch(items, ids, ids.clone(), ids.clone(), ids.clone())


def row_ids(batch: Batch) -> list[int]:
    return (batch.targets[:, 0] - 1).tolist()


def lengths_of(batch: Batch) -> list[int]:
    return (batch.items > 0).sum(1).tolist()


def test_take_and_cat_keep_fields_aligned():
    rows = rows_with_ids([1, 2, 3, 4, 5])
    part = rows.take(np.array([4, 0, 2]))
    assert row_ids(part) == [4, 0, 2] and part.size == 3
    assert all(torch.equal(part.targets, v) for v in (part.behaviors, part.gaps))
    assert torch.equal(part.items, rows.items[[4, 0, 2]])
    both = Batch.cat([part, rows.take([1, 3])])
    assert row_ids(both) == [4, 0, 2, 1, 3]
    with pytest.raises(ValueError, match="at least one"):
        Batch.cat([])


def test_left_pad_right_aligns_and_keeps_the_most_recent():
    out = left_pad([np.array([1, 2, 3, 4]), np.array([], dtype=np.int64), [7]], 3)
    assert out.tolist() == [[2, 3, 4], [0, 0, 0], [0, 0, 7]] and out.dtype == np.int64


def test_trim_padding_drops_only_all_padding_columns():
    items = torch.as_tensor(left_pad([[1], [2, 2]], 5))  # (2, 5)
    targets = torch.zeros_like(items)
    targets[0, 2] = 9  # a target column counts as used
    rows = Batch(items, items, items, targets, targets)
    trimmed = trim_padding(rows)
    assert trimmed.items.tolist() == [[0, 0, 1], [0, 2, 2]] and trimmed.targets[0, 0] == 9
    empty = Batch(*(torch.zeros(2, 3, dtype=torch.long) for _ in range(5)))
    assert trim_padding(empty).items.shape == (2, 3)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 8), min_size=0, max_size=40),
    st.integers(1, 7),
    st.one_of(st.none(), st.integers(1, 20)),
    st.one_of(st.none(), st.integers(0, 2**16)),
)
def test_length_batches_yield_every_row_once_with_its_index(lengths, batch_size, bucket, seed):
    rows = rows_with_ids(lengths)
    rng = None if seed is None else np.random.default_rng(seed)
    got = list(length_batches(rows, batch_size, rng, bucket_rows=bucket))
    seen = [i for idx, _ in got for i in idx.tolist()]
    assert sorted(seen) == list(range(len(lengths)))  # every row exactly once
    for idx, batch in got:
        assert row_ids(batch) == idx.tolist() and 1 <= batch.size <= batch_size
        assert idx.dtype == np.int64
    if seed is None and bucket is None:  # the eval order: every row sorted by length
        flat = [n for _, b in got for n in lengths_of(b)]
        assert flat == sorted(flat) and seen == sorted(seen, key=lambda i: (lengths[i], i))
    # Within a bucket the batches cover disjoint length ranges (sorted, then cut).
    step = bucket or max(1, len(lengths))
    per_bucket = -(-step // batch_size)
    for start in range(0, len(got), per_bucket):
        spans = sorted(
            (min(lengths_of(b)), max(lengths_of(b))) for _, b in got[start : start + per_bucket]
        )
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False))


def test_length_batches_seeded_order_is_reproducible_and_matches_the_reference():
    lengths = list(np.random.default_rng(5).integers(0, 9, 97))
    rows = rows_with_ids(lengths)

    def order(seed):
        rng = np.random.default_rng(seed)  # two epochs from one rng, as the training loop does
        return [idx.tolist() for _ in range(2) for idx, _ in length_batches(rows, 4, rng, 16)]

    assert order(3) == order(3) and order(3) != order(4)
    # The pre-refactor training order, written out: permute rows, cut into buckets, sort each
    # bucket by length (stable), cut into batches, permute the batches of each bucket.
    rng, expected = np.random.default_rng(3), []
    lens = np.asarray(lengths)
    for _ in range(2):
        perm = rng.permutation(len(lens))
        for s in range(0, len(lens), 16):
            chunk = perm[s : s + 16]
            chunk = chunk[np.argsort(lens[chunk], kind="stable")]
            parts = [chunk[i : i + 4] for i in range(0, len(chunk), 4)]
            expected += [parts[j].tolist() for j in rng.permutation(len(parts))]
    assert order(3) == expected


def test_length_batches_over_a_stream_count_rows_across_chunks():
    rows = rows_with_ids([3, 1, 2, 5, 4, 1, 2])
    chunks = [rows.take(np.arange(0, 4)), rows.take(np.arange(4, 7))]
    got = list(length_batches(iter(chunks), 2))
    assert [idx.tolist() for idx, _ in got] == [[1, 2], [0, 3], [5, 6], [4]]  # chunk = bucket
    for idx, batch in got:
        assert row_ids(batch) == idx.tolist()
