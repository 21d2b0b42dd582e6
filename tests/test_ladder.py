"""The ladder of ceilings (rl/ladder.py): cluster bootstrap, common random numbers of state
copies, and the rungs on a world where the observation tells the best lam and on one where
lam changes nothing. Seconds, no Ray."""

from __future__ import annotations

import numpy as np

from rec.rerank import RerankConfig
from rl.arms import split_users
from rl.config import EnvConfig
from rl.env import DiversityEnv
from rl.ladder import _copy_state, _return_to_go, cluster_ci, ladder
from rl.simdata import SimulatorData
from tests.test_policy import contextual_world


def test_cluster_ci():
    assert cluster_ci(np.full(10, 2.0), np.arange(10) // 2) == (2.0, 2.0)
    rng = np.random.default_rng(0)
    x, users = rng.normal(1.0, 1.0, 400), np.repeat(np.arange(40), 10)
    lo, hi = cluster_ci(x, users)
    assert lo < x.mean() < hi and hi - lo < 0.5
    shared = np.repeat(rng.normal(0, 1, 40), 10)  # users' episodes perfectly correlated
    lo2, hi2 = cluster_ci(shared, users)
    assert hi2 - lo2 > 2.5 * (hi - lo) * 0.5  # wider than 400 independent draws would give


def test_state_copies_replay_the_same_randomness():
    data = SimulatorData.synthetic(n_users=50, n_items=600, n_categories=10, seed=1)
    for model in ("types", "session"):
        env = DiversityEnv(data, EnvConfig(action_mode="continuous", user_model=model))
        env.reset(seed=3)
        env.step(np.array([0.3], np.float32))
        snap = _copy_state(env.__dict__)
        base = np.array([0.2], np.float32)
        first = _return_to_go(env, 0.7, base)
        env.__dict__.update(_copy_state(snap))
        assert _return_to_go(env, 0.7, base) == first


def test_ladder_finds_a_context_ceiling_where_the_observation_tells_the_type():
    data, cfg = contextual_world()
    tune, test = split_users(data.n_users, 0.5, 0)
    lad = ladder(data, cfg, tune, test, episodes=150, seed=0, n_states=400)
    assert set(lad) >= {"best_fixed", "per_type_oracle", "context_ceiling"}
    assert lad["per_type_oracle"]["gain_ci95"][0] > 0, lad["per_type_oracle"]
    ctx = lad["context_ceiling"]
    assert ctx["gain_ci95"][0] > 0 and ctx["mean_lam"] < 1.0, ctx
    assert lad["context_ceiling_beats_best_fixed"]


def test_ladder_is_flat_where_lam_changes_nothing():
    data = SimulatorData.synthetic(n_users=60, n_items=600, n_categories=10, seed=2)
    cfg = EnvConfig(k=5, n_candidates=40, max_steps=6, user_model="session")
    tune, test = split_users(data.n_users, 0.5, 0)
    none = RerankConfig(method="none")  # every lam shows the ranker's top-k
    lad = ladder(data, cfg, tune, test, episodes=60, seed=0, n_states=40, rerank_cfg=none)
    for rung in ("per_type_oracle", "context_ceiling"):
        assert lad[rung]["gain"] == 0.0 and lad[rung]["gain_ci95"] == [0.0, 0.0]
    assert np.isnan(lad["context_ceiling"]["r2_heldout_states"])
    assert not lad["context_ceiling_beats_best_fixed"]
