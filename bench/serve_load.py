"""Closed-loop HTTP load against the recommender: requests/s, latency percentiles, errors.

    # against a running server (python -m jobs.serve ... or serve run serve/config.yaml):
    python bench/serve_load.py --model-dir outputs/beauty
    # or start the server itself (a separate process, stopped at the end):
    flock /tmp/ray.lock python bench/serve_load.py --model-dir outputs/beauty \
        --start jobs/configs/beauty.yaml model_dir=outputs/beauty

Each of `--concurrency` workers (asyncio + httpx, one process) sends POST /recommend for a
random logged user of the model's data, waits for the answer, and sends the next one. Per
level: warm-up, then `--duration` seconds measured. Writes bench/results/serve_load.json with
requests/s, p50/p95/p99 latency, errors, the mean per-stage times the server reports
(`timings_ms`) and the machine's load average (other work on the machine shows up there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]


def user_ids(model_dir: str | Path) -> np.ndarray:
    """Raw user ids with a logged history (the server knows them): the test split of the
    current version of <model_dir>/data, verified as a replica verifies it."""
    if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
        sys.path.insert(0, str(ROOT))
    from serve.cache import test_split

    test = test_split(str(Path(ROOT, model_dir)))
    if test is None:
        raise SystemExit(f"{model_dir}/data has no test split: no logged users to ask for")
    frame = pl.read_parquet(test / "*.parquet", columns=["user_id"])
    return frame["user_id"].to_numpy()


async def worker(client, url, users, rng, stop_at, record) -> None:
    while time.perf_counter() < stop_at:
        body = {"user_id": int(rng.choice(users)), "k": 10}
        t0 = time.perf_counter()
        try:
            resp = await client.post(url, json=body)
            ok = resp.status_code == 200
            stages = resp.json()["timings_ms"] if ok else None
        except (httpx.HTTPError, ValueError):
            ok, stages = False, None
        record(time.perf_counter() - t0, ok, stages)


async def level(base: str, users: np.ndarray, concurrency: int, seconds: float, warmup: float):
    """One closed-loop level: warm-up, then `seconds` measured."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        url = f"{base}/recommend"
        rngs = [np.random.default_rng(i) for i in range(concurrency)]
        end = time.perf_counter() + warmup
        await asyncio.gather(*(worker(client, url, users, r, end, lambda *a: None) for r in rngs))
        lat, errors, stages = [], [0], []

        def record(dt: float, ok: bool, st: dict | None) -> None:
            if ok:
                lat.append(dt)
                stages.append(st)
            else:
                errors[0] += 1

        t0 = time.perf_counter()
        end = t0 + seconds
        await asyncio.gather(*(worker(client, url, users, r, end, record) for r in rngs))
        wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000.0
    keys = sorted({k for st in stages for k in st})
    return {
        "concurrency": concurrency,
        "seconds": round(wall, 2),
        "requests": len(lat) + errors[0],
        "errors": errors[0],
        "requests_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "server_stage_mean_ms": {
            k: round(float(np.mean([st.get(k, 0.0) for st in stages])), 3) for k in keys
        },
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def start_server(config: str, overrides: list[str], base: str) -> subprocess.Popen:
    """python -m jobs.serve in its own process group; returns once /healthz answers."""
    cmd = [sys.executable, "-m", "jobs.serve", "--config", config, *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    os.killpg(proc.pid, 2)  # never leave a half-started server (and its Ray) behind
    proc.wait(timeout=60)
    raise RuntimeError("server did not become healthy within 240 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model-dir", default="outputs/beauty", help="for the user ids")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    parser.add_argument("--start", nargs="+", metavar=("CONFIG", "OVERRIDE"), default=None)
    args = parser.parse_args(argv)
    users = user_ids(args.model_dir)
    proc = start_server(args.start[0], args.start[1:], args.url) if args.start else None
    try:
        levels = []
        for c in args.concurrency:
            res = asyncio.run(level(args.url, users, c, args.duration, args.warmup))
            print(json.dumps(res), flush=True)
            levels.append(res)
        health = httpx.get(f"{args.url}/healthz", timeout=10).json()
    finally:
        if proc is not None:
            os.killpg(proc.pid, 2)  # SIGINT: jobs.serve shuts Serve down
            proc.wait(timeout=60)
    out = {
        "url": args.url,
        "server": health,
        "cpus": os.cpu_count(),
        "request": {"user_id": "random logged user", "k": 10},
        "levels": levels,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"[serve_load] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
