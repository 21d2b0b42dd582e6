"""Request -> recommendation: the orchestration the HTTP ingress runs, without Ray.

    ctx = StageContext("outputs/beauty", serve_cfg, rerank_cfg)
    front = Frontend(serve_cfg, rerank_cfg, ctx.catalog, users, vectors, has_policy=False)
    out = await front.recommend(RecommendRequest(history=[301, 775], k=10), LocalStages(ctx))

`Stages` is whatever runs the model stages of serve/stages.py (retriever, ranker, policy) by
name: `LocalStages` calls them in this process (tests, benchmarks, `serve.fused`); serve/app.py
passes `HandleStages` over Ray Serve deployment handles.

Cold start: a request whose history (logged + given) has no known item gets the
`cold_start_pool` most popular items re-ranked by the same re-ranker at lam = the request's
lam or `serve.cold_start_lam` (popular-and-diverse; lam_source "cold_start" when chosen here).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from rec.rerank import RerankConfig
from rl.features import SessionRecord
from serve.catalog import Catalog, UserHistories
from serve.config import ServeConfig
from serve.engine import Ranked, Retrieved, popular_pool, rerank_candidates
from serve.policy import session_record
from serve.schemas import RecommendRequest
from serve.stages import STAGES, StageContext


class RequestError(ValueError):
    """Bad input the schema could not catch (config-dependent bounds); becomes a 422."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name, self.message = field_name, message


class Stages(Protocol):
    """Runs one request through a registered stage (serve.stages.STAGES) by its name."""

    names: frozenset[str]  # the stages that are running (the policy only with a policy_dir)

    async def run(self, name: str, *args: Any) -> Any: ...


class LocalStages:
    """Every registered stage built in this process from `ctx`, called with a batch of one."""

    def __init__(self, ctx: StageContext) -> None:
        self.fns = {s.name: s.build(ctx) for s in STAGES if s.enabled(ctx)}
        self.names = frozenset(self.fns)

    async def run(self, name: str, *args: Any) -> Any:
        if name not in self.fns:
            raise RuntimeError(f"stage {name!r} is not running; running: {sorted(self.names)}")
        # In a worker thread: the event loop keeps reading requests (and refusing them, see
        # serve.http.Admission) while the model runs; torch and numpy release the GIL in their
        # kernels. Bare server at concurrency 64: admitted p50 373 -> 18 ms, 503 p50 258 -> 13 ms
        # (bench/README.md "Serving under overload").
        return (await asyncio.to_thread(self.fns[name], *([arg] for arg in args)))[0]


@dataclass
class Resolved:
    """A request's history after lookup: (L,) int64 indices, oldest first."""

    history: np.ndarray
    unknown: list[int] = field(default_factory=list)
    truncated: bool = False
    shown: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # this session's
    session: SessionRecord | None = None  # this session's slates and clicks (the policy's)
    diversity: float | None = None  # the ranker's diversity head (None: cold start)


class Frontend:
    """Validation, history lookup, cold start, lam choice, re-ranking and the response."""

    def __init__(
        self,
        cfg: ServeConfig,
        rerank: RerankConfig,
        catalog: Catalog,
        users: UserHistories,
        vectors: np.ndarray,
        has_policy: bool,
    ) -> None:
        """vectors (n_items + 1, D) float32: the item table the re-ranker's cosine uses."""
        cfg.check_rerank(rerank)
        self.cfg, self.rerank, self.catalog, self.users = cfg, rerank, catalog, users
        self.vectors, self.has_policy = vectors, has_policy
        self.pool, self.pool_scores = popular_pool(catalog.counts, cfg.cold_start_pool)

    def resolve(self, req: RecommendRequest) -> Resolved:
        """Check config-dependent bounds; logged + given history as item indices."""
        if req.k > self.cfg.max_k:
            raise RequestError("k", f"must be <= {self.cfg.max_k} (serve.max_k), got {req.k}")
        logged = self.users.get(req.user_id) if req.user_id is not None else None
        given, unknown = self.catalog.to_indices(req.history or [])
        parts = [p for p in (logged, given) if p is not None and len(p)]
        history = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        truncated = len(history) > self.cfg.max_history
        shown, _ = self.catalog.to_indices(req.shown or [])  # unknown ones cannot be candidates
        session = session_record(self.catalog, req.session)
        return Resolved(history[-self.cfg.max_history :], unknown, truncated, shown, session)

    async def recommend(self, req: RecommendRequest, stages: Stages) -> dict:
        """The response body (serve.schemas.RecommendResponse fields)."""
        t0 = time.perf_counter()
        res = self.resolve(req)
        timings: dict[str, float] = {}
        if not len(res.history):
            picks, scores, lam, source = self._cold_start(req.k, req.lam, res.shown, timings)
        else:
            picks, scores, lam, source = await self._personal(req, res, stages, timings)
        timings["total"] = _ms(t0)
        items = [
            {
                "id": int(self.catalog.item_ids[i]),
                "score": float(s),
                "categories": self.catalog.raw_categories(int(i)),
            }
            for i, s in zip(picks, scores, strict=True)
        ]
        return {
            "items": items,
            "lam": float(lam),
            "lam_source": source,
            "cold_start": not len(res.history),
            "unknown_items": res.unknown,
            "history_used": int(len(res.history)),
            "history_truncated": res.truncated,
            "diversity": res.diversity,
            "timings_ms": timings,
        }

    async def _personal(
        self, req: RecommendRequest, res: Resolved, stages: Stages, timings: dict
    ) -> tuple[np.ndarray, np.ndarray, float, str]:
        history = res.history
        t = time.perf_counter()
        got = await stages.run("retriever", history, history if req.exclude_seen else None)
        timings["retrieve"], timings["retrieve_compute"] = _ms(t), round(got.compute_ms, 3)
        if len(got.candidates):
            t = time.perf_counter()
            ranked = await stages.run("ranker", got)
            timings["rank"], timings["rank_compute"] = _ms(t), round(ranked.compute_ms, 3)
            res.diversity = float(ranked.diversity)
            # The policy sees all N with a shown mask (the env's pool and its free mask).
            full, shown_mask = ranked, np.isin(got.candidates, res.shown)
            # After ranking, so a candidate's score does not depend on what was shown.
            got, ranked = drop_shown(got, ranked, res.shown)
        if not len(got.candidates):  # the catalogue is in the history (or shown): nothing left
            if req.lam is not None:
                return np.zeros(0, np.int64), np.zeros(0), req.lam, "request"
            return np.zeros(0, np.int64), np.zeros(0), self.cfg.default_lam, "default"
        t = time.perf_counter()
        if req.lam is not None:
            lam, source = req.lam, "request"
        elif self.has_policy:
            lam = await stages.run("policy", history, full, shown_mask, res.session)
            source = "policy"
            timings["policy"] = _ms(t)
        else:
            lam, source = self.cfg.default_lam, "default"
        t = time.perf_counter()
        pos = self._rerank(got.candidates, ranked.scores, req.k, lam)
        timings["rerank"] = _ms(t)
        return got.candidates[pos], ranked.scores[pos], lam, source

    def _cold_start(
        self, k: int, lam: float | None, shown: np.ndarray, timings: dict
    ) -> tuple[np.ndarray, np.ndarray, float, str]:
        t = time.perf_counter()
        source = "request" if lam is not None else "cold_start"
        lam = self.cfg.cold_start_lam if lam is None else lam
        keep = ~np.isin(self.pool, shown)  # (P,)
        pool, pool_scores = self.pool[keep], self.pool_scores[keep]
        pos = self._rerank(pool, pool_scores, k, lam)
        timings["rerank"] = _ms(t)
        return pool[pos], pool_scores[pos], lam, source

    def _rerank(self, cands: np.ndarray, scores: np.ndarray, k: int, lam: float) -> np.ndarray:
        """(N,) candidate indices and scores -> (min(k, N),) positions in re-ranked order."""
        embedding = self.rerank.similarity == "embedding"
        return rerank_candidates(
            np.asarray(scores, dtype=np.float64),
            k,
            lam,
            self.rerank,
            vectors=self.vectors[cands] if embedding else None,
            cat_ids=None if embedding else self.catalog.categories[cands],
        )


def drop_shown(got: Retrieved, ranked: Ranked, shown: np.ndarray) -> tuple[Retrieved, Ranked]:
    """Remove the session's shown item indices from one request's candidates (and scores)."""
    if not len(shown):
        return got, ranked
    keep = ~np.isin(got.candidates, shown)  # (N,)
    return (
        replace(got, candidates=got.candidates[keep], interest=got.interest[keep]),
        replace(ranked, scores=ranked.scores[keep], relevance=ranked.relevance[keep]),
    )


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


def run_sync(coro):
    """Run one coroutine to completion from synchronous code (tests, scripts)."""
    return asyncio.run(coro)
