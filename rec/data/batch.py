"""From prepared sequences to model batches: numpy examples, one collate to tensors, and the
one length-bucketed batch iterator that training, evaluation and the RL world share.

Prepared splits (written by `jobs.prepare`, see rec/data/sequences.py) hold one row per user:

    items       list<int32>  item indices (vocab, 0 = padding) in time order
    behaviors   list<int8>   behavior tokens (rec.data.schema.BEHAVIOR_TOKENS)
    timestamps  list<int64>  unix seconds, or positions where the source has only the order
    target_*    valid/test only: the held-out next event

`make_examples` turns a batch of such rows into fixed-length, left-padded numpy arrays
(it runs inside Ray Data's map_batches), and `collate` makes the typed tensor batch the
model takes. Models never see numpy.

    rows = collate(load_examples(prepared, "test", 50))       # Batch (U, 50)
    for idx, batch in length_batches(rows, 256):              # shortest histories first
        scores[idx] = model.score_next(batch)                 # idx: the batch's rows in `rows`
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

N_GAP_TOKENS = 24  # 0 pad, 1 first event / unknown gap, 2.. log2-bucketed seconds since previous
# Default users per forward pass where a model scores the whole catalogue outside training (the
# frontier, the simulator's world): the (B, n_items + 1) score matrix sets the memory.
SCORE_BATCH_SIZE = 256


@dataclass
class Batch:
    """A batch of left-padded sequences. Shapes: (B, T) int64 unless noted.

    items:            input item indices, 0 = padding
    behaviors:        input behavior tokens, 0 = padding
    gaps:             time-gap tokens (log2 seconds since the previous event), 0 = padding
    targets:          the next item at each position, 0 = no target there
    target_behaviors: the behavior token of that next event, 0 = no target
    """

    items: torch.Tensor
    behaviors: torch.Tensor
    gaps: torch.Tensor
    targets: torch.Tensor
    target_behaviors: torch.Tensor

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The same fn applied to every field (all fields share the (B, T) layout)."""
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str) -> Batch:
        return self.map(lambda v: v.to(device, non_blocking=True))

    def take(self, idx: np.ndarray | torch.Tensor) -> Batch:
        """Rows `idx` ((K,) int positions) of every field -> a Batch (K, T)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.map(lambda v: v[idx])

    @staticmethod
    def cat(batches: Sequence[Batch]) -> Batch:
        """Batches of the same width T, rows stacked in order -> (sum B, T)."""
        if not batches:
            raise ValueError("Batch.cat needs at least one batch, got none")
        return Batch(
            **{
                f.name: torch.cat([getattr(b, f.name) for b in batches])
                for f in dataclasses.fields(Batch)
            }
        )

    @property
    def size(self) -> int:
        return int(self.items.shape[0])


def gap_tokens(timestamps: np.ndarray) -> np.ndarray:
    """(N,) int64 timestamps of one sequence -> (N,) gap tokens; the first event gets 1."""
    ts = np.asarray(timestamps, dtype=np.int64)
    out = np.ones(ts.shape, dtype=np.int64)
    if ts.size > 1:
        gap = np.clip(np.diff(ts), 0, None).astype(np.float64)
        out[1:] = np.minimum(2 + np.ceil(np.log2(gap + 1.0)), N_GAP_TOKENS - 1).astype(np.int64)
    return out


def left_pad(rows: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """Rows of varying length -> (B, max_len) int64, right-aligned, 0 in front.

    A row longer than max_len keeps its last (most recent) max_len values."""
    out = np.zeros((len(rows), max_len), dtype=np.int64)  # (B, max_len)
    for i, row in enumerate(rows):
        row = np.asarray(row, dtype=np.int64)[-max_len:]
        if row.size:
            out[i, max_len - row.size :] = row
    return out


def trim_padding(batch: Batch) -> Batch:
    """Drop leading columns that are padding in every row (positions are padding-invariant)."""
    used = (batch.items > 0).any(0) | (batch.targets > 0).any(0)  # (T,)
    if not bool(used.any()):
        return batch
    start = int(used.nonzero()[0, 0])
    if start == 0:
        return batch
    return batch.map(lambda v: v[:, start:])


def make_examples(batch: dict[str, Any], max_len: int) -> dict[str, np.ndarray]:
    """Sequence rows -> padded arrays of shape (B, max_len).

    Train rows (no `target_item`): inputs are seq[:-1], targets seq[1:] (next item at every
    position); a train row of one event has no target and is dropped. Eval rows: inputs are the
    history, the single target sits at the last position.
    """
    train = "target_item" not in batch
    keep = [i for i, x in enumerate(batch["items"]) if len(x) >= 2 or not train]
    items = [np.asarray(batch["items"][i], dtype=np.int64) for i in keep]
    behaviors = [np.asarray(batch["behaviors"][i], dtype=np.int64) for i in keep]
    stamps = [np.asarray(batch["timestamps"][i], dtype=np.int64) for i in keep]
    gaps = [gap_tokens(ts) for ts in stamps]
    if train:
        return {
            "items": left_pad([x[:-1] for x in items], max_len),
            "behaviors": left_pad([x[:-1] for x in behaviors], max_len),
            "gaps": left_pad([x[:-1] for x in gaps], max_len),
            "targets": left_pad([x[1:] for x in items], max_len),
            "target_behaviors": left_pad([x[1:] for x in behaviors], max_len),
        }
    n = len(items)
    targets = np.zeros((n, max_len), dtype=np.int64)
    target_behaviors = np.zeros((n, max_len), dtype=np.int64)
    targets[:, -1] = np.asarray(batch["target_item"], dtype=np.int64)
    target_behaviors[:, -1] = np.asarray(batch["target_behavior"], dtype=np.int64)
    return {
        "items": left_pad(items, max_len),
        "behaviors": left_pad(behaviors, max_len),
        "gaps": left_pad(gaps, max_len),
        "targets": targets,
        "target_behaviors": target_behaviors,
    }


def collate(arrays: dict[str, np.ndarray]) -> Batch:
    """The one place numpy becomes tensors (used as `iter_torch_batches(collate_fn=...)`)."""
    return Batch(
        **{
            # torch.tensor copies: arrays that came through Ray are read-only.
            f.name: torch.tensor(np.asarray(arrays[f.name]), dtype=torch.long)
            for f in dataclasses.fields(Batch)
        }
    )


def length_batches(
    source: Batch | Iterable[Batch],
    batch_size: int,
    rng: np.random.Generator | None = None,
    bucket_rows: int | None = None,
) -> Iterator[tuple[np.ndarray, Batch]]:
    """Batches of rows with similar history length: left padding is then mostly trimmed away
    (Beauty's median history is 6 events in a 50-wide window), for the same rows.

    source: rows in memory (one Batch), cut into buckets of `bucket_rows` rows (None: one
        bucket of all rows), in a random order first if `rng` is given; or a stream of chunks
        (e.g. Ray Data's `iter_torch_batches`), each chunk one bucket in the order it comes
        (the stream does its own shuffling).
    Each bucket is sorted by length (stable), cut into batches of `batch_size` rows, and its
    batches come in a random order with `rng`, else shortest first. So without `rng` and with
    one bucket, rows come sorted by length: what evaluation wants (scores do not depend on the
    order, and sorted batches carry ~6x fewer padded tokens on Beauty).

    Yields (idx, batch): idx (B,) int64 the batch's row positions in `source` (for a stream,
    counted over its chunks in order), batch = those rows. Every row comes exactly once.
    The rng draws: one permutation of all rows, then one per bucket; so ranks that share a
    seed and a row count take the same length quantile at each step.
    """
    for offset, rows, idx in _buckets(source, rng, bucket_rows):
        lengths = (rows.items[torch.as_tensor(idx, dtype=torch.long)] > 0).sum(1).numpy()  # (R,)
        idx = idx[np.argsort(lengths, kind="stable")]
        parts = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        for j in rng.permutation(len(parts)) if rng is not None else range(len(parts)):
            yield offset + parts[j], rows.take(parts[j])


def tower_batches(
    rows: Batch, batch_size: int, rngs: list[np.random.Generator], bucket_rows: int | None = None
) -> Iterator[tuple[np.ndarray, list[Batch]]]:
    """`length_batches` in one order per generator, zipped step by step: (idx of the first
    order's batch, [one batch per order]). For an ensemble whose towers each learn from their
    own order of the same rows (`model.tower_orders`). Rows in memory only: a stream cannot
    be read in several orders at once. Every order has the same number of batches (bucket
    sizes do not depend on the permutation)."""
    if not isinstance(rows, Batch):
        raise ValueError(
            "per-tower batch orders need the rows in memory (train.shard_in_memory=true)"
        )
    orders = [length_batches(rows, batch_size, rng, bucket_rows) for rng in rngs]
    for step in zip(*orders, strict=True):
        yield step[0][0], [batch for _, batch in step]


def _buckets(
    source: Batch | Iterable[Batch], rng: np.random.Generator | None, bucket_rows: int | None
) -> Iterator[tuple[int, Batch, np.ndarray]]:
    """(offset of `rows` in the source, rows, (R,) row positions in `rows`) per bucket."""
    if isinstance(source, Batch):
        n = source.size
        order = rng.permutation(n) if rng is not None else np.arange(n)  # (n,)
        step = bucket_rows or max(1, n)
        for start in range(0, n, step):
            yield 0, source, order[start : start + step]
        return
    offset = 0
    for chunk in source:
        yield offset, chunk, np.arange(chunk.size)
        offset += chunk.size
