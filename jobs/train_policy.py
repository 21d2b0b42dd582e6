r"""Learn a policy that picks the DPP diversity weight lam per slate, with RLlib PPO.

    python -m jobs.train_policy --config jobs/configs/beauty.yaml \
        model_dir=outputs/beauty output_dir=outputs/policy_beauty

1. World: the trained ranker (model_dir/export) scores a sample of held-out users; a weighted
   ALS fitted on full sequences is the simulated users' ground truth (rl/world.py).
2. The simulated user fitted to the log's training users (`world.user_model`: "session", the
   session model of rl/session_fit.py, every parameter's provenance in world.json; "types",
   the calibrated focused/explorer user), then realism.json/.png: held-out users' logged
   sessions against their simulated ones (rl/realism.py).
3. PPO on RLlib's new API stack (rl/train.py), env runners on Ray, training users only; the
   episode return is printed each iteration.
4. The RLModule and policy.json are published as a new version of output_dir (v-.../ with
   MANIFEST.json, then CURRENT switches; loads without the Algorithm and verifies: `rl.policy`).
5. Evaluation on held-out users, the same seeded episodes for every arm: the policy, lam =
   0, 0.1, ..., 1 and a random lam -> policy_eval.json, policy_eval.png; then the ladder of
   ceilings (rl/ladder.py) on tune / test halves of them -> policy_eval.json `ladder`.
Expect a few minutes on 2 CPUs with the default 40 iterations.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from jobs.common import check_locations, init_ray, main_guard, parse_args
from jobs.config import RunConfig
from rec import artifacts, storage
from rec.config_loader import ConfigError
from rec.logs import get_logger
from rl.arms import split_users
from rl.ladder import halves, ladder
from rl.policy import MODULE_DIR, LamPolicy, write_policy_meta
from rl.realism import write_realism
from rl.report import evaluate_arms, write_report
from rl.train import fit
from rl.world import build_world, load_world, save_world
from rl.world_fit import fit_user_model, realism_report

log = get_logger("train_policy")


def run(cfg: RunConfig) -> dict:
    if not cfg.model_dir:
        raise ConfigError("model_dir=DIR is required (a jobs.train output directory)")
    check_locations(cfg)
    with storage.staged_dir(cfg.output_dir) as out:  # a local folder, uploaded to a URI at the end
        report = _run(cfg, out)
    published = [storage.join(cfg.output_dir, n) for n in ("policy_eval.json", artifacts.CURRENT)]
    log.info("wrote %s, policy_eval.png, world.npz/json, realism.json/png", ", ".join(published))
    return report


def _run(cfg: RunConfig, out) -> dict:
    pc = cfg.policy
    t0 = time.time()
    data, world_ref, env_cfg, changed, (train_users, eval_users) = _world(cfg, out)
    log.info(
        f"world: {data.n_users} users x {data.candidates.shape[1]} candidates, "
        f"{time.time() - t0:.0f} s; user model {env_cfg.user_model}: {changed}"
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
    log.info("published the policy %s", version)
    policy = LamPolicy.load(dest)  # the published module, verified, exactly as Serve loads it
    report = evaluate_arms(
        data, env_cfg, eval_users, policy.arm(), pc.eval_episodes, pc.seed + 10_000, cfg.rerank
    )
    if pc.ladder_states:
        report["ladder"] = _ladder(cfg, data, env_cfg, eval_users, policy)
    report["seconds"] = round(time.time() - t0, 1)
    report["user_model"] = env_cfg.user_model  # its fit and provenance: world.json
    write_report(report, curve, out)
    log.info(
        f"policy {report['policy.mean_return']:.3f} vs best fixed lam "
        f"{report['best_fixed.lam']:.1f} {report['best_fixed.mean_return']:.3f}: gain "
        f"{100 * report['gain_over_best_fixed']:+.1f}% (paired 95% CI "
        f"{[round(100 * g, 1) for g in report['gain_over_best_fixed_paired_ci95']]}%)"
    )
    return report


def _world(cfg: RunConfig, out):
    """Build and save the world, fit its simulated user on the training users, write
    world.json and the realism report -> (data, world ref, env config, fitted summary,
    (train users, held-out users))."""
    pc = cfg.policy
    world = build_world(cfg.model_dir, cfg.world)
    world_path = save_world(world, out / "world.npz")
    # Env runners (on any node) read the world from where it is published.
    world_ref = _publish_world(world_path, cfg.output_dir)
    data = load_world(world_path, cfg.env.types, seed=pc.seed)
    split = split_users(data.n_users, pc.eval_fraction, pc.seed)
    env_cfg, model = fit_user_model(world, data, cfg.env, cfg.world, split[0], cfg.rerank)
    (out / "world.json").write_text(json.dumps(model, indent=2) + "\n")
    data = load_world(world_path, env_cfg.types, seed=pc.seed)  # calibrated types
    if cfg.world.realism_episodes:
        realism = realism_report(
            world, data, env_cfg, split[1], cfg.world.realism_episodes, pc.seed, cfg.rerank
        )
        write_realism(realism, out)
        log.info("realism: real-vs-simulated session AUC %.3f", realism["classifier_auc"])
    return data, world_ref, env_cfg, model.get("calibrated") or model["session"], split


def _ladder(cfg: RunConfig, data, env_cfg, eval_users, policy: LamPolicy) -> dict:
    """The ladder of ceilings on tune / test halves of the held-out users (rl/ladder.py)."""
    pc = cfg.policy
    tune, test = halves(eval_users, pc.seed)
    lad = ladder(
        data,
        env_cfg,
        tune,
        test,
        pc.eval_episodes,
        pc.seed + 20_000,
        n_states=pc.ladder_states,
        policy=policy.arm(),
        rerank_cfg=cfg.rerank,
    )
    rungs = ("per_type_oracle", "context_ceiling", "ppo")
    parts = [
        f"{r} {100 * lad[r]['gain']:+.1f}% [{100 * lad[r]['gain_ci95'][0]:+.1f}, "
        f"{100 * lad[r]['gain_ci95'][1]:+.1f}]"
        for r in rungs
        if r in lad
    ]
    log.info("ladder vs best fixed lam %.1f: %s", lad["best_fixed"]["lam"], "; ".join(parts))
    return lad


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
