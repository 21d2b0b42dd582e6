"""Benchmark: jobs.prepare on Ray Data versus the same transformation in one polars process.

    python bench/prepare.py                 # 10M-row synthetic Taobao-schema CSV log
    python bench/prepare.py --rows 1e6      # quicker

Each path runs in its own subprocess (so each driver's peak RSS is its own) over the same
generated CSV. Prints a table and writes bench/results/prepare.json. Target: the Ray path at
least 0.5x the polars events/s on a 2-core machine, driver peak RSS under 2 GB at 10M rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_log(rows: float, work: Path) -> Path:
    from rec.data.synthetic import SyntheticConfig, generate

    # ~45 rows per user with the default funnel and 40 pv events per user.
    cfg = SyntheticConfig(n_users=int(rows / 45), n_items=200_000, n_categories=2_000, seed=1)
    out = work / f"log-{int(rows)}"
    if not (out / "UserBehavior.csv").exists():
        generate(cfg, out, fmt="csv", single_file=True, overwrite=True)
    return out / "UserBehavior.csv"


def run_one(mode: str, log: str, out: str) -> dict:
    """In the subprocess: run one path, report seconds, events and this process's peak RSS."""
    from rec.data.config import DataConfig

    cfg = DataConfig(format="taobao", path=log)
    tree_peak, worker_peak = [0], [0]
    stop = threading.Event()

    def sample() -> None:  # RSS of this process and its children (Ray's workers)
        me = psutil.Process()
        while not stop.wait(0.2):
            rss = [_rss(p) for p in me.children(recursive=True)]
            tree_peak[0] = max(tree_peak[0], _rss(me) + sum(rss))
            worker_peak[0] = max(worker_peak[0], *rss, 0)  # the largest single child

    t_start = time.perf_counter()
    if mode == "ray":
        from jobs.common import RayConfig, init_ray
        from rec.ray_prepare import prepare

        init_ray(RayConfig(num_cpus=2))
        t_ready = time.perf_counter()
        threading.Thread(target=sample, daemon=True).start()
        stats = prepare(cfg, out)
    else:
        from rec.data.local import prepare_local

        t_ready = time.perf_counter()
        threading.Thread(target=sample, daemon=True).start()
        stats = prepare_local(cfg, out)
    seconds = time.perf_counter() - t_ready
    stop.set()
    return {
        "mode": mode,
        "rows": stats["rows_read"],
        "seconds": round(seconds, 2),
        "startup_seconds": round(t_ready - t_start, 2),
        "events_per_s": round(stats["rows_read"] / seconds),
        "driver_peak_rss_mb": _driver_peak_mb(),
        "tree_peak_rss_mb": round(tree_peak[0] / 2**20),
        "worker_peak_rss_mb": round(worker_peak[0] / 2**20),
        "n_users": stats["n_users"],
        "n_items": stats["n_items"],
    }


def _driver_peak_mb() -> int:
    """VmHWM: ru_maxrss would include the parent's RSS at exec (bench/scale.py's generator)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=float, default=10e6)
    parser.add_argument("--work", default=str(ROOT / ".cache" / "bench_prepare"))
    parser.add_argument("--one", choices=["ray", "polars"], help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.one:
        print(json.dumps(run_one(args.one, args.log, str(work / f"out-{args.one}"))))
        return
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = make_log(args.rows, work)
    gen_s = time.perf_counter() - t0
    results = {}
    for mode in ("polars", "ray"):
        cmd = [sys.executable, __file__, "--one", mode, "--log", str(log), "--work", str(work)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        if proc.returncode:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = results["ray"]["events_per_s"] / results["polars"]["events_per_s"]
    report = {
        "rows": results["polars"]["rows"],
        "log_bytes": log.stat().st_size,
        "generate_seconds": round(gen_s, 1),
        "cpus": os.cpu_count(),
        "results": results,
        "ray_over_polars": round(ratio, 3),
        "targets": {"ray_over_polars_min": 0.5, "driver_peak_rss_mb_max": 2048},
    }
    print(
        f"\n{report['rows']:,} rows ({report['log_bytes'] / 2**20:.0f} MiB CSV), {os.cpu_count()} CPUs"
    )
    print(
        f"{'path':8} {'seconds':>8} {'events/s':>12} {'driver RSS MB':>14} {'all procs MB':>13} {'startup s':>10}"
    )
    for mode, r in results.items():
        print(
            f"{mode:8} {r['seconds']:8.1f} {r['events_per_s']:12,} {r['driver_peak_rss_mb']:14,} "
            f"{r['tree_peak_rss_mb']:13,} {r['startup_seconds']:10.1f}"
        )
    print(f"ray / polars events/s: {ratio:.2f} (target >= 0.5)")
    out = ROOT / "bench" / "results" / "prepare.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
