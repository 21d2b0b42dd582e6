"""The model stages of the request path, declared once in STAGES (no Ray here).

A stage is a batch function over one of the inference objects of serve/engine.py or
serve/policy.py: B requests' arguments in (one list per argument), B results out. Everything
else iterates over STAGES:

    serve/app.py: build_app     one Ray Serve deployment per stage, `@serve.batch`, `.bind()`
    serve/app.py: HandleStages  `await stages.run("ranker", retrieved)` over those handles
    serve/frontend.py: LocalStages  the same functions in-process (tests, `serve.fused: true`)

Registered today, in request order (serve/frontend.py: Frontend awaits them by name):

    retriever  (history, exclude) -> Retrieved   the transformer encodes the history; top-N items
    ranker     (retrieved,) -> Ranked            the multi-task heads score the N candidates
    policy     (history, ranked, shown, session) -> lam   the RLlib module picks lam (policy_dir)

How to add a stage (say a re-scorer between ranking and re-ranking):
1. Write its inference object (torch/numpy, no Ray) in serve/engine.py or its own serve/*.py,
   with a batch method: lists of B arguments -> list of B results.
2. Register it: one `Stage(name, deployment, build)` in STAGES below, where `build(ctx)` returns
   that batch method bound to an object made from the StageContext (model, catalog, configs).
3. Await it where its result is used, in serve/frontend.py: `await stages.run("<name>", ...)`.
It then runs as its own deployment (named `deployment`; serve/config.yaml can scale it by that
name) with `@serve.batch`, or inside the ingress with `serve.fused: true`. Its resources come
from the ServeConfig field named like the stage (`serve.<name>`) if there is one, else from
DeploymentSpec's defaults: add a DeploymentSpec field to serve/config.py to make them settable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from rec import storage
from rec.ann import index_for_serving
from rec.export import load_export
from rec.recommender import Recommender
from rec.rerank import RerankConfig
from serve.cache import local_dir
from serve.catalog import Catalog
from serve.config import ServeConfig
from serve.engine import HeadScorer, QueryTower

BatchFn = Callable[..., list[Any]]  # B-long argument lists -> B results


class StageContext:
    """What a stage's builder may use; the export is copied (URIs: once per node, see
    serve/cache.py) and loaded on first use (a policy replica never loads the model)."""

    def __init__(
        self,
        model_dir: str | Path,
        cfg: ServeConfig,
        rerank: RerankConfig,
        policy_dir: str | None = None,
    ) -> None:
        # A train job's output_dir (export/ and data/): a local path or a URI.
        self.model_dir = str(model_dir)
        self.cfg, self.rerank, self.policy_dir = cfg, rerank, policy_dir

    @cached_property
    def export_dir(self) -> Path:
        """A local directory with the export (the model_dir's own when it is local)."""
        return local_dir(storage.join(self.model_dir, "export"))

    @cached_property
    def model(self) -> Recommender:
        return load_export(self.export_dir)

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog.load(self.export_dir)


@dataclass(frozen=True)
class Stage:
    """One registered stage (see the module docstring)."""

    name: str  # what Frontend awaits (`stages.run(name, ...)`); also its ServeConfig field
    deployment: str  # its Ray Serve deployment name (the `deployments:` names of serve/config.yaml)
    build: Callable[[StageContext], BatchFn]  # called once per replica (or once when fused)
    needs_policy: bool = False  # built and deployed only when a policy_dir is given

    def enabled(self, ctx: StageContext) -> bool:
        return ctx.policy_dir is not None or not self.needs_policy


def _retriever(ctx: StageContext) -> BatchFn:
    # serve.retrieval: the export's ANN index (rec/ann.py) on a large catalogue, else exact.
    index = index_for_serving(ctx.export_dir, ctx.cfg.retrieval, ctx.cfg.ann_min_items, ctx.model)
    tower = QueryTower(ctx.model, ctx.catalog.behavior, index)
    n = ctx.rerank.n_candidates
    return lambda histories, excludes: tower.retrieve(histories, excludes, n)


def _ranker(ctx: StageContext) -> BatchFn:
    return HeadScorer(ctx.model, ctx.cfg.relevance_weight).score


def _policy(ctx: StageContext) -> BatchFn:
    from serve.policy import PolicyScorer  # RLlib's module machinery: only when a policy runs

    scorer = PolicyScorer(local_dir(ctx.policy_dir), ctx.catalog.categories)
    return lambda hists, ranked, shown, sessions: scorer.choose(
        hists, ranked, shown, sessions
    ).tolist()


STAGES: tuple[Stage, ...] = (
    Stage("retriever", "Retriever", _retriever),
    Stage("ranker", "Ranker", _ranker),
    Stage("policy", "Policy", _policy, needs_policy=True),
)
