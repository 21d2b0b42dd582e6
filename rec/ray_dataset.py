"""Prepared splits as Ray Datasets of training examples, for `ray.train.get_dataset_shard`.

ds = training_dataset("outputs/beauty/data", "train", max_len=50)
trainer = TorchTrainer(..., datasets={"train": ds})
# in each worker:
for batch in ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=256, collate_fn=BatchCollate()):   # -> rec.data.batch.Batch
"""

from __future__ import annotations

import json
from pathlib import Path

import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from rec import storage
from rec.data.batch import Batch, collate, make_examples
from rec.data.outputs import SPLITS

DATA_TASK_CPUS = 0.1


def training_dataset(
    prepared_dir: str | Path, split: str = "train", max_len: int | None = None
) -> ray.data.Dataset:
    """Rows of `split` as padded numpy examples (see rec.data.batch.make_examples).

    `max_len` defaults to the one the data was prepared with (meta.json).
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


class BatchCollate(NumpyBatchCollateFn):
    """`rec.data.batch.collate` in the form `iter_torch_batches(collate_fn=...)` expects."""

    def __call__(self, batch: dict) -> Batch:
        return collate(batch)
