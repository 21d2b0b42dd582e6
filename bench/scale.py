"""Scale sweep (issue 13): cost curves of generate, prepare, train, evaluation, retrieval.

    python bench/scale.py          # the points that fit (each < 30 min; ~1 h on 2 cores)
    python bench/scale.py --big    # + 4M items for train, evaluation, retrieval
    python bench/scale.py --only retrieval --items 12000 100000 --update

It does not take the Ray lock itself: on the shared machine run it as
`flock /tmp/ray.lock python bench/scale.py ...`. Every point runs in its own subprocess, so its
peak RSS is its own (VmHWM):

  generate   the Taobao-shaped synthetic log streamed to parquet at scale 0.01, 0.1, 1 (~1M,
             ~10M, ~100M events): seconds, peak RSS (bounded: one 20k-user chunk at a time)
  prepare    the same log (jobs/configs/taobao_scale.yaml) at scale 0.01, 0.1, 1 written as one
             CSV like the real file, then jobs.prepare's pipeline (CSV blocks parsed by
             polars inside plain Ray tasks: rec/ray_prepare.py) and the
             single-process polars references (bench/prepare.py: eager where it fits, i.e.
             up to 10M events, and streaming at every size); driver and largest-worker peak
             RSS, output bytes, Ray over the fastest polars reference
  train      bench/scale_train.py: Ray Train + DeepSpeed steps (2 CPU workers) at 100k, 1M
             (4M) items under ZeRO-2, ZeRO-3 and the row-sparse item table
             (train.item_table=sparse, rec/sparse_table.py, as jobs.train): step seconds,
             tokens/s, largest worker RSS; quality (scale_quality.py): sampled vs full softmax
  serve      bench/scale_serve.py: the HTTP endpoint over a 4.16M-item export: p50/p99
  evaluate   full ranking of every item, chunked over items (rec/evaluation.py), for a sample
             of users of a tiny model (64-d) at 100k, 1M items (4M with --big): seconds
             per 10k users
  retrieval  QueryTower.retrieve at batch 1 (the serving path: transformer + top-100), exact
             matmul versus the faiss IVF index (rec/ann.py) at 12k, 100k, 1M (4M) items: p50/p99,
             index build seconds, recall@100 of the index's top-100 against exact

Untrained weights carry no structure, so the item table is made category-clustered (a
category vector plus a smaller item vector, the shape a trained table has) before retrieval.
Writes bench/results/scale.json (one record per point, plus fitted exponents b of
cost ~ size^b per stage) and bench/results/scale.png. Timings depend on the machine's load.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / ".cache" / "bench_scale"
EVAL_POINTS = ((100_000, 2000), (1_000_000, 500))  # (items, users measured)
RETRIEVAL_ITEMS = (12_000, 100_000, 1_000_000)
N_CATEGORIES = 9_439  # Taobao's
POINT_SECONDS = 1800  # a point that does not finish in 30 min does not fit this node


def _peak_rss_mb() -> int:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the parent's across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _tiny_model(n_items: int, seed: int = 0):
    """A 64-d, 2-layer Recommender over n_items items, one category each (Zipf-sized)."""
    import torch

    from rec.model import DataDims, ModelConfig
    from rec.recommender import Recommender

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_cat = min(N_CATEGORIES, n_items)
    weights = 1.0 / np.arange(1, n_cat + 1)
    cats = np.zeros((n_items + 1, 1), dtype=np.int64)
    cats[1:, 0] = 1 + rng.choice(n_cat, n_items, p=weights / weights.sum())
    cfg = ModelConfig(size="tiny", max_len=50, dropout=0.0)
    dims = DataDims(n_items=n_items, n_categories=n_cat)
    return Recommender(cfg, dims, torch.as_tensor(cats)).eval(), cats


def _histories(n_users: int, n_items: int, seed: int) -> list[np.ndarray]:
    """Histories of 5..50 items, popularity-skewed (Zipf over a random item order)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_items) + 1
    lengths = rng.integers(5, 51, n_users)
    ranks = np.minimum(rng.zipf(1.2, lengths.sum()), n_items) - 1
    return np.split(order[ranks], np.cumsum(lengths)[:-1])


def point_evaluate(n_items: int, n_users: int) -> dict:
    """Chunked full-ranking evaluation of n_users users; seconds scaled to 10k users."""
    import torch

    from rec.data.batch import Batch, left_pad, length_batches
    from rec.data.splits import ItemTables
    from rec.evaluation import DEFAULT_ITEM_CHUNK, evaluate

    torch.set_num_threads(1)
    model, cats = _tiny_model(n_items)
    hists = _histories(n_users, n_items, seed=1)
    full = left_pad(hists, 51)  # (U, 51): inputs are all but the last, targets shifted
    items = torch.as_tensor(full[:, :-1])
    targets = torch.as_tensor(full[:, 1:])
    real = (items > 0).long()
    rows = Batch(items, real, real, targets, (targets > 0).long())
    counts = np.bincount(np.concatenate(hists), minlength=n_items + 1)
    tables = ItemTables(cats, counts, {})
    t0 = time.perf_counter()
    metrics = evaluate(model, length_batches(rows, 256), tables, "test")
    seconds = time.perf_counter() - t0
    return {
        "stage": "evaluate",
        "items": n_items,
        "users": n_users,
        "item_chunk": DEFAULT_ITEM_CHUNK,
        "seconds": round(seconds, 2),
        "seconds_per_10k_users": round(seconds * 10_000 / n_users, 1),
        "peak_rss_mb": _peak_rss_mb(),
        "test.ndcg@10": round(metrics["test.ndcg@10"], 5),  # untrained: ~0, a sanity value
    }


def _clustered_model(n_items: int):
    """The tiny model with a category-clustered item table (module docstring)."""
    import torch

    model, _ = _tiny_model(n_items)
    with torch.no_grad():
        model.model.category_emb.weight.normal_(0.0, 1.0)
        model.model.item_emb.weight.normal_(0.0, 0.5)
        for emb in (model.model.category_emb, model.model.item_emb):
            emb.weight[0].zero_()
    return model


def point_retrieval(n_items: int, method: str, n_queries: int = 300) -> dict:
    """p50/p99 of one-request retrieval (top-100), build seconds, recall@100 vs exact."""
    import faiss
    import torch

    from rec import ann
    from serve.engine import QueryTower

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    model = _clustered_model(n_items)
    exact = QueryTower(model, behavior=1)
    index, build_s = None, 0.0
    if method == "ann":
        t0 = time.perf_counter()
        index = ann.build_index(exact.table[1:].numpy())
        build_s = time.perf_counter() - t0
    tower = QueryTower(model, behavior=1, index=index)
    hists = _histories(n_queries, n_items, seed=2)
    times, recalls = [], []
    for h in hists:
        t0 = time.perf_counter()
        got = tower.retrieve([h], [None], 100)[0]
        times.append(time.perf_counter() - t0)
        if index is not None:
            want = exact.retrieve([h], [None], 100)[0]
            recalls.append(len(np.intersect1d(got.candidates, want.candidates)) / 100)
    ms = np.array(times[5:]) * 1000  # the first calls warm caches
    return {
        "stage": "retrieval",
        "items": n_items,
        "method": method,
        "seconds": round(float(np.sum(times)) + build_s, 2),
        "build_seconds": round(build_s, 1),
        "nlist": index.nlist if index is not None else None,
        "nprobe": index.nprobe if index is not None else None,
        "recall@100": round(float(np.mean(recalls)), 4) if recalls else 1.0,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "peak_rss_mb": _peak_rss_mb(),
    }


def point_generate(scale: float, work: Path) -> dict:
    """The Taobao-shaped synthetic log at `scale` streamed to parquet files, chunk by chunk."""
    from jobs.config import RunConfig
    from rec.config_loader import load_config
    from rec.data.synthetic import generate

    cfg = load_config(RunConfig, str(ROOT / "jobs/configs/taobao_scale.yaml"), [])
    cfg.data.synthetic.scale = scale
    t0 = time.perf_counter()
    paths = generate(cfg.data.synthetic, work / f"gen-{scale:g}", overwrite=True)
    seconds = time.perf_counter() - t0
    import pyarrow.parquet as pq

    events = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    return {
        "stage": "generate",
        "events": events,
        "seconds": round(seconds, 1),
        "events_per_s": round(events / seconds),
        "peak_rss_mb": _peak_rss_mb(),
        "bytes": sum(p.stat().st_size for p in paths),
        "files": len(paths),
    }


def _run(cmd: list[str], points: int = 1) -> str:
    """Run points in a subprocess, each allowed POINT_SECONDS; its last stdout line."""
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["TORCH_EXTENSIONS_DIR"] = ext
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=POINT_SECONDS * points
    )
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[1:4])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def _key(r: dict) -> tuple:
    variant = r.get("mode") or r.get("method") or r.get("zero_stage") or r.get("interest_loss")
    return r["stage"], r.get("events") or r.get("items") or r.get("scale"), variant


def _cost(r: dict) -> tuple[str, float, float, str] | None:
    """(series name, size, cost, panel axis) of a record's time curve; None for a failed point."""
    if "error" in r:
        return None
    if r["stage"] in ("prepare", "generate"):
        name = f"{r['stage']}.{r.get('mode', 'synthetic')}.seconds"
        return name, r["events"], r["seconds"], "events"
    if r["stage"] == "evaluate":
        return "evaluate.seconds_per_10k_users", r["items"], r["seconds_per_10k_users"], "items"
    if r["stage"] == "train":
        z = r["zero_stage"]
        name = f"train.{f'zero{z}' if str(z).isdigit() else z}.step_seconds"
        return name, r["items"], r["seconds"], "items"
    if r["stage"] == "serve":
        return "serve.http.p50_ms", r["items"], r["p50_ms"], "items"
    if r["stage"] == "quality":
        return None  # one catalogue size: a table row, not a curve
    if r["stage"] == "retrieval":
        return f"retrieval.{r['method']}.p50_ms", r["items"], r["p50_ms"], "items"
    return f"{r['stage']}.seconds", r.get("events") or r["items"], r["seconds"], "items"


def exponents(records: list[dict]) -> dict[str, float]:
    """b of cost ~ size^b (least squares in log-log) per stage (and method / mode)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for key, x, y, _ in filter(None, map(_cost, records)):
        series.setdefault(key, []).append((x, y))
    out = {}
    for key, pts in series.items():
        if len({x for x, _ in pts}) >= 2:
            xs, ys = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out[key] = round(float(np.polyfit(xs, ys, 1)[0]), 2)
    return out


def plot(records: list[dict], path: Path) -> None:
    """Log-log panels: seconds against events (generate, prepare), cost against items
    (train step, evaluation per 10k users, retrieval p50 ms), and peak RSS against size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    lines: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for r in records:
        cost = _cost(r)
        if cost is None:
            continue
        name, size, y, axis = cost
        lines.setdefault((0 if axis == "events" else 1, name), []).append((size, y))
        peak = f"{name.rsplit('.', 1)[0]} peak MB"
        lines.setdefault((2, peak), []).append((size, r["peak_rss_mb"]))
        if r.get("worker_peak_rss_mb"):
            lines.setdefault((2, f"{peak} (largest worker)"), []).append(
                (size, r["worker_peak_rss_mb"])
            )
    for (panel, name), pts in lines.items():
        pts.sort()
        axes[panel].plot(*zip(*pts, strict=True), "o-", label=name)
    titles = ("seconds vs events", "cost vs items (see legend)", "peak RSS MB vs size")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(xscale="log", yscale="log", title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def jsonl_records(script: str, args: list[str], work: Path, points: int) -> list[dict]:
    """Records of one of helper T's scripts (bench/scale_train.py, scale_serve.py,
    scale_quality.py), run in its own process with `--out <file>` (JSON lines)."""
    out = work / f"{Path(script).stem}.jsonl"
    out.unlink(missing_ok=True)
    _run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], points)
    return [json.loads(line) for line in out.read_text().splitlines()]


def model_records(args, stages: list[str], work: Path) -> list[dict]:
    """train: Ray Train + DeepSpeed steps at 100k, 1M (4M) items, ZeRO-2/3 and the row-sparse
    item table; quality: sampled vs full softmax at ~100k items; serve: the HTTP endpoint
    over a 4.16M-item export (its faiss index built first, no Ray)."""
    records: list[dict] = []
    if "train" in stages:
        items = args.train_items or [100_000, 1_000_000] + ([4_162_024] if args.big else [])
        zero = ["2", "3", "sparse"]
        cli = ["--items", *map(str, items), "--zero", *zero, "--steps", str(args.train_steps)]
        records += jsonl_records("scale_train.py", cli, work, len(items) * len(zero))
    if "quality" in stages:
        records += jsonl_records("scale_quality.py", ["--items", "100000"], work, 1)
    if "serve" in stages:
        root = ["--root", str(work / "serve")]
        _run([sys.executable, str(ROOT / "bench/scale_serve.py"), "build", *root])
        records += jsonl_records("scale_serve.py", ["serve", *root], work, 1)
    return records


def measure(args, stages: list[str], work: Path) -> list[dict]:
    """Every asked-for point, each in its own subprocess."""
    records: list[dict] = []
    me = [sys.executable, __file__, "--point"]
    if "generate" in stages:
        for scale in args.gen_scales:
            records.append(json.loads(_run([*me, "generate", str(scale), str(work)])))
            print(json.dumps(records[-1]), flush=True)
    if "prepare" in stages:
        from bench.prepare import scale_points

        for scale in args.prepare_scales:
            # Eager polars holds the whole log (~37 GB at 100M events): up to 10M only.
            modes = ["polars", "polars-stream", "ray"] if scale <= 0.1 else ["ray", "polars-stream"]
            records += scale_points(scale, work, modes, POINT_SECONDS)
            print(json.dumps(records[-1]), flush=True)
    records += model_records(args, stages, work)
    if "evaluate" in stages:
        for items, users in EVAL_POINTS + (((4_162_024, 200),) if args.big else ()):
            records.append(json.loads(_run([*me, "evaluate", str(items), str(users)])))
            print(json.dumps(records[-1]), flush=True)
    if "retrieval" in stages:
        for items in args.items or RETRIEVAL_ITEMS + ((4_162_024,) if args.big else ()):
            for method in ("exact", "ann"):
                records.append(json.loads(_run([*me, "retrieval", str(items), method])))
                print(json.dumps(records[-1]), flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    stages = ["generate", "prepare", "train", "quality", "evaluate", "retrieval", "serve"]
    parser.add_argument("--only", choices=stages, nargs="*")
    parser.add_argument("--gen-scales", type=float, nargs="*", default=[0.01, 0.1, 1.0])
    parser.add_argument("--prepare-scales", type=float, nargs="*", default=[0.01, 0.1, 1.0])
    parser.add_argument("--work", default=str(WORK), help="generated logs and outputs")
    parser.add_argument("--items", type=int, nargs="*", help="retrieval catalogue sizes")
    parser.add_argument("--train-items", type=int, nargs="*", help="train catalogue sizes")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--big", action="store_true", help="also 4M items (eval, retrieval)")
    parser.add_argument("--update", action="store_true", help="merge into scale.json")
    parser.add_argument("--merge", nargs="*", default=[], help="JSON-lines records to add")
    parser.add_argument("--point", nargs="+", help=argparse.SUPPRESS)  # in the subprocess
    args = parser.parse_args()
    if args.point:
        stage, size, arg = args.point
        if stage == "generate":
            print(json.dumps(point_generate(float(size), Path(arg))))
            return
        fn = point_evaluate if stage == "evaluate" else point_retrieval
        print(json.dumps(fn(int(size), int(arg) if stage == "evaluate" else arg)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    records = measure(args, stages if args.only is None else args.only, work)
    for path in args.merge:  # points measured by an earlier run of one of the scripts above
        lines = Path(path).read_text().splitlines()
        records += [r for r in map(json.loads, filter(None, lines)) if "stage" in r]
    if args.update:  # keep the earlier file's points that this run did not measure again
        old = json.loads((RESULTS / "scale.json").read_text())["records"]
        records = [r for r in old if _key(r) not in {_key(x) for x in records}] + records
    report = {
        "machine": f"{os.cpu_count()} CPUs, shared with other jobs; one thread per point",
        "records": records,
        "exponents": exponents(records),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(records, RESULTS / "scale.png")
    print(json.dumps(report["exponents"]))
    print(f"wrote {RESULTS / 'scale.json'} and {RESULTS / 'scale.png'}")


if __name__ == "__main__":
    main()
