"""Ray Train + DeepSpeed training of the multi-task recommender (the distributing layer).

`fit(spec)` runs a `TorchTrainer` whose workers each execute `train_loop_per_worker`: the
loop reads top to bottom -- shard -> forward -> backward -> step -> validate -> checkpoint ->
report. Every rank saves its DeepSpeed shard into the checkpoint, rank 0 adds a consolidated
serving export (safetensors + config), and a crashed worker group restarts from the latest
checkpoint with its step count intact. With `train.checkpoint_every_steps` it also checkpoints
inside an epoch, and a restart continues that epoch at the batch it stopped at (rec/resume.py).

The pieces the loop calls live beside it, none of them Ray-bound except the checkpoints:
rec/deepspeed_setup.py (engine), rec/schedule.py (LR), rec/data/batch.py (length-bucketed
batches), rec/evaluation.py (validation), rec/train_metrics.py (throughput),
rec/ray_checkpoints.py (save, report, restore), rec/resume.py (where a run is, mid-epoch
resume), rec/sparse_table.py (`train.item_table`: the item rows row-sparse beside DeepSpeed),
rec/fault_injection.py (test hook).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from rec import storage
from rec.data.batch import Batch, length_batches
from rec.data.splits import ItemTables, load_item_tables
from rec.deepspeed_setup import deepspeed_engine, full_parameters, worker_env
from rec.ensemble import model_summary, tower_clip, weight_decay_groups
from rec.evaluation import evaluate
from rec.fault_injection import maybe_inject_failure
from rec.logs import get_logger
from rec.model import ModelConfig, count_parameters
from rec.ray_checkpoints import restore, save_and_report
from rec.ray_dataset import (
    BatchCollate,
    ordered_ingest,
    rank_parts,
    sampled_dataset,
    shard_name,
)
from rec.recommender import build_recommender
from rec.resume import (
    after_epoch,
    batch_seed,
    checkpoint_due,
    epoch_batches,
    epoch_rng,
    resume_batches,
)
from rec.sparse_table import dense_parameters, optimizer_step, resolve_item_table, sparse_item_table
from rec.tracking import Tracker, TrackingTarget, run_params
from rec.train_config import TrainConfig
from rec.train_metrics import EpochMeter

SCORE = "valid.ndcg@10"  # early stopping and best-checkpoint metric
log = get_logger("train")


@dataclass
class TrainSpec:
    """Everything a worker needs (picklable): configs and absolute paths or URIs."""

    model: ModelConfig
    train: TrainConfig
    prepared_dir: str
    steps_per_epoch: int  # optimizer steps in one epoch over the train split (LR schedule)
    storage_dir: str  # Ray Train run storage (checkpoints): a local path or a URI
    extensions_dir: str  # TORCH_EXTENSIONS_DIR for DeepSpeed's compiled ops
    tracking: TrackingTarget | None = None  # curves, MLflow, TensorBoard (None: none written)
    # Per-epoch validation on at most this many users, a seeded sample (eval.max_users resolved
    # by catalogue size: at Taobao's scale validating every user costs more than the epoch).
    valid_max_users: int | None = None


def fit(spec: TrainSpec, name: str = "train", callbacks: list | None = None) -> ray.train.Result:
    """Train with Ray Train on the current Ray cluster; returns the Ray Train result.

    callbacks: Ray Train user callbacks (e.g. Tune's TuneReportCallback inside a sweep).
    """
    cfg = spec.train
    datasets, data_config = _datasets(spec)
    storage_path, storage_fs = storage.for_ray(spec.storage_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={
                "CPU": cfg.cpus_per_worker,
                **({"GPU": 1} if cfg.use_gpu else {}),
                **cfg.resources_per_worker,
            },
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=3, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
        ),
        datasets=datasets,
        dataset_config=data_config,
    )
    return trainer.fit()


def _datasets(spec: TrainSpec) -> tuple[dict, DataConfig | None]:
    """Ray Train's datasets and data config. With `train.materialize_data`: each split in a
    seeded order of its user ids, cut into one materialized part per rank by row position
    (rec/ray_dataset.py: rank_parts), so every fit -- and every restart of the worker group,
    and a later fit with `train.resume_from` -- gives rank r the same rows in the same order
    (tests/test_step_checkpoints.py). Without: streamed, split by Ray Train as it reads."""
    cfg = spec.train
    names = ("train", "valid")
    limit = {"train": None, "valid": spec.valid_max_users}
    if not cfg.materialize_data:
        return {
            n: sampled_dataset(spec.prepared_dir, n, spec.model.max_len, limit[n], cfg.seed)
            for n in names
        }, None
    datasets = {}
    for name in names:
        parts = rank_parts(
            spec.prepared_dir, name, cfg.num_workers, spec.model.max_len, cfg.seed, limit[name]
        )
        datasets.update({shard_name(name, rank): part for rank, part in enumerate(parts)})
    return datasets, ordered_ingest()


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: its shard of every epoch, validation, checkpoint and report."""
    spec: TrainSpec = config["spec"]
    cfg = spec.train
    worker_env(cfg, spec.extensions_dir)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    tables = load_item_tables(spec.prepared_dir)
    engine, table = _engine(spec, tables, rank == 0, world)
    state = restore(engine, cfg.resume_from, table)  # rec/resume.py: where the run is
    tracker = _tracker(spec, state) if rank == 0 else None
    train_shard, valid_shard = _shards(cfg)
    bucket = cfg.batch_size * cfg.length_buckets  # rows sorted by length together

    for epoch in range(state["epoch"], cfg.epochs):
        engine.train()
        meter = EpochMeter(world)
        # in memory, or streamed in bucket-size chunks (shuffled locally, seeded per epoch)
        rows = _epoch_rows(train_shard, bucket, int(epoch_rng(cfg.seed, epoch).integers(2**31)))
        # The same order on every rank (each step then takes the same length quantile of every
        # rank's rows: ranks wait less at the gradient sync) and on every attempt: a restart
        # skips the batches its checkpoint had trained.
        towers = spec.model.members if spec.model.tower_orders else 0  # one order per tower
        batches = epoch_batches(rows, cfg.batch_size, cfg.seed, epoch, bucket, towers)
        for k, (_, batch), last in resume_batches(batches, skip=state["epoch_batches"]):
            torch.manual_seed(batch_seed(cfg.seed, rank, epoch, k))  # dropout, negatives
            batch = _to(batch, engine.device)  # a Batch, or one per tower (tower_orders)
            loss, logs = engine(batch)  # Recommender.forward = the multi-task loss
            engine.backward(loss)
            took_step = optimizer_step(engine, table)  # DeepSpeed's, then the sparse table's
            state["epoch_batches"] = k + 1
            meter.update(batch if isinstance(batch, Batch) else batch[0], logs)
            if took_step:
                state["step"] += 1
                ends = last or _at_max_steps(cfg, state)
                if checkpoint_due(state["step"], cfg.checkpoint_every_steps, ends):
                    _save_mid_epoch(engine, state, cfg, table)
            maybe_inject_failure(cfg.inject_failure_at_step, rank, state["step"], spec.storage_dir)
            if _at_max_steps(cfg, state):
                break
        done = _at_max_steps(cfg, state) or epoch + 1 == cfg.epochs
        metrics = _epoch_metrics(engine, cfg, state, meter, epoch, done, (valid_shard, tables))
        state = after_epoch(state, epoch)
        state["history"] = [*state["history"], metrics]  # saved with the checkpoint
        patience = cfg.early_stop_patience
        stop = done or (patience is not None and state["bad_evals"] > patience)
        save_and_report(engine, state, metrics, cfg, table=table)
        if rank == 0:
            log.info("%s", json.dumps(_rounded(metrics)))
        if tracker:
            tracker.log(state["history"])
        if stop:
            break
    if tracker:
        tracker.close()


def _to(batch: Batch | list[Batch], device) -> Batch | list[Batch]:
    return batch.to(device) if isinstance(batch, Batch) else [b.to(device) for b in batch]


def _engine(spec: TrainSpec, tables: ItemTables, chief: bool, world: int) -> tuple:
    """The recommender in its DeepSpeed engine, and its item table trained row-sparse beside
    it (`train.item_table`: rec/sparse_table.py), or None where DeepSpeed trains it too."""
    ds = spec.train.deepspeed
    clip = tower_clip(ds.gradient_clipping, spec.model.members)  # each tower as if alone
    cfg = replace(spec.train, deepspeed=replace(ds, gradient_clipping=clip))
    model = build_recommender(spec.model, tables)
    table = sparse_item_table(model, cfg, spec.steps_per_epoch)
    if chief:
        log.info("%s | workers=%d | item table %s", model_summary(model.model, model), world,
                 "sparse" if table else "dense")  # fmt: skip
    params = weight_decay_groups(model, dense_parameters(model, table))  # model.tower_weight_decay
    return deepspeed_engine(model, cfg, spec.steps_per_epoch, params), table


def _epoch_metrics(
    engine, cfg: TrainConfig, state: dict, meter: EpochMeter, epoch: int, done: bool, valid
) -> dict:
    """The epoch's training metrics, and validation when due (every `eval_every` epochs and at
    the end), which also moves the best score in `state`. valid: (valid shard, item tables)."""
    metrics = {"epoch": epoch + 1, "step": state["step"], **meter.summary()}
    if (epoch + 1) % cfg.eval_every == 0 or done:
        with full_parameters(engine, cfg.deepspeed.zero_stage):
            metrics |= validate(engine.module, *valid, cfg.eval_batch_size)
        _track_best(state, metrics[SCORE])
        metrics["best." + SCORE] = state["best"]
    return metrics


def _tracker(spec: TrainSpec, state: dict) -> Tracker | None:
    """Rank 0's tracking of the run; it continues the restored state's history."""
    if spec.tracking is None:
        return None
    return Tracker(spec.train.tracking, spec.tracking, run_params(spec.model, spec.train), state)


def _save_mid_epoch(engine, state: dict, cfg: TrainConfig, table) -> None:
    """A checkpoint to resume from, never to serve: no export, and a score of -inf. Ray
    Train's CheckpointConfig keeps the top 3 by SCORE plus the latest, so it stays only while
    it is the latest or fewer than 3 validated ones exist, and best-checkpoint picks never
    take it. (Without the key Ray would log an error for each and score it -inf anyway.)"""
    metrics = {k: state[k] for k in ("epoch", "step", "epoch_batches")} | {SCORE: float("-inf")}
    save_and_report(engine, state, metrics, cfg, export=False, table=table)


def _at_max_steps(cfg: TrainConfig, state: dict) -> bool:
    return bool(cfg.max_steps and state["step"] >= cfg.max_steps)


def _track_best(state: dict, score: float) -> None:
    """Early stopping's counters after a validation scored `score`."""
    if score > state["best"]:
        state["best"], state["bad_evals"] = score, 0
    else:
        state["bad_evals"] += 1


def _shards(cfg: TrainConfig) -> tuple:
    """This rank's train and valid shards: Ray Data iterators, or with `train.shard_in_memory`
    all their rows as one Batch each (read once, before the clock of the first epoch starts)."""
    rank = ray.train.get_context().get_world_rank()
    name = (lambda split: shard_name(split, rank)) if cfg.materialize_data else str
    train = ray.train.get_dataset_shard(name("train"))
    valid = ray.train.get_dataset_shard(name("valid"))
    if not cfg.shard_in_memory:
        return train, valid
    chunk_rows = cfg.batch_size * cfg.length_buckets
    return _rows_in_memory(train, chunk_rows), _rows_in_memory(valid, chunk_rows)


def _rows_in_memory(shard, chunk_rows: int) -> Batch:
    """All of this rank's rows of a dataset shard as one Batch of tensors."""
    chunks = list(shard.iter_torch_batches(batch_size=chunk_rows, collate_fn=BatchCollate()))
    if not chunks:
        raise ValueError("a training worker got no rows: fewer rows than train.num_workers")
    return Batch.cat(chunks)


def _epoch_rows(shard, chunk_rows: int, shuffle_seed: int | None = None) -> Batch | Iterable[Batch]:
    """One pass over a shard for `length_batches`: the rows in memory as they are (it
    shuffles them itself), or a fresh stream of `chunk_rows`-row chunks (Ray Data shuffles
    those locally with `shuffle_seed`; None: not shuffled)."""
    if isinstance(shard, Batch):
        return shard
    return shard.iter_torch_batches(
        batch_size=chunk_rows,
        collate_fn=BatchCollate(),
        local_shuffle_buffer_size=None if shuffle_seed is None else 4 * chunk_rows,
        local_shuffle_seed=shuffle_seed,
    )


def validate(model, shard, tables: ItemTables, batch_size: int) -> dict[str, float]:
    """Full-ranking metrics on this rank's validation shard (sorted by length), merged over
    all ranks."""
    rows = _epoch_rows(shard, 8 * batch_size)
    return evaluate(model, length_batches(rows, batch_size), tables, "valid", merge_ranks=True)


def count_steps_per_epoch(prepared_dir: str | Path, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: train rows with a target, split over workers, batched."""
    import polars as pl

    train = storage.read_parquet(storage.join(prepared_dir, "train"), columns=["items"])
    rows = train.filter(pl.col("items").list.len() >= 2).height
    per_worker = rows // cfg.num_workers
    return max(1, math.ceil(per_worker / cfg.batch_size) // cfg.grad_accum)


def describe(spec: TrainSpec, tables: ItemTables) -> dict:
    """Sizes for the job log and metrics.json (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_recommender(spec.model, tables)
    return {
        "parameters": count_parameters(model),
        # ConfigError here (in the driver) for a train.item_table=sparse that cannot work
        "item_table": resolve_item_table(spec.train, model.interest_loss),
        "model": asdict(spec.model),
        "train": asdict(spec.train),
    }


def _rounded(metrics: dict) -> dict:
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}
