"""Latency of the re-rankers (rec/rerank.py) on one CPU thread.

    python bench/rerank.py            # full grid, ~1 min
    python bench/rerank.py --quick    # N=500, k=10 only, a few seconds

For N in {100, 500, 1000} candidates, k in {10, 50} picks, batch 1 and 64, MMR and DPP over
(N, D) float32 item vectors (cosine similarity built on the fly, as in serving), it prints
the median time per request and writes bench/results/rerank.json. Target: DPP at N=500,
k=10 within 1 ms per request.
"""

from __future__ import annotations

import os

# One thread, set before numpy loads its BLAS: serving runs many replicas per machine.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from rec.rerank import dpp, mmr  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "rerank.json"
METHODS = {"mmr": mmr, "dpp": dpp}


def make_inputs(batch: int, n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(B, N) float32 scores and (B, N, D) float32 clustered item vectors."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(batch, 10, dim))  # (B, 10, D)
    which = rng.integers(0, 10, size=(batch, n))  # (B, N)
    vectors = np.take_along_axis(centers, which[:, :, None], axis=1)  # (B, N, D)
    vectors = vectors + 0.5 * rng.normal(size=vectors.shape)
    scores = rng.normal(size=(batch, n))
    return scores.astype(np.float32), vectors.astype(np.float32)


def time_per_request(
    fn, scores, vectors, k: int, lam: float, budget_s: float
) -> tuple[float, float]:
    """(median, min) seconds per request over repeated calls (at least 5, ~budget_s in all).

    The min is the better estimate of the intrinsic cost on a shared, noisy machine.
    """
    fn(scores, k, lam, vectors=vectors)  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn(scores, k, lam, vectors=vectors)
        times.append(time.perf_counter() - t0)
    per = np.array(times) / scores.shape[0]
    return float(np.median(per)), float(per.min())


def run(
    ns=(100, 500, 1000), ks=(10, 50), batches=(1, 64), dim: int = 64, budget_s: float = 0.3
) -> list[dict]:
    """Time every (N, batch, k, method) cell; prints one markdown table row per cell."""
    rows = []
    for n in ns:
        for batch in batches:
            scores, vectors = make_inputs(batch, n, dim)
            for k in ks:
                for name, fn in METHODS.items():
                    med, low = time_per_request(fn, scores, vectors, k, 0.5, budget_s)
                    row = {"method": name, "n": n, "k": k, "batch": batch, "dim": dim}
                    row |= {"ms_median": round(med * 1e3, 4), "ms_min": round(low * 1e3, 4)}
                    rows.append(row)
                    print(f"| {name} | {n} | {k} | {batch} | {med * 1e3:.3f} | {low * 1e3:.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=500, k=10 only")
    parser.add_argument("--dim", type=int, default=64, help="item vector size D")
    args = parser.parse_args()
    grid = {"ns": (500,), "ks": (10,), "budget_s": 0.1} if args.quick else {}
    print("| method | N | k | batch | ms/request median | ms/request min |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = run(dim=args.dim, **grid)
    for r in rows:
        if (r["method"], r["n"], r["k"]) == ("dpp", 500, 10):
            verdict = "meets" if r["ms_median"] <= 1.0 else "MISSES"
            print(
                f"target DPP N=500 k=10 batch {r['batch']}: {r['ms_median']:.3f} ms ({verdict} 1 ms)"
            )
    meta = {
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "threads": 1,
        "lam": 0.5,
        "vectors": "float32 clustered, 10 clusters",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(
        f"wrote {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}"
    )


if __name__ == "__main__":
    main()
