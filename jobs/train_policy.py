"""Learn a policy that picks the DPP diversity weight lam per slate, with RLlib PPO.

    python -m jobs.train_policy --config jobs/configs/beauty.yaml \
        model_dir=outputs/beauty output_dir=outputs/policy_beauty

1. World: the trained ranker (model_dir/export) scores a sample of held-out users; a weighted
   ALS fitted on full sequences is the simulated users' ground truth (rl/world.py).
2. Calibration: leaving (and, on logs with real sessions, satiation) fitted to the log.
3. PPO on RLlib's new API stack (rl/train.py), env runners on Ray, training users only; the
   episode return is printed each iteration.
4. The RLModule is saved to output_dir/rl_module (loads without the Algorithm: `rl.policy`).
5. Evaluation on held-out users, the same seeded episodes for every arm: the policy, lam =
   0, 0.1, ..., 1 and a random lam -> policy_eval.json, policy_eval.png.
Expect a few minutes on 2 CPUs with the default 40 iterations.
"""

from __future__ import annotations

import time
from pathlib import Path

from jobs.common import init_ray, main_guard, parse_args
from jobs.config import RunConfig
from rec.config_loader import ConfigError
from rl.arms import split_users
from rl.calibrate import apply_calibration
from rl.policy import MODULE_DIR, LamPolicy, write_policy_meta
from rl.report import evaluate_arms, write_report
from rl.train import fit
from rl.world import build_world, load_world, save_world


def run(cfg: RunConfig) -> dict:
    if not cfg.model_dir:
        raise ConfigError("model_dir=DIR is required (a jobs.train output directory)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pc = cfg.policy
    t0 = time.time()
    world = build_world(cfg.model_dir, cfg.world)
    world_path = save_world(world, out / "world.npz")
    env_cfg, changed = apply_calibration(
        cfg.env,
        world.calibration,
        load_world(world_path, cfg.env.types, seed=pc.seed),
        rerank_cfg=cfg.rerank,
    )
    data = load_world(world_path, env_cfg.types, seed=pc.seed)  # calibrated types
    train_users, eval_users = split_users(data.n_users, pc.eval_fraction, pc.seed)
    print(
        f"world: {data.n_users} users x {data.candidates.shape[1]} candidates, "
        f"{time.time() - t0:.0f} s; calibrated {changed}"
    )

    init_ray(cfg.ray)
    curve = fit(pc, world_path, env_cfg, train_users, out / MODULE_DIR, cfg.rerank)
    write_policy_meta(
        out, env_cfg, {"algorithm": "PPO", "calibrated": changed, "model_dir": str(cfg.model_dir)}
    )

    policy = LamPolicy.load(out)  # the saved module, exactly as Serve will load it
    report = evaluate_arms(
        data, env_cfg, eval_users, policy.arm(), pc.eval_episodes, pc.seed + 10_000, cfg.rerank
    )
    report["seconds"] = round(time.time() - t0, 1)
    json_path, png_path = write_report(report, curve, out)
    print(
        f"policy {report['policy.mean_return']:.3f} vs best fixed lam "
        f"{report['best_fixed.lam']:.1f} {report['best_fixed.mean_return']:.3f}: gain "
        f"{100 * report['gain_over_best_fixed']:+.1f}% (paired 95% CI "
        f"{[round(100 * g, 1) for g in report['gain_over_best_fixed_paired_ci95']]}%)"
    )
    print(f"wrote {json_path}, {png_path}, {out / MODULE_DIR}")
    return report


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    raise SystemExit(main())
