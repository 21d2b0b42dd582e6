"""A/B through the live endpoint: the offline evaluation's simulated users, served over HTTP
(stdlib + numpy, no Ray; `jobs/ab_test.py` runs it against `jobs.serve`).

    endpoint = Endpoint("http://127.0.0.1:8000")
    served = served_world(data, endpoint, histories, item_ids, users, cfg.n_candidates)
    report = ab_test(served, cfg, users, endpoint, histories, item_ids, ABConfig(), seed,
                     offline_policy=policy.arm())

Episode e of every arm resets `rl.env.DiversityEnv` with seed `seed + e`, as `rl.arms.play`
does: the same user, the same intent draw and the same random stream for every arm, online or
offline (common random numbers). Then each slate is a POST /recommend carrying the session so
far: `history` (the user's logged history, plus this session's clicks with
`clicks_in_history`), `shown` (this session's shown items, which the endpoint drops from its
top-N), `session` (every slate so far with its clicks in click order and its lam: the served
policy replays it into the env's observation, rl/features.py) and `lam` (fixed arms; the
policy arm omits it and the served policy chooses). The simulated user (`env.user`, the env's
own `np_random`) responds to the returned slate.

Why the paths agree exactly: the offline reference plays on the *served world*, the world
whose candidates, scores and diversity head are what the endpoint returns at lam 0 with k = N
for the same history (the trained ranker's view as served: request behaviour tokens and no
time gaps, the served score log softmax + w log sigmoid(relevance); the world of
jobs.train_policy scores the logged tokens with the raw interest logit, so its slates differ),
and whose history is the one sent. The endpoint drops shown items after ranking without
refilling, and the driver returns shown-but-unclicked items when fewer than k remain, as the
env's "recycle" does. The served policy's observation is then the offline env's at every step
(a session-model policy; a history longer than serve.max_history is cut by the endpoint and
would differ). A known difference that remains: with `clicks_in_history` the ranker
re-encodes the session's clicks (a closed loop the offline env does not have).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace

import numpy as np

from rec.rerank import RerankConfig
from rl.arms import Arm, ArmResult, fixed, play
from rl.config import EnvConfig
from rl.env import DiversityEnv, slate_ild
from rl.ladder import cluster_ci
from rl.simdata import SimulatorData, recent_items
from rl.users import category_weights

METRICS = {"return": "returns", "clicks": "clicks", "session_length": "lengths", "ild": "ild"}


@dataclass
class ABConfig:
    """`python -m jobs.ab_test`: simulated users against the running Serve app."""

    # Base URL of the app (POST {url}/recommend); None: http://{serve.host}:{serve.port}.
    url: str | None = None
    # Fixed-lam arms, sent in every request of their sessions.
    lams: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    # The served policy's arm (requests without lam; the app must run a policy).
    policy: bool = True
    # Episodes per arm (None: policy.eval_episodes), on the held-out users of jobs.train_policy.
    episodes: int | None = 200
    # Append this session's clicks to each request's history (the ranker re-encodes them: the
    # live closed loop); False keeps the logged history, the offline env's fixed candidates.
    clicks_in_history: bool = False
    boots: int = 1000  # cluster-bootstrap resamples (users) per CI
    timeout_s: float = 30.0  # per HTTP request
    retries: int = 5  # 503 answers (overload) retried after Retry-After

    def __post_init__(self) -> None:
        if any(not 0.0 <= lam <= 1.0 for lam in self.lams):
            raise ValueError(f"ab.lams must lie in [0, 1], got {self.lams!r}")
        if not self.lams and not self.policy:
            raise ValueError("ab: no arms (ab.lams is empty and ab.policy is false)")
        if self.episodes is not None and self.episodes < 2:
            raise ValueError(f"ab.episodes must be >= 2 or null, got {self.episodes!r}")
        if self.boots < 10 or self.timeout_s <= 0 or self.retries < 0:
            raise ValueError("ab.boots must be >= 10, ab.timeout_s > 0, ab.retries >= 0")


class Endpoint:
    """POST /recommend over plain HTTP (urllib), retrying 503s after their Retry-After."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 5) -> None:
        self.url = url.rstrip("/") + "/recommend"
        self.timeout_s, self.retries = timeout_s, retries
        self.requests = 0

    def recommend(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(
                self.url, data=data, headers={"content-type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    self.requests += 1
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:300]
                if err.code != 503 or attempt == self.retries:
                    raise RuntimeError(f"{self.url} answered {err.code}: {detail}") from None
                time.sleep(float(err.headers.get("Retry-After") or 1.0))
        raise AssertionError("unreachable")


class _Ids:
    """Item index <-> raw id (item_ids (n_items + 1,) int64, the export's vocabulary)."""

    def __init__(self, item_ids: np.ndarray) -> None:
        self.raw = np.asarray(item_ids, dtype=np.int64)
        self.index = {int(r): i for i, r in enumerate(self.raw.tolist()) if i}

    def to_raw(self, items) -> list[int]:
        return self.raw[np.asarray(items, dtype=np.int64)].tolist()

    def to_index(self, answer: dict) -> np.ndarray:
        """The answer's items -> (k,) int64 indices (an id outside the vocabulary: an error)."""
        try:
            return np.array([self.index[int(it["id"])] for it in answer["items"]], np.int64)
        except KeyError as err:
            raise ValueError(
                f"the endpoint returned item {err} outside the world's catalogue"
            ) from None


def served_world(
    data: SimulatorData,
    endpoint: Endpoint,
    histories: list[np.ndarray],
    item_ids: np.ndarray,
    users: np.ndarray,
    n: int,
) -> SimulatorData:
    """The world with `users`' candidates and scores replaced by the endpoint's top-n at lam 0
    (its ranker's order) for each user's logged history (histories[u]: (L,) item indices), the
    diversity head by the endpoint's and the recent history by the one sent (the served
    policy's observation inputs)."""
    ids = _Ids(item_ids)
    cands, scores = data.candidates[:, :n].copy(), data.scores[:, :n].copy()  # (U, n)
    head = data.diversity_head.copy()  # (U,)
    users = np.asarray(users)
    width = max(data.history_items.shape[1], max(len(histories[u]) for u in users.tolist()))
    hist = np.zeros((data.n_users, width), np.int64)  # (U, width) right-aligned, 0-padded
    hist[:, width - data.history_items.shape[1] :] = data.history_items
    hist[users] = recent_items([histories[u] for u in users.tolist()], width)
    for u in np.asarray(users).tolist():
        answer = endpoint.recommend({"history": ids.to_raw(histories[u]), "k": n, "lam": 0.0})
        got = ids.to_index(answer)
        if len(got) < n:
            raise ValueError(f"the endpoint returned {len(got)} < env.n_candidates={n} items")
        cands[u] = got
        scores[u] = [it["score"] for it in answer["items"]]
        head[u] = answer["diversity"]
    return replace(data, candidates=cands, scores=scores, diversity_head=head, history_items=hist)


class _Affinity:
    """The user's per-item inputs for any item, in `DiversityEnv`'s units: the ground-truth
    affinity of `rl.env.standardised_affinity` (centred on the mean over the user's env
    candidates, scaled by the catalogue-wide sd for the user) and, for the session user, the
    item's log popularity centred on the same candidates (as `DiversityEnv._start_session`)."""

    def __init__(self, data: SimulatorData, cfg: EnvConfig) -> None:
        self.data = data
        order = np.argsort(-data.scores, axis=1, kind="stable")[:, : cfg.n_candidates]
        self.pool = np.take_along_axis(data.candidates, order, 1)  # (U, n) the env's pool
        items = data.item_factors[1:].astype(np.float64)  # (n_items, F)
        self.cov = np.atleast_2d(np.cov(items, rowvar=False))  # (F, F)
        pop = getattr(data, "item_popularity", None)  # (n_items + 1,) or None
        self.pop = pop if cfg.user_model == "session" else None

    def frame(self, u: int) -> tuple[np.ndarray, float, float, float]:
        """-> (1, F) user factors, affinity centre, affinity sd, popularity centre."""
        x = self.data.user_factors[u : u + 1].astype(np.float64)  # (1, F)
        raw = self.raw(x, self.pool[u])
        sd = float(np.sqrt(max(((x @ self.cov) * x).sum(), 1e-24)))
        pop_centre = 0.0 if self.pop is None else self.pop[self.pool[u]].mean()
        return x, float(raw.mean()), sd, pop_centre

    def raw(self, x: np.ndarray, items: np.ndarray) -> np.ndarray:
        y = self.data.item_factors[items].astype(np.float64)[None]  # (1, k, F)
        return np.einsum("bnf,bf->bn", y, x)[0]  # (k,)


def play_online(
    data: SimulatorData,
    cfg: EnvConfig,
    users: np.ndarray,
    endpoint: Endpoint,
    histories: list[np.ndarray],
    item_ids: np.ndarray,
    lam: float | None,
    episodes: int,
    seed: int,
    *,
    clicks_in_history: bool = False,
    rerank_cfg: RerankConfig | None = None,
) -> ArmResult:
    """`rl.arms.play` with every slate from the endpoint (lam None: the served policy's)."""
    env = DiversityEnv(
        data, replace(cfg, action_mode="continuous"), users=users, rerank_cfg=rerank_cfg
    )
    ids, aff = _Ids(item_ids), _Affinity(data, cfg)
    weights = category_weights(data.item_categories)  # (n_items + 1, C)
    out = np.zeros((6, episodes))
    for e in range(episodes):
        _, info = env.reset(seed=seed + e)  # the user and the session user's start: CRN
        session = _Session(env, cfg, info["user"], aff, weights, ids)
        while session.going:
            history = histories[session.u]
            if clicks_in_history:
                history = np.concatenate([history, session.clicked])
            body = {
                "history": ids.to_raw(history),
                "shown": ids.to_raw(session.shown),
                "session": session.slates,
                "k": cfg.k,
            }
            if lam is not None:
                body["lam"] = lam
            answer = endpoint.recommend(body)
            if lam is None and answer["lam_source"] != "policy":
                raise ValueError(f"policy arm: lam_source={answer['lam_source']!r} (no policy?)")
            session.show(ids.to_index(answer), float(answer["lam"]))
        out[:, e] = session.totals()
    return ArmResult(*out[:5], users=out[5].astype(np.int64))


class _Session:
    """One simulated session fed with the endpoint's slates; termination as in `DiversityEnv`
    (the user leaves; max_steps slates; fewer than k unshown candidates: "recycle" returns the
    shown-but-unclicked ones, a feed refresh; "end" stops)."""

    def __init__(
        self, env: DiversityEnv, cfg: EnvConfig, u: int, aff: _Affinity, weights, ids: _Ids
    ):
        self.env, self.cfg, self.u, self.weights, self.ids = env, cfg, u, weights, ids
        self.aff = aff
        self.x, self.centre, self.sd, self.pop_centre = aff.frame(u)
        self.shown = np.zeros(0, np.int64)  # (S,) item indices shown and not recycled
        self.clicked = np.zeros(0, np.int64)  # (c,) this session's clicks, in click order
        self.going, self.steps, self.clicks = True, 0, 0
        self.ret = self.ild = self.lam = 0.0  # sums over the session's slates
        self.slates: list[dict] = []  # the request's `session`: raw ids, clicks, lam per slate

    def show(self, slate: np.ndarray, lam: float) -> None:
        """The user's response to one (k,) slate of item indices."""
        if len(slate) < self.cfg.k:  # the endpoint has nothing more for this session
            self.going = self.steps > 0
            if not self.going:
                raise ValueError(f"the endpoint returned {len(slate)} < k={self.cfg.k} items")
            return
        data = self.env.data
        cats, w = data.item_categories[slate], self.weights[slate]  # (k, C), (k, C)
        affinity = (self.aff.raw(self.x, slate) - self.centre) / self.sd  # (k,)
        if self.aff.pop is None:
            resp = self.env.user.respond(affinity, cats, w, self.env.np_random)
        else:  # the session user's popularity term
            pop = self.aff.pop[slate] - self.pop_centre  # (k,)
            resp = self.env.user.respond(affinity, cats, w, self.env.np_random, pop)
        picked = np.flatnonzero(resp.clicks) if resp.order is None else resp.order
        self.clicked = np.concatenate([self.clicked, slate[picked]])
        self.slates.append(
            {"items": self.ids.to_raw(slate), "clicked": self.ids.to_raw(slate[picked]), "lam": lam}
        )
        self.shown = np.concatenate([self.shown, slate])
        self.steps += 1
        self.ret += len(picked) + self.cfg.purchase_weight * np.count_nonzero(resp.purchases)
        self.clicks += len(picked)
        self.ild += slate_ild(cats, data.n_categories + 1)
        self.lam += lam
        self.going = not resp.left and self.steps < self.cfg.max_steps and self._refill()

    def _refill(self) -> bool:
        n = self.cfg.n_candidates
        if n - len(self.shown) >= self.cfg.k:
            return True
        if self.cfg.on_exhausted == "recycle":
            self.shown = self.clicked.copy()
            return n - len(self.shown) >= self.cfg.k
        return False

    def totals(self) -> tuple[float, ...]:
        s = max(self.steps, 1)
        return (self.ret, self.clicks, self.steps, self.ild / s, self.lam / s, self.u)


def arm_summary(r: ArmResult, boots: int, seed: int) -> dict:
    """Mean and cluster-bootstrap 95 % CI (users resampled) of each metric of one arm."""
    out = {}
    for name, attr in METRICS.items():
        x = getattr(r, attr)
        lo, hi = cluster_ci(x, r.users, boots=boots, seed=seed)
        out[name] = {"mean": float(x.mean()), "ci95": [lo, hi]}
    out["mean_lam"] = float(r.lam.mean())
    return out


def compare(online: ArmResult, offline: ArmResult, boots: int, seed: int) -> dict:
    """Online against offline for one arm, episode by episode (same seeds, same users)."""
    if not np.array_equal(online.users, offline.users):
        raise ValueError("online and offline episodes met different users: seeds differ")
    diff = online.returns - offline.returns
    on, off = arm_summary(online, boots, seed), arm_summary(offline, boots, seed)
    lo, hi = cluster_ci(diff, online.users, boots=boots, seed=seed)
    (a_lo, a_hi), (b_lo, b_hi) = on["return"]["ci95"], off["return"]["ci95"]
    return {
        "online": on,
        "offline": off,
        "return_diff": {"mean": float(diff.mean()), "ci95": [lo, hi]},
        "identical_episodes": float(np.mean(np.abs(diff) < 1e-9)),
        "cis_overlap": bool(a_lo <= b_hi and b_lo <= a_hi),
    }


def ab_test(
    served: SimulatorData,
    cfg: EnvConfig,
    users: np.ndarray,
    endpoint: Endpoint,
    histories: list[np.ndarray],
    item_ids: np.ndarray,
    ab: ABConfig,
    episodes: int,
    seed: int,
    *,
    offline_policy: Arm | None = None,
    rerank_cfg: RerankConfig | None = None,
    world: SimulatorData | None = None,
) -> dict:
    """Every arm online through the endpoint and offline on the served world (same episodes)
    -> the ab_test.json dict (arms keyed "lam=0.5" / "policy"). world: the world of
    jobs.train_policy (its own ranker view), whose offline return is reported beside."""
    arms: dict[str, tuple[float | None, Arm | None]] = {
        f"lam={lam:g}": (lam, fixed(lam)) for lam in ab.lams
    }
    if ab.policy:
        arms["policy"] = (None, offline_policy)
    report: dict = {"episodes": episodes, "users": int(len(users)), "seed": seed, "arms": {}}
    for name, (lam, arm) in arms.items():
        t0 = time.time()
        online = play_online(
            served, cfg, users, endpoint, histories, item_ids, lam, episodes, seed,
            clicks_in_history=ab.clicks_in_history, rerank_cfg=rerank_cfg,
        )  # fmt: skip
        row = {"online": arm_summary(online, ab.boots, seed), "seconds": round(time.time() - t0, 1)}
        if arm is not None:
            offline = play(served, cfg, users, arm, episodes, seed, rerank_cfg)
            row |= compare(online, offline, ab.boots, seed)
            if world is not None:
                own = play(world, cfg, users, arm, episodes, seed, rerank_cfg)
                row["offline_world_return"] = arm_summary(own, ab.boots, seed)["return"]
        report["arms"][name] = row
    report["requests"] = endpoint.requests
    return report


def table(report: dict) -> str:
    """A printable table: per arm, the online metrics (return with its CI), then the return
    offline on the served world, the share of identical episodes, and the return offline on
    jobs.train_policy's own world."""
    lines = [
        f"{'arm':<10} {'return [95% CI]':<24} {'clicks':>7} {'length':>7} {'ILD':>6} "
        f"{'lam':>5} {'offline':>8} {'same ep.':>8} {'world':>8}"
    ]
    for name, row in report["arms"].items():
        on = row["online"]
        lo, hi = on["return"]["ci95"]
        off = row.get("offline", {}).get("return", {}).get("mean", float("nan"))
        same = row.get("identical_episodes", float("nan"))
        own = row.get("offline_world_return", {}).get("mean", float("nan"))
        lines.append(
            f"{name:<10} {on['return']['mean']:6.3f} [{lo:6.3f}, {hi:6.3f}]    "
            f"{on['clicks']['mean']:7.3f} {on['session_length']['mean']:7.3f} "
            f"{on['ild']['mean']:6.3f} {on['mean_lam']:5.2f} {off:8.3f} {same:8.2f} {own:8.3f}"
        )
    return "\n".join(lines)
