"""Chaos bench: does a training run with failures end where an uninterrupted run ends?

Amazon Beauty (jobs/configs/beauty.yaml, fixed seed) trained three times with the same
settings, each `python -m jobs.train` run under the Ray lock (/tmp/ray.lock) on its own:
  a) uninterrupted;
  b) a random training worker (either rank) SIGKILLed from outside at 3 random points (one
     step drawn in each third of the run, then 0-2 s later: inside a step, a checkpoint save
     or a report); Ray Train restarts the worker group from the latest checkpoint;
  c) the driver (the `python -m jobs.train` process) SIGKILLed once at a random point, its
     local Ray with it, then a new `jobs.train` run with `train.resume_from` = the latest
     complete checkpoint (the newest one whose MANIFEST.json verifies).
Steps lost and restart gaps come from a step log the workers write (RAYDIV_STEP_LOG,
rec/fault_injection.py): a restart shows as the step count going back.

    python bench/chaos_train.py                    # epochs 8, checkpoint every 20 steps
    python bench/chaos_train.py --epochs 25 --every 20

Do not wrap it in flock: it takes the lock per run (a with the data's prepare, b, c with
its continuation), so other Ray work can go between. Prints a table and writes bench/results/chaos_train.json.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "jobs" / "configs" / "beauty.yaml"
LOCK = "/tmp/ray.lock"
WORKER_TITLE = "ray::RayTrainWorker"  # Ray Train's worker actor processes


@contextmanager
def ray_lock(held: bool = False):
    """The machine's one-Ray-at-a-time lock, as `flock /tmp/ray.lock` takes it (held: the
    caller already holds it)."""
    if held:
        yield
        return
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def job(out: Path, overrides: list[str], step_log: Path, chaos=None) -> dict:
    """One `python -m jobs.train` run in its own session (hold the Ray lock); `chaos(proc)`
    runs beside it. Whatever of the session outlives the driver (a killed driver's Ray) is
    killed before it returns. -> {"wall_s", "rc"}"""
    cmd = [sys.executable, "-m", "jobs.train", "--config", str(CONFIG), f"output_dir={out}"]
    env = os.environ | {"RAYDIV_STEP_LOG": str(step_log)}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "job.log", "w") as log:
        t0 = time.time()
        proc = subprocess.Popen(
            cmd + overrides, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        if chaos:
            chaos(proc)
        rc = proc.wait()
        wall = time.time() - t0
        _kill_session(proc.pid)
    return {"wall_s": round(wall, 1), "rc": rc}


def _kill_session(sid: int) -> None:
    """SIGKILL what is left of the session the driver led (only processes this bench began)."""
    time.sleep(3)  # Ray's own fate sharing usually ends them first
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (ProcessLookupError, psutil.Error):
            pass


def steps(step_log: Path) -> list[tuple[float, int]]:
    if not step_log.exists():
        return []
    rows = [line.split() for line in step_log.read_text().splitlines()]
    return [(float(t), int(s)) for t, s in rows if t and s]


def wait_for_step(step_log: Path, target: int, proc) -> int | None:
    """Wait until rank 0 has logged `target` (restarts included) -> the last step, or None
    when the driver ended first."""
    while proc.poll() is None:
        log = steps(step_log)
        if log and log[-1][1] >= target:
            return log[-1][1]
        time.sleep(0.2)
    return None


def train_workers(sid: int) -> list[int]:
    """PIDs of the Ray Train worker processes in the driver's session."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            title = " ".join(p.info["cmdline"] or [])
            if title.startswith(WORKER_TITLE) and os.getsid(p.pid) == sid:
                found.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return sorted(found)


def draw_targets(rng: np.random.Generator, total: int, n: int, every: int) -> list[int]:
    """One step in each of n equal parts of the run, at least one interval from the edges."""
    edges = np.linspace(every, total - every, n + 1)
    return [
        int(rng.integers(int(lo), int(hi))) for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]


def kill_workers(step_log: Path, targets: list[int], rng, events: list):
    def chaos(proc) -> None:
        for target in targets:
            if wait_for_step(step_log, target, proc) is None:
                return
            time.sleep(float(rng.uniform(0, 2)))
            workers = train_workers(proc.pid)
            while not workers and proc.poll() is None:  # between a restart's groups
                time.sleep(0.5)
                workers = train_workers(proc.pid)
            if not workers:
                return
            victim = int(rng.choice(workers))
            os.kill(victim, signal.SIGKILL)
            events.append({"target": target, "step": steps(step_log)[-1][1], "pid": victim})
            print(f"[chaos] killed worker {victim} near step {events[-1]['step']}", flush=True)

    return chaos


def kill_driver(step_log: Path, target: int, rng, events: list):
    def chaos(proc) -> None:
        if wait_for_step(step_log, target, proc) is None:
            return
        time.sleep(float(rng.uniform(0, 2)))
        os.kill(proc.pid, signal.SIGKILL)
        events.append({"target": target, "step": steps(step_log)[-1][1], "pid": proc.pid})
        print(f"[chaos] killed the driver near step {events[-1]['step']}", flush=True)

    return chaos


def latest_complete_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of a Ray Train run whose manifest verifies (Ray names them by
    time; one being written when the driver died has no complete manifest)."""
    from rec import artifacts

    for ckpt in sorted(run_dir.glob("checkpoint_*"), reverse=True):
        try:
            artifacts.verify(str(ckpt))
            return ckpt
        except artifacts.ArtifactError as err:
            print(f"[chaos] skip {ckpt.name}: {err}", flush=True)
    raise SystemExit(f"no complete checkpoint under {run_dir}")


def restarts(step_log: Path) -> list[dict]:
    """Each place the step count goes back: steps trained again, and the gap in seconds from
    the last step before the failure to the first step after the restart."""
    log = steps(step_log)
    dt = float(np.median(np.diff([t for t, _ in log]))) if len(log) > 1 else 0.0
    out = []
    for (t0, s0), (t1, s1) in zip(log, log[1:], strict=False):
        if s1 <= s0:
            lost = s0 - (s1 - 1)
            out.append({"steps_lost": lost, "gap_s": round(t1 - t0, 1),
                        "redo_s": round(lost * dt, 1)})  # fmt: skip
    return out


def final(out: Path) -> dict:
    """Test metrics, the published export's best epoch and weights hash ({} if it failed)."""
    from rec import artifacts

    if not (out / "metrics.json").exists():
        return {}
    metrics = json.loads((out / "metrics.json").read_text())
    export = Path(artifacts.resolve(str(out / "export")))
    return {
        "test_ndcg@10": metrics["test.ndcg@10"],
        "test_recall@10": metrics["test.recall@10"],
        "best_valid_ndcg@10": metrics.get("best.valid.ndcg@10"),
        "best_epoch": json.loads((export / "checkpoint.json").read_text()).get("epoch"),
        "weights_sha256": weights_sha256(str(export)),
    }


def weights_sha256(export: str) -> str:
    """The exported weights' sha256, as the export's verified manifest records it."""
    from rec import artifacts

    files = {f.path: f.sha256 for f in artifacts.verify(export).files}
    return files["model.safetensors"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--every", type=int, default=20, help="train.checkpoint_every_steps")
    ap.add_argument("--seed", type=int, default=0, help="where the faults land")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "chaos"))
    ap.add_argument("--only", default="abc", help="which runs (a needs to run first)")
    ap.add_argument("--lock-held", action="store_true", help="the caller holds the Ray lock")
    args = ap.parse_args()
    base = Path(args.out)
    data = base / "data"
    common = [
        f"train.epochs={args.epochs}",
        f"train.checkpoint_every_steps={args.every}",
        "train.early_stop_patience=null",
        "train.max_failures=5",
        f"train.prepared_dir={data}",
    ]
    rng = np.random.default_rng(args.seed)
    results_path = ROOT / "bench" / "results" / "chaos_train.json"
    res = json.loads(results_path.read_text()) if results_path.exists() else {}
    res["settings"] = {"config": "jobs/configs/beauty.yaml", "overrides": common[:4],
                       "fault_seed": args.seed}  # fmt: skip
    if "a" in args.only:
        with ray_lock(args.lock_held):
            res["a"] = run_a(base, data, common)
        results_path.write_text(json.dumps(res, indent=2))  # kept if a later case fails
    total = res["a"]["steps"]
    if "b" in args.only:
        with ray_lock(args.lock_held):
            res["b"] = run_b(base, common, draw_targets(rng, total, 3, args.every), rng)
        results_path.write_text(json.dumps(res, indent=2))  # kept if a later case fails
    if "c" in args.only:
        with ray_lock(args.lock_held):
            res["c"] = run_c(base, common, draw_targets(rng, total, 1, args.every)[0], rng)
        results_path.write_text(json.dumps(res, indent=2))  # kept if a later case fails
    print(table(res))
    print(f"wrote {results_path}")


def run_a(base: Path, data: Path, common: list[str]) -> dict:
    """The data's prepare (once, not timed), then the uninterrupted run."""
    if not (data / "CURRENT").exists() and not (data / "meta.json").exists():
        subprocess.run([sys.executable, "-m", "jobs.prepare", "--config", str(CONFIG),
                        f"output_dir={data}"], cwd=ROOT, check=True)  # fmt: skip
    log = base / "a.steps"
    log.unlink(missing_ok=True)
    run = job(base / "a", common, log) | final(base / "a")
    return run | {"steps": steps(log)[-1][1]} | step_costs(log, every(common))


def every(common: list[str]) -> int:
    return int(
        next(o for o in common if o.startswith("train.checkpoint_every_steps=")).split("=")[1]
    )


def step_costs(step_log: Path, interval: int) -> dict:
    """Median seconds of a step, and what a mid-epoch checkpoint adds to it (the step log's
    gaps: step k*interval is logged after its checkpoint was saved and reported)."""
    log = steps(step_log)
    gaps = {s1: t1 - t0 for (t0, _), (t1, s1) in zip(log, log[1:], strict=False)}
    step_s = float(np.median(list(gaps.values())))
    after = [g for s, g in gaps.items() if s % interval == 0]
    return {"step_s": round(step_s, 3), "checkpoint_s": round(float(np.median(after)) - step_s, 3)}


def run_b(base: Path, common: list[str], targets: list[int], rng) -> dict:
    """Random training workers SIGKILLed near `targets`; Ray Train restarts the group."""
    log, events = base / "b.steps", []
    log.unlink(missing_ok=True)
    run = job(base / "b", common, log, kill_workers(log, targets, rng, events))
    return run | final(base / "b") | {"faults": events, "restarts": restarts(log)}


def run_c(base: Path, common: list[str], target: int, rng) -> dict:
    """The driver SIGKILLed near `target`, then a new run from its latest checkpoint."""
    log, events = base / "c.steps", []
    log.unlink(missing_ok=True)
    first = job(base / "c1", common, log, kill_driver(log, target, rng, events))
    ckpt = latest_complete_checkpoint(base / "c1" / "ray" / "train")
    second = job(base / "c2", [*common, f"train.resume_from={ckpt}"], log)
    return {
        "wall_s": round(first["wall_s"] + second["wall_s"], 1),
        "rc": second["rc"],
        "killed_driver_wall_s": first["wall_s"],
        "resumed_from": ckpt.name,
        "faults": events,
        "restarts": restarts(log),
    } | final(base / "c2")


def table(res: dict) -> str:
    a = res["a"]
    lines = [
        "| run | completes | test NDCG@10 | vs a | weights = a | failures | steps lost "
        "(each) | restart gap s (each) | wall s | overhead s / failure |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("a", "b", "c"):
        if name not in res:
            continue
        r = res[name]
        if "test_ndcg@10" not in r:
            lines.append(f"| {name} | NO (rc {r['rc']}) | | | | | | | {r['wall_s']} | |")
            continue
        n = len(r.get("faults", []))
        rs = r.get("restarts", [])
        over = (r["wall_s"] - a["wall_s"]) / n if n else 0.0
        lines.append(
            f"| {name} | {'yes' if r['rc'] == 0 else 'NO'} | {r['test_ndcg@10']:.6f} | "
            f"{100 * (r['test_ndcg@10'] / a['test_ndcg@10'] - 1):+.2f} % | "
            f"{'yes' if r['weights_sha256'] == a['weights_sha256'] else 'no'} | {n} | "
            f"{', '.join(str(x['steps_lost']) for x in rs) or '-'} | "
            f"{', '.join(str(x['gap_s']) for x in rs) or '-'} | {r['wall_s']} | "
            f"{over:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
