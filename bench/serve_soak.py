"""Soak: a steady request rate for minutes; errors and the memory of Serve's processes.

    flock /tmp/ray.lock python bench/serve_soak.py --model-dir outputs/serve_beauty \
        --rate 60 --minutes 10        # or --rate-fraction 0.5: half the maximum measured first

Starts jobs.serve (--config-name: a bench/serve_throughput.py configuration, default fused;
--set: more overrides), warms up (--warmup s, default 60) at --rate (imports, allocator and
caches settle), takes the resident memory (RSS) of every process of the server's session
(driver, raylet, GCS, Serve controller, proxy, replicas), then sends --rate requests/s
open-loop (on a schedule whatever the answers: Poisson arrivals by default, --arrivals uniform
for one every 1/rate s; at most 256 in flight) for --minutes, sampling RSS and the 1-min load
average each minute. Reports answers by status (each non-200 with its send time), latency
percentiles and RSS growth per process, of Serve's processes (controller, proxy, replicas:
the issue's measure) and in total. Issue 15 asks for half the measured maximum throughput (bench/README.md
"Serving throughput"), 0 errors and < 5 % RSS growth. Writes bench/results/serve_soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.serve_load import level, user_ids  # noqa: E402
from bench.serve_throughput import CONFIGS, free_port, start, stop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES: dict[int, str] = {}  # pid -> name when first seen
# Serve's own processes by their Ray process title: controller, HTTP proxy, replicas.
SERVE_TITLES = ("ray::ServeController", "ray::ProxyActor", "ray::ServeReplica")
MACHINE = f"{os.cpu_count()} cores shared with other agents' jobs; 1-min load: load_1m_by_minute"


def session_rss(root_pid: int) -> dict[str, int]:
    """RSS bytes of the server process and every descendant, keyed 'pid name' (the name as
    first seen: a Ray worker's title changes with the task it runs)."""
    out = {}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for proc in procs:
        try:
            name = NAMES.setdefault(proc.pid, " ".join(proc.cmdline()[:1])[:80] or proc.name())
            out[f"{proc.pid} {name}"] = proc.memory_info().rss
        except psutil.Error:
            continue
    return out


def arrival_times(rate: float, seconds: float, arrivals: str, seed: int = 0) -> np.ndarray:
    """Send times (s from the start) of `rate` requests/s over `seconds`. "poisson": independent
    exponential gaps (many users each acting on their own: bursts happen); "uniform": one every
    1/rate s (the kindest schedule; what session 8 used)."""
    if arrivals == "uniform":
        return np.arange(int(rate * seconds)) / rate
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, int(rate * seconds * 1.5) + 100)
    times = np.cumsum(gaps)
    return times[times < seconds]


async def open_loop(base, users, rate, seconds, results, on_minute=None, arrivals="poisson"):
    """`rate` requests/s for `seconds`, each sent on schedule (not after the previous one);
    results get (status, seconds to answer, send time in s from the start)."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    rng, gate = np.random.default_rng(0), asyncio.Semaphore(256)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(body: dict, sent: float) -> None:
            async with gate:
                t = time.perf_counter()
                try:
                    code = (await client.post(f"{base}/recommend", json=body)).status_code
                except httpx.HTTPError:
                    code = -1
                results.append((code, time.perf_counter() - t, round(sent, 3)))

        t0, tasks, minute = time.perf_counter(), [], 0
        for at in arrival_times(rate, seconds, arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if on_minute and (time.perf_counter() - t0) // 60 > minute:
                minute += 1
                on_minute(minute)
            body = {"user_id": int(rng.choice(users)), "k": 10}
            tasks.append(asyncio.create_task(one(body, time.perf_counter() - t0)))
        await asyncio.gather(*tasks)


def pct_growth(series: list[float]) -> float | None:
    """Growth of the last value over the first, in %; None without a first value."""
    return round(100.0 * (series[-1] - series[0]) / series[0], 2) if series and series[0] else None


def report(samples: list, results: list, rate: float, minutes: float, config: str) -> dict:
    """samples [(minute, {"pid name": rss bytes}, 1-min load average)], results [(status,
    seconds, sent at)] -> the summary."""
    first, last = samples[0][1], samples[-1][1]
    common = sorted(set(first) & set(last))
    growth = {k: round(100.0 * (last[k] - first[k]) / first[k], 2) for k in common}
    total = [sum(s.get(k, 0) for k in common) for _, s, _ in samples]
    # Serve's processes alone (the measure); the total adds raylet, GCS, dashboard...
    served = [k for k in common if k.split(" ", 1)[1].startswith(SERVE_TITLES)]
    serve_mb = [round(sum(s.get(k, 0) for k in served) / 2**20, 1) for _, s, _ in samples]
    ms = np.asarray([r[1] for r in results if r[0] == 200]) * 1000
    return {
        "rate": rate,
        "minutes": minutes,
        "config": config,
        "codes": {str(c): sum(r[0] == c for r in results) for c in {r[0] for r in results}},
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
        "max_ms": round(float(ms.max()), 1) if len(ms) else None,
        # every answer that was not 200: (status, s from the start it was sent, s it took),
        # to set beside Serve's logs (/tmp/ray/session_*/logs/serve) when one appears
        "not_200": sorted((c, sent, round(t, 3)) for c, t, sent in results if c != 200),
        "load_1m_by_minute": [load for _, _, load in samples],
        "sample_minutes": [m for m, _, _ in samples],
        "rss_total_mb": [round(t / 2**20, 1) for t in total],
        "rss_total_growth_pct": pct_growth(total),
        "rss_serve_mb": serve_mb,
        "rss_serve_processes": served,
        "rss_serve_growth_pct": pct_growth(serve_mb),
        "rss_growth_pct_by_process": growth,
        "processes_gone_or_new": sorted(set(first) ^ set(last)),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default="outputs/serve_beauty")
    parser.add_argument("--config-name", default="fused", choices=list(CONFIGS))
    parser.add_argument("--set", action="append", default=[], help="a.b=value for jobs.serve")
    rate = parser.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=float, help="requests per second")
    rate.add_argument(
        "--rate-fraction",
        type=float,
        help="this fraction of the maximum throughput measured first on the same server "
        "(closed loop, concurrency 8, 20 s: bench/serve_load.py's level)",
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--arrivals",
        choices=("poisson", "uniform"),
        default="poisson",
        help="open-loop send times: Poisson (independent users, bursts) or one every 1/rate s",
    )
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS is taken")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_soak.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    users = user_ids(args.model_dir)
    port = free_port()
    env_extra, overrides = CONFIGS[args.config_name]
    name = f"{args.config_name}*"  # the configuration with --set added (bare stays bare)
    CONFIGS[name] = (env_extra, [*(overrides or []), *args.set])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    proc = start(name, args.model_dir, port)
    base = f"http://127.0.0.1:{port}"
    samples: list[tuple[float, dict[str, int], float]] = []
    results: list[tuple[int, float, float]] = []
    measured = None
    try:
        if args.rate_fraction:  # the maximum under this run's conditions (load included)
            measured = asyncio.run(level(base, users, 8, 20.0, 5.0))
            print(f"[soak] maximum: {json.dumps(measured)}", flush=True)
            args.rate = round(args.rate_fraction * measured["requests_per_s"], 1)
        asyncio.run(open_loop(base, users, args.rate, args.warmup, [], arrivals=args.arrivals))
        samples.append((0.0, session_rss(proc.pid), os.getloadavg()[0]))

        def sample(minute: int) -> None:
            samples.append((float(minute), session_rss(proc.pid), os.getloadavg()[0]))
            done = len(results)
            bad = sum(r[0] != 200 for r in results)
            print(f"[soak] minute {minute}: {done} answers, {bad} not 200", flush=True)

        soak = open_loop(base, users, args.rate, args.minutes * 60, results, sample, args.arrivals)
        asyncio.run(soak)
        samples.append((args.minutes, session_rss(proc.pid), os.getloadavg()[0]))
    finally:
        stop(proc)
    started += time.strftime(" - %H:%M UTC", time.gmtime())
    out = report(samples, results, args.rate, args.minutes, args.config_name)
    out.update(overrides=args.set, maximum=measured, rate_fraction=args.rate_fraction)
    out.update(arrivals=args.arrivals, date=started, machine=MACHINE)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "rss_growth_pct_by_process"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
