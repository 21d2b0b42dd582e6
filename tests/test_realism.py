"""The realism report (rl/realism.py): metric known answers, two samples of one process look
alike, shuffling within sessions is caught, and the report files from a simulated world.
Seconds, no Ray."""

from __future__ import annotations

import json

import numpy as np

from rl.calibrate import SequenceLog
from rl.config import EnvConfig
from rl.realism import (
    FEATURES,
    Sessions,
    auc,
    gini,
    ks_statistic,
    log_sessions,
    realism_metrics,
    repeat_curve,
    simulated_sessions,
    write_realism,
)
from rl.simdata import SimulatorData


def sticky_sessions(n: int, stay: float, seed: int, n_items: int = 300) -> Sessions:
    """Sessions whose category stays with P = stay; item i has category i % 15 + 1."""
    rng = np.random.default_rng(seed)
    items, cats = [], []
    for _ in range(n):
        length = int(rng.integers(2, 15))
        c, seq = int(rng.integers(1, 16)), []
        for _ in range(length):
            if rng.random() >= stay:
                c = int(rng.integers(1, 16))
            seq.append(c - 1 + 15 * int(rng.integers(0, n_items // 15)))
        arr = np.array(seq) + 1
        items.append(arr)
        cats.append((arr - 1) % 15 + 1)
    return Sessions(items, cats, np.arange(n) // 3)


def test_metric_known_answers():
    assert ks_statistic(np.arange(10), np.arange(10)) == 0.0
    assert ks_statistic(np.zeros(5), np.ones(5)) == 1.0
    assert gini(np.ones(4)) == 0.0 and abs(gini(np.array([0, 0, 0, 4])) - 0.75) < 1e-12
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.ones(6), np.array([0, 1, 0, 1, 0, 1])) == 0.5
    s = Sessions([np.arange(6)], [np.array([1, 1, 1, 2, 2, 3])], np.zeros(1, np.int64))
    curve = repeat_curve(s)  # after r=1: 1->1 stay, 2->2 stay, 3 is last; 2->3 leaves at r=2
    assert curve["n"][:3] == [2.0, 2.0, 1.0] and curve["p"][:3] == [1.0, 0.5, 0.0]
    assert curve["low"][0] < 1.0 <= curve["high"][0] + 1e-12


def test_same_process_is_indistinguishable_and_shuffling_is_caught():
    log_pop = np.log1p(np.ones(301))
    real, twin = sticky_sessions(600, 0.7, seed=0), sticky_sessions(600, 0.7, seed=1)
    same = realism_metrics(real, twin, log_pop, seed=0)
    assert abs(same["classifier_auc"] - 0.5) < 0.07, same["classifier_auc"]
    assert same["session_length"]["ks"] < 0.1 and same["user_entropy"]["ks"] < 0.15
    r1, t1 = (same["repeat_by_run_length"][k]["p"][0] for k in ("real", "simulated"))
    assert abs(r1 - t1) < 0.06
    rng = np.random.default_rng(2)
    perm = [rng.permutation(len(c)) for c in twin.cats]
    shuffled = Sessions(
        [i[p] for i, p in zip(twin.items, perm, strict=True)],
        [c[p] for c, p in zip(twin.cats, perm, strict=True)],
        twin.user,
    )
    diff = realism_metrics(real, shuffled, log_pop, seed=0)
    assert diff["classifier_auc"] > 0.7, diff["classifier_auc"]
    assert diff["session_length"]["ks"] == same["session_length"]["ks"]  # lengths untouched
    s1 = diff["repeat_by_run_length"]["simulated"]["p"][0]
    assert r1 - s1 > 0.2


def test_log_sessions_cut_at_gaps():
    cats = np.array([[0], [1], [2], [1]])
    log = SequenceLog(
        [np.array([1, 1, 2, 3, 1])],
        [np.array([0, 10, 20, 20 + 3600, 20 + 3700])],
        cats,
        "unix",
    )
    s = log_sessions(log, np.array([0]))
    assert [x.tolist() for x in s.items] == [[1, 2], [3, 1]]  # the repeat of item 1 dropped
    assert [x.tolist() for x in s.cats] == [[1, 2], [1, 1]]
    log.timestamp_kind = "position"
    assert len(log_sessions(log, np.array([0])).items) == 1


def test_report_files_from_a_simulated_world(tmp_path):
    data = SimulatorData.synthetic(n_users=120, n_items=1500, n_categories=15, seed=0)
    cfg = EnvConfig(user_model="session")
    users = np.arange(60, 120)
    sim = simulated_sessions(data, cfg, users, np.full(60, 2), seed=0)
    assert sim.items and set(sim.user.tolist()) <= set(users.tolist())
    assert all(len(i) == len(c) > 0 for i, c in zip(sim.items, sim.cats, strict=True))
    real = simulated_sessions(data, EnvConfig(), users, np.full(60, 2), seed=100)
    report = realism_metrics(real, sim, np.log1p(np.ones(data.n_items + 1)), seed=0)
    json_path, png_path = write_realism(report, tmp_path)
    loaded = json.loads(json_path.read_text())
    assert 0.0 <= loaded["classifier_auc"] <= 1.0 and png_path.stat().st_size > 1000
    assert len(loaded["repeat_by_run_length"]["real"]["p"]) == 8
    assert loaded["user_entropy"]["users"] > 30  # users with sessions in both
    assert set(loaded["classifier_weights"]) == set(FEATURES)
