"""Prepared splits as Ray Datasets of training examples, for `ray.train.get_dataset_shard`.

ds = training_dataset("outputs/beauty/data", "train", max_len=50)
trainer = TorchTrainer(..., datasets={"train": ds})
# in each worker:
for batch in ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=256, collate_fn=BatchCollate()):   # -> rec.data.batch.Batch

Reproducible shards (the same rows, in the same order, on the same rank in every fit):

parts = rank_parts(d, "train", world, max_len=50, seed=0)                  # before the fit
datasets={shard_name("train", r): p for r, p in enumerate(parts)}, dataset_config=ordered_ingest()
ray.train.get_dataset_shard(shard_name("train", rank))                    # in rank's worker
"""

from __future__ import annotations

import json
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
ORDER_KEY = "_order"  # rank_parts' sort key column


def training_dataset(
    prepared_dir: str | Path,
    split: str = "train",
    max_len: int | None = None,
) -> ray.data.Dataset:
    """Rows of `split` as padded numpy examples (see rec.data.batch.make_examples).

    `max_len` defaults to the one the data was prepared with (meta.json). Rows come in the
    order the read delivers them (see rank_parts for a fixed one).
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
    return ds.map_batches(
        make_examples, batch_format="numpy", fn_kwargs={"max_len": max_len}, num_cpus=DATA_TASK_CPUS
    )


def rank_parts(
    prepared_dir: str | Path,
    split: str,
    world: int,
    max_len: int,
    seed: int,
    max_rows: int | None = None,
) -> list[ray.data.MaterializedDataset]:
    """`world` equal parts of `split` as materialized datasets of padded examples, part r for
    rank r: the same rows, in the same order, on the same rank in every fit, whatever the
    cluster (the last `len % world` rows are dropped). max_rows: keep only the first that many
    rows of the seeded order, i.e. a seeded sample of users (validation at a large catalogue).

    The split is read whole by the driver and put in a seeded order of its user ids (a
    function of the seed and the ids alone: prepared files are ordered, and unshuffled one
    rank got 41 % more tokens than the other on Beauty), then cut by row position; padding
    runs as one Ray task per part. Ray Data itself cannot give this cheaply: its Parquet reader
    hands files over in the order its threads found them (Ray 2.60), so a seeded
    `random_shuffle` permutes a varying input, and a sort gives a fixed order but cost 20-35 s
    a split on 2 CPUs (a 200-task shuffle, or 8 with fixed boundaries) against ~1 s here.
    The driver holds one split's sequences (Beauty: 3 MB; 1M users x 50 events: ~0.5 GB);
    beyond that, stream with `train.materialize_data=false`.
    """
    import polars as pl

    frame = storage.read_parquet(storage.join(prepared_dir, split))
    if "target_item" not in frame.columns:  # a train row of one event has no target: make_examples
        frame = frame.filter(pl.col("items").list.len() >= 2)  # drops it, so drop it before the cut
    key = _order_key(frame["user_id"].to_numpy(), seed)
    frame = frame.with_columns(pl.Series(ORDER_KEY, key)).sort([ORDER_KEY, "user_id"])
    if max_rows is not None:
        frame = frame.head(max_rows)
    per_rank = frame.height // world
    parts = []
    for rank in range(world):
        rows = frame.slice(rank * per_rank, per_rank).drop(ORDER_KEY).to_arrow()
        examples = ray.data.from_arrow(rows).map_batches(
            make_examples, batch_format="numpy", fn_kwargs={"max_len": max_len},
            num_cpus=DATA_TASK_CPUS,
        )  # fmt: skip
        part = examples.materialize()
        # Read by its rank every epoch: a progress bar would re-render in the job's log each time.
        part.context.enable_progress_bars = False
        parts.append(part)
    return parts


def sampled_dataset(
    prepared_dir: str | Path, split: str, max_len: int, max_rows: int | None, seed: int
) -> ray.data.Dataset:
    """`training_dataset` of `split`, streamed, thinned to about `max_rows` rows by a seeded
    Bernoulli sample (Ray Data's random_sample) when the split has more; every row otherwise."""
    ds = training_dataset(prepared_dir, split, max_len)
    if max_rows is None:
        return ds
    rows = storage.read_parquet(storage.join(prepared_dir, split), columns=["user_id"]).height
    return ds if rows <= max_rows else ds.random_sample(max_rows / rows, seed=seed)


def _order_key(user_ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 63-bit pseudo-random key per id: pandas' 64-bit hash (any id type) of the id's
    hash mixed with the seed's."""
    ids = pd.util.hash_array(np.asarray(user_ids), categorize=False)
    mixed = ids ^ pd.util.hash_array(np.asarray([seed], dtype=np.int64))[0]
    return (pd.util.hash_array(mixed, categorize=False) >> np.uint64(1)).astype(np.int64)


def shard_name(split: str, rank: int) -> str:
    """The dataset name of rank `rank`'s part of `split` (see rank_parts)."""
    return f"{split}_rank{rank}"


def ordered_ingest() -> DataConfig:
    """Ray Train's data config for `rank_parts` parts: each is read whole by its rank (no
    further split) in block order."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=[], execution_options=options)


class BatchCollate(NumpyBatchCollateFn):
    """`rec.data.batch.collate` in the form `iter_torch_batches(collate_fn=...)` expects."""

    def __call__(self, batch: dict) -> Batch:
        return collate(batch)
