"""An ingress replica killed (SIGKILL) under load: what the clients see, by ingress path.

    flock /tmp/ray.lock python bench/serve_ingress_kill.py --model-dir outputs/serve_beauty

Ray's HTTP proxy answers 500 for requests in flight on an ingress replica that dies (it maps
the RayActorError to 500 and does not retry; a request router only picks a replica before
sending). With RAY_SERVE_ENABLE_HA_PROXY=1, HAProxy talks to the ingress replicas directly and
its `retry-on` policy is Ray's RAY_SERVE_HAPROXY_RETRY_ON (default `conn-failure`: nothing was
sent); adding `empty-response` replays a request whose replica closed the connection without
an answer -- safe here, recommendations are idempotent.

Per run: the fused app with 2 ingress replicas, 4 closed-loop clients; after 5 s one Ingress
replica process is SIGKILLed, 20 s later the clients stop. Reports answers by status.
Writes bench/results/serve_ingress_kill.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.serve_load import user_ids  # noqa: E402
from bench.serve_throughput import CONFIGS, TPUT, free_port, start, stop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TWO = ["serve.fused=true", "serve.replicas=2"]
HAPROXY = {**TPUT, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
RUNS = {
    "proxy (default)": ({}, TWO),
    "haproxy, retry-on conn-failure (Ray's default)": (HAPROXY, TWO),
    "haproxy, retry-on conn-failure empty-response": (
        {**HAPROXY, "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response"},
        TWO,
    ),
}


def ingress_replicas(root_pid: int) -> list[psutil.Process]:
    root = psutil.Process(root_pid)
    found = []
    for proc in root.children(recursive=True):
        try:
            if "Ingress" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


async def load(base, users, seconds, kill_at, victim) -> list[int]:
    codes: list[int] = []
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(seed: int) -> None:
            rng, end = np.random.default_rng(seed), time.perf_counter() + seconds
            while time.perf_counter() < end:
                try:
                    body = {"user_id": int(rng.choice(users)), "k": 10}
                    code = (await client.post(f"{base}/recommend", json=body)).status_code
                except httpx.HTTPError:
                    code = -1
                codes.append(code)

        async def killer() -> None:
            await asyncio.sleep(kill_at)
            os.kill(victim.pid, signal.SIGKILL)

        await asyncio.gather(killer(), *(one(s) for s in range(4)))
    return codes


def main() -> int:
    model_dir = (
        sys.argv[sys.argv.index("--model-dir") + 1]
        if "--model-dir" in sys.argv
        else ("outputs/serve_beauty")
    )
    users = user_ids(model_dir)
    results = []
    for name, (env, overrides) in RUNS.items():
        CONFIGS[name] = (env, overrides)
        port = free_port()
        proc = start(name, model_dir, port)
        try:
            replicas = ingress_replicas(proc.pid)
            res = {"run": name, "ingress_replicas": len(replicas)}
            if replicas:
                codes = asyncio.run(load(f"http://127.0.0.1:{port}", users, 25, 5, replicas[0]))
                res["codes"] = {str(c): codes.count(c) for c in sorted(set(codes))}
        finally:
            stop(proc)
        print(json.dumps(res), flush=True)
        results.append(res)
    out = ROOT / "bench" / "results" / "serve_ingress_kill.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
