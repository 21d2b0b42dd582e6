"""The log-fitted session user (rl/session_fit.py, rl/session_user.py): EM on run lengths
recovers planted mixtures, the hazard fit recovers a planted coefficient, the fit covers every
parameter with its provenance, and the env runs the fitted user. Seconds, no Ray."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rl.calibrate import SequenceLog
from rl.config import EnvConfig, SessionConfig
from rl.env import DiversityEnv
from rl.session_fit import (
    Runs,
    fit_mixture,
    fit_session_model,
    leave_features,
    logistic_fit,
    satiation_after,
)
from rl.simdata import SimulatorData


def sample_runs(
    n_sessions: int,
    share: float,
    stay: tuple[float, float],
    seed: int,
    beta: tuple[float, float] = (0.0, 0.0),
    p_end: float = 0.08,
    switch: tuple[float, float] | None = None,
) -> Runs:
    """Sessions of category runs from the model the EM fits: a run's intent focused with P =
    share (or, with `switch`, a Markov chain over runs), per-step P(stay) = sigmoid(logit(stay_I)
    - (beta[0] + beta[1] * h) * s(n)), h ~ U(0, 1) the session's user entropy, the session ending after any event with P = p_end (censoring the run)."""
    rng = np.random.default_rng(seed)
    cfg = SessionConfig()
    a = np.log(np.array(stay) / (1 - np.array(stay)))
    length, cens, sess, ent = [], [], [], []
    for s in range(n_sessions):
        intent, ended, h = int(rng.random() >= share), False, rng.random()
        while not ended:
            n = 1
            while True:
                if rng.random() < p_end:
                    ended = True
                    break
                z = a[intent] - (beta[0] + beta[1] * h) * satiation_after(np.array([n]), cfg)[0]
                if rng.random() >= 1 / (1 + np.exp(-z)):
                    break
                n += 1
            length.append(n)
            cens.append(ended)
            sess.append(s)
            ent.append(h)
            if switch is None:
                intent = int(rng.random() >= share)
            elif rng.random() < switch[intent]:
                intent = 1 - intent
    return Runs(np.array(length), np.array(cens), np.array(sess), np.array(ent))


def test_em_recovers_a_geometric_mixture():
    runs = sample_runs(2000, share=0.35, stay=(0.85, 0.2), seed=0)
    mix = fit_mixture(runs, SessionConfig(), satiation=False)
    q = 1 / (1 + np.exp(-mix.a))
    assert abs(q[0] - 0.85) < 0.03 and abs(q[1] - 0.2) < 0.04, q
    # the share of runs: focused runs are longer, so by run count they are fewer than 35 %
    # of intents drawn per run; share is per run, as sampled
    assert abs(mix.share[0] - 0.35) < 0.05, mix.share


def test_em_separates_satiation_from_the_mixture():
    """Rising hazards (satiation, stronger for high-entropy users) are told apart from the
    mixture's falling ones: base and slope of the sensitivity come back."""
    planted = sample_runs(2000, share=0.5, stay=(0.9, 0.1), seed=1, beta=(1.0, 4.0))
    sat = fit_mixture(planted, SessionConfig())
    assert abs(sat.beta[0] - 1.0) < 0.8 and abs(sat.beta[1] - 4.0) < 1.5, sat.beta
    q = 1 / (1 + np.exp(-sat.a))
    assert abs(q[0] - 0.9) < 0.04 and abs(q[1] - 0.1) < 0.08, q
    zero = fit_mixture(sample_runs(2000, share=0.5, stay=(0.9, 0.1), seed=1), SessionConfig())
    assert np.abs(zero.beta).max() < 1.0, zero.beta
    # a geometric mixture (no satiation) fits the satiated runs worse
    assert sat.loglik > fit_mixture(planted, SessionConfig(), satiation=False).loglik + 10


def test_intent_switches_follow_a_planted_chain():
    runs = sample_runs(2500, share=0.5, stay=(0.92, 0.05), seed=2, switch=(0.2, 0.6))
    mix = fit_mixture(runs, SessionConfig(), satiation=False)
    sw = mix.switch
    assert abs(sw[0] - 0.2) < 0.08 and abs(sw[1] - 0.6) < 0.1, sw


def test_logistic_hazard_recovers_a_planted_coefficient():
    rng = np.random.default_rng(3)
    conc = rng.random(20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-(-2.0 + 1.5 * conc)))).astype(float)
    x = np.stack([np.ones_like(conc), conc], 1)
    coef, se = logistic_fit(x, y)
    assert abs(coef[1] - 1.5) < 3 * se[1] + 0.05 and se[1] < 0.2, (coef, se)
    y_neg = (rng.random(20000) < 1 / (1 + np.exp(-(-2.0 - 1.0 * conc)))).astype(float)
    assert logistic_fit(x, y_neg)[0][1] < -0.5


def test_leave_features_known_answer():
    cats = np.array([3, 3, 4, 3, 5, 5, 1])
    session = np.array([0, 0, 0, 0, 0, 0, 1])
    x, ends = leave_features(cats, session)
    np.testing.assert_allclose(x[:, 1], [1, 1, 2 / 3, 3 / 4, 3 / 5, 2 / 5, 1])
    np.testing.assert_array_equal(ends, [0, 0, 0, 0, 0, 1, 1])


def tiny_log(seed: int = 0, n_users: int = 120) -> SequenceLog:
    """Users with unix timestamps: sticky users repeat categories, others hop."""
    rng = np.random.default_rng(seed)
    n_items, n_cat = 400, 20
    cats = np.zeros((n_items + 1, 1), np.int64)
    cats[1:, 0] = rng.integers(1, n_cat + 1, n_items)
    by_cat = [np.flatnonzero(cats[:, 0] == c) for c in range(n_cat + 1)]
    items, ts = [], []
    for u in range(n_users):
        stay = 0.8 if u % 2 else 0.2
        c, seq = int(rng.integers(1, n_cat + 1)), []
        for _ in range(int(rng.integers(8, 30))):
            if rng.random() >= stay:
                c = int(rng.integers(1, n_cat + 1))
            seq.append(int(rng.choice(by_cat[c])) if len(by_cat[c]) else 1)
        gaps = np.where(rng.random(len(seq)) < 0.15, 7200, 60)
        items.append(np.array(seq))
        ts.append(1_500_000_000 + np.cumsum(gaps))
    return SequenceLog(items, ts, cats, "unix")


def test_fit_session_model_records_every_parameter():
    fit = fit_session_model(tiny_log(), users=np.arange(0, 120, 2) + 1)  # odd: sticky users
    s = fit.session
    assert set(fit.provenance) == set(vars(SessionConfig()))
    assert {p["source"] for p in fit.provenance.values()} == {"fitted", "assumed"}
    assert fit.provenance["stay_focused"]["source"] == "fitted"
    assert fit.provenance["delta"]["source"] == "assumed"
    assert 0.6 < s.stay_focused < 0.95 and s.stay_browsing < s.stay_focused
    assert fit.stats["sessions_cut_by"] == "gaps > 30 min" and fit.stats["n_sessions"] > 60
    EnvConfig(user_model="session", session=s)  # passes the config's range checks
    with pytest.raises(ValueError, match="user_model"):
        EnvConfig(user_model="bogus")


@pytest.fixture(scope="module")
def world() -> SimulatorData:
    return SimulatorData.synthetic(n_users=200, n_items=2000, n_categories=20, seed=0)


def repeat_rate(world: SimulatorData, session: SessionConfig, episodes: int = 150) -> float:
    env = DiversityEnv(world, EnvConfig(user_model="session", session=session))
    cats = world.item_categories.max(1)
    same = total = 0
    for e in range(episodes):
        env.reset(seed=e)
        done, prev = False, 0
        while not done:
            _, _, te, tr, info = env.step(0)
            for c in cats[info["clicked"]]:
                same, total = same + (c == prev), total + bool(prev)
                prev = c
            done = te or tr
    return same / max(total, 1)


def test_env_runs_the_session_user_and_intent_drives_repeats(world):
    check_env(DiversityEnv(world, EnvConfig(user_model="session")), skip_render_check=True)
    sticky = replace(SessionConfig(), focused_share=1.0, stay_focused=0.95, switch_focused=0.0)
    hopping = replace(SessionConfig(), focused_share=0.0, stay_browsing=0.05, switch_browsing=0.0)
    assert repeat_rate(world, sticky) > repeat_rate(world, hopping) + 0.2


def test_simulated_moments_recover_planted_popularity_stickiness_revisits_and_leaving():
    """rl.moments: sessions simulated under planted (popularity_weight, stick_offset,
    revisit_weight, leave_intercept) give the target moments; a fit from the defaults reproduces them (the
    parameters move the right way from the defaults)."""
    from rl.moments import fit_moments, item_popularity, simulate_moments

    data = SimulatorData.synthetic(n_users=80, n_items=800, n_categories=12, seed=4)
    counts = np.random.default_rng(0).poisson(np.exp(np.random.default_rng(1).normal(1, 1, 801)))
    data.item_popularity = item_popularity(counts)
    base = EnvConfig(k=5, n_candidates=60, max_steps=12, user_model="session")
    planted = replace(
        base.session,
        popularity_weight=-1.5,
        stick_offset=2.0,
        revisit_weight=-3.0,
        leave_intercept=-1.5,
    )
    rows = np.arange(40)
    target = simulate_moments(data, replace(base, session=planted), rows, 300, 7, 1)
    neutral = simulate_moments(data, base, rows, 300, 7, 1)
    assert target["log_popularity"] < neutral["log_popularity"] - 0.1
    assert target["repeat_rate"] > neutral["repeat_rate"] + 0.05
    assert target["revisit_rate"] < neutral["revisit_rate"] - 0.05, (target, neutral)
    names = ("popularity_weight", "stick_offset", "revisit_weight", "leave_intercept")
    fitted, out = fit_moments(
        data, base, rows, target, 1, episodes=300, iterations=6, seed=7, names=names
    )
    got = out["simulated"]
    assert (
        abs(got["events_per_session"] - target["events_per_session"])
        < 0.15 * target["events_per_session"]
    ), (got, target)
    assert abs(got["log_popularity"] - target["log_popularity"]) < 0.1, (got, target)
    assert abs(got["repeat_rate"] - target["repeat_rate"]) < 0.05, (got, target)
    assert abs(got["revisit_rate"] - target["revisit_rate"]) < 0.04, (got, target)
    assert fitted.popularity_weight < -0.5 and fitted.stick_offset > 0.5, fitted
    assert fitted.revisit_weight < -1.0, fitted


def test_revisits_known_answer():
    from rl.moments import revisits

    # A A B A C B B: event 3 (A after B) and event 5 (B after C) go back; repeats do not count
    got = revisits(np.array([1, 1, 2, 1, 3, 2, 2]))
    np.testing.assert_array_equal(got, [False, False, True, False, True, False])
    assert revisits(np.array([4])).size == 0


def test_leave_spread_widens_session_lengths_and_is_recovered():
    """rl.moments: a per-session leaving offset (session.leave_spread) spreads session lengths;
    fitting (leave_spread, leave_intercept) to the planted sessions' moments recovers the
    spread and the sd of log lengths (session 9: MovieLens's sittings, one film or hundreds)."""
    from rl.moments import fit_moments, simulate_moments

    data = SimulatorData.synthetic(n_users=40, n_items=600, n_categories=10, seed=5)
    base = EnvConfig(k=5, n_candidates=60, max_steps=40, user_model="session")
    base = replace(base, session=replace(base.session, no_click=0.0, leave_intercept=-2.5))
    planted = replace(base, session=replace(base.session, leave_spread=1.5, leave_intercept=-3.0))
    rows = np.arange(20)
    target = simulate_moments(data, planted, rows, 150, 3, 1)
    flat = simulate_moments(data, base, rows, 150, 3, 1)
    assert target["log_length_sd"] > flat["log_length_sd"] + 0.15, (target, flat)
    names = ("leave_spread", "leave_intercept")
    fitted, out = fit_moments(
        data, base, rows, target, 1, episodes=150, iterations=6, seed=3, names=names
    )
    got = out["simulated"]
    assert abs(got["log_length_sd"] - target["log_length_sd"]) < 0.08, (got, target)
    assert abs(got["events_per_session"] / target["events_per_session"] - 1) < 0.15, got
    assert 0.7 < fitted.leave_spread < 2.5, fitted
