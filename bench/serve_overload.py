"""Overload: concurrency 64 against the admission limits; admitted latency vs unloaded.

    flock /tmp/ray.lock python bench/serve_overload.py --model-dir outputs/serve_beauty

Per configuration (a jobs.serve process each, or the bare uvicorn server of
bench/serve_throughput.py with the same admission: the no-Ray control): C = 1 for
--duration s (the unloaded p99), then C = 64 for --duration s, where a client answered 503
waits `backoff` (Retry-After: a polite client; or 0.25 s: four times the pressure) before its
next request. Reports the answers by status, the admitted (200) p50/p99 seen by the client, the
p99 of the ingress's own `timings_ms.total` for those (time inside the ingress replica: the
rest is the HTTP proxy, the client and waiting for a CPU), and the 503s' p50. The clients run
in this process, on the same cores as the server: on a small machine their own scheduling is
part of every latency measured. Writes bench/results/serve_overload.json.

--modes SERVER ... (round 3): per server, the unloaded phase once, then 64 clients in each of
MODES (hammer / Retry-After, generator at nice 0 / 19), recording the generator's own
event-loop lag as well.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.serve_load import user_ids  # noqa: E402
from bench.serve_throughput import CONFIGS, free_port, start, stop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def limits(ongoing: int, queued: int) -> list[str]:
    """Serve's limits of the ingress: running per replica, held in the router."""
    return [
        f"serve.ingress.max_ongoing_requests={ongoing}",
        f"serve.ingress.max_queued_requests={queued}",
    ]


def quiet(overrides: list[str]) -> list[str]:
    """Without Ray Serve's per-request access log (serve.access_log=false)."""
    return [*overrides, "serve.access_log=false"]


def admit(running: int) -> list[str]:
    """The ingress's own admission (serve.max_running), Serve's limits far above the client
    count so that nothing waits in Serve's router; no access log lines."""
    return [*quiet(limits(256, 256)), f"serve.max_running={running}"]


# Serve's router retries a request that found every replica full after 25 ms, doubling to
# 0.5 s (RAY_SERVE_ROUTER_RETRY_*, read where the proxy starts): a queued request may sleep
# while a slot is free. These settings retry after 1-5 ms instead.
FAST_ROUTER = {
    "RAY_SERVE_ROUTER_RETRY_INITIAL_BACKOFF_S": "0.001",
    "RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S": "0.005",
}

# name -> (serve_throughput configuration, jobs.serve overrides, client back-off after a 503:
# seconds or "retry-after"[, environment of the server's processes]).
RUNS = {
    "composed 4+4, backoff 0.25 s": ("composed", limits(4, 4), 0.25),
    "composed 4+4, Retry-After": ("composed", limits(4, 4), "retry-after"),
    "fused 2+2, Retry-After": ("fused", limits(2, 2), "retry-after"),
    "fused 1+1, Retry-After": ("fused", limits(1, 1), "retry-after"),
    "fused+tput 2+2, Retry-After": ("fused+tput", limits(2, 2), "retry-after"),
    "fused+haproxy 2+2, Retry-After": ("fused+haproxy", limits(2, 2), "retry-after"),
    "bare, Retry-After": ("bare", [], "retry-after"),
    "bare app 2, Retry-After": ("bare", admit(2), "retry-after"),
    "bare app 2, backoff 0.25 s": ("bare", admit(2), 0.25),
    "fused app 2, Retry-After": ("fused", admit(2), "retry-after"),
    "fused app 4, Retry-After": ("fused", admit(4), "retry-after"),
    "fused app 2, backoff 0.25 s": ("fused", admit(2), 0.25),
    "fused 2+2 fast router, Retry-After": ("fused", limits(2, 2), "retry-after", FAST_ROUTER),
    "fused 1+1 fast router, Retry-After": ("fused", limits(1, 1), "retry-after", FAST_ROUTER),
    "fused 2+1 fast router, Retry-After": ("fused", limits(2, 1), "retry-after", FAST_ROUTER),
    "fused 2+2 fast router, backoff 0.25 s": ("fused", limits(2, 2), 0.25, FAST_ROUTER),
}


async def clients(base, users, n, seconds, backoff, lag=None) -> list[tuple]:
    """n closed-loop clients for `seconds`: (status, client seconds, ingress total ms, seconds
    from the start to the request's send). backoff after a 503: seconds (0: hammer, retry at
    once) or "retry-after". lag: a list that receives the generator's own event-loop lag (s
    by which a 10 ms sleep overslept), sampled throughout: the time any answer waited in this
    process before its client saw it."""
    out: list[tuple] = []
    t0 = time.perf_counter()

    async def probe() -> None:
        while time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lag.append(time.perf_counter() - t - 0.01)

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(seed: int) -> None:
            rng, end = np.random.default_rng(seed), time.perf_counter() + seconds
            while time.perf_counter() < end:
                body = {"user_id": int(rng.choice(users)), "k": 10}
                t = time.perf_counter()
                try:
                    resp = await client.post(f"{base}/recommend", json=body)
                    code = resp.status_code
                except httpx.HTTPError:
                    code, resp = -1, None
                total = resp.json()["timings_ms"]["total"] if code == 200 else None
                out.append((code, time.perf_counter() - t, total, t - t0))
                if code == 503:
                    wait = resp.headers.get("retry-after") if backoff == "retry-after" else None
                    await asyncio.sleep(float(wait) if wait else float(backoff))
                elif code == -1:
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(one(s) for s in range(n)), *([probe()] if lag is not None else []))
    return out


SETTLE_S = 3.0  # the first seconds of a level: 64 connections opened at once, not steady


def summary(results) -> dict:
    ok = [(t, total) for c, t, total, _ in results if c == 200]
    settled = [t for c, t, _, start in results if c == 200 and start >= SETTLE_S]
    shed = [t for c, t, _, _ in results if c == 503]
    codes = {str(c): sum(r[0] == c for r in results) for c in sorted({r[0] for r in results})}
    pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1) if xs else None  # noqa: E731
    return {
        "codes": codes,
        "admitted_per_s": None,
        "admitted_p50_ms": pct([t for t, _ in ok], 50),
        "admitted_p95_ms": pct([t for t, _ in ok], 95),
        "admitted_p99_ms": pct([t for t, _ in ok], 99),
        "settled_p99_ms": pct(settled, 99),  # sent after the first SETTLE_S seconds
        "ingress_total_p99_ms": pct([total / 1000 for _, total in ok], 99),
        "shed_p50_ms": pct(shed, 50),
    }


def run(name, model_dir, users, seconds) -> dict:
    config, overrides, backoff, *env = RUNS[name]
    port = free_port()
    env_extra = {**CONFIGS[config][0], **(env[0] if env else {})}
    CONFIGS[f"{config}*"] = (env_extra, [*(CONFIGS[config][1] or []), *overrides])
    proc = start(f"{config}*", model_dir, port)
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(clients(base, users, 1, 3.0, backoff))  # warm-up
        alone = summary(asyncio.run(clients(base, users, 1, seconds, backoff)))
        over_raw = asyncio.run(clients(base, users, 64, seconds, backoff))
        over = summary(over_raw)
        over["admitted_per_s"] = round(int(over["codes"].get("200", 0)) / seconds, 1)
    finally:
        stop(proc)
    res = {"run": name, "overrides": overrides, "env": env_extra, "backoff": backoff}
    res.update(alone=alone, c64=over)
    res["ratio_p99"] = round(over["admitted_p99_ms"] / alone["admitted_p99_ms"], 2)
    res["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res), flush=True)
    return res


WORKERS_NICE_0 = {"RAY_worker_niceness": "0"}

# Round 3: one server, its unloaded phase, then 64 clients in each of these modes in turn:
# how a 503'd client returns (0: at once, hammering; "retry-after": as told) and the
# generator's niceness (19: it leaves the CPUs to the server, as clients on other machines
# would; the server's processes stay at 0).
MODES = {
    "hammer": (0.0, 0),
    "Retry-After": ("retry-after", 0),
    "hammer, clients nice 19": (0.0, 19),
    "Retry-After, clients nice 19": ("retry-after", 19),
}
SERVERS = {
    "fused 2+2": ("fused", quiet(limits(2, 2)), {}),  # serve/config.yaml's limits
    # Ray starts its workers (proxy, replicas) at nice 15 (RAY_worker_niceness): below the
    # clients and anything else on the machine. The same server with them at 0:
    "fused 2+2, Ray workers nice 0": ("fused", quiet(limits(2, 2)), WORKERS_NICE_0),
    "bare app 2": ("bare", admit(2), {}),  # the no-Ray control, its model in a thread
}


def run_modes(server: str, model_dir: str, users, seconds: float) -> dict:
    config, overrides, env = SERVERS[server]
    CONFIGS[f"{config}*"] = (
        {**CONFIGS[config][0], **env},
        [*(CONFIGS[config][1] or []), *overrides],
    )
    port = free_port()
    proc = start(f"{config}*", model_dir, port)
    base = f"http://127.0.0.1:{port}"
    res = {"server": server, "overrides": overrides, "env": env}
    try:
        asyncio.run(clients(base, users, 1, 3.0, 0.0))  # warm-up
        lag: list[float] = []
        res["alone"] = summary(asyncio.run(clients(base, users, 1, seconds, 0.0, lag)))
        res["alone"]["client_lag_p99_ms"] = round(float(np.percentile(lag, 99)) * 1e3, 1)
        for mode, (backoff, nice) in MODES.items():
            lag = []
            os.setpriority(os.PRIO_PROCESS, 0, nice)
            try:
                over = summary(asyncio.run(clients(base, users, 64, seconds, backoff, lag)))
            finally:
                os.setpriority(os.PRIO_PROCESS, 0, 0)
            over["admitted_per_s"] = round(int(over["codes"].get("200", 0)) / seconds, 1)
            over["client_lag_p99_ms"] = round(float(np.percentile(lag, 99)) * 1e3, 1)
            over["ratio_p99"] = round(over["admitted_p99_ms"] / res["alone"]["admitted_p99_ms"], 2)
            over["load_average_1m"] = round(os.getloadavg()[0], 2)
            res[mode] = over
            print(json.dumps({"server": server, "mode": mode, **over}), flush=True)
            time.sleep(2.0)  # the last answers drain
    finally:
        stop(proc)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default="outputs/serve_beauty")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument(
        "--modes", nargs="+", choices=list(SERVERS), help="round 3: these servers x MODES"
    )
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_overload.json"))
    args = parser.parse_args(argv)
    users = user_ids(args.model_dir)
    if args.modes:
        results = [run_modes(name, args.model_dir, users, args.duration) for name in args.modes]
    else:
        results = [run(name, args.model_dir, users, args.duration) for name in args.runs]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "runs": results}, indent=2))
    print(f"[serve_overload] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
