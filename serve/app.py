"""The Ray Serve application: ingress (FastAPI) -> retriever -> ranker -> policy -> re-rank.

    app = build_app(serve_cfg, model_dir="outputs/beauty", policy_dir=None)
    serve.run(app, name="recommender")     # or: python -m jobs.serve / serve run serve/config.yaml

Deployments are thin wrappers over serve/engine.py objects, composed with `.bind()`:

    Ingress    FastAPI routes, validation, user histories, cold start, lam choice, re-ranking
    Retriever  the transformer encodes the history; top-N by h . e over every item (one matmul)
    Ranker     the multi-task heads score the N candidates (relevance, diversity)
    Policy     the RLlib module picks lam from the user's state (only with a policy_dir)

Retriever, Ranker and Policy batch concurrent requests with `@serve.batch`. With
`serve.fused: true` the ingress runs the same engine objects in its own process instead: one
deployment, no handle hops (each costs ~10 ms on a busy 2-core machine, see bench/README.md),
but the stages can no longer scale or batch separately.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures of the
# ingress class at runtime, and serve.ingress rewraps them where string annotations no longer
# resolve (/openapi.json then fails).
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle

from rec.config import from_dict
from rec.export import load_export
from serve.catalog import Catalog, UserHistories
from serve.config import DeploymentSpec, ServeConfig
from serve.engine import HeadScorer, QueryTower, Ranked, Retrieved
from serve.http import BodyLimit
from serve.pipeline import Frontend, LocalStages, RequestError
from serve.schemas import Health, ItemResponse, RecommendRequest, RecommendResponse

ROOT = Path(__file__).resolve().parents[1]

api = FastAPI(
    title="raydiv recommender",
    version="1.0",
    description="Retrieve, rank, choose the diversity weight lam, re-rank (DPP/MMR).",
)
api.add_middleware(BodyLimit)


def _batched(method, cfg: ServeConfig) -> None:
    """Apply the config's batch size and wait to a `@serve.batch` method."""
    method.set_max_batch_size(cfg.batch_max_size)
    method.set_batch_wait_timeout_s(cfg.batch_wait_s)


@serve.deployment
class Retriever:
    def __init__(self, model_dir: str, cfg: ServeConfig) -> None:
        torch.set_num_threads(cfg.torch_threads)
        export = Path(model_dir) / "export"
        self.tower = QueryTower(load_export(export), Catalog.load(export).behavior)
        self.n = cfg.n_candidates
        _batched(self.retrieve, cfg)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def retrieve(
        self, histories: list[np.ndarray], excludes: list[np.ndarray | None]
    ) -> list[Retrieved]:
        return self.tower.retrieve(histories, excludes, self.n)


@serve.deployment
class Ranker:
    def __init__(self, model_dir: str, cfg: ServeConfig) -> None:
        torch.set_num_threads(cfg.torch_threads)
        self.scorer = HeadScorer(load_export(Path(model_dir) / "export"), cfg.relevance_weight)
        _batched(self.rank, cfg)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def rank(self, requests: list[Retrieved]) -> list[Ranked]:
        return self.scorer.score(requests)


@serve.deployment
class Policy:
    def __init__(self, model_dir: str, policy_dir: str, cfg: ServeConfig) -> None:
        from serve.policy import PolicyScorer

        torch.set_num_threads(cfg.torch_threads)
        catalog = Catalog.load(Path(model_dir) / "export")
        self.scorer = PolicyScorer(policy_dir, catalog.categories)
        _batched(self.choose, cfg)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def choose(self, histories: list[np.ndarray], ranked: list[Ranked]) -> list[float]:
        return self.scorer.choose(histories, ranked).tolist()


class HandleStages:
    """serve.pipeline.Stages over deployment handles."""

    def __init__(self, retriever: DeploymentHandle, ranker: DeploymentHandle, policy) -> None:
        self.retriever, self.ranker, self.policy = retriever, ranker, policy

    async def retrieve(self, history: np.ndarray, exclude: np.ndarray | None) -> Retrieved:
        return await self.retriever.retrieve.remote(history, exclude)

    async def rank(self, retrieved: Retrieved) -> Ranked:
        return await self.ranker.rank.remote(retrieved)

    async def choose_lam(self, history: np.ndarray, ranked: Ranked) -> float:
        return await self.policy.choose.remote(history, ranked)


def fused_stages(model, catalog: Catalog, cfg: ServeConfig, policy_dir: str | None) -> LocalStages:
    """serve.fused: the engine objects in the ingress process (no handle hops, no batching)."""
    policy = None
    if policy_dir is not None:
        from serve.policy import PolicyScorer

        policy = PolicyScorer(policy_dir, catalog.categories)
    tower = QueryTower(model, catalog.behavior)
    return LocalStages(tower, HeadScorer(model, cfg.relevance_weight), cfg.n_candidates, policy)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        retriever: DeploymentHandle | None,
        ranker: DeploymentHandle | None,
        policy: DeploymentHandle | None,
        model_dir: str,
        cfg: ServeConfig,
        policy_dir: str | None = None,
    ) -> None:
        """Handles of the stage deployments; all None with serve.fused (stages run here)."""
        torch.set_num_threads(cfg.torch_threads)
        export = Path(model_dir) / "export"
        model = load_export(export)
        catalog = Catalog.load(export)
        users = UserHistories.load(Path(model_dir) / "data", model.cfg.max_len)
        with torch.no_grad():
            vectors = model.model.item_embeddings().numpy().astype(np.float32)  # (N + 1, D)
        if cfg.fused:
            self.stages = fused_stages(model, catalog, cfg, policy_dir)
            has_policy = self.stages.policy is not None
        else:
            self.stages, has_policy = HandleStages(retriever, ranker, policy), policy is not None
        self.front = Frontend(cfg, catalog, users, vectors, has_policy=has_policy)
        api.state.max_body_bytes = cfg.max_body_bytes  # read by BodyLimit

    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, req: RecommendRequest) -> dict:
        """Top-k items for a user id and/or a history, re-ranked for diversity at lam."""
        try:
            return await self.front.recommend(req, self.stages)
        except RequestError as err:
            detail = [{"loc": ["body", err.field_name], "msg": err.message, "type": "value_error"}]
            raise HTTPException(status_code=422, detail=detail) from None

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        front = self.front
        return {
            "status": "ok",
            "n_items": front.catalog.n_items,
            "n_users": len(front.users),
            "policy": front.has_policy,
            "rerank": f"{front.rerank_cfg.method}/{front.rerank_cfg.similarity}",
        }

    @api.get("/items/{item_id}", response_model=ItemResponse)
    async def item(self, item_id: int) -> dict:
        """One catalogue item by raw id (404 if unknown)."""
        idx = self.front.catalog.index_of.get(item_id)
        if idx is None:
            raise HTTPException(
                status_code=404, detail=f"item_id {item_id} is not in the catalogue"
            )
        return {"index": idx, **self.front.catalog.describe(idx)}


def deployment_options(spec: DeploymentSpec) -> dict[str, Any]:
    """A DeploymentSpec -> `.options(...)` keyword arguments."""
    auto = spec.autoscaling
    return {
        "ray_actor_options": {"num_cpus": spec.num_cpus},
        "max_ongoing_requests": spec.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": auto.min_replicas,
            "max_replicas": auto.max_replicas,
            "target_ongoing_requests": auto.target_ongoing_requests,
            "upscale_delay_s": auto.upscale_delay_s,
            "downscale_delay_s": auto.downscale_delay_s,
            "look_back_period_s": auto.look_back_period_s,
        },
    }


def resolve_dir(path: str | None) -> str | None:
    """Relative artifact paths are relative to the repository root (replicas run elsewhere)."""
    if path is None:
        return None
    p = Path(path)
    return str(p if p.is_absolute() else (ROOT / p).resolve())


def build_app(cfg: ServeConfig, model_dir: str | None, policy_dir: str | None = None):
    """The bound application; model_dir is required, policy_dir optional (lam: default)."""
    model_dir = resolve_dir(model_dir)
    if model_dir is None:
        raise ValueError("model_dir is required: a train job's output directory (with export/)")
    if not (Path(model_dir) / "export" / "model_config.json").is_file():
        raise ValueError(f"model_dir {model_dir!r} has no export/model_config.json")
    policy_dir = resolve_dir(policy_dir)
    ingress = Ingress.options(**deployment_options(cfg.ingress))
    if cfg.fused:
        return ingress.bind(None, None, None, model_dir, cfg, policy_dir)
    retriever = Retriever.options(**deployment_options(cfg.retriever)).bind(model_dir, cfg)
    ranker = Ranker.options(**deployment_options(cfg.ranker)).bind(model_dir, cfg)
    policy = None
    if policy_dir is not None:
        opts = deployment_options(cfg.policy)
        policy = Policy.options(**opts).bind(model_dir, policy_dir, cfg)
    return ingress.bind(retriever, ranker, policy, model_dir, cfg)


def app_builder(args: dict[str, Any]):
    """For `serve run serve/config.yaml`: args {"model_dir", "policy_dir", "serve": {...}}.

    "serve" holds ServeConfig fields (unknown keys are refused); the per-deployment sections
    of the Serve config file override replicas and resources on top of them.
    """
    unknown = sorted(set(args) - {"model_dir", "policy_dir", "serve"})
    if unknown:
        raise ValueError(f"unknown app arg {unknown[0]!r}; allowed: model_dir, policy_dir, serve")
    cfg = from_dict(ServeConfig, dict(args.get("serve") or {}), "serve")
    return build_app(cfg, args.get("model_dir"), args.get("policy_dir"))
