"""Ingress replicas killed (SIGKILL) under load: what the clients see, with and without the
proxy's replay (serve/proxy_retry.py), with 1 and 2 ingress replicas.

    flock /tmp/ray.lock timeout 480 python bench/serve_ingress_kill.py \
        --model-dir outputs/serve_beauty

Ray's HTTP proxy answers 500 for requests in flight on an ingress replica that dies (it maps
the RayActorError to 500 and does not retry). serve.proxy_retries (default 2) installs
serve/proxy_retry.py in the proxy through Ray's RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH:
such a request is replayed on another replica, or answered 503 + Retry-After when none
answers within serve.proxy_retry_wait_s.

Per run: the fused app (the default: one deployment, so its ingress replicas are every
replica), Serve's limits as serve/config.yaml (2 running + 2 queued per replica), 4
closed-loop clients; three times, once every replica is up and has run 4 s, one Ingress
replica process is SIGKILLed; the clients stop 4 s after the last kill. Reports answers by
status (and how many 503s are the replay's own) and the slowest answer. Writes
bench/results/serve_ingress_kill_retry.json (session 7's HAProxy runs:
serve_ingress_kill.json).
"""

from __future__ import annotations

import argparse
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
from bench.serve_throughput import CONFIGS, free_port, start, stop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIMITS = ["serve.ingress.max_ongoing_requests=2", "serve.ingress.max_queued_requests=2"]
RUNS = {
    f"{n} replica{'s' * (n > 1)}, {name}": ({}, ["serve.fused=true", f"serve.replicas={n}",
                                                 *LIMITS, f"serve.proxy_retries={retries}"])
    for n in (1, 2)
    for name, retries in (("Ray's proxy alone", 0), ("proxy replay", 2))
}  # fmt: skip
KILLS, GAP_S = 3, 4.0


def ingress_replicas(root_pid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if "Ingress" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


async def load(base: str, users, root_pid: int, n: int) -> tuple[list[tuple], list[str]]:
    """4 closed-loop clients (no pause after a 503: the pressure stays on) while KILLS times
    a live Ingress replica is killed, each once all n are up (the previous one replaced) and
    the clients ran GAP_S more; they stop GAP_S after the last kill. Answers: (status,
    seconds, whether a 503 is the replay's own)."""
    answers: list[tuple] = []
    kills: list[str] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not done.is_set():
                t = time.perf_counter()
                try:
                    body = {"user_id": int(rng.choice(users)), "k": 10}
                    resp = await client.post(f"{base}/recommend", json=body)
                    code, mine = resp.status_code, "no ingress replica" in resp.text
                except httpx.HTTPError:
                    code, mine = -1, False
                answers.append((code, time.perf_counter() - t, mine))

        async def killer() -> None:
            t0 = time.perf_counter()
            for _ in range(KILLS):
                await asyncio.sleep(GAP_S)
                while len(live := ingress_replicas(root_pid)) < n:
                    await asyncio.sleep(0.2)
                await asyncio.sleep(GAP_S)  # let the replacement take load first
                os.kill(ingress_replicas(root_pid)[0].pid, signal.SIGKILL)
                kills.append(f"{time.perf_counter() - t0:.1f}s: 1 of {len(live)}")
            await asyncio.sleep(GAP_S)
            done.set()

        await asyncio.gather(killer(), *(one(s) for s in range(4)))
    return answers, kills


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default="outputs/serve_beauty")
    parser.add_argument("--only", nargs="*", help="run names containing any of these")
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "serve_ingress_kill_retry.json")
    )
    args = parser.parse_args(argv)
    users = user_ids(args.model_dir)
    results = []
    for name, (env, overrides) in RUNS.items():
        if args.only and not any(word in name for word in args.only):
            continue
        CONFIGS[name] = (env, overrides)
        port = free_port()
        proc = start(name, args.model_dir, port)
        try:
            n = int(overrides[1].split("=")[1])
            answers, kills = asyncio.run(load(f"http://127.0.0.1:{port}", users, proc.pid, n))
        finally:
            stop(proc)
        codes = [c for c, _, _ in answers]
        res = {
            "run": name,
            "overrides": overrides,
            "kills": kills,
            "codes": {str(c): codes.count(c) for c in sorted(set(codes))},
            "503_from_replay": sum(mine for _, _, mine in answers),
            "seconds": round(sum(t for _, t, _ in answers) / 4, 1),
            "slowest_s": round(max(t for _, t, _ in answers), 2),
            "load1": round(os.getloadavg()[0], 1),
        }
        print(json.dumps(res), flush=True)
        results.append(res)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
