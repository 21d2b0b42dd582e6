"""The simulated-user environment (rl/): gymnasium contract, determinism, the user model's
satiation and leaving, the heterogeneity that makes a per-user lam worth learning, the ALS
ground truth and the log calibration. Runs in well under a minute, no Ray."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

from rec.rerank import SIMILARITIES, RerankConfig, rerank
from rl.calibrate import (
    SequenceLog,
    apply_calibration,
    calibrate,
    load_prepared,
    stay_probabilities,
)
from rl.config import EnvConfig, LeavingConfig, SatiationConfig
from rl.env import OBS_FIELDS, DiversityEnv, slate_ild
from rl.groundtruth import ALSConfig, fit_als
from rl.simdata import SimulatorData, recent_items
from rl.users import SimulatedUser, UserTypes, category_weights


@pytest.fixture(scope="module")
def world() -> SimulatorData:
    return SimulatorData.synthetic(n_users=300, n_items=3000, n_categories=30, seed=0)


def run_episode(env: DiversityEnv, seed: int, action, user: int | None = None) -> list:
    """-> [(obs, reward, terminated, truncated, info-without-arrays), ...] of one episode."""
    options = None if user is None else {"user": user}
    obs, _ = env.reset(seed=seed, options=options)
    out = [(obs, 0.0, False, False, {})]
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(action)
        out.append((obs, reward, terminated, truncated, info))
        done = terminated or truncated
    return out


def one_user(sensitivity: float, n_categories: int = 4) -> SimulatedUser:
    types = UserTypes(*(np.array([v]) for v in (1.0, sensitivity, 0.9, 1.0, 0.0, 0.5)))
    user = SimulatedUser(n_categories, 4, SatiationConfig(), EnvConfig().choice, LeavingConfig())
    user.start(types, 0)
    return user


# ----------------------------------------------------------------------------- gym contract


@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_check_env_passes(world, mode):
    env = DiversityEnv(world, EnvConfig(action_mode=mode))
    check_env(env, skip_render_check=True)
    assert env.observation_space.shape == (len(OBS_FIELDS),)


def test_same_seed_same_trajectory_different_seeds_differ(world):
    env = DiversityEnv(world, EnvConfig(action_mode="continuous"))
    lam = np.array([0.5], dtype=np.float32)

    def trace(seed: int) -> list:
        return [
            (o.tolist(), r, te, tr, info.get("slate", np.zeros(0)).tolist(), info.get("clicks"))
            for o, r, te, tr, info in run_episode(env, seed, lam)
        ]

    assert trace(7) == trace(7)
    assert trace(7) != trace(8)


def test_observation_in_bounds_and_info_keys(world):
    env = DiversityEnv(world, EnvConfig(max_steps=30))
    for seed in range(5):
        for obs, _, _, _, info in run_episode(env, seed, 3):
            assert env.observation_space.contains(obs)
            if info:
                assert {"clicks", "purchases", "ild", "lam", "slate", "leave_prob"} <= set(info)
                assert 0.0 <= info["ild"] <= 1.0 and info["lam"] == pytest.approx(0.3)
                assert 0 <= info["purchases"] <= info["clicks"] <= env.cfg.choice.max_clicks


def test_actions_map_to_lam(world):
    cont = DiversityEnv(world, EnvConfig(action_mode="continuous"))
    cont.reset(seed=0)
    assert cont.step(np.array([1.7], dtype=np.float32))[4]["lam"] == 1.0  # clipped
    disc = DiversityEnv(world, EnvConfig())
    disc.reset(seed=0)
    assert disc.step(np.int64(4))[4]["lam"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="discrete action"):
        disc.step(11)


def test_lam_zero_slate_is_the_rankers_top_k(world):
    env = DiversityEnv(world, EnvConfig())
    for user in (0, 5, 17):
        env.reset(seed=0, options={"user": user})
        info = env.step(0)[4]
        order = np.argsort(-world.scores[user], kind="stable")[: env.cfg.k]
        np.testing.assert_array_equal(info["slate"], world.candidates[user][order])


def test_category_kernel_diversifies_categories_more_than_item_vectors(world):
    """rerank.similarity="category" runs the DPP on the Jaccard of category sets: at lam = 1
    its first slate spans more categories than the cosine kernel's, and at lam = 0 both are the
    ranker's top k."""
    ild = {}
    for sim in SIMILARITIES:
        rerank_cfg = RerankConfig(similarity=sim)
        env = DiversityEnv(world, EnvConfig(action_mode="continuous"), rerank_cfg=rerank_cfg)
        vals, tops = [], []
        for user in range(40):
            env.reset(seed=0, options={"user": user})
            tops.append(env.step(np.array([0.0], np.float32))[4]["slate"])
            env.reset(seed=0, options={"user": user})
            vals.append(env.step(np.array([1.0], np.float32))[4]["ild"])
        ild[sim] = (float(np.mean(vals)), tops)
    np.testing.assert_array_equal(ild["embedding"][1], ild["category"][1])
    assert ild["category"][0] > ild["embedding"][0]
    with pytest.raises(ValueError, match="similarity"):
        RerankConfig(similarity="jaccard")


@pytest.mark.parametrize("method", ["mmr", "none"])
def test_env_slates_follow_the_shared_rerank_method(world, method):
    """The env re-ranks with `rec.rerank.rerank` under the run's `rerank:` section."""
    env = DiversityEnv(world, EnvConfig(action_mode="continuous"), rerank_cfg=RerankConfig(method))
    env.reset(seed=0, options={"user": 3})
    slate = env.step(np.array([0.8], np.float32))[4]["slate"]
    scores, items = env._scores[3], env._cands[3]
    vecs = world.item_vectors[items][None]
    expected = rerank(scores[None], env.cfg.k, 0.8, RerankConfig(method), vectors=vecs)[0]
    np.testing.assert_array_equal(slate, items[expected])


def test_slates_never_repeat_until_the_pool_is_recycled(world):
    quiet = LeavingConfig(base=0.0, increment=0.0, cap=0.0)  # nobody leaves
    env = DiversityEnv(world, EnvConfig(max_steps=10, leaving=quiet))
    steps = run_episode(env, 0, 5)[1:]
    shown = np.concatenate([info["slate"] for *_, info in steps])
    assert len(steps) == 10 and len(np.unique(shown)) == 100  # N = 100, k = 10
    assert steps[-1][3] and not steps[-1][2]  # truncated at max_steps, not terminated
    ended = DiversityEnv(world, EnvConfig(max_steps=15, leaving=quiet, on_exhausted="end"))
    assert len(run_episode(ended, 0, 5)) - 1 == 10  # pool exhausted -> truncated
    recycled = DiversityEnv(world, EnvConfig(max_steps=15, leaving=quiet))
    steps = run_episode(recycled, 0, 5)[1:]
    clicked = {i for *_, info in steps[:10] for i in info["slate"][: info["clicks"]]}
    assert len(steps) > 10 and len(clicked) > 0


def test_slate_ild():
    assert slate_ild(np.array([[1, 0], [1, 0], [1, 0]]), 4) == 0.0
    assert slate_ild(np.array([[1, 0], [2, 0], [3, 0]]), 4) == 1.0
    # {1, 2} vs {2}: Jaccard 1/2 -> ILD 1/2
    assert slate_ild(np.array([[1, 2], [2, 0]]), 4) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- user model


def test_satiation_lowers_the_click_chance_of_a_repeated_category():
    cats = np.array([[1], [1], [2], [3]])  # slot 0 and 1 in category 1
    weights = category_weights(np.vstack([[0], cats]))[1:]
    aff = np.zeros(4)
    for sensitivity, should_drop in ((3.0, True), (0.0, False)):
        user = one_user(sensitivity)
        before = user.choice_probabilities(aff, cats, weights)
        rng = np.random.default_rng(0)
        while not user.respond(aff, cats, weights, rng).clicks[:2].any():
            pass  # until an item of category 1 has been clicked
        after = user.choice_probabilities(aff, cats, weights)
        assert 0.0 < user.satiation[1] <= 1.0
        if should_drop:
            assert after[1] < before[1] and after[2] < before[2]
            assert after[3] / after[1] > before[3] / before[1]  # category 2 gained on category 1
        else:
            np.testing.assert_allclose(after, before)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=4, max_size=4), st.integers(0, 2**31 - 1))
def test_satiation_stays_in_unit_interval(cat_ids, seed):
    cats = np.array(cat_ids)[:, None]
    weights = (cats > 0).astype(np.float64)
    user, rng = one_user(2.0), np.random.default_rng(seed)
    for _ in range(20):
        user.respond(rng.normal(size=4), cats, weights, rng)
        assert (user.satiation >= 0).all() and (user.satiation <= 1).all()
        assert user.satiation[0] == 0.0


def test_leaving_rises_with_unsatisfying_slates_and_terminates(world):
    user = one_user(0.0)
    probs = [user.leave_probability(n) for n in range(10)]
    assert probs == sorted(probs) and probs[1] > probs[0] and probs[-1] == user.leave_cfg.cap
    always = DiversityEnv(world, EnvConfig(leaving=LeavingConfig(base=1.0, cap=1.0)))
    *_, (_, _, terminated, truncated, _) = run_episode(always, 0, 5)
    assert terminated and not truncated
    never = LeavingConfig(base=0.0, increment=0.0, cap=0.0)
    steps = run_episode(DiversityEnv(world, EnvConfig(max_steps=4, leaving=never)), 0, 5)
    assert len(steps) == 5 and steps[-1][3] and not steps[-1][2]


def test_explorers_prefer_more_diversity_than_focused_users():
    """No single fixed lam is best for everyone: in a small simulation (the same users and
    seeds for every lam) explorers' best fixed lam is higher than focused users'."""
    world = SimulatorData.synthetic(n_users=600, n_items=3000, n_categories=30, seed=0)
    env = DiversityEnv(world, EnvConfig())
    lams = (0, 4, 8)  # lam 0.0, 0.4, 0.8
    returns = {}
    for explorer in (0.0, 1.0):
        users = np.flatnonzero(world.types.explorer == explorer)
        returns[explorer] = [
            np.mean(
                [
                    sum(r for _, r, *_ in run_episode(env, 1000 * rep + int(u), action, int(u)))
                    for rep in range(2)
                    for u in users
                ]
            )
            for action in lams
        ]
    best_focused, best_explorer = (lams[int(np.argmax(returns[e]))] for e in (0.0, 1.0))
    assert best_explorer > best_focused, returns
    assert returns[1.0][2] > returns[1.0][0] and returns[0.0][2] < max(returns[0.0]), returns


# ----------------------------------------------------------------------------- ground truth


def test_als_recovers_a_planted_low_rank_preference_better_than_popularity():
    rng = np.random.default_rng(0)
    n_users, n_items, rank = 300, 200, 4
    pref = 1.5 * rng.normal(size=(n_users, rank)) @ rng.normal(size=(rank, n_items))
    pop = 0.5 * rng.normal(size=n_items)  # popularity the baseline can exploit
    seqs, held = [], []
    for u in range(n_users):
        p = np.exp(pref[u] + pop)
        s = rng.choice(n_items, size=25, p=p / p.sum()) + 1
        seqs.append(s[:-5])
        held.append(s[-5:])
    gt = fit_als(seqs, n_items, ALSConfig(factors=8, iterations=10))
    counts = np.bincount(np.concatenate(seqs), minlength=n_items + 1).astype(np.float64)

    def hit_rate(score) -> float:
        hits = 0
        for u in range(n_users):
            s = score(u).copy()
            s[0], s[seqs[u]] = -np.inf, -np.inf  # padding and already-seen items
            hits += np.isin(held[u], np.argsort(-s)[:10]).sum()
        return hits / (5 * n_users)

    als = hit_rate(lambda u: gt.affinity(u, np.arange(n_items + 1)))
    popular = hit_rate(lambda u: counts)
    assert als > 2 * popular, (als, popular)
    assert gt.item_factors.shape == (n_items + 1, 8) and not gt.item_factors[0].any()


# ----------------------------------------------------------------------------- calibration


def test_stay_probabilities_by_run_length():
    # one session: categories 1 1 1 2 2 3 -> runs of 3, 2, 1
    prob, count = stay_probabilities(np.array([1, 1, 1, 2, 2, 3]), np.zeros(6, np.int64))
    # n=1: events 0 (stay), 3 (stay); n=2: events 1 (stay), 4 (leave); n=3: event 2 (leave)
    np.testing.assert_array_equal(count[:3], [2, 2, 1])
    np.testing.assert_allclose(prob[:3], [1.0, 0.5, 0.0])


def test_sessions_split_at_thirty_minute_gaps():
    items = [np.array([1, 2, 3, 4]), np.array([5, 6])]
    stamps = [np.array([0, 60, 60 + 1801, 60 + 1900]), np.array([0, 10])]
    table = np.arange(7)[:, None]  # item i in category i
    cal = calibrate(SequenceLog(items, stamps, table, "unix"))
    assert cal.n_sessions == 3 and cal.session_mean == pytest.approx(2.0)
    cal = calibrate(SequenceLog(items, stamps, table, "position"))
    assert cal.n_sessions == 2 and cal.session_mean == pytest.approx(3.0)


def test_prepared_data_to_environment(tmp_path):
    """prepare (no Ray) -> full sequences -> calibration, ALS ground truth -> SimulatorData."""
    from rec.data.config import DataConfig
    from rec.data.local import prepare_local
    from rec.data.synthetic import SyntheticConfig

    synthetic = SyntheticConfig(n_users=150, n_items=400, n_categories=12, events_per_user=20)
    prepare_local(DataConfig(synthetic=synthetic), tmp_path)
    log = load_prepared(tmp_path)
    cal = calibrate(log)
    assert cal.timestamp_kind == "unix" and cal.n_sessions >= len(log.items)
    assert np.isfinite(cal.stay_prob[0]) and cal.log_odds_by_type.shape == (3,)
    n_items = log.item_categories.shape[0] - 1
    gt = fit_als(log.items, n_items, ALSConfig(factors=8, iterations=3))
    rng = np.random.default_rng(0)
    cands = np.stack([1 + rng.permutation(n_items)[:100] for _ in log.items])  # a stand-in ranker
    data = SimulatorData.build(
        candidates=cands,
        scores=rng.normal(size=cands.shape),
        diversity_head=rng.random(len(log.items)),
        history_items=recent_items([s[:-2] for s in log.items], 20),  # the ranker's inputs
        item_categories=log.item_categories,
        item_vectors=rng.normal(size=(n_items + 1, 8)),
        ground_truth=gt,
    )
    # load_prepared: each full sequence ends with the user's valid then test target
    import polars as pl

    test = pl.read_parquet(tmp_path / "test" / "*.parquet").sort("user_id")
    valid = pl.read_parquet(tmp_path / "valid" / "*.parquet").sort("user_id")
    assert [int(s[-1]) for s in log.items] == test["target_item"].to_list()
    assert [int(s[-2]) for s in log.items] == valid["target_item"].to_list()
    # The closed form without simulator data (rl/calibrate.py docstring): base = clicks per
    # slate / mean session length, clicks per slate = 1 / (1 - continue prob), kept in
    # [0.02, 0.5]. Defaults: continue 0.9 and 0.4 -> 1 / (1 - 0.65) ~ 2.86 clicks per slate.
    env_cfg = EnvConfig()
    cont = 0.5 * (env_cfg.types.continue_focused + env_cfg.types.continue_explorer)
    want = float(np.clip(1.0 / (1.0 - cont) / cal.session_mean, 0.02, 0.5))
    cfg, changed = apply_calibration(env_cfg, cal)
    assert changed["leaving.base"] == pytest.approx(want, rel=1e-12)  # same float ops
    assert cfg.leaving.base == want and cfg.leaving.cap >= want
    assert cfg.leaving.base != EnvConfig().leaving.base  # calibration did change it
    check_env(DiversityEnv(data, cfg), skip_render_check=True)


def test_leaving_base_is_calibrated_by_bisection(world):
    """fit_leave_base brackets the base whose simulated mean clicks per session equal the
    target: with the same episode seeds for every base, the final interval's lower end gives
    more clicks than the target and its upper end at most the target; an unreachable target
    warns and ends at base ~0."""
    from rl.calibrate import fit_leave_base, mean_clicks

    cfg = EnvConfig()

    def clicks(base: float) -> float:
        leaving = replace(cfg.leaving, base=base, cap=max(cfg.leaving.cap, base))
        return mean_clicks(world, replace(cfg, leaving=leaving), 0.0, 40, 0)

    target = clicks(0.2)  # a target the simulator reaches at base 0.2
    base = fit_leave_base(world, cfg, target, episodes=40, iterations=10)
    half = 0.9 / 2**11  # [0, 0.9] halved 10 times, the midpoint returned
    assert clicks(base - half) > target >= clicks(base + half), base
    assert clicks(0.1) > target >= clicks(0.3)  # so the bracket lies in (0.1, 0.3)
    assert 0.1 < base < 0.3
    with pytest.warns(UserWarning, match="out of reach"):
        assert fit_leave_base(world, cfg, 1e6, episodes=5, iterations=10) < 0.001


def test_configs_and_data_fail_loudly(world):
    with pytest.raises(ValueError, match="n_candidates"):
        EnvConfig(k=10, n_candidates=5)
    with pytest.raises(ValueError, match="leaving.cap"):
        EnvConfig(leaving=LeavingConfig(cap=1.5))
    with pytest.raises(ValueError, match="SimulatorData.scores"):
        replace(world, scores=world.scores[:, :5])
    with pytest.raises(ValueError, match="n_candidates"):
        DiversityEnv(world, EnvConfig(n_candidates=200))
