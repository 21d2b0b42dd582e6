"""Benchmark: one Amazon Beauty training epoch, bare PyTorch versus Ray Train + DeepSpeed.

    python bench/train_throughput.py                  # needs ../shared/data (or RECDIV_DATA)
    python bench/train_throughput.py --size small

(a) a single-process PyTorch loop with 2 threads, global batch 256; (b) Ray Train with 2
DeepSpeed ZeRO-2 workers x 1 thread each, micro-batch 128 each (the same global batch, the
same model, data and length bucketing), on the same machine in the same run. Reports
sequences/s, tokens/s (real, non-padding), the time ratio and the peak RSS per worker; writes
bench/results/train_throughput.json. Target: (b) takes at most 1.15x the time of (a).
Each path runs --repeat times (default 3, interleaved, each in a fresh process) and the
medians are compared: single runs on a 2-core machine vary by +-10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("RECDIV_DATA", ROOT.parent / "shared" / "data"))


def bare(prepared: Path, size: str, batch: int) -> dict:
    import numpy as np
    import torch

    from rec.data.batch import collate, length_batches
    from rec.data.splits import load_examples, load_item_tables
    from rec.model import ModelConfig
    from rec.recommender import build_recommender

    torch.set_num_threads(2)
    torch.manual_seed(0)
    tables = load_item_tables(prepared)
    model = build_recommender(ModelConfig(size=size, use_time_gaps=False), tables)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = collate(load_examples(prepared, "train", tables.meta["max_len"]))
    t0, seqs, tokens, steps = time.perf_counter(), 0, 0, 0
    # The same length bucketing as the Ray Train loop (TrainConfig.length_buckets = 8).
    for _, b in length_batches(rows, batch, np.random.default_rng(0), bucket_rows=8 * batch):
        loss, _ = model.loss(b)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seqs, tokens, steps = seqs + b.size, tokens + int((b.items > 0).sum()), steps + 1
    s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds": round(s, 1),
        "steps": steps,
        "seq_per_s": round(seqs / s, 1),
        "tokens_per_s": round(tokens / s),
        "peak_rss_mb_per_worker": round(rss),
    }


def ray_deepspeed(prepared: Path, size: str, batch: int, out: Path) -> dict:
    from jobs.config import RunConfig
    from jobs.train import run
    from rec.config_loader import load_config

    cfg = load_config(
        RunConfig,
        ROOT / "jobs" / "configs" / "beauty.yaml",
        [
            f"output_dir={out}",
            f"train.prepared_dir={prepared}",
            f"model.size={size}",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.threads_per_worker=1",
            f"train.batch_size={batch // 2}",
            "train.epochs=1",
            "train.deepspeed.zero_stage=2",
        ],
    )
    m = json.loads(json.dumps(run(cfg)))
    return {
        "seconds": m["best.train_seconds"],
        "steps": m["best.step"],
        "seq_per_s": m["best.train_seq_per_s"],
        "tokens_per_s": m["best.train_tokens_per_s"],
        "peak_rss_mb_per_worker": m["best.worker_peak_rss_mb"],
    }


def run_path(mode: str, args: argparse.Namespace, work: Path) -> dict:
    """One path ("bare" or "ray") in a fresh process, so neither warms the other's caches."""
    cmd = [sys.executable, __file__, "--one", mode, "--size", args.size]
    cmd += ["--batch", str(args.batch), "--work", str(work)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> dict:
    """Print the table of the median run of each path; the JSON record."""
    # The median run of each path: one 2-core machine is noisy (+-10 % run to run).
    results = {m: sorted(r, key=lambda x: x["seconds"])[len(r) // 2] for m, r in runs.items()}
    ratio = results["ray"]["seconds"] / results["bare"]["seconds"]
    print(
        f"\nAmazon Beauty, one epoch, model={args.size}, global batch {args.batch}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'path':34} {'seconds':>8} {'steps':>6} {'seq/s':>8} {'tokens/s':>9} {'peak RSS/worker MB':>19}"
    )
    names = {
        "bare": "(a) PyTorch, 1 process x 2 threads",
        "ray": "(b) Ray Train+DeepSpeed ZeRO-2, 2x1",
    }
    for mode, r in results.items():
        print(
            f"{names[mode]:34} {r['seconds']:8.1f} {r['steps']:6} {r['seq_per_s']:8.1f} {r['tokens_per_s']:9,} {r['peak_rss_mb_per_worker']:19,}"
        )
    for mode, r in runs.items():
        print(f"{mode} seconds per run: {[x['seconds'] for x in r]}")
    print(f"time ratio (b)/(a), medians of {args.repeat}: {ratio:.2f} (target <= 1.15)")
    return {
        "size": args.size,
        "global_batch": args.batch,
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "results": results,
        "seconds_per_run": {m: [x["seconds"] for x in r] for m, r in runs.items()},
        "time_ratio": round(ratio, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--work", default=str(ROOT / ".cache" / "bench_train"))
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; medians compared")
    parser.add_argument("--one", choices=["bare", "ray"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    prepared = work / "beauty"
    if args.one:
        fn = (
            bare(prepared, args.size, args.batch)
            if args.one == "bare"
            else ray_deepspeed(prepared, args.size, args.batch, work / "ray")
        )
        print("RESULT " + json.dumps(fn))
        return
    if not (prepared / "meta.json").exists():
        from rec.data.config import DataConfig
        from rec.data.local import prepare_local

        prepare_local(
            DataConfig(format="amazon", path=str(DATA / "amazon-beauty" / "Beauty.txt.gz")),
            prepared,
        )
    runs: dict[str, list[dict]] = {"bare": [], "ray": []}
    for mode in [m for _ in range(args.repeat) for m in ("bare", "ray")]:  # interleaved
        runs[mode].append(run_path(mode, args, work))
    path = ROOT / "bench" / "results" / "train_throughput.json"
    path.write_text(json.dumps(report(args, runs), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
