"""Serving logic without Ray: catalog, retrieval, ranking, re-ranking, cold start, validation."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rec.export import load_export
from rec.metrics import ild_jaccard
from serve.app import app_builder, build_app
from serve.catalog import Catalog, UserHistories
from serve.config import ServeConfig
from serve.engine import HeadScorer, QueryTower, history_batch
from serve.http import BodyLimit
from serve.pipeline import Frontend, LocalStages, RequestError, run_sync
from serve.schemas import RecommendRequest
from tests.conftest import ROOT
from tests.serve_support import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve_core"))


@pytest.fixture(scope="module")
def parts(model_dir):
    torch.set_num_threads(1)
    model = load_export(model_dir / "export")
    catalog = Catalog.load(model_dir / "export")
    users = UserHistories.load(model_dir / "data", model.cfg.max_len)
    return model, catalog, users


def frontend(parts, **overrides) -> tuple[Frontend, LocalStages]:
    model, catalog, users = parts
    cfg = ServeConfig(n_candidates=50, max_k=20, max_history=30, **overrides)
    vectors = model.model.item_embeddings().detach().numpy()
    front = Frontend(cfg, catalog, users, vectors, has_policy=False)
    stages = LocalStages(QueryTower(model, catalog.behavior), HeadScorer(model), cfg.n_candidates)
    return front, stages


def test_catalog_lookup_and_users(parts) -> None:
    _, catalog, users = parts
    raw = catalog.item_ids[[3, 1, 7]].tolist()
    idx, unknown = catalog.to_indices([raw[0], -5, raw[1], raw[2], 10**15])
    assert idx.tolist() == [3, 1, 7] and unknown == [-5, 10**15]
    desc = catalog.describe(3)
    assert desc["id"] == raw[0] and len(desc["categories"]) == 1 and desc["popularity"] > 0
    assert len(users) > 100
    user = next(iter(users._histories))
    assert users.get(user).dtype == np.int64 and users.get(-1) is None


def test_history_batch_left_pads_and_keeps_recent() -> None:
    batch = history_batch([np.array([5, 6, 7]), np.array([9])], behavior=1, max_len=2)
    assert batch.items.tolist() == [[6, 7], [0, 9]]
    assert batch.behaviors.tolist() == [[1, 1], [0, 1]]
    assert int(batch.targets.abs().sum()) == 0


def test_retrieval_matches_full_scoring_and_excludes(parts) -> None:
    model, catalog, _ = parts
    tower = QueryTower(model, catalog.behavior)
    hists = [np.array([3, 8, 12]), np.array([40])]
    got = tower.retrieve(hists, [hists[0], None], n=30)
    full = model.score_next(history_batch(hists, catalog.behavior, model.cfg.max_len))  # (2, N+1)
    full[0, hists[0]] = float("-inf")
    want = torch.topk(full, 30, dim=1)
    for row in range(2):
        assert got[row].candidates.tolist() == want.indices[row].tolist()
        np.testing.assert_allclose(got[row].interest, want.values[row].numpy(), rtol=1e-5)
    assert not set(got[0].candidates) & set(hists[0].tolist())


def test_ranker_score_is_documented_combination(parts) -> None:
    model, catalog, _ = parts
    hist = np.array([3, 8, 12])
    got = QueryTower(model, catalog.behavior).retrieve([hist], [None], n=25)[0]
    ranked = HeadScorer(model, relevance_weight=0.5).score([got])[0]
    batch = history_batch([hist], catalog.behavior, model.cfg.max_len)
    rel = model.relevance(batch, torch.from_numpy(got.candidates)[None])[0].numpy()
    want = torch.log_softmax(torch.from_numpy(got.interest), 0).numpy() + 0.5 * np.log(rel)
    np.testing.assert_allclose(ranked.scores, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ranked.relevance, rel, rtol=1e-5)
    assert ranked.diversity == pytest.approx(float(model.diversity(batch)[0]), rel=1e-5)


def test_recommend_distinct_unseen_items(parts) -> None:
    front, stages = frontend(parts)
    catalog = parts[1]
    user = next(iter(parts[2]._histories))
    seen = set(catalog.item_ids[parts[2].get(user)].tolist())
    out = run_sync(front.recommend(RecommendRequest(user_id=user, k=10), stages))
    ids = [item["id"] for item in out["items"]]
    assert len(ids) == 10 == len(set(ids)) and not set(ids) & seen
    assert out["lam_source"] == "default" and out["lam"] == front.cfg.default_lam
    assert {"retrieve", "rank", "rerank", "total"} <= set(out["timings_ms"])


def test_unknown_items_truncation_and_k_bound(parts) -> None:
    front, stages = frontend(parts)
    raw = parts[1].item_ids[1:41].tolist()  # 40 known items > max_history = 30
    out = run_sync(front.recommend(RecommendRequest(history=[*raw, -7], k=5, lam=0.5), stages))
    assert out["unknown_items"] == [-7] and out["history_truncated"]
    assert out["history_used"] == 30 and out["lam_source"] == "request"
    assert not {i["id"] for i in out["items"]} & set(raw[-30:])  # the kept (most recent) ones
    with pytest.raises(RequestError) as err:
        front.resolve(RecommendRequest(history=raw, k=21))
    assert err.value.field_name == "k"


@pytest.mark.parametrize("req", [{}, {"user_id": -123}, {"history": [-1, -2]}])
def test_cold_start_is_popular_and_diverse(parts, req) -> None:
    front, stages = frontend(parts, similarity="category")
    out = run_sync(front.recommend(RecommendRequest(k=10, **req), stages))
    assert out["cold_start"] and out["lam_source"] == "cold_start" and len(out["items"]) == 10
    counts = parts[1].counts
    picked = [parts[1].index_of[item["id"]] for item in out["items"]]
    assert np.median(counts[picked]) >= np.percentile(counts[1:], 75)  # popular
    cats = torch.as_tensor(parts[1].categories)
    top_pop = torch.as_tensor(np.argsort(-counts[1:], kind="stable")[:10] + 1)[None]
    assert ild_jaccard(torch.tensor([picked]), cats) >= ild_jaccard(top_pop, cats)  # diverse


def test_raising_lam_raises_ild(parts) -> None:
    front, stages = frontend(parts)
    cats = torch.as_tensor(parts[1].categories)
    users = list(parts[2]._histories)[:40]
    ild = {}
    for lam in (0.0, 0.5, 0.9):
        lists = []
        for user in users:
            out = run_sync(front.recommend(RecommendRequest(user_id=user, k=10, lam=lam), stages))
            lists.append([parts[1].index_of[item["id"]] for item in out["items"]])
        ild[lam] = float(ild_jaccard(torch.tensor(lists), cats).mean())
    assert ild[0.0] < ild[0.5] < ild[0.9], ild


def test_body_limit_413_declared_and_streamed() -> None:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"n": len(await request.body())})

    app = Starlette(routes=[Route("/", echo, methods=["POST"])])
    app.state.max_body_bytes = 100
    app.add_middleware(BodyLimit)

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            async def chunks():
                for _ in range(5):
                    yield b"x" * 30

            return [
                await client.post("/", content=b"x" * 100),
                await client.post("/", content=b"x" * 101),
                await client.post("/", content=chunks()),  # no content-length: streamed
            ]

    ok, declared, streamed = run_sync(go())
    assert ok.status_code == 200 and ok.json() == {"n": 100}
    assert declared.status_code == 413 and "serve.max_body_bytes" in declared.json()["detail"]
    assert streamed.status_code == 413


def test_app_builder_and_serve_config_file(model_dir) -> None:
    from ray.serve.schema import ServeDeploySchema

    with pytest.raises(ValueError, match="model_dir"):
        build_app(ServeConfig(), None)
    with pytest.raises(ValueError, match="'modeldir'"):
        app_builder({"modeldir": str(model_dir)})
    with pytest.raises(ValueError, match="max_k"):
        app_builder({"model_dir": str(model_dir), "serve": {"max_k": 500}})
    app = app_builder({"model_dir": str(model_dir), "serve": {"rerank_method": "mmr"}})
    assert app is not None
    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app_cfg,) = schema.applications
    assert app_cfg.import_path == "serve.app:app_builder"
    names = {d.name for d in app_cfg.deployments}
    assert names == {"Ingress", "Retriever", "Ranker"}
    for dep in app_cfg.deployments:
        auto = dep.autoscaling_config
        assert auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"]
        assert dep.ray_actor_options.num_cpus > 0


def test_policy_chooses_lam_from_request_state(parts, model_dir, tmp_path) -> None:
    from rl.features import request_observation
    from rl.policy import LamPolicy
    from serve.policy import PolicyScorer
    from tests.serve_support import make_policy_dir

    policy_dir = make_policy_dir(tmp_path)
    front, stages = frontend(parts)
    front.has_policy = True
    stages.policy = PolicyScorer(policy_dir, parts[1].categories)
    user = next(iter(parts[2]._histories))
    out = run_sync(front.recommend(RecommendRequest(user_id=user, k=10), stages))
    assert out["lam_source"] == "policy" and "policy" in out["timings_ms"]
    # the same lam by hand: retrieval -> ranking -> observation -> LamPolicy
    hist = parts[2].get(user)
    ranked = stages.scorer.score(stages.tower.retrieve([hist], [hist], 50))[0]
    policy = LamPolicy.load(policy_dir)
    obs = request_observation(
        hist, parts[1].categories, ranked.diversity, ranked.scores, policy.env_cfg
    )
    assert out["lam"] == pytest.approx(float(policy.choose(obs[None])[0]))
    assert round(out["lam"] * 10) == pytest.approx(out["lam"] * 10)  # discrete lam grid
    given = run_sync(front.recommend(RecommendRequest(user_id=user, k=10, lam=0.25), stages))
    assert given["lam"] == 0.25 and given["lam_source"] == "request"


def test_fused_stages_answer_as_the_separate_ones(parts, model_dir, tmp_path) -> None:
    from serve.app import fused_stages
    from tests.serve_support import make_policy_dir

    assert build_app(ServeConfig(fused=True), str(model_dir)) is not None
    cfg = ServeConfig(n_candidates=50, max_k=20, max_history=30)
    fused = fused_stages(parts[0], parts[1], cfg, str(make_policy_dir(tmp_path)))
    front, local = frontend(parts)
    user = next(iter(parts[2]._histories))
    req = RecommendRequest(user_id=user, k=10, lam=0.5)
    a, b = (run_sync(front.recommend(req, st)) for st in (fused, local))
    assert a["items"] == b["items"]
    front.has_policy = True
    out = run_sync(front.recommend(RecommendRequest(user_id=user, k=10), fused))
    assert out["lam_source"] == "policy"
