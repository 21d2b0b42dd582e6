"""Training steps at Taobao's catalogue size (issue 13.3): Ray Train + DeepSpeed, 2 CPU workers.

    flock /tmp/ray.lock timeout 480 python bench/scale_train.py --items 100000 1000000 --zero 2 3
    flock /tmp/ray.lock timeout 480 python bench/scale_train.py --items 4162024 --zero 2

`train_points(items, zero_stages)` -> one record per (items, stage):
{stage: "train", items, zero_stage, seconds (mean step after warm-up), tokens_per_s (real
target tokens, both workers), peak_rss_mb (largest worker, VmHWM), ...}. bench/scale.py
calls it. Each point is its own Ray Train run of the tiny model of
jobs/configs/taobao_scale.yaml (64-d, 2 layers, interest loss "auto": sampled softmax with
logQ at >= 100k items), fed Taobao-shaped rows made in each worker (Zipf item popularity,
histories mostly at the 50-event window, as Taobao's ~100 events per user give), so only the
catalogue size changes between points. No validation, checkpoint or export: the step alone.
The pieces are the training job's own (rec.recommender, rec.deepspeed_setup, length_batches).

`quality(n_items, steps)` trains the same model with full and with sampled softmax on the
same rows and seeds, in one process, and ranks held-out next items over the full catalogue
(NDCG@10, Recall@10): sampled softmax's cost in quality where both fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "jobs" / "configs" / "taobao_scale.yaml"
N_CATEGORIES = 9_439  # Taobao's
TAOBAO_EVENTS_PER_USER = 101.4


def peak_rss_mb() -> int:
    """This process's peak RSS (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return 0


def emit_records(records: list[dict], out: str | None, echo: bool = True) -> None:
    """Print each record as a JSON line (unless already printed) and append them to `out`."""
    if echo:
        for r in records:
            print(json.dumps(r), flush=True)
    if out:
        with open(out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def scale_configs(overrides: list[str] | None = None):
    """(ModelConfig, TrainConfig) of taobao_scale.yaml with a.b=value overrides."""
    from jobs.config import RunConfig
    from rec.config_loader import load_config

    cfg = load_config(RunConfig, str(CONFIG), list(overrides or []))
    return cfg.model, cfg.train


def catalogue(n_items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item categories (n_items + 1, 1), a popularity order of items and Zipf weights."""
    rng = np.random.default_rng(seed)
    n_cat = min(N_CATEGORIES, n_items)
    cat_w = 1.0 / np.arange(1, n_cat + 1)
    cats = np.zeros((n_items + 1, 1), dtype=np.int64)
    cats[1:, 0] = 1 + rng.choice(n_cat, n_items, p=cat_w / cat_w.sum())
    return cats, rng.permutation(n_items) + 1, rng


def sequences(n_items: int, n_rows: int, max_len: int, seed: int) -> np.ndarray:
    """(n_rows, max_len + 1) left-padded item sequences: lengths as Taobao users' (mean ~101
    events, cut to the window), items Zipf(1.1)-popular over a seeded item order."""
    _, order, _ = catalogue(n_items)
    rng = np.random.default_rng(seed)
    lengths = np.clip(
        rng.exponential(TAOBAO_EVENTS_PER_USER, n_rows).astype(int) + 2, 2, max_len + 1
    )
    out = np.zeros((n_rows, max_len + 1), dtype=np.int64)
    ranks = np.minimum(rng.zipf(1.1, int(lengths.sum())), n_items) - 1
    flat = order[ranks]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for r, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        out[r, max_len + 1 - n :] = flat[s : s + n]
    return out


def rows_batch(seqs: np.ndarray, seed: int):
    """Sequences (R, T + 1) -> a training Batch (R, T): next item at every position; Taobao's
    behavior mix (pv 89.5 / cart 5.5 / fav 2.9 / buy 2.1 %)."""
    import torch

    from rec.data.batch import Batch
    from rec.data.schema import BEHAVIOR_TOKENS

    rng = np.random.default_rng(seed)
    names = ["pv", "cart", "fav", "buy"]
    tokens = np.array([BEHAVIOR_TOKENS[n] for n in names])
    beh = tokens[rng.choice(4, seqs.shape, p=[0.895, 0.055, 0.029, 0.021])] * (seqs > 0)
    gaps = np.where(seqs > 0, rng.integers(1, 20, seqs.shape), 0)
    t = torch.as_tensor
    return Batch(
        items=t(seqs[:, :-1]),
        behaviors=t(beh[:, :-1]),
        gaps=t(gaps[:, :-1]),
        targets=t(seqs[:, 1:] * (seqs[:, :-1] > 0)),
        target_behaviors=t(beh[:, 1:] * (seqs[:, :-1] > 0)),
    )


def build_model(model_cfg, n_items: int, counts: np.ndarray | None = None):
    """The Recommender over n_items Taobao-like items; proposal q from counts (None: Zipf)."""
    import torch

    from rec.model import DataDims
    from rec.recommender import Recommender

    cats, order, _ = catalogue(n_items)
    dims = DataDims(n_items=n_items, n_categories=min(N_CATEGORIES, n_items))
    model = Recommender(model_cfg, dims, torch.as_tensor(cats))
    if counts is None:  # expected counts of the Zipf(1.1) draw, as the training split gives
        counts = np.zeros(n_items + 1)
        counts[order] = 1e6 / np.arange(1, n_items + 1) ** 1.1
    model.set_proposal(torch.as_tensor(counts))
    return model


def _timed_steps(engine, rows, train_cfg, warmup: int, rank: int, table=None):
    """Warm-up steps, then the timed ones: (seconds, timed steps, real target tokens). No host
    sync inside the timed window on a GPU (tokens are counted on the CPU copy of the batch;
    the clock is read after a device synchronize at both ends). table: the row-sparse item
    table stepped after the engine (rec/sparse_table.py, as in jobs.train), or None."""
    import torch

    from rec.data.batch import length_batches
    from rec.sparse_table import optimizer_step

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rng = np.random.default_rng(rank)
    t0, steps, tokens = 0.0, 0, 0
    batches = length_batches(rows, train_cfg.batch_size, rng, 8 * train_cfg.batch_size)
    for k, (_, batch) in enumerate(batches):
        if k == warmup:
            sync()
            t0 = time.perf_counter()
        if k >= warmup:
            steps, tokens = steps + 1, tokens + int((batch.targets > 0).sum())
        loss, _ = engine(batch.to(engine.device))
        engine.backward(loss)
        optimizer_step(engine, table)
    sync()
    return time.perf_counter() - t0, steps, tokens


def train_loop(config: dict) -> None:
    """One Ray Train worker: warm-up + timed steps on its own rows; rank 0 writes the record."""
    import ray.train
    import torch
    import torch.distributed as dist

    from rec.deepspeed_setup import deepspeed_engine, worker_env
    from rec.sparse_table import dense_parameters, sparse_item_table

    model_cfg, train_cfg = config["model"], config["train"]
    worker_env(train_cfg, config["extensions_dir"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(train_cfg.seed)
    t0 = time.perf_counter()
    model = build_model(model_cfg, config["items"])
    n_steps = config["steps"] + config["warmup"]
    table = sparse_item_table(model, train_cfg, n_steps)  # train.item_table, as jobs.train
    engine = deepspeed_engine(model, train_cfg, n_steps, dense_parameters(model, table))
    setup_s = time.perf_counter() - t0
    seqs = sequences(config["items"], n_steps * train_cfg.batch_size, model_cfg.max_len, 100 + rank)
    seconds, steps, tokens = _timed_steps(
        engine, rows_batch(seqs, rank), train_cfg, config["warmup"], rank, table
    )
    stats = torch.tensor([seconds, tokens], dtype=torch.float64)
    dist.all_reduce(stats)  # seconds and tokens summed over ranks
    peak = torch.tensor([peak_rss_mb()], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    step_s = float(stats[0]) / dist.get_world_size() / steps
    if rank == 0:  # a file: Ray Train v2 keeps no metrics of a report without a checkpoint
        record = {
            "seconds": step_s,
            "tokens_per_s": float(stats[1]) / (step_s * steps),
            "peak_rss_mb": int(peak[0]),
            "setup_seconds": setup_s,
            "steps": steps,
            "interest_loss": model.interest_loss,
            "item_table": "sparse" if table else "dense",
        }
        if torch.cuda.is_available():
            record["gpu_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        Path(config["result_path"]).write_text(json.dumps(record))


def train_point(
    n_items: int, zero_stage: int | str, steps: int = 30, warmup: int = 5, overrides=()
) -> dict:
    """One Ray Train run (2 CPU workers) of `steps` timed steps after `warmup` at n_items.
    zero_stage: 2 or 3 (train.item_table=dense), or "sparse" (train.item_table=sparse: the
    item table row-sparse, the rest under ZeRO-2)."""
    import ray

    from jobs.common import RayConfig, start_local_ray

    stage = 2 if zero_stage == "sparse" else int(zero_stage)
    table = "sparse" if zero_stage == "sparse" else "dense"
    model_cfg, train_cfg = scale_configs(
        [f"train.deepspeed.zero_stage={stage}", f"train.item_table={table}", *overrides]
    )
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    if not ray.is_initialized():  # on loopback, as a job's local Ray
        start_local_ray(RayConfig(num_cpus=None if train_cfg.use_gpu else 2), log_to_driver=False)
    result_path = Path(f"/tmp/ray_scale_train/{n_items}-z{zero_stage}.json")
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    loop_config = {
        "model": model_cfg,
        "train": train_cfg,
        "items": n_items,
        "steps": steps,
        "warmup": warmup,
        "extensions_dir": ext,
        "result_path": str(result_path),
    }
    _fit(loop_config, train_cfg, f"scale-train-{n_items}-z{zero_stage}")
    m = json.loads(result_path.read_text())
    return {
        "stage": "train",
        "items": n_items,
        "zero_stage": zero_stage,
        "seconds": round(m["seconds"], 4),
        "tokens_per_s": round(m["tokens_per_s"], 1),
        "peak_rss_mb": m["peak_rss_mb"],
        "setup_seconds": round(m["setup_seconds"], 1),
        "run_seconds": round(time.perf_counter() - t0, 1),
        "steps": m["steps"],
        "workers": train_cfg.num_workers,
        "batch_size": train_cfg.batch_size,
        "interest_loss": m["interest_loss"],
        "item_table": m["item_table"],
        "n_negatives": model_cfg.n_negatives,
    }


def _fit(loop_config: dict, train_cfg, name: str) -> None:
    """`train_loop` on Ray Train with the train config's workers, CPUs and GPUs."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = {"GPU": 1} if train_cfg.use_gpu else {}
    TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train_cfg.num_workers,
            use_gpu=train_cfg.use_gpu,
            resources_per_worker={"CPU": train_cfg.cpus_per_worker, **gpu},
        ),
        run_config=RunConfig(name=name, storage_path="/tmp/ray_scale_train"),
    ).fit()


def train_points(
    items=(100_000, 1_000_000, 4_162_024), zero_stages=(2, 3, "sparse"), steps: int = 30
) -> list[dict]:
    """Records for every (items, ZeRO stage); a point that fails is recorded with its error."""
    out = []
    for n in items:
        for z in zero_stages:
            try:
                out.append(train_point(n, z, steps))
            except Exception as err:  # noqa: BLE001 - a point that breaks is a result too
                out.append(
                    {"stage": "train", "items": n, "zero_stage": z, "error": repr(err)[:400]}
                )
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000, 4_162_024])
    parser.add_argument("--zero", nargs="+", default=["2", "3", "sparse"], help="2, 3, sparse")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", help="append the records (JSON lines) to this file")
    args = parser.parse_args()
    stages = [z if z == "sparse" else int(z) for z in args.zero]
    records = train_points(args.items, stages, args.steps)  # printed as each point ends
    emit_records(records, args.out, echo=False)


if __name__ == "__main__":
    main()
