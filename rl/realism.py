"""How far simulated sessions are from logged ones: realism.json and realism.png (numpy only).

    real = log_sessions(log, held_out_log_users)           # the held-out users' logged sessions
    sim = simulated_sessions(data, env_cfg, held_out_rows, episodes, seed)   # lam = 0
    report = realism_metrics(real, sim, seed=0); write_realism(report, out_dir)

Simulated sessions are played with lam = 0 (the ranker's order: the logging-like policy,
assumed), a session's clicks in click order being what a log of it would hold; sessions
without a click leave no trace in a log and are dropped. Logged sessions are cut as in
rl.session_fit (30-min gaps on unix timestamps; whole sequences where only positions exist).
Every comparison uses an event's most specific category (rl.calibrate). Where the log is a
k-core of whole sequences (Beauty), simulated sessions shorter than the fit users' shortest
logged one are dropped too (`keep_long`: the log's own selection), and item popularity is
counted without the held-out users' events (else every real event would carry its own count
and no simulated click would).

Metrics: P(next event stays in the category | run length r), r = 1..8 (8: >= 8), with 95 %
Wilson intervals; the KS statistic of session lengths; per-user category entropy (entropy of
the categories of a user's events over log(min(events, categories))), its KS statistic and
means; the popularity Gini of consumed items on equal-size samples; and the cross-validated
AUC of a logistic regression telling real from simulated sessions from sequence features
(balanced classes; 0.5 = indistinguishable), also without the popularity features.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rl.calibrate import SESSION_GAP_S, SequenceLog
from rl.session_fit import logistic_fit

MAX_R = 8
FEATURES = (
    "log_length",
    "distinct_share",
    "repeat_rate",
    "max_run_share",
    "entropy",
    "mean_log_popularity",
    "sd_log_popularity",
)

SEQ = [i for i, f in enumerate(FEATURES) if "popularity" not in f]  # sequence-shape features


@dataclass
class Sessions:
    items: list[np.ndarray]  # per session (L,) item indices in order
    cats: list[np.ndarray]  # per session (L,) most specific category
    user: np.ndarray  # (S,) the session's user


def log_sessions(log: SequenceLog, users: np.ndarray) -> Sessions:
    """The logged sessions of `users` (rows of log), consecutive repeats of an item dropped."""
    specific = log.item_categories.max(1)
    items, cats, who = [], [], []
    for u in np.asarray(users):
        seq, ts = log.items[u], log.timestamps[u]
        keep = np.ones(len(seq), dtype=bool)
        keep[1:] = seq[1:] != seq[:-1]
        seq, ts = seq[keep], ts[keep]
        if not len(seq):
            continue
        cut = (
            np.flatnonzero(np.diff(ts) > SESSION_GAP_S) + 1 if log.timestamp_kind == "unix" else []
        )
        for part in np.split(seq, cut):
            items.append(part)
            cats.append(specific[part])
            who.append(int(u))
    return Sessions(items, cats, np.asarray(who, dtype=np.int64))


def simulated_sessions(
    data, env_cfg, users: np.ndarray, counts: np.ndarray, seed: int, rerank_cfg=None
) -> Sessions:
    """counts[i] sessions of user users[i] (world rows) under lam = 0 -> clicks in click
    order, sessions without a click dropped (they leave nothing in a log)."""
    from rl.env import DiversityEnv  # the env pulls in gymnasium; metrics alone do not

    env = DiversityEnv(
        data, replace(env_cfg, action_mode="continuous"), users=users, rerank_cfg=rerank_cfg
    )
    specific = data.item_categories.max(1)
    items, cats, who = [], [], []
    zero, e = np.zeros(1, dtype=np.float32), 0
    for u, n in zip(np.asarray(users).tolist(), np.asarray(counts).tolist(), strict=True):
        for _ in range(int(n)):
            env.reset(seed=seed + e, options={"user": u})
            e, clicked, done = e + 1, [], False
            while not done:
                _, _, terminated, truncated, info = env.step(zero)
                clicked.extend(info["clicked"].tolist())
                done = terminated or truncated
            if clicked:
                seq = np.asarray(clicked, dtype=np.int64)
                items.append(seq)
                cats.append(specific[seq])
                who.append(u)
    return Sessions(items, cats, np.asarray(who, dtype=np.int64))


def keep_long(s: Sessions, min_events: int) -> Sessions:
    """Only the sessions with >= min_events events (a k-core log's selection)."""
    keep = [i for i, c in enumerate(s.cats) if len(c) >= min_events]
    return Sessions([s.items[i] for i in keep], [s.cats[i] for i in keep], s.user[keep])


def repeat_curve(s: Sessions) -> dict[str, list[float]]:
    """P(stay | run length r), r = 1..MAX_R, with 95 % Wilson bounds and counts."""
    hits, count = np.zeros(MAX_R), np.zeros(MAX_R)
    for c in s.cats:
        if len(c) < 2:
            continue
        stay = c[1:] == c[:-1]  # (L-1,) the event after position i stays
        run = np.ones(len(c), dtype=np.int64)
        for i in range(1, len(c)):
            run[i] = run[i - 1] + 1 if c[i] == c[i - 1] else 1
        bucket = np.minimum(run[:-1], MAX_R) - 1
        hits += np.bincount(bucket, stay, MAX_R)
        count += np.bincount(bucket, minlength=MAX_R)
    p = np.divide(hits, count, out=np.full(MAX_R, np.nan), where=count > 0)
    lo, hi = _wilson(hits, count)
    return {"p": p.tolist(), "low": lo.tolist(), "high": hi.tolist(), "n": count.tolist()}


def _wilson(k: np.ndarray, n: np.ndarray, z: float = 1.959963984540054):
    n1 = np.maximum(n, 1)
    p = k / n1
    mid = (p + z * z / (2 * n1)) / (1 + z * z / n1)
    half = z * np.sqrt(p * (1 - p) / n1 + z * z / (4 * n1 * n1)) / (1 + z * z / n1)
    return np.where(n > 0, mid - half, np.nan), np.where(n > 0, mid + half, np.nan)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    if not len(a) or not len(b):
        return float("nan")
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0 = all equal)."""
    x = np.sort(np.asarray(counts, float))
    if not len(x) or x.sum() == 0:
        return float("nan")
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def _norm_entropy(c: np.ndarray) -> float:
    if len(c) < 2:
        return 0.0
    p = np.unique(c, return_counts=True)[1] / len(c)
    return float(-(p * np.log(p)).sum() / math.log(len(c)))


def user_entropy(real: Sessions, sim: Sessions) -> tuple[np.ndarray, np.ndarray]:
    """Per user present in both: normalised category entropy of the user's events (sessions
    in order) in each, both cut to the shorter of the two so lengths do not decide."""

    def by_user(s: Sessions) -> dict[int, np.ndarray]:
        out: dict[int, list[np.ndarray]] = {}
        for u, c in zip(s.user.tolist(), s.cats, strict=True):
            out.setdefault(u, []).append(c)
        return {u: np.concatenate(v) for u, v in out.items()}

    a, b = by_user(real), by_user(sim)
    common = sorted(set(a) & set(b))
    cut = [min(len(a[u]), len(b[u])) for u in common]
    ent_a = np.array([_norm_entropy(a[u][:m]) for u, m in zip(common, cut, strict=True)])
    ent_b = np.array([_norm_entropy(b[u][:m]) for u, m in zip(common, cut, strict=True)])
    return ent_a, ent_b


def popularity_gini(s: Sessions, n_events: int, rng: np.random.Generator) -> float:
    """Gini of item counts over a random sample of n_events consumed events."""
    items = np.concatenate(s.items) if s.items else np.zeros(0, np.int64)
    sample = rng.choice(items, min(n_events, len(items)), replace=False)
    return gini(np.unique(sample, return_counts=True)[1])


def session_features(s: Sessions, log_pop: np.ndarray) -> np.ndarray:
    """(S, len(FEATURES)) per-session sequence features; log_pop: (n_items + 1,) log counts."""
    out = np.zeros((len(s.cats), len(FEATURES)))
    for i, (items, c) in enumerate(zip(s.items, s.cats, strict=True)):
        n = len(c)
        change = np.flatnonzero(np.diff(c) != 0)
        runs = np.diff(np.concatenate([[0], change + 1, [n]]))
        pop = log_pop[items]
        out[i] = (
            math.log(n),
            len(np.unique(c)) / n,
            float((c[1:] == c[:-1]).mean()) if n > 1 else 0.0,
            runs.max() / n,
            _norm_entropy(c),
            pop.mean(),
            pop.std(),
        )
    return out


def classifier_auc(real: np.ndarray, sim: np.ndarray, seed: int, folds: int = 5) -> float:
    """Cross-validated AUC of a logistic regression (features standardised, classes balanced
    by subsampling the larger) telling real (1) from simulated (0) rows."""
    rng = np.random.default_rng(seed)
    n = min(len(real), len(sim))
    if n < folds * 2:
        return float("nan")
    x = np.concatenate([real[rng.permutation(len(real))[:n]], sim[rng.permutation(len(sim))[:n]]])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    fold = rng.permutation(2 * n) % folds
    score = np.zeros(2 * n)
    for f in range(folds):
        tr, te = fold != f, fold == f
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-9
        design = np.column_stack([np.ones(tr.sum()), (x[tr] - mu) / sd])
        coef, _ = logistic_fit(design, y[tr], l2=1e-2)
        score[te] = np.column_stack([np.ones(te.sum()), (x[te] - mu) / sd]) @ coef
    return auc(score, y)


def _weights(real: np.ndarray, sim: np.ndarray) -> list[float]:
    x = np.concatenate([real, sim])
    if len(real) < 2 or len(sim) < 2:
        return [float("nan")] * x.shape[1]
    z = (x - x.mean(0)) / (x.std(0) + 1e-9)
    y = np.concatenate([np.ones(len(real)), np.zeros(len(sim))])
    coef, _ = logistic_fit(np.column_stack([np.ones(len(x)), z]), y, l2=1e-2)
    return [round(float(c), 3) for c in coef[1:]]


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUC, tied scores sharing their mean rank."""
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - counts + (counts + 1) / 2.0)[inv]
    pos = y > 0.5
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def realism_metrics(real: Sessions, sim: Sessions, log_pop: np.ndarray, seed: int = 0) -> dict:
    """Every comparison of the module docstring -> a JSON-ready dict."""
    rng = np.random.default_rng(seed)
    len_r = np.array([len(c) for c in real.cats])
    len_s = np.array([len(c) for c in sim.cats])
    ent_r, ent_s = user_entropy(real, sim)
    n_ev = int(min(len_r.sum(), len_s.sum()))
    f_real, f_sim = session_features(real, log_pop), session_features(sim, log_pop)
    return {
        "sessions": {"real": int(len(len_r)), "simulated": int(len(len_s))},
        "repeat_by_run_length": {"real": repeat_curve(real), "simulated": repeat_curve(sim)},
        "session_length": {
            "ks": ks_statistic(len_r, len_s),
            "mean_real": float(len_r.mean()),
            "mean_simulated": float(len_s.mean()) if len(len_s) else float("nan"),
            "survival_real": _survival(len_r),
            "survival_simulated": _survival(len_s),
        },
        "user_entropy": {
            "ks": ks_statistic(ent_r, ent_s),
            "mean_real": float(ent_r.mean()) if len(ent_r) else float("nan"),
            "mean_simulated": float(ent_s.mean()) if len(ent_s) else float("nan"),
            "users": int(len(ent_r)),
        },
        "popularity_gini": {
            "events_sampled": n_ev,
            "real": popularity_gini(real, n_ev, rng),
            "simulated": popularity_gini(sim, n_ev, rng),
        },
        "classifier_auc": classifier_auc(f_real, f_sim, seed),
        # the same without the popularity features: how far the session shape alone gives the
        # simulator away (the popularity of what is consumed also depends on the candidates)
        "classifier_auc_sequence_only": classifier_auc(f_real[:, SEQ], f_sim[:, SEQ], seed),
        # standardised weights of a fit on all sessions: what gives the simulator away
        "classifier_weights": dict(zip(FEATURES, _weights(f_real, f_sim), strict=True)),
        "auc_target": 0.65,
    }


def _survival(lengths: np.ndarray, up_to: int = 30) -> list[float]:
    """P(length >= n), n = 1..up_to."""
    if not len(lengths):
        return []
    return [(lengths >= n).mean().item() for n in range(1, up_to + 1)]


def write_realism(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """realism.json and realism.png in out_dir."""
    out_dir = Path(out_dir)
    json_path = out_dir / "realism.json"
    json_path.write_text(json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n")
    png_path = out_dir / "realism.png"
    _plot(report, png_path)
    return json_path, png_path


def strict_json(x):
    """NaN (a run length never reached, too few sessions) -> null: strict JSON."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [strict_json(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    r = np.arange(1, MAX_R + 1)
    for i, (name, curve) in enumerate(report["repeat_by_run_length"].items()):
        p, lo, hi = (np.array(curve[k], float) for k in ("p", "low", "high"))
        err = np.clip([p - lo, hi - p], 0.0, None)  # Wilson bounds at p = 0 / 1: rounding
        ax.errorbar(r + 0.1 * i, p, yerr=err, fmt="o-", capsize=3, label=name)
    ax.set_xlabel("run length r (8: >= 8)")
    ax.set_ylabel("P(next event in the same category)")
    ax.set_title(f"classifier AUC {report['classifier_auc']:.3f} (target <= 0.65)")
    ax.legend(fontsize=8)
    sl = report["session_length"]
    for name in ("real", "simulated"):
        surv = sl[f"survival_{name}"]
        ax2.step(np.arange(1, len(surv) + 1), surv, where="post", label=name)
    ax2.set_yscale("log")
    ax2.set_xlabel("session length n (events / clicks)")
    ax2.set_ylabel("P(length >= n)")
    g = report["popularity_gini"]
    ax2.set_title(
        f"KS {sl['ks']:.3f}; entropy KS {report['user_entropy']['ks']:.3f}; "
        f"Gini {g['real']:.2f} / {g['simulated']:.2f}"
    )
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
