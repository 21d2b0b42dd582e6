"""Where a training run is, and how a restarted one continues mid-epoch exactly there (no Ray).

The loop's counters (saved as state.json in every checkpoint):

    epoch          epochs finished
    step           optimizer steps taken (all epochs)
    epoch_batches  micro-batches of epoch `epoch` already trained (0 at an epoch boundary)
    best           best valid NDCG@10 so far; bad_evals: validations since it improved
    history        every finished epoch's metrics (curves, MLflow, TensorBoard: rec/tracking.py)

A restarted run replays nothing: the order of an epoch's batches is a function of
(seed, epoch) alone (`epoch_rng`), and each batch's dropout and negative samples of
(seed, rank, epoch, batch) alone (`batch_seed`), so skipping the `epoch_batches` already
trained (`resume_batches`) leaves exactly the batches -- with the same random draws -- that
the uninterrupted run took next, provided each rank holds the same rows in the same order
(rec/train.py `_datasets`: a seeded hash order cut by row position, read into memory).

    for k, batch, last in resume_batches(length_batches(rows, B, epoch_rng(seed, e)), skip):
        torch.manual_seed(batch_seed(seed, rank, e, k))
        ...
        if checkpoint_due(step, every, ends=last): save a mid-epoch checkpoint
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

import numpy as np

from rec.data.batch import Batch, length_batches, tower_batches

T = TypeVar("T")


def fresh_state() -> dict:
    """The counters of a run that has not trained yet."""
    counters = {"epoch": 0, "step": 0, "epoch_batches": 0, "best": float("-inf"), "bad_evals": 0}
    return counters | {"history": []}  # every finished epoch's metrics (rec/tracking.py)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that orders epoch `epoch`'s batches: the same on every rank (ranks then
    take the same length quantile at each step) and for every attempt of the run."""
    return np.random.default_rng([seed, epoch])


def tower_rng(seed: int, epoch: int, tower: int) -> np.random.Generator:
    """The batch order of tower `tower` of an ensemble (`model.tower_orders`): tower 0 takes
    the run's own `epoch_rng`, every other tower an independent order of (seed, epoch, tower),
    the same on every rank and attempt."""
    return epoch_rng(seed, epoch) if tower == 0 else np.random.default_rng([seed, epoch, tower])


def epoch_batches(
    rows: Batch, batch_size: int, seed: int, epoch: int, bucket: int, towers: int = 0
) -> Iterator[tuple[np.ndarray, Batch | list[Batch]]]:
    """Epoch `epoch`'s (idx, batch) in the run's seeded order (`length_batches`); towers > 0
    (`model.tower_orders`): one order per tower, (idx, [batch per tower]) (`tower_batches`)."""
    if not towers:
        return length_batches(rows, batch_size, epoch_rng(seed, epoch), bucket)
    rngs = [tower_rng(seed, epoch, k) for k in range(towers)]
    return tower_batches(rows, batch_size, rngs, bucket)


def batch_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """torch's seed for micro-batch `batch` of `epoch` on `rank` (dropout, sampled negatives):
    independent across ranks and batches, and the same after a restart."""
    return int(np.random.SeedSequence([seed, rank, epoch, batch]).generate_state(1, np.uint64)[0])


def resume_batches(batches: Iterable[T], skip: int) -> Iterator[tuple[int, T, bool]]:
    """(k, batch, last) for batches k >= skip of an epoch: k counts from the epoch's first
    batch, `last` is True for its final batch (one look ahead, so it works on a stream)."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip!r}")
    it = islice(iter(batches), skip, None)
    sentinel = object()
    current = next(it, sentinel)
    k = skip
    while current is not sentinel:
        following = next(it, sentinel)
        yield k, current, following is sentinel  # type: ignore[misc]
        current, k = following, k + 1


def checkpoint_due(step: int, every: int | None, ends: bool) -> bool:
    """Save a mid-epoch checkpoint after optimizer step `step`? Every `every` steps, except
    where the epoch (or the run) ends anyway: its end-of-epoch checkpoint follows at once."""
    return every is not None and step % every == 0 and not ends


def after_epoch(state: dict, epoch: int) -> dict:
    """The counters once epoch `epoch` (0-based) is finished."""
    return state | {"epoch": epoch + 1, "epoch_batches": 0}
