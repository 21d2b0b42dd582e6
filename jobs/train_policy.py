"""Learn a policy that picks the DPP diversity weight lam per slate, with RLlib PPO.

    python -m jobs.train_policy --config jobs/configs/beauty.yaml \
        model_dir=outputs/beauty output_dir=outputs/policy_beauty

1. World: the trained ranker (model_dir/export) scores a sample of held-out users; a weighted
   ALS fitted on full sequences is the simulated users' ground truth (rl/world.py).
2. Calibration: leaving (and, on logs with real sessions, satiation) fitted to the log.
3. PPO on RLlib's new API stack, env runners on Ray, training users only; the episode return
   is printed each iteration. PPO: on-policy and stable with few knobs for a small discrete
   action (11 lam levels) and short episodes; no replay buffer to size.
4. The RLModule is saved to output_dir/rl_module (loads without the Algorithm: `rl.policy`).
5. Evaluation on held-out users, the same seeded episodes for every arm: the policy, lam =
   0, 0.1, ..., 1 and a random lam -> policy_eval.json, policy_eval.png.
Expect a few minutes on 2 CPUs with the default 40 iterations.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

from jobs.common import init_ray, main_guard, parse_args
from jobs.config import RunConfig
from rec.config import ConfigError
from rl.arms import split_users
from rl.calibrate import apply_calibration
from rl.policy import MODULE_DIR, LamPolicy, PolicyConfig, write_policy_meta
from rl.report import evaluate_arms, write_report
from rl.world import build_world, load_world, make_env, save_world

ENV_NAME = "raydiv-diversity-env"


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
        cfg.env, world.calibration, load_world(world_path, cfg.env.types, seed=pc.seed)
    )
    data = load_world(world_path, env_cfg.types, seed=pc.seed)  # calibrated types
    train_users, eval_users = split_users(data.n_users, pc.eval_fraction, pc.seed)
    print(
        f"world: {data.n_users} users x {data.candidates.shape[1]} candidates, "
        f"{time.time() - t0:.0f} s; calibrated {changed}"
    )

    init_ray(cfg.ray)
    spec = {
        "world": str(world_path.resolve()),
        "env": asdict(env_cfg),
        "users": train_users.tolist(),
        "seed": pc.seed,
    }
    algo = build_ppo(pc, spec)
    curve = []
    for it in range(1, pc.iterations + 1):  # the visible loop: sample -> optimise -> log
        result = algo.train()
        runners = result.get("env_runners", {})
        row = {
            "iteration": it,
            "episode_return_mean": float(runners.get("episode_return_mean", float("nan"))),
            "episode_len_mean": float(runners.get("episode_len_mean", float("nan"))),
            "env_steps": int(runners.get("num_env_steps_sampled_lifetime", 0)),
        }
        curve.append(row)
        print(
            f"iter {it:3d}  return {row['episode_return_mean']:7.3f}  "
            f"len {row['episode_len_mean']:5.2f}  steps {row['env_steps']}",
            flush=True,
        )
    module_dir = out / MODULE_DIR
    shutil.rmtree(module_dir, ignore_errors=True)
    algo.get_module().save_to_path(str(module_dir.resolve()))
    algo.stop()
    write_policy_meta(
        out, env_cfg, {"algorithm": "PPO", "calibrated": changed, "model_dir": str(cfg.model_dir)}
    )

    policy = LamPolicy.load(out)  # the saved module, exactly as Serve will load it
    report = evaluate_arms(
        data, env_cfg, eval_users, policy.arm(), pc.eval_episodes, seed=pc.seed + 10_000
    )
    report["seconds"] = round(time.time() - t0, 1)
    json_path, png_path = write_report(report, curve, out)
    print(
        f"policy {report['policy.mean_return']:.3f} vs best fixed lam "
        f"{report['best_fixed.lam']:.1f} {report['best_fixed.mean_return']:.3f}: gain "
        f"{100 * report['gain_over_best_fixed']:+.1f}% (paired 95% CI "
        f"{[round(100 * g, 1) for g in report['gain_over_best_fixed_paired_ci95']]}%)"
    )
    print(f"wrote {json_path}, {png_path}, {module_dir}")
    return report


def build_ppo(pc: PolicyConfig, spec: dict):
    """PPO on the new API stack, env runners created from `spec` (rl.world.make_env)."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_env)
    config = (
        PPOConfig()
        .environment(ENV_NAME, env_config=spec)
        .env_runners(num_env_runners=pc.num_env_runners, num_cpus_per_env_runner=0.5)
        .learners(num_learners=0)
        .training(
            train_batch_size_per_learner=pc.train_batch_size,
            minibatch_size=pc.minibatch_size,
            num_epochs=pc.num_epochs,
            lr=pc.lr,
            gamma=pc.gamma,
            entropy_coeff=pc.entropy_coeff,
        )
        .rl_module(model_config={"fcnet_hiddens": list(pc.hidden), "vf_share_layers": False})
        .debugging(seed=pc.seed)
    )
    return config.build_algo()


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    raise SystemExit(main())
