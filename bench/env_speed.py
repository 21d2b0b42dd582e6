"""Speed of the simulated-user environment (rl/env.py) and the fixed-lam sweep that shows why a
per-user lam is worth learning.

    python bench/env_speed.py                      # ~1 min
    python bench/env_speed.py --episodes 1000      # tighter sweep, ~4 min
    python bench/env_speed.py --calibrate outputs/smoke/data   # + calibration of a prepared dir

1. steps/s on one thread (OMP/MKL/OPENBLAS = 1) for k = 10, N = 100, discrete and continuous
   actions (random lam, episodes reset as they end, so reset cost is included), with the time
   of one bare `rec.rerank.dpp` call at N = 100 in the same process for reference. Target:
   >= 2,000 steps/s.
2. mean return per fixed lam in {0, 0.1, ..., 1} over the same episodes (seeds 0..E-1, so the
   same users and random streams for every lam) on `SimulatorData.synthetic`, overall and per
   user type, with the best fixed lam per type, and what choosing lam per type would earn.
Prints tables and writes bench/results/env_speed.json.
"""

from __future__ import annotations

import os

# One thread, set before numpy loads its BLAS: RLlib runs one env per worker core.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from rec.rerank import dpp  # noqa: E402
from rl.config import EnvConfig  # noqa: E402
from rl.env import DiversityEnv  # noqa: E402
from rl.simdata import SimulatorData  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "env_speed.json"
LAMS = np.round(np.linspace(0.0, 1.0, 11), 1)
TYPES = ("focused", "explorer")


def steps_per_second(data: SimulatorData, mode: str, steps: int, repeats: int) -> list[float]:
    """steps/s of `repeats` blocks of `steps` random-lam steps each (resets included). Short
    blocks: on a shared machine the best block is the estimate of the env's own cost."""
    env = DiversityEnv(data, EnvConfig(action_mode=mode))
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(steps)]
    rates = []
    for r in range(repeats):
        env.reset(seed=r)
        start = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        rates.append(steps / (time.perf_counter() - start))
    return rates


def dpp_call_ms(data: SimulatorData, calls: int = 2000) -> float:
    """Median ms of one dpp call at N = 100, k = 10, lam = 0.5 on this world's vectors."""
    scores = data.scores[:1].astype(np.float64)  # (1, N)
    vectors = data.item_vectors[data.candidates[:1]]  # (1, N, D)
    dpp(scores, 10, 0.5, vectors=vectors)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        dpp(scores, 10, 0.5, vectors=vectors)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def sweep(data: SimulatorData, episodes: int) -> dict:
    """Returns per fixed lam (rows) and episode (columns), the type of each episode's user, and
    the mean return of lam = the ranker's diversity head (a one-line state-based policy)."""
    env = DiversityEnv(data, EnvConfig(action_mode="continuous"))
    returns = np.zeros((len(LAMS), episodes))
    explorer = np.zeros(episodes, dtype=bool)
    for a, lam in enumerate(LAMS):
        action = np.array([lam], dtype=np.float32)
        for e in range(episodes):
            returns[a, e], info = _episode(env, e, lambda obs, act=action: act)
            explorer[e] = info["explorer"]
    head = np.array([_episode(env, e, lambda obs: obs[5:6])[0] for e in range(episodes)])
    return {"returns": returns, "explorer": explorer, "head_policy": head}


def _episode(env: DiversityEnv, seed: int, policy) -> tuple[float, dict]:
    obs, info = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += reward
        done = terminated or truncated
    return total, info


def summarise(result: dict) -> dict:
    """Mean and standard error per lam, overall and per type; best fixed lam per type."""
    ret, explorer = result["returns"], result["explorer"]
    groups = {"all": np.ones_like(explorer), "focused": ~explorer, "explorer": explorer}
    table = {}
    for name, mask in groups.items():
        r = ret[:, mask]
        mean, se = r.mean(1), r.std(1) / np.sqrt(max(r.shape[1], 1))
        table[name] = {
            "episodes": int(mask.sum()),
            "mean": [round(float(x), 3) for x in mean],
            "se": [round(float(x), 3) for x in se],
            "best_lam": float(LAMS[int(mean.argmax())]),
        }
    share = explorer.mean()
    per_type = (1 - share) * max(table["focused"]["mean"]) + share * max(table["explorer"]["mean"])
    table["best_fixed_lam_return"] = max(table["all"]["mean"])
    table["best_lam_per_type_return"] = round(float(per_type), 3)
    table["lam_equals_diversity_head_return"] = round(float(result["head_policy"].mean()), 3)
    return table


def calibration(prepared: str, data: SimulatorData) -> dict:
    from rl.calibrate import apply_calibration, calibrate, load_prepared

    cal = calibrate(load_prepared(prepared))
    _, changed = apply_calibration(EnvConfig(), cal, data)
    out = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in asdict(cal).items()}
    return {"measured": out, "calibrated": changed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=200, help="episodes per fixed lam")
    parser.add_argument("--steps", type=int, default=1000, help="steps per timed block")
    parser.add_argument("--calibrate", default=None, help="a prepared-data directory")
    args = parser.parse_args()

    data = SimulatorData.synthetic(n_users=1000, n_items=3000, n_categories=30, seed=0)
    speed = {
        m: steps_per_second(data, m, args.steps, repeats=5) for m in ("discrete", "continuous")
    }
    ref = dpp_call_ms(data)
    print(f"{'mode':<11} {'steps/s median':>15} {'steps/s best':>13}   (k=10, N=100, 1 thread)")
    for mode, rates in speed.items():
        print(f"{mode:<11} {np.median(rates):>15,.0f} {max(rates):>13,.0f}")
    print(f"one rec.rerank.dpp call at N=100, k=10: {ref:.3f} ms (median)\n")

    t0 = time.perf_counter()
    table = summarise(sweep(data, args.episodes))
    print(
        f"mean return per fixed lam, {args.episodes} episodes each ({time.perf_counter() - t0:.0f} s)"
    )
    print(f"{'users':<9} {'n':>4} " + " ".join(f"{lam:>5.1f}" for lam in LAMS) + "  best lam")
    for name in ("all", *TYPES):
        row = table[name]
        cells = " ".join(f"{m:>5.2f}" for m in row["mean"])
        print(f"{name:<9} {row['episodes']:>4} {cells}  {row['best_lam']:.1f}")
    print(
        f"best single fixed lam: {table['best_fixed_lam_return']:.3f}; best lam per type: "
        f"{table['best_lam_per_type_return']:.3f}; lam = diversity head: "
        f"{table['lam_equals_diversity_head_return']:.3f}"
    )
    out = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "steps_per_s": {m: [round(r) for r in rates] for m, rates in speed.items()},
        "dpp_call_ms": round(ref, 4),
        "lams": LAMS.tolist(),
        "sweep": table,
    }
    if args.calibrate:
        out["calibration"] = calibration(args.calibrate, data)
        print("\ncalibration:", json.dumps(out["calibration"], indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
