r"""Learn a policy that picks the DPP diversity weight lam per slate, with RLlib PPO.

    python -m jobs.train_policy --config jobs/configs/beauty.yaml \
        model_dir=outputs/beauty output_dir=outputs/policy_beauty

1. World: the trained ranker (model_dir/export) scores a sample of held-out users; a weighted
   ALS fitted on full sequences is the simulated users' ground truth (rl/world.py).
2. The simulated user fitted to the log's training users (`world.user_model`: "session", the
   session model of rl/session_fit.py, every parameter's provenance in world.json; "types",
   the calibrated focused/explorer user), then realism.json/.png: held-out users' logged
   sessions against their simulated ones (rl/realism.py).
   Users are split fit / tune / test (60/20/20 with policy.eval_fraction = 0.4): the user
   model and PPO see the fit users, selection the tune users, the ladder reports on test.
3. PPO on RLlib's new API stack (rl/train.py), env runners on Ray, fit users only, one run
   per seed (policy.seeds), each early-stopped on its tune-user return. With
   policy.warm_start (default) every seed starts as the best fixed lam of the tune users
   (the ladder's best_fixed choice, rl.ladder.best_fixed), scored as iteration 0 and kept
   unless an iterate beats it with a paired CI above 0; policy_eval.json `ppo_selection`
   (and the ladder's ppo.per_seed) says which iteration each seed kept, and whether PPO
   found anything better than the constant.
4. The seed with the best tune return is published: its RLModule and policy.json as a new
   version of output_dir (v-.../ with MANIFEST.json, then CURRENT switches; loads without
   the Algorithm and verifies: `rl.policy`).
5. Evaluation on held-out users, the same seeded episodes for every arm: the policy, lam =
   0, 0.1, ..., 1 and a random lam -> policy_eval.json, policy_eval.png; then the ladder of
   ceilings (rl/ladder.py) on tune / test, every PPO seed reported -> policy_eval.json
   `ladder`; and the ladder without PPO across the unidentified parameters
   (rl/sensitivity.py) -> sensitivity.json / sensitivity.md.
Evaluations play policy.episodes(users) episodes per arm: small held-out sets get more
episodes per user (rl/policy.py: PolicyConfig.episodes).
Expect ~15 min on 2 CPUs for Beauty with the defaults (5 seeds), less for the Taobao slice.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from jobs.common import check_locations, init_ray, main_guard, parse_args
from jobs.config import RunConfig
from rec import artifacts, storage
from rec.config_loader import ConfigError
from rec.logs import get_logger
from rl.arms import play, split_users
from rl.ladder import best_fixed, halves, ladder
from rl.policy import MODULE_DIR, LamPolicy, write_policy_meta
from rl.realism import write_realism
from rl.report import evaluate_arms, write_report
from rl.sensitivity import markdown, sensitivity, write_sensitivity
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
    log.info(
        "wrote %s, policy_eval.png, world.npz/json, realism.json/png, sensitivity.json/md",
        ", ".join(published),
    )
    return report


def _run(cfg: RunConfig, out) -> dict:
    pc = cfg.policy
    t0 = time.time()
    data, world_ref, env_cfg, fitted, (train_users, eval_users) = _world(cfg, out)
    log.info(
        f"world: {data.n_users} users x {data.candidates.shape[1]} candidates, "
        f"{time.time() - t0:.0f} s; user model {env_cfg.user_model}: {fitted['summary']}"
    )
    tune, test = halves(eval_users, pc.seed)
    # the ladder's best_fixed choice on the tune users, made once: PPO starts from it
    choice = _best_fixed(cfg, data, env_cfg, tune, test)
    init_ray(cfg.ray)
    with tempfile.TemporaryDirectory(prefix="raydiv-policy-") as tmp:
        seeds, curves, chosen = _train_seeds(
            cfg, data, (world_ref, env_cfg), train_users, tune, tmp, choice
        )
        build = Path(tmp) / f"seed{chosen}"
        extra = {"algorithm": "PPO", "calibrated": fitted["summary"], "seed": chosen}
        write_policy_meta(build, env_cfg, extra | {"model_dir": str(cfg.model_dir)})
        dest = storage.absolute(cfg.output_dir)
        version = artifacts.publish(
            build, dest, kind="policy", producer="jobs.train_policy", config=asdict(pc)
        )
    log.info("published the policy %s (seed %d, best tune return)", version, chosen)
    policy = LamPolicy.load(dest)  # the published module, verified, exactly as Serve loads it
    n_eval = pc.episodes(len(eval_users))
    report = evaluate_arms(
        data, env_cfg, eval_users, policy.arm(), n_eval, pc.seed + 10_000, cfg.rerank
    )
    report["ppo_selection"] = _selection(curves)
    if pc.ladder_states:
        lad = report["ladder"] = _ladder(cfg, data, env_cfg, (tune, test), seeds, choice)
        for s, sel in report["ppo_selection"]["per_seed"].items():  # beside each seed's gain
            lad["ppo"]["per_seed"][s] |= sel
    if pc.sensitivity.w_exp:
        table = sensitivity(
            data, env_cfg, train_users, tune, test, fitted["target"], fitted["min_events"],
            pc.sensitivity, cfg.rerank,
        )  # fmt: skip
        write_sensitivity(table, out)
        log.info("sensitivity (gains vs best fixed lam):\n%s", markdown(table))
    report["seconds"] = round(time.time() - t0, 1)
    report["user_model"] = env_cfg.user_model  # its fit and provenance: world.json
    write_report(report | {"published_seed": chosen}, curves[chosen], out)
    log.info(
        f"policy {report['policy.mean_return']:.3f} vs best fixed lam "
        f"{report['best_fixed.lam']:.1f} {report['best_fixed.mean_return']:.3f}: gain "
        f"{100 * report['gain_over_best_fixed']:+.1f}% (paired 95% CI "
        f"{[round(100 * g, 1) for g in report['gain_over_best_fixed_paired_ci95']]}%)"
    )
    return report


def _best_fixed(cfg: RunConfig, data, env_cfg, tune, test):
    """The ladder's best fixed lam on the tune users with its grid results (rl.ladder.best_fixed,
    the ladder's episodes and seed), or None where neither the ladder nor the warm start
    needs it."""
    pc = cfg.policy
    if not (pc.warm_start or pc.ladder_states):
        return None
    n = pc.episodes(min(len(tune), len(test)))
    return best_fixed(data, env_cfg, tune, n, pc.seed + 20_000, cfg.rerank)


def _train_seeds(cfg: RunConfig, data, world, train_users, tune, tmp, choice):
    """One early-stopped PPO run per seed (warm-started at choice's lam with
    policy.warm_start) -> ({seed: arm}, {seed: curve}, the seed with the best tune return).
    Modules in tmp/seed<s>/rl_module."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    pc, (world_ref, env_cfg) = cfg.policy, world
    n_tune = pc.episodes(len(tune), pc.tune_episodes)
    warm = choice[0] if pc.warm_start else None
    if warm is not None:
        log.info("PPO warm start: lam %.1f (best fixed lam on the tune users)", warm)

    def on_tune(arm):  # the same seeded tune episodes for every iteration and seed
        return play(data, env_cfg, tune, arm, n_tune, pc.seed + 30_000, cfg.rerank)

    arms, curves, scores = {}, {}, {}
    for s in range(pc.seed, pc.seed + pc.seeds):
        module_dir = Path(tmp) / f"seed{s}" / MODULE_DIR
        run_cfg = replace(pc, seed=s)
        curves[s] = fit(
            run_cfg, world_ref, env_cfg, train_users, module_dir, cfg.rerank, on_tune, warm
        )
        module = RLModule.from_checkpoint(str(module_dir.resolve()))
        arms[s] = LamPolicy(module, env_cfg).arm()
        kept = [r for r in curves[s] if r.get("kept")]  # the saved module's row
        scores[s] = kept[0]["tune_return"] if kept else -np.inf
        log.info("PPO seed %d: kept iteration %s, tune return %.3f", s,
                 kept[0]["iteration"] if kept else "-", scores[s])  # fmt: skip
    return arms, curves, max(scores, key=scores.get)


def _selection(curves: dict) -> dict:
    """Which iteration each seed kept (0: the warm start, the best fixed lam) -> JSON."""
    per_seed = {}
    for s, curve in curves.items():
        kept = next((r for r in curve if r.get("kept")), curve[-1])
        per_seed[str(s)] = {
            "selected_iteration": kept["iteration"],
            "selected_warm_start": "warm_start_lam" in kept,
            "tune_return": kept.get("tune_return"),
            "iterations_run": max(r["iteration"] for r in curve),
        }
    warm = sum(v["selected_warm_start"] for v in per_seed.values())
    verdict = (
        "PPO found nothing better than the constant: every seed kept its warm start"
        if warm == len(per_seed)
        else f"{len(per_seed) - warm} of {len(per_seed)} seeds beat the constant on tune users"
    )
    log.info("PPO selection: %s", verdict)
    return {"per_seed": per_seed, "seeds_kept_warm_start": warm, "verdict": verdict}


def _world(cfg: RunConfig, out):
    """Build the world, fit its simulated user on the fit users, save it (with the fitted
    item popularity), write world.json and the realism report -> (data, world ref, env
    config, {"summary", "target", "min_events"}, (fit users, held-out users))."""
    pc = cfg.policy
    world = build_world(cfg.model_dir, cfg.world)
    world_path = save_world(world, out / "world.npz")
    data = load_world(world_path, cfg.env.types, seed=pc.seed)
    split = split_users(data.n_users, pc.eval_fraction, pc.seed)
    env_cfg, model = fit_user_model(world, data, cfg.env, cfg.world, split[0], cfg.rerank)
    (out / "world.json").write_text(json.dumps(model, indent=2) + "\n")
    world_path = save_world(world, world_path)  # now with what the fit added
    # Env runners (on any node) read the world from where it is published.
    world_ref = _publish_world(world_path, cfg.output_dir)
    data = load_world(world_path, env_cfg.types, seed=pc.seed)  # calibrated types
    if cfg.world.realism_episodes:
        realism = realism_report(
            world, data, env_cfg, split[1], cfg.world.realism_episodes, pc.seed, cfg.rerank
        )
        write_realism(realism, out)
        log.info("realism: real-vs-simulated session AUC %.3f", realism["classifier_auc"])
    moments = model.get("moments", {})
    fitted = {
        "summary": model.get("calibrated") or model["session"],
        "target": moments.get("target", {}),
        "min_events": moments.get("min_events", 1),
    }
    return data, world_ref, env_cfg, fitted, split


def _ladder(cfg: RunConfig, data, env_cfg, split, arms: dict, choice) -> dict:
    """The ladder of ceilings on the tune / test users (rl/ladder.py), every PPO seed."""
    pc = cfg.policy
    tune, test = split
    lad = ladder(
        data,
        env_cfg,
        tune,
        test,
        pc.episodes(min(len(tune), len(test))),
        pc.seed + 20_000,
        n_states=pc.ladder_states,
        policies=arms,
        oracle_episodes=pc.oracle_episodes,
        rollouts=pc.ladder_rollouts,
        rerank_cfg=cfg.rerank,
        tune_choice=choice,
    )
    rungs = ("per_type_oracle", "context_ceiling", "full_oracle", "ppo")
    parts = [
        f"{r} {100 * lad[r]['gain']:+.1f}% [{100 * lad[r]['gain_ci95'][0]:+.1f}, "
        f"{100 * lad[r]['gain_ci95'][1]:+.1f}]"
        for r in rungs
        if r in lad
    ]
    log.info("ladder vs best fixed lam %.1f: %s", lad["best_fixed"]["lam"], "; ".join(parts))
    log.info("80 %% target: %s", lad.get("target_80pct"))
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
