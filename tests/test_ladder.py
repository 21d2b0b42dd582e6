"""The ladder of ceilings (rl/ladder.py): cluster bootstrap, common random numbers of state
copies, and the rungs on a world where the observation tells the best lam and on one where
lam changes nothing. Seconds, no Ray."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from rec.rerank import RerankConfig
from rl.arms import fixed, split_users
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
    lad = ladder(data, cfg, tune, test, episodes=150, seed=0, n_states=400, oracle_episodes=150)
    assert set(lad) >= {"best_fixed", "per_type_oracle", "context_ceiling"}
    assert lad["per_type_oracle"]["gain_ci95"][0] > 0, lad["per_type_oracle"]
    ctx = lad["context_ceiling"]
    assert ctx["gain_ci95"][0] > 0 and ctx["mean_lam"] < 1.0, ctx
    assert lad["context_ceiling_beats_best_fixed"]
    assert ctx["regression_kept"] and ctx["rollouts_per_state"] == 4
    # the full-information oracle (the hidden type added to the regressor) gains too
    full = lad["full_oracle"]
    assert full["gain_ci95"][0] > 0 and full["episodes"] == 150, full
    assert np.isfinite(full["r2_heldout_states"])


def test_ladder_is_flat_where_lam_changes_nothing():
    data = SimulatorData.synthetic(n_users=60, n_items=600, n_categories=10, seed=2)
    cfg = EnvConfig(k=5, n_candidates=40, max_steps=6, user_model="session")
    tune, test = split_users(data.n_users, 0.5, 0)
    none = RerankConfig(method="none")  # every lam shows the ranker's top-k
    arms = {0: fixed(0.0), 1: fixed(1.0)}  # two "PPO seeds"
    lad = ladder(
        data, cfg, tune, test, episodes=60, seed=0, n_states=40, policies=arms, rerank_cfg=none
    )
    for rung in ("per_type_oracle", "context_ceiling", "full_oracle", "ppo"):
        assert lad[rung]["gain"] == 0.0 and lad[rung]["gain_ci95"] == [0.0, 0.0]
    assert np.isnan(lad["context_ceiling"]["r2_heldout_states"])
    assert not lad["context_ceiling_beats_best_fixed"]
    assert set(lad["ppo"]["per_seed"]) == {"0", "1"} and lad["ppo"]["seeds"] == 2
    assert not lad["ppo"]["any_seed_worse_than_best_fixed"]
    assert np.isnan(lad["ppo_share_of_context_ceiling"])  # no ceiling above best fixed
    assert lad["target_80pct"]["testable"] is False and lad["target_80pct"]["met"] is None


def test_sensitivity_table_keeps_the_identified_product_and_writes_json_and_markdown(tmp_path):
    """rl/sensitivity.py on a tiny session world: a cell keeps sensitivity * w_click (what the
    EM identifies), re-fits the leave intercept to the target session length, and the table
    is written as strict JSON and markdown, one row per cell."""
    import json

    from rl.moments import simulate_moments
    from rl.sensitivity import SensitivityConfig, cell_config, sensitivity, write_sensitivity

    data = SimulatorData.synthetic(n_users=60, n_items=600, n_categories=10, seed=2)
    cfg = EnvConfig(k=5, n_candidates=40, max_steps=6, user_model="session")
    cell = cell_config(cfg, w_exp=1.0, w_click=1.0, scale=1.5)
    s0, s1 = cfg.session, cell.session
    assert s1.w_exp == 1.0 and np.isclose(
        s1.sensitivity_base * s1.w_click, 1.5 * s0.sensitivity_base * s0.w_click
    )
    fit, tune, test = np.arange(20), np.arange(20, 40), np.arange(40, 60)
    target = simulate_moments(data, cfg, fit, 100, 0, 1)
    sc = SensitivityConfig(
        w_exp=[0.0, 1.0], w_click=[0.5], sensitivity_scale=[1.0], episodes=20, n_states=10,
        oracle_episodes=4, fit_episodes=60,
    )  # fmt: skip
    table = sensitivity(data, cfg, fit, tune, test, target, 1, sc)
    assert [c["w_exp"] for c in table["cells"]] == [0.0, 1.0]
    # each cell's re-fitted leave intercept gives the events per session its row reports; the
    # default's neighbour (w_exp 0) reaches the log's length, w_exp 1 (satiated by every
    # slate) cannot and says so
    for c in table["cells"]:
        moved = replace(cfg, session=replace(cfg.session, w_exp=c["w_exp"],
                                             leave_intercept=c["leave_intercept"]))  # fmt: skip
        got = simulate_moments(data, moved, fit, sc.fit_episodes, sc.seed, 1)
        assert got["events_per_session"] == c["events_per_session"]
    assert [c["matches_log_length"] for c in table["cells"]] == [True, False]
    js, md = write_sensitivity(table, tmp_path)
    assert len(json.loads(js.read_text())["cells"]) == 2
    assert md.read_text().count("\n") == 4 and "| 1 | 0.5 | 1 |" in md.read_text()
