"""Fit the session user's free parameters by simulated moments on the fit users (numpy only).

    counts = item_counts(log, counted_users)          # every logged user but the held-out
    data.item_popularity = item_popularity(counts)    # (n_items + 1,) z-scored log counts
    target = log_moments(log, fit_log_users, counts, min_events)
    session, found = fit_moments(data, env_cfg, fit_rows, target, min_events)

Why: with only the EM fit (rl/session_fit.py) a classifier told simulated from logged sessions
with AUC 0.97 on Beauty, mostly from the popularity of clicked items (the ranker's top slots
are popular items, clicked by every simulated user alike: consumed-item Gini 0.52 vs 0.20) and
from too few category repeats (the intent's stickiness logit(stay_I) is spread over a slate
holding few items of the last category). Five parameters are set so that simulated sessions
of the fit users (lam = 0, the logging-like policy, assumed) reproduce five moments of the
same users' logged sessions, each monotone in its parameter, by coordinate bisection with
common random numbers:
  - mean standardised log popularity of consumed items <- session.popularity_weight (the
    item's z-scored log count among all logged users but the held-out ones, centred on the
    user's candidates: it moves clicks between items, not the click rate);
  - P(next event in the same category) <- session.stick_offset;
  - P(next event returns to a category of the session other than the last one) <-
    session.revisit_weight (added in session 8: with the other three matched, the classifier
    still told Beauty's sessions apart by their category diversity, AUC 0.656);
  - sd of log(events per session) <- session.leave_spread (added in session 9: with one
    leaving hazard for every session, MovieLens's simulated sittings were all alike, its
    logged ones one event to hundreds; a classifier told them apart at AUC 0.96);
  - events per session           <- session.leave_intercept   (decreasing in it).
A fitted popularity_weight < 0 says the logging policy (unknown) surfaced less popular items
than the trained ranker's top slots do; all five are only as good as the lam = 0 assumption.
Sessions are compared under the log's own selection: where the log is a k-core of whole
sequences (timestamps are positions), sessions shorter than the fit users' shortest logged one
leave no trace (`min_events`; rl.realism applies the same selection).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from rl.calibrate import SequenceLog
from rl.config import EnvConfig, SessionConfig

BOUNDS = {  # (low, high, sign of d moment / d parameter); leaving last, so lengths match best
    "popularity_weight": (-8.0, 3.0, 1.0),
    "stick_offset": (-3.0, 9.0, 1.0),
    "revisit_weight": (-6.0, 6.0, 1.0),
    "leave_spread": (0.0, 4.0, 1.0),
    "leave_intercept": (-8.0, 8.0, -1.0),  # high with a spread: only long sittings stay
}
MOMENT_OF = {
    "leave_intercept": "events_per_session",
    "popularity_weight": "log_popularity",
    "stick_offset": "repeat_rate",
    "revisit_weight": "revisit_rate",
    "leave_spread": "log_length_sd",
}


def item_counts(log: SequenceLog, users: np.ndarray) -> np.ndarray:
    """(n_items + 1,) events per item over `users`' sequences."""
    seqs = [log.items[u] for u in np.asarray(users)]
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=len(log.item_categories))


def item_popularity(counts: np.ndarray) -> np.ndarray:
    """(n_items + 1,) counts -> float32 log(1 + count) z-scored over items 1..n (item 0 = 0)."""
    out = standardise(np.log1p(counts.astype(np.float64)), counts)
    out[0] = 0.0
    return out


def standardise(lp: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Log counts on the scale of item_popularity(counts) (the same mean and sd)."""
    ref = np.log1p(counts[1:].astype(np.float64))
    return ((lp - ref.mean()) / max(float(ref.std()), 1e-9)).astype(np.float32)


def session_moments(sessions, pops: list[np.ndarray], min_events: int = 1) -> dict:
    """rl.realism.Sessions and each session's (L,) item popularity -> the five moments over
    sessions with >= min_events events."""
    keep = [i for i, c in enumerate(sessions.cats) if len(c) >= max(min_events, 1)]
    if not keep:
        return {
            "events_per_session": 0.0,
            "log_popularity": float("nan"),
            "repeat_rate": 0.0,
            "revisit_rate": 0.0,
            "log_length_sd": 0.0,
        }
    pop = np.concatenate([pops[i] for i in keep])
    flat = np.concatenate([sessions.cats[i][1:] == sessions.cats[i][:-1] for i in keep])
    back = np.concatenate([revisits(sessions.cats[i]) for i in keep])
    log_len = np.log([len(sessions.cats[i]) for i in keep])
    return {
        "events_per_session": float(len(pop) / len(keep)),
        "log_popularity": float(pop.mean()),
        "repeat_rate": float(flat.mean()) if len(flat) else 0.0,
        "revisit_rate": float(back.mean()) if len(back) else 0.0,
        "log_length_sd": float(log_len.std()),
        "sessions": len(keep),
    }


def revisits(cats: np.ndarray) -> np.ndarray:
    """(L,) categories -> (L - 1,) bool: event i + 1 returns to a category of events 0..i - 1
    other than event i's (a repeat of the last category is not a revisit)."""
    seen: set[int] = set()
    out = np.zeros(max(len(cats) - 1, 0), dtype=bool)
    for i in range(1, len(cats)):
        if i >= 2:
            seen.add(int(cats[i - 2]))
        out[i - 1] = cats[i] != cats[i - 1] and int(cats[i]) in seen
    return out


def log_moments(log: SequenceLog, users: np.ndarray, counts: np.ndarray, min_events: int):
    """The moments of `users`' logged sessions, each event's popularity counted without the
    user's own events (a simulated click is not in the counts either)."""
    from rl.realism import log_sessions

    sess = log_sessions(log, users)
    own = {int(u): np.bincount(log.items[u], minlength=len(counts)) for u in np.unique(sess.user)}
    pops = [
        standardise(np.log1p((counts[i] - own[int(u)][i]).astype(np.float64)), counts)
        for i, u in zip(sess.items, sess.user.tolist(), strict=True)
    ]
    return session_moments(sess, pops, min_events)


def min_logged_events(log: SequenceLog, users: np.ndarray) -> int:
    """The log's selection: the shortest logged session of `users` where sessions are whole
    k-core sequences (positions); 1 where sessions are cut by time gaps (any length logs)."""
    if log.timestamp_kind == "unix":
        return 1
    from rl.realism import log_sessions

    lengths = [len(c) for c in log_sessions(log, users).cats]
    return int(min(lengths)) if lengths else 1


def log_horizon(log: SequenceLog, users: np.ndarray, quantile: float = 0.9) -> int:
    """Slates a simulated session may last so the horizon does not cut the sessions the log
    shows: the `quantile` of `users`' logged session lengths in events (a slate gives at
    least one click while a session goes on, so this many slates hold that many events)."""
    from rl.realism import log_sessions

    lengths = [len(c) for c in log_sessions(log, users).cats]
    return int(np.ceil(np.quantile(lengths, quantile))) if lengths else 1


def simulate_moments(
    data, cfg: EnvConfig, rows: np.ndarray, episodes: int, seed: int, min_events: int,
    rerank_cfg=None,
) -> dict:  # fmt: skip
    """The moments of `episodes` simulated sessions (lam = 0) of a seeded sample of `rows`."""
    from rl.realism import simulated_sessions

    rng = np.random.default_rng(seed)
    rows = np.asarray(rows)
    counts = np.bincount(rng.integers(len(rows), size=episodes), minlength=len(rows))
    sim = simulated_sessions(data, cfg, rows, counts, seed, rerank_cfg)
    pop = data.item_popularity
    pop = np.zeros(data.n_items + 1, np.float32) if pop is None else pop  # none known: 0
    return session_moments(sim, [pop[i] for i in sim.items], min_events)


def fit_moments(
    data,
    cfg: EnvConfig,
    rows: np.ndarray,
    target: dict,
    min_events: int,
    *,
    episodes: int = 200,
    iterations: int = 7,
    rounds: int = 2,
    seed: int = 0,
    rerank_cfg=None,
    names: tuple[str, ...] = tuple(BOUNDS),
) -> tuple[SessionConfig, dict]:
    """Coordinate bisection of the module docstring over `names` -> (fitted session config,
    the simulated moments at the end next to the targets)."""
    session = cfg.session
    for _ in range(rounds):
        for name in names:
            lo, hi, sign = BOUNDS[name]
            want = target[MOMENT_OF[name]]
            for _ in range(iterations):
                mid = 0.5 * (lo + hi)
                trial = replace(cfg, session=replace(session, **{name: mid}))
                got = simulate_moments(data, trial, rows, episodes, seed, min_events, rerank_cfg)
                value = got[MOMENT_OF[name]]
                too_high = np.isfinite(value) and value > want
                # moment too high: move the parameter against its effect
                if too_high == (sign > 0):
                    hi = mid
                else:
                    lo = mid
            session = replace(session, **{name: 0.5 * (lo + hi)})
    final = simulate_moments(
        data, replace(cfg, session=session), rows, episodes, seed, min_events, rerank_cfg
    )
    return session, {"target": target, "simulated": final, "min_events": min_events}
