"""Ray Train + DeepSpeed training of the multi-task recommender (the distributing layer).

`fit(spec)` runs a `TorchTrainer` whose workers each execute `train_loop_per_worker`: the
loop reads top to bottom -- shard -> forward -> backward -> step -> validate -> checkpoint ->
report. Every rank saves its DeepSpeed shard into the checkpoint, rank 0 adds a consolidated
serving export (safetensors + config), and a crashed worker group restarts from the latest
checkpoint with its step count intact.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from rec.data.batch import Batch
from rec.evaluation import build_recommender, load_item_tables
from rec.metrics import RankingEvaluator
from rec.model import ModelConfig, count_parameters, model_summary
from rec.ray_dataset import BatchCollate, training_dataset
from rec.train_config import TrainConfig

SCORE = "valid.ndcg@10"  # early stopping and best-checkpoint metric
CKPT_TAG = "ds"  # DeepSpeed checkpoint tag (a subdirectory; "latest" is its pointer file)
# Batches per epoch left out of `train_tokens_per_s_steady` (CUDA context, allocator and
# kernel selection warm up on the first steps; a short GPU run would otherwise under-report).
WARM_BATCHES = 10


@dataclass
class TrainSpec:
    """Everything a worker needs (picklable): configs and absolute paths."""

    model: ModelConfig
    train: TrainConfig
    prepared_dir: str
    steps_per_epoch: int  # optimizer steps in one epoch over the train split (LR schedule)
    storage_dir: str  # Ray Train run storage (checkpoints)
    extensions_dir: str  # TORCH_EXTENSIONS_DIR for DeepSpeed's compiled ops


def fit(spec: TrainSpec, name: str = "train", callbacks: list | None = None) -> ray.train.Result:
    """Train with Ray Train on the current Ray cluster; returns the Ray Train result.

    callbacks: Ray Train user callbacks (e.g. Tune's TuneReportCallback inside a sweep).
    """
    cfg = spec.train
    datasets = {
        "train": training_dataset(spec.prepared_dir, "train", spec.model.max_len),
        "valid": training_dataset(spec.prepared_dir, "valid", spec.model.max_len),
    }
    if cfg.materialize_data:
        # Shuffled once first: the split hands each worker a contiguous range of rows, and
        # prepared files are ordered (on Beauty the first half holds 41 % more tokens than the
        # second), so unshuffled, one worker did more work per step and the other waited for it.
        datasets = {
            name: ds.random_shuffle(seed=cfg.seed).materialize() for name, ds in datasets.items()
        }
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
            },
        ),
        run_config=RunConfig(
            name=name,
            storage_path=spec.storage_dir,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=3, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def train_loop_per_worker(config: dict) -> None:
    spec: TrainSpec = config["spec"]
    cfg = spec.train
    _worker_env(spec)
    import deepspeed  # after DS_ACCELERATOR is set: DeepSpeed picks its accelerator at import

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    tables = load_item_tables(spec.prepared_dir)
    model = build_recommender(spec.model, tables)
    if rank == 0:
        print(f"[train] {model_summary(model.model, model)} | workers={world}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, spec.steps_per_epoch))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=None if cfg.deepspeed.offload_optimizer else opt,
        lr_scheduler=None if cfg.deepspeed.offload_optimizer else sched,
        model_parameters=model.parameters() if cfg.deepspeed.offload_optimizer else None,
        config=deepspeed_config(cfg),
    )
    state = _restore(engine, cfg)
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    collate = BatchCollate()
    big = cfg.batch_size * cfg.length_buckets  # rows per chunk, cut into length buckets
    if cfg.shard_in_memory:  # read once, before the clock of the first epoch starts
        train_rows = _rows_in_memory(train_shard, big, collate)
        valid_shard = [_rows_in_memory(valid_shard, big, collate)]
    # The same seed on every rank: each step then takes the same length quantile of every
    # rank's chunk, so ranks do similar work per step and wait less at the gradient sync
    # (per-rank seeds paired short with long batches: ~1/3 of the CPU went to waiting).
    rng = np.random.default_rng(cfg.seed + 1000 * state["epoch"])

    for epoch in range(state["epoch"], cfg.epochs):
        engine.train()
        t0, tokens, seqs, losses = time.perf_counter(), 0, 0, []
        warm = None  # (time, tokens) after WARM_BATCHES: throughput without the start-up cost
        chunks = (
            _shuffled_chunks(train_rows, big, rng)
            if cfg.shard_in_memory
            else train_shard.iter_torch_batches(
                batch_size=big, collate_fn=collate, local_shuffle_buffer_size=4 * big
            )
        )
        for chunk in chunks:
            for batch in _length_batches(chunk, cfg.batch_size, rng):
                batch = batch.to(engine.device)
                loss, logs = engine(batch)  # Recommender.forward = the multi-task loss
                engine.backward(loss)
                engine.step()
                if engine.is_gradient_accumulation_boundary():
                    state["step"] += 1
                tokens += int((batch.items > 0).sum())
                seqs += batch.size
                losses.append(logs)
                if len(losses) == WARM_BATCHES:
                    warm = (time.perf_counter(), tokens)
                _maybe_inject_failure(cfg, rank, state["step"], spec.storage_dir)
                if cfg.max_steps and state["step"] >= cfg.max_steps:
                    break
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                break
        t_end = time.perf_counter()
        train_s = t_end - t0
        metrics = {
            "epoch": epoch + 1,
            "step": state["step"],
            "train_seconds": round(train_s, 2),
            "train_seq_per_s": round(seqs * world / train_s, 1),
            "train_tokens_per_s": round(tokens * world / train_s, 1),
            **(
                {
                    "train_tokens_per_s_steady": round(
                        (tokens - warm[1]) * world / (t_end - warm[0]), 1
                    )
                }
                if warm and t_end > warm[0]
                else {}
            ),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            **{f"train.{k}": float(np.mean([x[k] for x in losses])) for k in losses[0]},
        }
        if torch.cuda.is_available():
            metrics["gpu_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        done = bool(cfg.max_steps and state["step"] >= cfg.max_steps) or epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or done:
            metrics |= validate(engine.module, valid_shard, tables, cfg.eval_batch_size, collate)
            if metrics[SCORE] > state["best"]:
                state["best"], state["bad_evals"] = metrics[SCORE], 0
            else:
                state["bad_evals"] += 1
            metrics["best." + SCORE] = state["best"]
        state["epoch"] = epoch + 1
        stop = done or (
            cfg.early_stop_patience is not None and state["bad_evals"] > cfg.early_stop_patience
        )
        _checkpoint_and_report(engine, state, metrics, rank, spec)
        if rank == 0:
            print(
                f"[train] {json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})}",
                flush=True,
            )
        if stop:
            break


def _rows_in_memory(shard, chunk_rows: int, collate) -> Batch:
    """All of this rank's rows of a dataset shard as one Batch of tensors."""
    chunks = list(shard.iter_torch_batches(batch_size=chunk_rows, collate_fn=collate))
    if not chunks:
        raise ValueError("a training worker got no rows: fewer rows than train.num_workers")
    return Batch(**{k: torch.cat([getattr(c, k) for c in chunks]) for k in chunks[0].__dict__})


def _shuffled_chunks(rows: Batch, chunk_rows: int, rng: np.random.Generator):
    """The rows in a new random order, in chunks (what the streaming path's shuffle gives)."""
    order = torch.as_tensor(rng.permutation(rows.size))
    for i in range(0, rows.size, chunk_rows):
        idx = order[i : i + chunk_rows]
        yield Batch(**{k: v[idx] for k, v in rows.__dict__.items()})


@torch.no_grad()
def validate(model, shard, tables, batch_size: int, collate) -> dict[str, float]:
    """Full-ranking metrics on this rank's validation shard, merged over all ranks.

    shard: a Ray Data shard, or a list holding this rank's rows as one Batch."""
    ev = RankingEvaluator(torch.as_tensor(tables.categories), torch.as_tensor(tables.train_counts))
    model.eval()
    chunks = (
        shard
        if isinstance(shard, list)
        else shard.iter_torch_batches(batch_size=8 * batch_size, collate_fn=collate)
    )
    for chunk in chunks:
        for batch in _length_batches(chunk, batch_size, None):
            batch = batch.to(next(model.parameters()).device)
            ev.update(model.score_next(batch).float(), batch.targets[:, -1], batch.items)
    model.train()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, ev)
        ev = parts[0]
        for other in parts[1:]:
            ev.merge(other)
    return ev.compute("valid")


def count_steps_per_epoch(prepared_dir: str | Path, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: train rows with a target, split over workers, batched."""
    import polars as pl

    rows = (
        pl.scan_parquet(Path(prepared_dir) / "train" / "*.parquet")
        .filter(pl.col("items").list.len() >= 2)
        .select(pl.len())
        .collect()
        .item()
    )
    per_worker = rows // cfg.num_workers
    return max(1, math.ceil(per_worker / cfg.batch_size) // cfg.grad_accum)


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    """Step -> LR multiplier: linear warm-up, then constant or cosine to 0 at the last step."""
    warmup = max(1, cfg.warmup_steps)
    total = max(warmup + 1, cfg.max_steps or cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup)
        if cfg.lr_schedule == "constant":
            return ramp
        progress = min(1.0, max(0, step - warmup) / (total - warmup))
        return ramp * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: TrainConfig) -> dict:
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    out = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:  # DeepSpeed builds DeepSpeedCPUAdam for an offloaded AdamW
        out["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay},
        }
        out["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0,
                "warmup_max_lr": cfg.lr,
                "warmup_num_steps": max(1, cfg.warmup_steps),
            },
        }
    return out


def _length_batches(chunk, batch_size: int, rng: np.random.Generator | None):
    """Split a big (shuffled) chunk into batches of similar length: less padding per batch.
    With an rng the batches come in random order, else shortest first."""
    lengths = (chunk.items > 0).sum(1).numpy()
    order = np.argsort(lengths, kind="stable")
    parts = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for j in rng.permutation(len(parts)) if rng is not None else range(len(parts)):
        idx = torch.as_tensor(parts[j])
        yield type(chunk)(**{k: v[idx] for k, v in chunk.__dict__.items()})


def _restore(engine, cfg: TrainConfig) -> dict:
    """Latest checkpoint of this run (after a failure), else `train.resume_from`, else fresh."""
    state = {"epoch": 0, "step": 0, "best": float("-inf"), "bad_evals": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and cfg.resume_from:
        ckpt = Checkpoint(cfg.resume_from)
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        engine.load_checkpoint(str(Path(d) / "deepspeed"), tag=CKPT_TAG)
        state |= json.loads((Path(d) / "state.json").read_text())
    print(f"[train] resumed at epoch {state['epoch']} step {state['step']}", flush=True)
    return state


def _checkpoint_and_report(engine, state, metrics, rank: int, spec: TrainSpec) -> None:
    """Every rank saves its DeepSpeed shard; rank 0 adds the serving export and state."""
    from rec.export import save_export

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(str(Path(tmp) / "deepspeed"), tag=CKPT_TAG)
        weights = _consolidated_state_dict(engine, spec.train.deepspeed.zero_stage, rank == 0)
        if rank == 0:
            (Path(tmp) / "state.json").write_text(json.dumps(state))
            save_export(
                engine.module, Path(tmp) / "export", extra={"metrics": metrics}, state_dict=weights
            )
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _consolidated_state_dict(engine, zero_stage: int, keep: bool) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights of the module on the rank that keeps them (None elsewhere).

    ZeRO-3 gathers its parameter shards, which every rank must join; below stage 3 each rank
    already holds the full weights and only the keeping rank copies them.
    """
    module = engine.module
    if zero_stage < 3:
        return (
            {k: v.detach().float().cpu() for k, v in module.state_dict().items()} if keep else None
        )
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if not keep:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def _maybe_inject_failure(cfg: TrainConfig, rank: int, step: int, storage: str) -> None:
    """Test hook: on the first attempt only, rank 1 dies hard at the configured step."""
    if cfg.inject_failure_at_step is None or rank != 1 or step != cfg.inject_failure_at_step:
        return
    marker = Path(storage) / "injected_failure"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(step))
    # Ray Train's controller collects reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a
    # worker dying sooner after a report can take that report's checkpoint with it, and the
    # run then restarts one checkpoint earlier. Waiting makes the hook test resume, not luck.
    time.sleep(5.0)
    os.kill(os.getpid(), signal.SIGKILL)


def _worker_env(spec: TrainSpec) -> None:
    if not spec.train.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", spec.extensions_dir)
    threads = spec.train.threads_per_worker or max(1, round(spec.train.cpus_per_worker + 0.49))
    torch.set_num_threads(threads)


def describe(spec: TrainSpec, tables) -> dict:
    """Sizes for the job log and metrics.json (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_recommender(spec.model, tables)
    return {
        "parameters": count_parameters(model),
        "model": asdict(spec.model),
        "train": asdict(spec.train),
    }
