"""The lam policy: world building, request features, arms evaluation, PPO on a contextual case."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, fields

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rec import artifacts
from rl.arms import fixed, paired_gain, play, random_lam, split_users
from rl.config import EnvConfig, LeavingConfig, SessionConfig
from rl.env import OBS_FIELDS, DiversityEnv, standardised_affinity
from rl.features import SessionRecord, request_observation, session_observation
from rl.simdata import SimulatorData
from rl.users import UserTypes, history_exploration
from rl.world import ARRAYS, World, WorldConfig, build_world, load_world, make_env, save_world
from rl.world_fit import fit_user_model, realism_report
from tests.serve_support import make_model_dir


@pytest.fixture(scope="module")
def small_world() -> SimulatorData:
    return SimulatorData.synthetic(
        n_users=60, n_items=400, n_categories=10, seed=3, n_candidates=50
    )


def test_request_observation_equals_env_reset(small_world):
    cfg = EnvConfig(n_candidates=40)
    env = DiversityEnv(small_world, cfg)
    for u in (0, 7, 31):
        obs, _ = env.reset(seed=1, options={"user": u})
        got = request_observation(
            small_world.history_items[u],
            small_world.item_categories,
            float(small_world.diversity_head[u]),
            small_world.scores[u][::-1],  # any order: it sorts
            cfg,
        )
        np.testing.assert_allclose(got, obs, rtol=1e-6, atol=1e-7)


def test_served_session_observation_equals_the_env_at_every_step(small_world):
    """A client that sends the session so far (slates, clicks in click order, lam) and the
    items no longer available gets the env's observation at that step, bit for bit, with the
    world's fitted session parameters (here non-default), recycling and the entropy window."""
    session = SessionConfig(w_exp=0.3, w_click=0.8, delta=0.6, leave_intercept=-4.0)
    cfg = EnvConfig(
        user_model="session", k=5, n_candidates=20, max_steps=12, entropy_window=2,
        session=session,
    )  # fmt: skip
    env, d = DiversityEnv(small_world, cfg), small_world
    rng, steps, recycled = np.random.default_rng(0), 0, False
    for e in range(12):
        obs, info = env.reset(seed=e)
        u, record, shown, clicked_all, done = info["user"], SessionRecord(), [], [], False
        # Odd episodes: the server's call, with the catalogue's category count computed once.
        n_cat = int(d.item_categories.max()) if e % 2 else None
        while not done:
            got = session_observation(
                d.history_items[u], d.item_categories, float(d.diversity_head[u]),
                d.scores[u], cfg, np.isin(d.candidates[u], shown), record, n_cat,
            )  # fmt: skip
            np.testing.assert_array_equal(got, obs, err_msg=f"episode {e} step {len(shown)}")
            obs, _, te, tr, info = env.step(rng.integers(11))
            record.slates.append(info["slate"])
            record.clicked.append(info["clicked"])
            record.lams.append(info["lam"])
            shown, clicked_all = (
                shown + info["slate"].tolist(),
                clicked_all + info["clicked"].tolist(),
            )
            if cfg.n_candidates - len(shown) < cfg.k:  # the env's "recycle", done by the client
                shown, recycled = list(clicked_all), True
            done, steps = te or tr, steps + 1
    assert steps > 60 and recycled and obs[OBS_FIELDS.index("satiation_max")] > 0


def test_session_record_and_replay_reject_bad_sessions(small_world):
    with pytest.raises(ValueError, match=r"session\[0\].clicked"):
        SessionRecord([np.array([3, 4])], [np.array([5])], [0.5])
    with pytest.raises(ValueError, match=r"session\[0\].lam"):
        SessionRecord([np.array([3, 4])], [np.array([4])], [1.5])
    with pytest.raises(ValueError, match="user_model"):  # the types user's satiation is hidden
        session_observation(
            small_world.history_items[0], small_world.item_categories, 0.5,
            small_world.scores[0], EnvConfig(), None,
            SessionRecord([np.array([3, 4])], [np.array([4])], [0.5]),
        )  # fmt: skip


@pytest.mark.parametrize(
    "head, scores, needle",
    [(1.5, [1.0, 0.5], "diversity_head"), (0.5, [1.0, np.nan], "cand_scores"), (0.5, [], "cand")],
)
def test_request_observation_rejects_bad_input(small_world, head, scores, needle):
    with pytest.raises(ValueError, match=needle):
        request_observation(
            small_world.history_items[0],
            small_world.item_categories,
            head,
            np.array(scores),
            EnvConfig(),
        )


def test_arms_play_the_same_episodes(small_world):
    cfg = EnvConfig(n_candidates=40)
    users = np.arange(30, 60)
    a = play(small_world, cfg, users, fixed(0.0), 40, seed=11)
    b = play(small_world, cfg, users, fixed(0.0), 40, seed=11)
    c = play(small_world, cfg, users, random_lam, 40, seed=11)
    np.testing.assert_array_equal(a.returns, b.returns)  # deterministic
    np.testing.assert_array_equal(a.users, c.users)  # common random numbers across arms
    assert set(a.users) <= set(users)
    assert a.lam.max() == 0.0 and 0.2 < c.lam.mean() < 0.8
    same = paired_gain(a, b)
    assert same["gain"] == 0.0 and same["diff_ci95"] == 0.0


def test_paired_gain_known_answer():
    """Non-identical arms: the gain is the mean paired difference over b's mean return, and the
    CI is 1.96 * sd(differences) / sqrt(n) (paired: b's own spread does not enter)."""
    from rl.arms import ArmResult

    def arm(returns):
        r = np.asarray(returns, dtype=np.float64)
        return ArmResult(r, r, r, r, r, np.arange(len(r)))

    b = arm([1.0, 3.0, 2.0, 6.0])  # mean 3
    a = arm([2.0, 4.0, 4.0, 6.0])  # differences 1, 1, 2, 0: mean 1, sd sqrt(2/3)
    got = paired_gain(a, b)
    half = 1.959963984540054 * np.sqrt(2 / 3) / 2
    # 1e-12: a few float64 roundings of numbers near 1 (the Z constant may be written shorter)
    assert got["diff"] == pytest.approx(1.0, abs=1e-12)
    assert got["gain"] == pytest.approx(1 / 3, abs=1e-12)
    assert got["diff_ci95"] == pytest.approx(half, rel=1e-6)
    assert got["gain_ci95_low"] == pytest.approx((1 - half) / 3, rel=1e-6)
    assert got["gain_ci95_high"] == pytest.approx((1 + half) / 3, rel=1e-6)
    assert paired_gain(b, a)["gain"] == pytest.approx(-1 / 4, abs=1e-12)  # over a's mean 4


def test_split_users_is_disjoint_and_seeded():
    tr, ev = split_users(100, 0.2, 5)
    assert len(ev) == 20 and not set(tr) & set(ev) and len(tr) + len(ev) == 100
    np.testing.assert_array_equal(ev, split_users(100, 0.2, 5)[1])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_users(100, 1.0, 0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("policy_model"))


def test_build_world_from_trained_model(model_dir, tmp_path):
    world = build_world(model_dir, WorldConfig(n_users=50, n_candidates=30, history_len=10))
    a = world.arrays
    assert a["candidates"].shape == (50, 30) and a["history_items"].shape == (50, 10)
    assert (np.diff(a["scores"], axis=1) <= 0).all()  # top-N in score order
    # no candidate is in the history the ranker saw (the user's sequence minus its test event)
    hist = a["history_items"]
    assert not any(set(a["candidates"][u]) & set(hist[u][hist[u] > 0]) for u in range(50))
    path = save_world(world, tmp_path / "w.npz")
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert set(ARRAYS) <= set(z.files)
    data = load_world(path, EnvConfig().types)
    assert data.n_users == 50 and data.n_items == a["item_categories"].shape[0] - 1
    cfg = EnvConfig(n_candidates=30, k=5)
    env = make_env({"world": str(path), "env": asdict(cfg), "users": list(range(40)), "seed": 0})
    check_env(env, skip_render_check=True)


def test_session_model_fitted_on_training_users_and_realism(model_dir, tmp_path):
    """jobs.train_policy's world step without Ray: the session user fitted on the world's
    training users (every parameter with its provenance), then the realism report."""
    cfg = WorldConfig(n_users=60, n_candidates=30, history_len=10, fit_episodes=30)
    world = build_world(model_dir, cfg)
    data = load_world(save_world(world, tmp_path / "w.npz"), EnvConfig().types)
    train, held = split_users(data.n_users, 0.3, 0)
    env, model = fit_user_model(world, data, EnvConfig(n_candidates=30, k=5), cfg, train)
    assert env.user_model == "session" and model["fit_users"]["count"] == len(train)
    assert model["provenance"]["stay_focused"]["source"] == "fitted"
    assert model["provenance"]["leave_intercept"]["value"] == env.session.leave_intercept
    assert -8 < env.session.leave_intercept < 8  # inside rl.moments.BOUNDS
    assert model["provenance"]["leave_spread"]["source"] == "fitted"
    # the horizon covers the log's sittings (never shorter than configured)
    assert model["horizon"]["env.max_steps"] == env.max_steps >= EnvConfig().max_steps
    json.dumps(model)  # world.json
    report = realism_report(world, data, env, held, episodes=40, seed=0)
    assert report["sessions"]["real"] > 0 and 0.0 <= report["classifier_auc"] <= 1.0


def test_build_world_names_missing_model(tmp_path):
    with pytest.raises(artifacts.ArtifactError, match=f"^{tmp_path}/data: not found"):
        build_world(tmp_path, WorldConfig())


def contextual_world() -> tuple[SimulatorData, EnvConfig]:
    """A tiny world whose users' type is a function of what the policy observes (history
    entropy). Focused users: the ranker is right for them, best lam ~0.5. Explorers: the
    ranker's order is wrong for them (scores = minus their true affinity) and they click
    readily, so the most diverse slates (lam = 1) do best."""
    data = SimulatorData.synthetic(
        n_users=200, n_items=600, n_categories=12, seed=0, n_candidates=60
    )
    entropy, _ = history_exploration(data.history_items, data.item_categories)
    ex = entropy > np.median(entropy)

    def w(focused: float, explorer: float) -> np.ndarray:
        return np.where(ex, explorer, focused).astype(np.float64)

    data.types = UserTypes(
        explorer=ex.astype(np.float64),
        sensitivity=w(0, 4),
        decay=w(0.9, 0.9),
        preference=w(3, 3),
        no_click=w(2.5, -1),
        continue_prob=w(0.9, 0.9),
    )
    aff = standardised_affinity(data, data.candidates)
    data.scores = np.where(ex[:, None], -aff, aff).astype(np.float32)
    cfg = EnvConfig(
        k=5, n_candidates=60, max_steps=8, purchase_weight=0.0, leaving=LeavingConfig(base=0.1)
    )
    return data, cfg


def test_contextual_world_best_lam_depends_on_type():
    data, cfg = contextual_world()
    users = np.arange(data.n_users)
    ex = data.types.explorer > 0.5
    lo, hi = (play(data, cfg, users, fixed(lam), 300, seed=5) for lam in (0.5, 1.0))
    assert lo.returns[~ex[lo.users]].mean() > hi.returns[~ex[hi.users]].mean() + 0.5
    assert hi.returns[ex[hi.users]].mean() > lo.returns[ex[lo.users]].mean() + 1.0


def test_warm_start_makes_an_untrained_module_the_constant(tmp_path):
    """rl.policy.warm_start_module: greedy, every observation gets the warm lam; sampled,
    the lam has WARM_START_PROB and every other level an equal share (PPO explores)."""
    import torch
    from ray.rllib.core.columns import Columns

    from rl.policy import MODULE_DIR, WARM_START_PROB, LamPolicy, warm_start_module
    from tests.serve_support import make_policy_dir

    make_policy_dir(tmp_path)  # an untrained RLModule, saved as the job saves one
    policy = LamPolicy.load(tmp_path)
    obs = np.random.default_rng(0).random((64, len(OBS_FIELDS))).astype(np.float32)
    assert len(set(policy.choose(obs).tolist())) > 1  # untrained: depends on the observation
    warm_start_module(policy.module, 0.3, "discrete")
    assert policy.choose(obs).tolist() == [0.3] * len(obs)
    with torch.no_grad():
        logits = policy.module.forward_inference({Columns.OBS: torch.from_numpy(obs)})
    p = torch.softmax(logits[Columns.ACTION_DIST_INPUTS], 1).numpy()
    np.testing.assert_allclose(p[:, 3], WARM_START_PROB, rtol=1e-5)
    np.testing.assert_allclose(np.delete(p, 3, 1), (1 - WARM_START_PROB) / 10, rtol=1e-5)
    assert (tmp_path / MODULE_DIR).is_dir()


def test_episodes_are_sized_to_the_users():
    from rl.policy import PolicyConfig

    pc = PolicyConfig(eval_episodes=500, episodes_per_user=50, max_episodes=2000)
    assert [pc.episodes(n) for n in (5, 23, 200)] == [500, 1150, 2000]
    assert pc.episodes(23, floor=150) == 1150 and pc.episodes(2, floor=150) == 150
    assert PolicyConfig(episodes_per_user=0).episodes(10_000) == 500  # off: the floor


@pytest.mark.ray
def test_ppo_learns_lam_from_the_observation(ray_local, tmp_path):
    """The job's PPO loop (rl.train.fit, lr and entropy schedules, early stopping on tune
    users), warm-started at the best fixed lam of the tune users (its iteration 0 is exactly
    that constant, on an env runner actor: the weights reached it), trained briefly on the
    contextual world, picks a higher lam for explorers than for focused users, keeps an
    iterate only where it beats the warm start beyond noise, and its saved RLModule loads
    without the Algorithm."""
    from rl.ladder import best_fixed
    from rl.policy import MODULE_DIR, LamPolicy, PolicyConfig, write_policy_meta
    from rl.train import fit

    data, cfg = contextual_world()
    arrays = {k: getattr(data, k) for k in ARRAYS}
    arrays |= {f"types.{f.name}": getattr(data.types, f.name) for f in fields(UserTypes)}
    path = save_world(
        World(arrays, calibration=None, users=np.arange(data.n_users)), tmp_path / "ctx.npz"
    )
    assert load_world(path, cfg.types).types.explorer.tolist() == data.types.explorer.tolist()
    train, held = split_users(data.n_users, 0.3, 0)
    tune = train[::2]  # scored every 3 iterations on the same seeded episodes
    pc = PolicyConfig(
        iterations=12,
        train_batch_size=1000,
        minibatch_size=200,
        num_epochs=10,
        lr=5e-3,
        entropy_coeff=0.0,
        num_env_runners=1,  # the job's layout: the warm start is synced to a runner actor
        hidden=[32, 32],
        eval_every=3,
        patience=4,  # the whole run: from the warm start PPO needs ~6 iterations to move
    )
    build, published = tmp_path / "build", str(tmp_path / "policy")
    scored = []
    warm, grid = best_fixed(data, cfg, tune, 300, 11)

    def on_tune(arm):
        scored.append(play(data, cfg, tune, arm, 300, seed=11))
        return scored[-1]

    curve = fit(pc, path, cfg, train, build / MODULE_DIR, select=on_tune, warm_lam=warm)
    assert [row["iteration"] for row in curve] == list(range(len(curve)))
    assert curve[0]["warm_start_lam"] == warm
    assert curve[0]["tune_return"] == grid[warm].returns.mean()  # exactly the constant
    assert [r["tune_return"] for r in curve if "tune_return" in r] == [
        r.returns.mean() for r in scored
    ]
    (kept,) = [r for r in curve if r.get("kept")]
    assert kept["iteration"] == 0 or kept["tune_gain_ci95_low"] > 0  # over the warm start
    write_policy_meta(build, cfg, {"algorithm": "PPO"})
    artifacts.publish(build, published, kind="policy", producer="test", config=asdict(pc))
    policy = LamPolicy.load(published)  # as jobs.train_policy publishes and Serve loads it
    env = DiversityEnv(data, cfg)
    obs = np.stack([env.reset(seed=0, options={"user": int(u)})[0] for u in held])
    lam = policy.choose(obs)
    # the saved module is the kept one: it scores the kept row's return on the same episodes
    assert play(data, cfg, tune, policy.arm(), 300, seed=11).returns.mean() == kept["tune_return"]
    assert kept["iteration"] > 0 and kept["tune_return"] > curve[0]["tune_return"]
    ex = data.types.explorer[held] > 0.5
    assert lam[ex].mean() > lam[~ex].mean() + 0.3, (lam[ex], lam[~ex])
    # and reading the context pays: it beats the best fixed lam on held-out users
    pol = play(data, cfg, held, policy.arm(), 300, seed=9).returns.mean()
    best = max(play(data, cfg, held, fixed(lam), 300, seed=9).returns.mean() for lam in (0.5, 1.0))
    assert pol > best, (pol, best)
    # the same module in a fresh process with no Ray started: Serve's load path
    code = (
        f"import numpy as np; from rl.policy import LamPolicy; p = LamPolicy.load({published!r}); "
        f"print(p.choose(np.zeros((2, 12), np.float32)).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(json.loads(out.stdout.strip().splitlines()[-1])) == 2
