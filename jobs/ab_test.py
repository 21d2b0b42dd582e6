r"""A/B through the live endpoint: the offline evaluation's simulated users against the
running Serve app, over HTTP.

    python -m jobs.serve --config jobs/configs/beauty.yaml model_dir=outputs/beauty \
        policy_dir=outputs/policy_beauty &          # the app under test, then:
    python -m jobs.ab_test --config jobs/configs/beauty.yaml model_dir=outputs/beauty \
        policy_dir=outputs/policy_beauty output_dir=outputs/ab_beauty

policy_dir is a jobs.train_policy output (the policy, the env config it was trained under and
world.npz). Arms: `ab.lams` (lam sent in each request) and the served policy (`ab.policy`).
Episodes: the held-out users and seeds of train_policy's evaluation (common random numbers).
Each arm also plays offline on the served world (rl/online.py says why that is exact, the
policy arm included: each request carries the session so far and the served policy replays it
into the env's observation). Writes <output_dir>/ab_test.json and prints a table: per arm return, clicks, session
length, ILD with cluster-bootstrap 95 % CIs over users. Starts no Ray (the policy's RLModule
is loaded for the offline arm only).
"""

from __future__ import annotations

import json

import numpy as np

from jobs.common import main_guard, parse_args, verified_export, verified_prepared
from jobs.config import RunConfig
from rec import storage
from rec.config_loader import ConfigError
from rec.logs import get_logger
from rl.arms import split_users
from rl.calibrate import load_prepared
from rl.online import Endpoint, ab_test, served_world, table
from rl.policy import LamPolicy
from rl.world import load_world
from serve.catalog import Catalog

log = get_logger("ab_test")


def run(cfg: RunConfig) -> dict:
    if not cfg.model_dir or not cfg.policy_dir:
        raise ConfigError(
            "model_dir=DIR and policy_dir=DIR (a jobs.train_policy output) are required"
        )
    ab, pc = cfg.ab, cfg.policy
    policy = LamPolicy.load(cfg.policy_dir)  # verified; its env config is the fitted user's
    env_cfg = policy.env_cfg
    world_path = storage.local_copy(
        storage.join(cfg.policy_dir, "world.npz"), storage.default_cache()
    )
    data = load_world(world_path, env_cfg.types, seed=pc.seed)  # as jobs.train_policy loads it
    users = split_users(data.n_users, pc.eval_fraction, pc.seed)[1]  # its held-out users
    catalog = Catalog.load(verified_export(cfg.model_dir))
    histories = _histories(cfg, world_path)
    url = ab.url or f"http://{cfg.serve.host}:{cfg.serve.port}"
    endpoint = Endpoint(url, ab.timeout_s, ab.retries)
    served = served_world(data, endpoint, histories, catalog.item_ids, users, env_cfg.n_candidates)
    episodes = ab.episodes or pc.eval_episodes
    report = ab_test(
        served, env_cfg, users, endpoint, histories, catalog.item_ids, ab, episodes,
        pc.seed + 10_000, offline_policy=policy.arm(), rerank_cfg=cfg.rerank, world=data,
    )  # fmt: skip
    report |= {"url": url, "clicks_in_history": ab.clicks_in_history}
    with storage.staged_dir(cfg.output_dir) as out:
        (out / "ab_test.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    log.info("wrote %s", storage.join(cfg.output_dir, "ab_test.json"))
    return report


def _histories(cfg: RunConfig, world_path) -> list[np.ndarray]:
    """Each world user's history as the world's ranker saw it: (L,) item indices."""
    with np.load(world_path, allow_pickle=False) as z:
        rows = z["users"]  # (U,) rows of the prepared test split (sorted by user_id)
    log_items = load_prepared(verified_prepared(cfg, cfg.model_dir)).items  # user_id order
    return [log_items[r][:-1] for r in rows.tolist()]  # all but the test event, as rl/world.py


def main(argv: list[str] | None = None) -> int:
    return main_guard(lambda: run(parse_args(RunConfig, argv, __doc__)))


if __name__ == "__main__":
    raise SystemExit(main())
