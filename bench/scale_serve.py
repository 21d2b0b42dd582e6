"""The recommender endpoint at Taobao's catalogue size over HTTP (issue 13.5).

    flock /tmp/ray.lock timeout 480 python bench/scale_serve.py build   # export + faiss index
    flock /tmp/ray.lock timeout 480 python bench/scale_serve.py serve   # jobs.serve + load

`build_model_dir(root, n_items)` writes a model directory shaped like a train job's output:
<root>/data, a small prepared Taobao-shaped synthetic log (its test users are the logged users
the load generator asks for), and <root>/export, an untrained tiny model (taobao_scale.yaml's
64-d, 2 layers) over n_items items (default 4,162,024, Taobao's): the log's items first, the
rest of the catalogue after them (raw ids 10^10 + i, categories drawn like the log's), with
the faiss index `serve.retrieval: auto` builds at export time (rec/ann.py) and a manifest.
Untrained weights: latency and memory do not depend on what the table learned (the index
recall at 4M items is bench/scale.py's retrieval point).

`serve_points(root)` starts `python -m jobs.serve` on it (bench/serve_load.py's start_server),
times start-up until /healthz answers, runs serve_load's closed loop at concurrency 1 and reads
the RSS of every Serve replica process -> [{stage: "serve", items, p50_ms, p99_ms, ...}].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.scale_train import emit_records  # noqa: E402

CONFIG = ROOT / "jobs" / "configs" / "taobao_scale.yaml"
WORK = ROOT / ".cache" / "bench_scale" / "serve-4m"
TAOBAO_ITEMS = 4_162_024
EXTRA_ID = 10**10  # raw ids of the catalogue items the small log never mentions


def _vocab(data_vocab: Path, n_items: int, seed: int = 0):
    """The log's items.parquet extended to n_items rows, categories drawn as the log's."""
    import polars as pl

    items = pl.read_parquet(data_vocab / "items.parquet").sort("item_idx")
    n_seen = items.height
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, n_seen, n_items - n_seen)  # a seen item's categories per new item
    extra = items[pick.tolist()].with_columns(
        pl.Series("item_idx", np.arange(n_seen + 1, n_items + 1), dtype=items["item_idx"].dtype),
        pl.Series("item_id", EXTRA_ID + np.arange(n_items - n_seen), dtype=pl.Int64),
        pl.lit(0, dtype=items["count"].dtype).alias("count"),
    )
    return pl.concat([items, extra.select(items.columns)])


def build_model_dir(root: Path, n_items: int = TAOBAO_ITEMS, n_users: int = 3000) -> dict:
    """Prepared log + export with an n_items table and its ANN index; returns timings."""
    import torch

    from bench.scale_train import scale_configs
    from rec import ann, artifacts
    from rec.data.config import DataConfig
    from rec.data.local import prepare_local
    from rec.data.outputs import item_category_table
    from rec.data.splits import load_item_tables
    from rec.data.synthetic import SyntheticConfig
    from rec.export import save_export
    from rec.model import DataDims
    from rec.recommender import Recommender

    shutil.rmtree(root, ignore_errors=True)
    log_items = min(200_000, n_items)  # the small log's catalogue (it reaches part of it)
    syn = SyntheticConfig(
        n_users=n_users,
        n_items=log_items,
        n_categories=min(9439, log_items // 10),
        events_per_user=60,
    )
    data = root / "data"
    prepare_local(DataConfig(format="synthetic", synthetic=syn, max_len=50), data)
    tables = load_item_tables(data)
    vocab_dir = Path(artifacts.resolve(str(data))) / "vocab"
    vocab = _vocab(vocab_dir, n_items)
    meta = dict(tables.meta, n_items=n_items)
    cats = item_category_table(vocab, max(1, meta["max_categories_per_item"]))
    model_cfg, _ = scale_configs()
    torch.manual_seed(0)
    dims = DataDims(n_items=n_items, n_categories=meta["n_categories"], has_engaged=True)
    model = Recommender(model_cfg, dims, torch.as_tensor(cats)).eval()
    t0 = time.perf_counter()
    export = save_export(model, root / "export", extra={"dataset": "synthetic-taobao-4m"})
    (export / "vocab").mkdir()
    vocab.write_parquet(export / "vocab" / "items.parquet")
    shutil.copy(vocab_dir / "categories.parquet", export / "vocab" / "categories.parquet")
    (export / "data_meta.json").write_text(json.dumps(meta, indent=2))
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    built = ann.add_to_export(export, "auto")
    index_s = time.perf_counter() - t0
    artifacts.write_manifest(export, kind="export", producer="bench.scale_serve", config={})
    return {
        "items": n_items,
        "export_seconds": round(export_s, 1),
        "index": built,
        "index_build_seconds": round(index_s, 1),
    }


def replica_rss_mb() -> dict[str, int]:
    """RSS of every live Ray Serve replica process, by its process title."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(proc.info["cmdline"] or [])
        if "ServeReplica" in title and proc.info["memory_info"] is not None:
            out[title.split()[0][:80]] = round(proc.info["memory_info"].rss / 2**20)
    return out


def serve_points(
    root: Path, duration: float = 20.0, warmup: float = 3.0, extra: tuple[str, ...] = ()
) -> list[dict]:
    """Start jobs.serve on root (extra: more a.b=value overrides, e.g. serve.fused=true),
    measure start-up, concurrency-1 latency and replica RSS."""
    from bench import serve_load
    from tests.ports import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    users = serve_load.user_ids(root)
    overrides = [f"model_dir={root}", f"serve.port={port}", "serve.retrieval=auto", *extra]
    t0 = time.perf_counter()
    proc = serve_load.start_server(str(CONFIG), overrides, base)
    startup_s = time.perf_counter() - t0
    try:
        res = asyncio.run(serve_load.level(base, users, 1, duration, warmup))
        rss = replica_rss_mb()
        import httpx

        health = httpx.get(f"{base}/healthz", timeout=10).json()
    finally:
        os.killpg(proc.pid, 2)  # SIGINT: jobs.serve shuts Serve down
        proc.wait(timeout=60)
    return [
        {
            "stage": "serve",
            "items": health.get("n_items"),
            "concurrency": 1,
            "overrides": list(extra),
            "p50_ms": res["p50_ms"],
            "p99_ms": res["p99_ms"],
            "requests_per_s": res["requests_per_s"],
            "requests": res["requests"],
            "errors": res["errors"],
            "startup_seconds": round(startup_s, 1),
            "replica_rss_mb": rss,
            "peak_rss_mb": max(rss.values(), default=None),
            "server_stage_mean_ms": res["server_stage_mean_ms"],
            "load_average_1m": res["load_average_1m"],
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["build", "serve"])
    parser.add_argument("--root", default=str(WORK))
    parser.add_argument("--items", type=int, default=TAOBAO_ITEMS)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--set", nargs="*", default=[], help="serve overrides, a.b=value")
    parser.add_argument("--out", help="append the records (JSON lines) to this file")
    args = parser.parse_args()
    root = Path(args.root)
    records = (
        [build_model_dir(root, args.items)]
        if args.what == "build"
        else serve_points(root, args.duration, extra=tuple(args.set))
    )
    emit_records(records, args.out)


if __name__ == "__main__":
    main()
