"""From prepared sequences to model batches: numpy examples, then one collate to tensors.

Prepared splits (written by `jobs.prepare`, see rec/data/sequences.py) hold one row per user:

    items       list<int32>  item indices (vocab, 0 = padding) in time order
    behaviors   list<int8>   behavior tokens (rec.data.schema.BEHAVIOR_TOKENS)
    timestamps  list<int64>  unix seconds, or positions where the source has only the order
    target_*    valid/test only: the held-out next event

`make_examples` turns a batch of such rows into fixed-length, left-padded numpy arrays
(it runs inside Ray Data's map_batches), and `collate` makes the typed tensor batch the
model takes. Models never see numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

N_GAP_TOKENS = 24  # 0 pad, 1 first event / unknown gap, 2.. log2-bucketed seconds since previous


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

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})

    @property
    def size(self) -> int:
        return int(self.items.shape[0])


def gap_tokens(timestamps: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """(N,) int64 timestamps of one sequence -> (N,) gap tokens; the first event gets 1."""
    ts = np.asarray(timestamps, dtype=np.int64)
    out = np.ones(ts.shape, dtype=np.int64)
    if ts.size > 1:
        gap = np.clip(np.diff(ts), 0, None).astype(np.float64)
        out[1:] = np.minimum(2 + np.ceil(np.log2(gap + 1.0)), N_GAP_TOKENS - 1).astype(np.int64)
    return out


def _left_pad(rows: list[np.ndarray], max_len: int) -> np.ndarray:
    out = np.zeros((len(rows), max_len), dtype=np.int64)
    for i, row in enumerate(rows):
        row = row[-max_len:]
        if row.size:
            out[i, max_len - row.size :] = row
    return out


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
            "items": _left_pad([x[:-1] for x in items], max_len),
            "behaviors": _left_pad([x[:-1] for x in behaviors], max_len),
            "gaps": _left_pad([x[:-1] for x in gaps], max_len),
            "targets": _left_pad([x[1:] for x in items], max_len),
            "target_behaviors": _left_pad([x[1:] for x in behaviors], max_len),
        }
    n = len(items)
    targets = np.zeros((n, max_len), dtype=np.int64)
    target_behaviors = np.zeros((n, max_len), dtype=np.int64)
    targets[:, -1] = np.asarray(batch["target_item"], dtype=np.int64)
    target_behaviors[:, -1] = np.asarray(batch["target_behavior"], dtype=np.int64)
    return {
        "items": _left_pad(items, max_len),
        "behaviors": _left_pad(behaviors, max_len),
        "gaps": _left_pad(gaps, max_len),
        "targets": targets,
        "target_behaviors": target_behaviors,
    }


def collate(arrays: dict[str, np.ndarray]) -> Batch:
    """The one place numpy becomes tensors (used as `iter_torch_batches(collate_fn=...)`)."""
    return Batch(
        **{
            name: torch.tensor(
                np.asarray(arrays[name]), dtype=torch.long
            )  # copies: Ray's are read-only
            for name in ("items", "behaviors", "gaps", "targets", "target_behaviors")
        }
    )
