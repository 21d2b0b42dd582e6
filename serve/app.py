"""The Ray Serve application: ingress (FastAPI) -> retriever -> ranker -> policy -> re-rank.

    app = build_app(serve_cfg, rerank_cfg, model_dir="outputs/beauty", policy_dir=None)
    serve.run(app, name="recommender")     # or: python -m jobs.serve / serve run serve/config.yaml

Deployments are thin wrappers composed with `.bind()`: the ingress, and one `StageDeployment`
per stage registered in serve/stages.py (which says how to add a stage):

    Ingress    FastAPI routes, validation, user histories, cold start, lam choice, re-ranking
    Retriever  the transformer encodes the history; top-N by h . e over every item (one matmul)
    Ranker     the multi-task heads score the N candidates (relevance, diversity)
    Policy     the RLlib module picks lam from the user's state (only with a policy_dir)

Each stage deployment batches concurrent requests with `@serve.batch` (serve.batch_max_size,
serve.batch_wait_s). With `serve.fused: true` the ingress runs the same stage functions in its
own process instead: one deployment, no handle hops (each costs ~10 ms on a busy 2-core
machine, see bench/README.md), but the stages can no longer scale or batch separately.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures of the
# ingress class at runtime, and serve.ingress rewraps them where string annotations no longer
# resolve (/openapi.json then fails).
import asyncio
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from rec import artifacts, storage
from rec.config_loader import from_dict
from rec.logs import get_logger
from rec.rerank import RerankConfig
from serve.cache import recheck, test_split
from serve.catalog import UserHistories
from serve.config import DeploymentSpec, ServeConfig
from serve.frontend import Frontend, LocalStages, RequestError
from serve.http import Admission, BodyGuard
from serve.ray_loopback import grpc_on_loopback
from serve.ray_metrics import AppMetrics
from serve.schemas import Health, ItemResponse, RecommendRequest, RecommendResponse
from serve.stages import STAGES, StageContext

ROOT = Path(__file__).resolve().parents[1]
# The project's log format (rec/logs.py) in every replica, through get_logger("serve") called
# in the replica (it installs the handler there): its lines reach the driver through Ray's
# worker-output forwarding, beside Ray Serve's own (its format and access log: LoggingConfig).
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}

api = FastAPI(
    title="raydiv recommender",
    version="1.0",
    description="Retrieve, rank, choose the diversity weight lam, re-rank (DPP/MMR).",
)
api.add_middleware(BodyGuard)
api.add_middleware(Admission)  # added last: runs first, before the body is read


@serve.deployment
class StageDeployment:
    """One registered stage (serve.stages.Stage) as a deployment; `.options(name=...)` names it."""

    def __init__(
        self,
        stage: str,
        model_dir: str,
        cfg: ServeConfig,
        rerank: RerankConfig,
        policy_dir: str | None = None,
    ) -> None:
        grpc_on_loopback()
        torch.set_num_threads(cfg.torch_threads)
        self.fn = STAGE_BY_NAME[stage].build(StageContext(model_dir, cfg, rerank, policy_dir))
        self.run.set_max_batch_size(cfg.batch_max_size)
        self.run.set_batch_wait_timeout_s(cfg.batch_wait_s)
        get_logger("serve").info(
            "stage %s ready (model %s, batches of <= %d)", stage, model_dir, cfg.batch_max_size
        )

    def check_health(self) -> None:
        recheck()  # an artefact copy truncated/deleted since __init__: unhealthy, restarted

    # The defaults are ServeConfig's; __init__ applies the configured values.
    @serve.batch(
        max_batch_size=ServeConfig.batch_max_size, batch_wait_timeout_s=ServeConfig.batch_wait_s
    )
    async def run(self, requests: list[tuple]) -> list[Any]:
        """B requests' argument tuples -> B results (one call of the stage's batch function)."""
        return self.fn(*(list(column) for column in zip(*requests, strict=True)))


class StageUnavailable(RuntimeError):
    """A stage call failed on dead or unreachable replicas after every retry (HTTP 503)."""


# A replica that died (killed, OOM, node lost) or cannot be reached: the call is retried, as
# stage calls are pure functions of their arguments (idempotent); any other error is a bug.
RETRYABLE = (RayActorError, DeploymentUnavailableError)


class HandleStages:
    """serve.frontend.Stages over the stage deployments' handles, retrying lost replicas."""

    def __init__(self, handles: dict[str, DeploymentHandle], retries: int = 3) -> None:
        self.handles, self.names, self.retries = handles, frozenset(handles), retries

    async def run(self, name: str, *args: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return await self.handles[name].run.remote(args)
            except RETRYABLE as err:
                tries = f"try {attempt + 1} of {self.retries + 1}"
                get_logger("serve").warning("stage %s: %s (%s)", name, type(err).__name__, tries)
                if attempt == self.retries:
                    raise StageUnavailable(
                        f"stage {name!r} unavailable after {attempt + 1} tries: "
                        f"{type(err).__name__}"
                    ) from None
                # The router drops a dead replica once the controller reports it; a short,
                # growing pause lets that happen (or a replacement start) before the retry.
                await asyncio.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")


def _front(request: Request) -> Frontend:
    return request.app.state.front


@api.post("/recommend", response_model=RecommendResponse)
async def recommend(req: RecommendRequest) -> dict:
    """Top-k items for a user id and/or a history, re-ranked for diversity at lam."""
    return await answer(req)


async def answer(req: RecommendRequest) -> dict:
    """The one call of Frontend.recommend, for the route and for handle callers alike, with
    its error mapping: a bad request (serve.frontend.RequestError) is HTTPException 422 naming
    the field, a stage lost after its retries (StageUnavailable) 503 + Retry-After. Reads
    this module's `api.state` (see attach); records the application metrics when attached."""
    state = api.state
    try:
        body = await state.front.recommend(req, state.stages)
    except RequestError as err:
        detail = [{"loc": ["body", err.field_name], "msg": err.message, "type": "value_error"}]
        raise HTTPException(status_code=422, detail=detail) from None
    except StageUnavailable as err:
        if state.metrics is not None:
            state.metrics.unavailable()
        retry = str(max(1, math.ceil(state.retry_after_s)))
        raise HTTPException(
            status_code=503, detail=str(err), headers={"Retry-After": retry}
        ) from None
    if state.metrics is not None:
        state.metrics.record(body)
    return body


@api.get("/healthz", response_model=Health)
async def healthz(request: Request) -> dict:
    front = _front(request)
    return {
        "status": "ok",
        "n_items": front.catalog.n_items,
        "n_users": len(front.users),
        "policy": front.has_policy,
        "rerank": f"{front.rerank.method}/{front.rerank.similarity}",
    }


@api.get("/items/{item_id}", response_model=ItemResponse)
async def item(item_id: int, request: Request) -> dict:
    """One catalogue item by raw id (404 if unknown)."""
    front = _front(request)
    idx = front.catalog.index_of.get(item_id)
    if idx is None:
        raise HTTPException(status_code=404, detail=f"item_id {item_id} is not in the catalogue")
    return {"index": idx, **front.catalog.describe(idx)}


def attach(front: Frontend, stages: Any, cfg: ServeConfig, metrics: Any = None) -> None:
    """What the routes above read from `api.state` (one ingress replica per process).

    Called by name, so `api` here is this module's object in the replica: Serve ships the
    Ingress class by value, and a global read in its own methods would be a pickled copy.
    metrics: serve.ray_metrics.AppMetrics in a Serve replica; None outside Ray (bench's bare server).
    """
    app = api
    app.state.front, app.state.stages = front, stages
    app.state.max_body_bytes = cfg.max_body_bytes  # read by BodyGuard
    app.state.retry_after_s = cfg.retry_after_s
    app.state.max_running = cfg.max_running  # read by Admission
    app.state.metrics = metrics


def _ingress_app() -> FastAPI:
    """`api` itself at replica start. Given the app object, serve.ingress would serve a frozen
    copy of it, which never sees the state Ingress.__init__ attaches to `api`."""
    return api


@serve.deployment
@serve.ingress(_ingress_app)
class Ingress:
    """The FastAPI app `api` (routes above) in a replica, its state built here."""

    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        model_dir: str,
        cfg: ServeConfig,
        rerank: RerankConfig,
        policy_dir: str | None = None,
    ) -> None:
        """Handles of the stage deployments by stage name; empty with serve.fused (the stages
        then run here, built from the same StageContext)."""
        grpc_on_loopback()
        torch.set_num_threads(cfg.torch_threads)
        ctx = StageContext(model_dir, cfg, rerank, policy_dir)
        stages = LocalStages(ctx) if cfg.fused else HandleStages(handles, cfg.stage_retries)
        attach(build_frontend(ctx, model_dir, stages), stages, cfg, AppMetrics())
        mode = "fused" if cfg.fused else "composed: " + ", ".join(sorted(stages.names))
        get_logger("serve").info(
            "ingress ready (%s; model %s; max_running %s)", mode, model_dir, cfg.max_running
        )

    async def recommend(self, req: RecommendRequest) -> dict:
        """POST /recommend's answer for a deployment handle (model composition, no HTTP);
        errors as HTTPException with the route's status codes (see answer)."""
        return await answer(req)

    def check_health(self) -> None:
        recheck()  # an artefact copy truncated/deleted since __init__: unhealthy, restarted


def build_frontend(ctx: StageContext, model_dir: str, stages: Any) -> Frontend:
    """The ingress's Frontend over a StageContext (users from the model's test split)."""
    users = UserHistories.from_split(test_split(model_dir), ctx.model.cfg.max_len)
    with torch.no_grad():
        vectors = ctx.model.item_table().numpy().astype(np.float32)  # (N + 1, D)
    has_policy = "policy" in stages.names
    return Frontend(ctx.cfg, ctx.rerank, ctx.catalog, users, vectors, has_policy=has_policy)


def deployment_options(
    spec: DeploymentSpec, name: str | None = None, cfg: ServeConfig | None = None
) -> dict[str, Any]:
    """A DeploymentSpec (a deployment name, the ServeConfig for serve.replicas and
    serve.retry_after_s) -> `.options(...)` keyword arguments."""
    cfg = cfg or ServeConfig()
    auto = spec.autoscaling
    actor = {"num_cpus": spec.num_cpus, **({"resources": spec.resources} if spec.resources else {})}
    # Over max_ongoing_requests per replica and max_queued_requests waiting, Serve answers 503
    # at once (with Retry-After) instead of queueing: overload sheds load, admitted requests
    # keep their latency.
    limits = {
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
    }
    if cfg.replicas:  # a fixed count for every deployment (e.g. 2: survive a lost replica)
        scaling: dict[str, Any] = {"num_replicas": cfg.replicas}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": auto.min_replicas,
                "max_replicas": auto.max_replicas,
                "target_ongoing_requests": auto.target_ongoing_requests,
                "upscale_delay_s": auto.upscale_delay_s,
                "downscale_delay_s": auto.downscale_delay_s,
                "look_back_period_s": auto.look_back_period_s,
            }
        }
    return {
        **({"name": name} if name is not None else {}),
        "ray_actor_options": actor,
        **limits,
        **scaling,
        "logging_config": {"enable_access_log": cfg.access_log},
    }


def resolve_dir(path: str | None) -> str | None:
    """URIs as given; relative local paths are relative to the repository root (replicas run
    elsewhere). A URI that lost its `//` (`s3:/b/x`) is refused, never made a local path."""
    if path is None or storage.is_uri(path):
        return path
    p = storage.local_path(path)
    return str(p if p.is_absolute() else (ROOT / p).resolve())


def _has_export(model_dir: str) -> bool:
    """A plain export (model_config.json) or one published with rec.artifacts (CURRENT); a
    missing bucket or refused credentials raise StorageError (one line naming the URI)."""
    export = storage.join(model_dir, "export")
    return any(
        storage.exists(storage.join(export, f)) for f in ("model_config.json", artifacts.CURRENT)
    )


def build_app(
    cfg: ServeConfig,
    rerank: RerankConfig,
    model_dir: str | None,
    policy_dir: str | None = None,
):
    """The bound application; model_dir is required, policy_dir optional (lam: default)."""
    model_dir = resolve_dir(model_dir)
    if model_dir is None:
        raise ValueError("model_dir is required: a train job's output directory (with export/)")
    if not _has_export(model_dir):
        raise ValueError(f"model_dir {model_dir!r} has no export/model_config.json")
    cfg.check_rerank(rerank)
    policy_dir = resolve_dir(policy_dir)
    if policy_dir is not None and not storage.exists(policy_dir):
        raise ValueError(f"policy_dir {policy_dir!r} does not exist")
    ingress = Ingress.options(**deployment_options(cfg.ingress, cfg=cfg))
    if cfg.fused:
        return ingress.bind({}, model_dir, cfg, rerank, policy_dir)
    ctx = StageContext(model_dir, cfg, rerank, policy_dir)  # only asked which stages are on
    handles = {
        stage.name: StageDeployment.options(
            **deployment_options(cfg.deployment(stage.name), stage.deployment, cfg)
        ).bind(stage.name, model_dir, cfg, rerank, policy_dir)
        for stage in STAGES
        if stage.enabled(ctx)
    }
    return ingress.bind(handles, model_dir, cfg, rerank)


APP_ARGS = ("model_dir", "policy_dir", "serve", "rerank")
# ServeConfig fields a Serve config file sets itself (http_options.host/port, proxy_location,
# the application's name and route_prefix): given as app args they would be silently ignored.
CONFIG_FILE_FIELDS = ("host", "port", "app_name", "route_prefix", "proxy_location")
# The args of the module-level `app` (below): JSON in this variable, else DEFAULT_APP_ARGS.
APP_ARGS_ENV = "RAYDIV_APP_ARGS"
DEFAULT_APP_ARGS = {"model_dir": "outputs/beauty"}


def app_builder(args: dict[str, Any]):
    """For `serve run serve/config.yaml`: args {"model_dir", "policy_dir", "serve", "rerank"}.

    "serve" holds ServeConfig fields and "rerank" rec.rerank.RerankConfig fields (the run
    config's sections of the same names; unknown keys are refused, and so are the fields the
    config file itself sets: CONFIG_FILE_FIELDS); the per-deployment sections of the Serve
    config file override replicas and resources on top of them.
    """
    unknown = sorted(set(args) - set(APP_ARGS))
    if unknown:
        raise ValueError(f"unknown app arg {unknown[0]!r}; allowed: {', '.join(APP_ARGS)}")
    serve_args = dict(args.get("serve") or {})
    ignored = [name for name in CONFIG_FILE_FIELDS if name in serve_args]
    if ignored:
        raise ValueError(
            f"app arg serve.{ignored[0]} would be ignored: a Serve config file sets the HTTP "
            "host and port (http_options), proxy_location, and the application's name and "
            "route_prefix itself; set them there"
        )
    cfg = from_dict(ServeConfig, serve_args, "serve")
    rerank = from_dict(RerankConfig, dict(args.get("rerank") or {}), "rerank")
    return build_app(cfg, rerank, args.get("model_dir"), args.get("policy_dir"))


def __getattr__(name: str):
    """`serve.app:app`, the Application `serve build` needs (it refuses a builder), built on
    first access from the JSON app args in $RAYDIV_APP_ARGS (the keys of app_builder; default
    DEFAULT_APP_ARGS), so that importing this module builds nothing:

        RAYDIV_APP_ARGS='{"model_dir": "outputs/beauty", "serve": {"fused": true}}' \\
            serve build serve.app:app -o serve/built.yaml

    The file deploys with `serve deploy` when the cluster's processes see the same variable:
    put it under the application's `runtime_env: {env_vars: {RAYDIV_APP_ARGS: ...}}`.
    """
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    raw = os.environ.get(APP_ARGS_ENV)
    try:
        args = json.loads(raw) if raw else dict(DEFAULT_APP_ARGS)
    except json.JSONDecodeError as err:
        raise ValueError(f"${APP_ARGS_ENV} is not JSON: {err}") from None
    if not isinstance(args, dict):
        raise ValueError(f"${APP_ARGS_ENV} must be a JSON object (app_builder's args)")
    return app_builder(args)
