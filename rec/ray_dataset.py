"""Prepared splits as Ray Datasets of training examples, for `ray.train.get_dataset_shard`.

ds = training_dataset("outputs/beauty/data", "train", max_len=50)
trainer = TorchTrainer(..., datasets={"train": ds})
# in each worker:
for batch in ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=256, collate_fn=BatchCollate()):   # -> rec.data.batch.Batch

Reproducible shards (the same rows, in the same order, on the same rank in every fit):

parts = rank_splits(training_dataset(d, "train", order_seed=0), world)   # before the fit
datasets={shard_name("train", r): p for r, p in enumerate(parts)}, dataset_config=ordered_ingest()
ray.train.get_dataset_shard(shard_name("train", rank))                    # in rank's worker
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import DataConfig

from rec import storage
from rec.data.batch import Batch, collate, make_examples
from rec.data.outputs import SPLITS

DATA_TASK_CPUS = 0.1
ORDER_KEY = "_order"  # hash_order's sort key column
ORDER_PARTITIONS = 8  # hash_order's sort tasks


def training_dataset(
    prepared_dir: str | Path,
    split: str = "train",
    max_len: int | None = None,
    order_seed: int | None = None,
) -> ray.data.Dataset:
    """Rows of `split` as padded numpy examples (see rec.data.batch.make_examples).

    `max_len` defaults to the one the data was prepared with (meta.json). `order_seed`:
    rows in a seeded pseudo-random order that is a function of the seed and the user ids
    alone (`hash_order`); None: the files' order, as the read delivers it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta_path = storage.join(prepared_dir, "meta.json")
    if not storage.exists(meta_path):
        raise FileNotFoundError(f"{prepared_dir}: no meta.json; run jobs.prepare into it first")
    if max_len is None:
        max_len = json.loads(storage.read_text(meta_path))["max_len"]
    # Small CPU shares: reading and padding are light, and whole-CPU tasks would wait forever
    # behind Train workers (and Tune trials) holding fractions of a 2-CPU machine.
    path, fs = storage.for_ray(storage.join(prepared_dir, split))
    ds = ray.data.read_parquet(path, filesystem=fs, num_cpus=DATA_TASK_CPUS)
    if order_seed is not None:
        ds = hash_order(ds, order_seed)
    return ds.map_batches(
        make_examples, batch_format="numpy", fn_kwargs={"max_len": max_len}, num_cpus=DATA_TASK_CPUS
    )


def hash_order(ds: ray.data.Dataset, seed: int) -> ray.data.Dataset:
    """Rows sorted by a seeded 63-bit hash of `user_id`: an order that is a function of the
    seed and the ids alone, still random over the users (prepared files are ordered:
    unshuffled, one rank got 41 % more tokens than the other on Beauty).

    Replaces `random_shuffle(seed=...)`, which permutes rows in the order the read hands
    them over, and the read's order varies (Ray 2.60's Parquet reader lists the files with
    parallel threads: without `preserve_order` set when the dataset is created, its block
    holds the files in the order they were found). A sort gives one order whatever the input
    order and blocks. Fixed boundaries (the hash is uniform) skip the sampling pass and make
    ORDER_PARTITIONS sort tasks instead of 200. Cost: ~15 s a split on 2 CPUs, smoke data or
    Beauty alike (mostly fixed overhead), ~20 s a fit more than the shuffle it replaces.
    """
    keyed = ds.map_batches(
        _add_order_key, batch_format="numpy", fn_kwargs={"seed": seed}, num_cpus=DATA_TASK_CPUS
    )
    step = 2**63 // ORDER_PARTITIONS
    return keyed.sort(ORDER_KEY, boundaries=[step * i for i in range(1, ORDER_PARTITIONS)])


def _add_order_key(batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The sort key: pandas' 64-bit hash (any id type) of the id's hash mixed with the
    seed's, as a non-negative int64 (Ray compares boundaries as int64)."""
    ids = pd.util.hash_array(np.asarray(batch["user_id"]), categorize=False)
    mixed = ids ^ pd.util.hash_array(np.asarray([seed], dtype=np.int64))[0]
    key = pd.util.hash_array(mixed, categorize=False) >> np.uint64(1)
    return batch | {ORDER_KEY: key.astype(np.int64)}


def rank_splits(ds: ray.data.Dataset, world: int) -> list[ray.data.MaterializedDataset]:
    """`world` equal contiguous parts of `ds` in its order (the last `len % world` rows are
    dropped), cut by row position: what rank r trains on does not depend on how the blocks
    fell, unlike Ray Train's default `streaming_split`, which deals whole blocks to the
    worker with the fewest rows so far. Run inside `ordered_execution()`."""
    return ds.materialize().split(world, equal=True)  # once: split counts, then cuts


def shard_name(split: str, rank: int) -> str:
    """The dataset name of rank `rank`'s part of `split` (see rank_splits)."""
    return f"{split}_rank{rank}"


def ordered_ingest() -> DataConfig:
    """Ray Train's data config for `rank_splits` parts: each is read whole by its rank (no
    further split) in block order."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=[], execution_options=options)


class BatchCollate(NumpyBatchCollateFn):
    """`rec.data.batch.collate` in the form `iter_torch_batches(collate_fn=...)` expects."""

    def __call__(self, batch: dict) -> Batch:
        return collate(batch)


@contextmanager
def ordered_execution() -> Iterator[None]:
    """Ray Data keeps block order inside this block (`preserve_order`): the blocks of a
    map after `hash_order` come out in the sorted order, not in the order their tasks
    finish."""
    options = ray.data.DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before
