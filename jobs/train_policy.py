r"""Learn a policy that picks the DPP diversity weight lam per slate, with RLlib PPO.

    python -m jobs.train_policy --config jobs/configs/beauty.yaml \
        model_dir=outputs/beauty output_dir=outputs/policy_beauty

1. World: the trained ranker (model_dir/export) scores a sample of held-out users; a weighted
   ALS fitted on full sequences is the simulated users' ground truth (rl/world.py).
2. Calibration: leaving (and, on logs with real sessions, satiation) fitted to the log.
3. PPO on RLlib's new API stack (rl/train.py), env runners on Ray, training users only; the
   episode return is printed each iteration.
4. The RLModule and policy.json are published as a new version of output_dir (v-.../ with
   MANIFEST.json, then CURRENT switches; loads without the Algorithm and verifies: `rl.policy`).
5. Evaluation on held-out users, the same seeded episodes for every arm: the policy, lam =
   0, 0.1, ..., 1 and a random lam -> policy_eval.json, policy_eval.png.
Expect a few minutes on 2 CPUs with the default 40 iterations.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from jobs.common import check_locations, init_ray, main_guard, parse_args
from jobs.config import RunConfig
from rec import artifacts, storage
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
    check_locations(cfg)
    with storage.staged_dir(cfg.output_dir) as out:  # a local folder, uploaded to a URI at the end
        report = _run(cfg, out)
    published = [storage.join(cfg.output_dir, n) for n in ("policy_eval.json", artifacts.CURRENT)]
    print(f"wrote {', '.join(published)} and policy_eval.png, world.npz")
    return report


def _run(cfg: RunConfig, out) -> dict:
    pc = cfg.policy
    t0 = time.time()
    world = build_world(cfg.model_dir, cfg.world)
    world_path = save_world(world, out / "world.npz")
    # Env runners (on any node) read the world from where it is published.
    world_ref = _publish_world(world_path, cfg.output_dir)
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
    with tempfile.TemporaryDirectory(prefix="raydiv-policy-") as tmp:
        curve = fit(pc, world_ref, env_cfg, train_users, Path(tmp) / MODULE_DIR, cfg.rerank)
        extra = {"algorithm": "PPO", "calibrated": changed, "model_dir": str(cfg.model_dir)}
        write_policy_meta(Path(tmp), env_cfg, extra)
        dest = storage.absolute(cfg.output_dir)
        version = artifacts.publish(
            tmp, dest, kind="policy", producer="jobs.train_policy", config=asdict(pc)
        )
    print(f"published the policy {version}")
    policy = LamPolicy.load(dest)  # the published module, verified, exactly as Serve loads it
    report = evaluate_arms(
        data, env_cfg, eval_users, policy.arm(), pc.eval_episodes, pc.seed + 10_000, cfg.rerank
    )
    report["seconds"] = round(time.time() - t0, 1)
    write_report(report, curve, out)
    print(
        f"policy {report['policy.mean_return']:.3f} vs best fixed lam "
        f"{report['best_fixed.lam']:.1f} {report['best_fixed.mean_return']:.3f}: gain "
        f"{100 * report['gain_over_best_fixed']:+.1f}% (paired 95% CI "
        f"{[round(100 * g, 1) for g in report['gain_over_best_fixed_paired_ci95']]}%)"
    )
    return report


def _publish_world(world_path, output_dir: str) -> str:
    """The world file as env runners should read it: the local file, or its copy on the URI."""
    if not storage.is_uri(output_dir):
        return str(world_path)
    uri = storage.join(output_dir, "world.npz")
    storage.copy_tree(world_path, uri)
    return uri


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    raise SystemExit(main())
