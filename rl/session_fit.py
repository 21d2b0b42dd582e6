"""Fit the session user (`rl.config.SessionConfig`, `rl/session_user.py`) to a log, numpy only.

    log = load_prepared(prepared_dir)                    # rl.calibrate.SequenceLog
    fit = fit_session_model(log, users=fit_users)        # SessionFit: config + provenance
    cfg = replace(env_cfg, user_model="session", session=fit.session)

Sessions: where timestamps are unix seconds, a new session starts after a gap of more than
30 min (rl.calibrate.SESSION_GAP_S); where they are positions (Amazon Beauty: timestamps
dropped), a user's whole kept sequence is one session, so its "survival" is the length
distribution of truncated 5-core sequences. Consecutive events on one item count once, and an
event's category is its item's most specific one (as in rl.calibrate).

What is fitted, from which statistic (of the `users` given: the fit split):
  - intent mixture (focused_share, stay_focused, stay_browsing): EM on category run lengths,
    a two-component mixture of per-step stay hazards sigmoid(a_I - beta_u * s(n)); without
    satiation (beta = 0) a mixture of geometric laws. The last run of a session is
    right-censored (its switch is not observed);
  - switch_focused, switch_browsing: the posterior co-occurrence of the intents of
    consecutive runs within a session (EM responsibilities);
  - sensitivity_base, sensitivity_slope: beta_u = base + slope * h_u (h_u the user's history
    category entropy), jointly with the mixture: a mixture alone only gives hazards falling
    with run length, satiation makes them rise, so both are identified, up to the scale of
    s(n), which needs the assumed w_click and delta;
  - leave_concentration (and a log-side intercept): a discrete-time logistic hazard of the
    session ending after an event, on the modal-category share of the last 5 events (the
    consumed proxy of slate concentration), i.e. the maximum-likelihood fit of the log's
    session-length survival; the simulator's leave_intercept is then set by simulated
    moments (rl/moments.py, with popularity_weight and stick_offset) so that simulated
    clicks per session match the log's mean events per session.
Assumed (the log has no impressions, so nothing about unclicked slates is identifiable):
delta, w_click, w_exp, leave_streak, leave_utility, position examination (choice.position_bias),
preference, no_click, continue_prob.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from rl.calibrate import SESSION_GAP_S, SequenceLog, _events
from rl.config import SessionConfig
from rl.simdata import recent_items
from rl.users import history_exploration

CONC_WINDOW = 5  # events whose modal-category share is the log's concentration feature


@dataclass
class Runs:
    """Category runs of a log: maximal stretches of one category within a session."""

    length: np.ndarray  # (R,) events in the run
    censored: np.ndarray  # (R,) bool: the session ended during the run (no switch seen)
    session: np.ndarray  # (R,) session id
    entropy: np.ndarray  # (R,) the run's user's history entropy


def runs_of(cats: np.ndarray, session: np.ndarray, entropy: np.ndarray) -> Runs:
    """(E,) categories, (E,) session ids (events in order), (E,) per-event user entropy."""
    new = np.ones(len(cats), dtype=bool)
    new[1:] = (cats[1:] != cats[:-1]) | (session[1:] != session[:-1])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(cats))
    last_in_session = np.ones(len(starts), dtype=bool)
    last_in_session[:-1] = session[starts[1:]] != session[starts[:-1]]
    return Runs(ends - starts, last_in_session, session[starts], entropy[starts])


def satiation_after(n: np.ndarray, cfg: SessionConfig) -> np.ndarray:
    """Satiation a category has at the next choice after n consecutive clicks on it, one per
    slate (linear model, exposure ignored): w_click * delta * (1 - delta^n) / (1 - delta)."""
    d = cfg.delta
    geo = n.astype(np.float64) if d >= 1.0 else (1.0 - d**n) / (1.0 - d)
    return cfg.w_click * d * geo


def logistic_fit(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray | None = None,
    l2: float = 1e-4,
    iters: int = 30,
    init: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted logistic regression by Newton steps (IRLS) -> (coef (P,), standard errors)."""
    w = np.ones(len(y)) if w is None else w
    beta = np.zeros(x.shape[1]) if init is None else np.array(init, dtype=np.float64)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ beta, -30, 30)))
        grad = x.T @ (w * (y - p)) - l2 * beta
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + l2 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-8:
            break
    return beta, np.sqrt(np.diag(np.linalg.inv(hess)))


@dataclass
class Mixture:
    share: np.ndarray  # (2,) P(intent) at a session's first run, focused first
    switch: np.ndarray  # (2,) P(focused -> browsing), P(browsing -> focused) between runs
    a: np.ndarray  # (2,) stay logits (satiation-free)
    beta: np.ndarray  # (2,) sensitivity base, slope on entropy
    resp: np.ndarray  # (R, 2) posterior intent of each run
    loglik: float
    iterations: int  # EM iterations run (== iters: stopped before converging)


def fit_mixture(runs: Runs, cfg: SessionConfig, satiation: bool = True, iters: int = 80) -> Mixture:
    """EM (Baum-Welch) for the two-intent model of category runs: within a session the intent
    is a Markov chain over runs, each run's length its intent's hazard law (module doc)."""
    # One row per stay decision: steps 1..l-1 stayed, step l switched (if not censored).
    n_rows = runs.length - runs.censored
    run_id = np.repeat(np.arange(len(runs.length)), n_rows)
    first = np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
    step = np.arange(len(run_id)) - first + 1  # (N,) run length n at the decision
    stay = (step < runs.length[run_id]).astype(np.float64)
    s = satiation_after(step, cfg)
    sx = np.stack([-s, -s * runs.entropy[run_id]], 1) if satiation else np.zeros((len(s), 0))
    chain = _Chain(runs.session)
    share, log_a = np.array([0.5, 0.5]), np.log(np.full((2, 2), 0.5))
    a, beta = np.array([1.5, -1.5]), np.zeros(sx.shape[1])
    prev, done = -np.inf, 0
    while done < iters:
        done += 1
        z = a[None, :] + (sx @ beta)[:, None]  # (N, 2)
        ll_rows = stay[:, None] * z - np.logaddexp(0.0, z)
        ll = np.stack([np.bincount(run_id, ll_rows[:, k], len(runs.length)) for k in range(2)], 1)
        resp, trans, total = chain.posteriors(ll, np.log(share), log_a)
        share = resp[chain.first_run].mean(0).clip(1e-6)
        log_a = np.log((trans / trans.sum(1, keepdims=True)).clip(1e-9))
        a, beta = _m_step(stay, sx, resp[run_id], a, beta)
        if total - prev < 1e-7 * len(runs.length):
            break
        prev = total
    switch = np.exp([log_a[0, 1], log_a[1, 0]])
    if a[0] < a[1]:  # focused = the stickier intent
        a, share, resp, switch = a[::-1], share[::-1], resp[:, ::-1], switch[::-1]
    beta = beta if satiation else np.zeros(2)
    return Mixture(share, switch, a, beta, resp, float(total), done)


class _Chain:
    """Runs laid out as (sessions, max runs) for a forward-backward pass over all sessions."""

    def __init__(self, session: np.ndarray) -> None:
        new = np.ones(len(session), dtype=bool)
        new[1:] = session[1:] != session[:-1]
        self.first_run = np.flatnonzero(new)
        sid = np.cumsum(new) - 1  # (R,) 0..S-1
        self.pos = np.arange(len(session)) - self.first_run[sid]  # (R,) run index in session
        self.sid = sid
        self.shape = (int(sid[-1]) + 1, int(self.pos.max()) + 1) if len(session) else (0, 1)

    def posteriors(self, ll: np.ndarray, log_pi: np.ndarray, log_a: np.ndarray):
        """(R, 2) run log-likelihoods per intent -> (R, 2) posteriors, (2, 2) expected
        transitions, total log-likelihood (scaled forward-backward, all sessions at once)."""
        n_s, n_t = self.shape
        top = ll.max(1)  # (R,) emissions are scaled per run; their log comes back in the total
        emit = np.ones((n_s, n_t, 2))  # padding after a session's end: a neutral step
        emit[self.sid, self.pos] = np.exp(ll - top[:, None])
        valid = np.zeros((n_s, n_t), dtype=bool)
        valid[self.sid, self.pos] = True
        trans_p = np.exp(log_a)
        alpha, scale = np.empty((n_s, n_t, 2)), np.ones((n_s, n_t))
        cur = np.exp(log_pi)[None] * emit[:, 0]
        for t in range(n_t):
            if t:
                nxt = (alpha[:, t - 1] @ trans_p) * emit[:, t]
                cur = np.where(valid[:, t, None], nxt, alpha[:, t - 1])
            scale[:, t] = np.where(valid[:, t], cur.sum(1), 1.0)
            alpha[:, t] = cur / scale[:, t, None]
        beta = np.ones((n_s, n_t, 2))
        for t in range(n_t - 2, -1, -1):
            back = ((emit[:, t + 1] * beta[:, t + 1]) @ trans_p.T) / scale[:, t + 1, None]
            beta[:, t] = np.where(valid[:, t + 1, None], back, 1.0)
        gamma = alpha * beta
        xi = (
            alpha[:, :-1, :, None]
            * trans_p[None, None]
            * (emit[:, 1:] * beta[:, 1:] / scale[:, 1:, None])[:, :, None, :]
        )  # (S, T-1, 2, 2)
        trans = (xi * valid[:, 1:, None, None]).sum((0, 1)) + 1e-9
        total = float(np.log(scale).sum() + top.sum())
        return gamma[self.sid, self.pos], trans, total


def _m_step(stay, sx, w, a, beta):
    """Weighted logistic fit of [intent intercepts, shared satiation terms]: a few Newton
    steps from the last estimate (a generalised EM step: the likelihood still rises)."""
    n, p = len(stay), sx.shape[1]
    x = np.zeros((2 * n, 2 + p))
    x[:n, 0], x[n:, 1] = 1.0, 1.0
    x[:n, 2:], x[n:, 2:] = sx, sx
    y, ww = np.concatenate([stay, stay]), np.concatenate([w[:, 0], w[:, 1]])
    coef, _ = logistic_fit(x, y, ww, iters=3, init=np.concatenate([a, beta]))
    return coef[:2], coef[2:]


def leave_features(cats: np.ndarray, session: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (E, 2) [1, modal-category share of the last CONC_WINDOW events of the session],
    (E,) whether the session ends after the event."""
    e = len(cats)
    lag = np.full((e, CONC_WINDOW), -1, dtype=np.int64)  # (E, W) the event and its W-1 past
    valid = np.zeros((e, CONC_WINDOW), dtype=bool)
    for d in range(CONC_WINDOW):
        same = np.zeros(e, dtype=bool)
        same[d:] = session[d:] == session[: e - d]
        # within one session the ids are contiguous, so "same session d back" suffices
        lag[same, d] = cats[: e - d][same[d:]] if d else cats
        valid[:, d] = same
    eq = (lag[:, :, None] == lag[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    share = eq.sum(2).max(1) / valid.sum(1)
    ends = np.ones(e, dtype=bool)
    ends[:-1] = session[1:] != session[:-1]
    return np.stack([np.ones(e), share], 1), ends.astype(np.float64)


@dataclass
class SessionFit:
    session: SessionConfig  # the fitted values, assumed ones at their defaults
    provenance: dict  # field -> {"value", "source": fitted|assumed, "from"}
    stats: dict  # what the fit saw (sessions, runs, log-likelihoods)

    def to_json(self) -> dict:
        return {"session": asdict(self.session), "provenance": self.provenance} | self.stats


def fit_session_model(
    log: SequenceLog, users: np.ndarray | None = None, base: SessionConfig | None = None
) -> SessionFit:
    """Fit the identifiable fields of `base` on the log's `users` (module docstring)."""
    base = base or SessionConfig()
    cats, session, user = _events(log)
    keep = np.ones(len(cats), bool) if users is None else np.isin(user, users)
    cats, session, user = cats[keep], session[keep], user[keep]
    hist = recent_items(log.items, max((len(x) for x in log.items), default=1))
    entropy, _ = history_exploration(hist, log.item_categories)  # (U,) normalised
    runs = runs_of(cats, session, entropy[user])
    mix = fit_mixture(runs, base)
    geo = fit_mixture(runs, base, satiation=False)
    switch = mix.switch
    x, y = leave_features(cats, session)
    hazard, hazard_se = logistic_fit(x, y)
    q = 1.0 / (1.0 + np.exp(-mix.a))
    fitted = replace(
        base,
        focused_share=float(mix.share[0]),
        stay_focused=float(q[0]),
        stay_browsing=float(q[1]),
        switch_focused=float(switch[0]),
        switch_browsing=float(switch[1]),
        sensitivity_base=float(mix.beta[0]),
        sensitivity_slope=float(mix.beta[1]),
        leave_concentration=float(hazard[1]),
    )
    split = "fit users" if users is not None else "all users"
    sess = "gaps > 30 min" if log.timestamp_kind == "unix" else "whole sequences (positions)"
    lengths = np.bincount(session)[np.unique(session)]
    stats = {
        "sessions_cut_by": sess,
        "session_gap_s": SESSION_GAP_S if log.timestamp_kind == "unix" else None,
        "n_sessions": int(len(lengths)),
        "n_events": int(len(cats)),
        "n_runs": int(len(runs.length)),
        "session_mean": float(lengths.mean()),
        "loglik_mixture": mix.loglik,
        "em_iterations": mix.iterations,
        "loglik_geometric_mixture": geo.loglik,
        "geometric_mixture": {
            "share_focused": float(geo.share[0]),
            "stay": (1 / (1 + np.exp(-geo.a))).tolist(),
        },
        "log_hazard": {
            "coef": hazard.tolist(),
            "se": hazard_se.tolist(),
            "features": ["intercept", "modal_share_last5"],
        },
    }
    return SessionFit(fitted, _provenance(fitted, split, log.timestamp_kind), stats)


def _provenance(s: SessionConfig, split: str, kind: str) -> dict:
    em = f"EM on category run lengths ({split}, censored at session ends)"
    out = {
        name: {"value": v, "source": "assumed", "from": "no impressions in the log"}
        for name, v in asdict(s).items()
    }
    for name in ("focused_share", "stay_focused", "stay_browsing"):
        out[name] |= {"source": "fitted", "from": em}
    for name in ("switch_focused", "switch_browsing"):
        out[name] |= {"source": "fitted", "from": "intent chain between runs, " + em}
    for name in ("sensitivity_base", "sensitivity_slope"):
        out[name] |= {
            "source": "fitted",
            "from": "stay hazard vs satiation s(n) x history entropy, "
            + em
            + "; scale set by the assumed w_click, delta",
        }
    out["leave_concentration"] |= {
        "source": "fitted",
        "from": f"logistic hazard of session end per event ({split}; sessions: "
        + ("30-min gaps" if kind == "unix" else "whole sequences")
        + ")",
    }
    out["leave_intercept"] |= {
        "source": "fitted",
        "from": "bisection: simulated clicks per session = log's mean",
    }
    return out
