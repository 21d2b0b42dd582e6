"""Serving logic without Ray: catalog, retrieval, ranking, re-ranking, cold start, validation."""

from __future__ import annotations

import copy
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

from rec.data.schema import BEHAVIOR_TOKENS
from rec.export import load_export
from rec.metrics import ild_jaccard
from rec.rerank import RerankConfig
from serve import proxy_retry
from serve.app import app_builder, build_app
from serve.catalog import Catalog, UserHistories
from serve.config import ServeConfig
from serve.engine import HeadScorer, QueryTower, history_batch
from serve.frontend import Frontend, LocalStages, RequestError, run_sync
from serve.http import BodyGuard
from serve.schemas import RecommendRequest
from serve.stages import StageContext
from tests.conftest import ROOT
from tests.serve_support import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve_core"))


@pytest.fixture(autouse=True)
def _one_thread():
    # Small shared machine: one torch thread keeps timings predictable; restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def parts(model_dir):
    model = load_export(model_dir / "export")
    catalog = Catalog.load(model_dir / "export")
    users = UserHistories.load(model_dir / "data", model.cfg.max_len)
    return model, catalog, users


def frontend(
    parts, model_dir: Path, policy_dir: str | None = None, **rerank
) -> tuple[Frontend, LocalStages]:
    """A Frontend and the registered stages in-process (`rerank`: RerankConfig overrides)."""
    model, catalog, users = parts
    cfg = ServeConfig(max_k=20, max_history=30)
    rerank_cfg = RerankConfig(n_candidates=50, **rerank)
    vectors = model.item_table().detach().numpy()
    stages = LocalStages(StageContext(model_dir, cfg, rerank_cfg, policy_dir))
    front = Frontend(cfg, rerank_cfg, catalog, users, vectors, "policy" in stages.names)
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


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_retrieval_ranks_by_score_next(parts, exclude_seen: bool) -> None:
    """Retrieval is `Recommender.score_next` on the request history, the learned repeat logit
    included (what `test.*` measures); exclude_seen=true only takes the history out."""
    model, catalog, _ = parts
    model = copy.deepcopy(model)
    with torch.no_grad():  # the untrained export has r = 0; a large r lifts history items
        model.set_repeat_logit(3.0)
    hists = [np.array([3, 8, 12]), np.array([40])]
    excludes = hists if exclude_seen else [None, None]
    got = QueryTower(model, catalog.behavior).retrieve(hists, excludes, n=30)
    full = model.score_next(history_batch(hists, catalog.behavior, model.cfg.max_len))  # (2, N+1)
    for row, hist in enumerate(hists):
        if exclude_seen:
            full[row, hist] = float("-inf")
        want = torch.topk(full[row], 30)
        assert got[row].candidates.tolist() == want.indices.tolist()
        np.testing.assert_allclose(got[row].interest, want.values.numpy(), rtol=1e-5)
        shown = set(hist.tolist()) & set(got[row].candidates.tolist())
        assert shown == (set() if exclude_seen else set(hist.tolist()))


def test_ranker_score_is_documented_combination(parts) -> None:
    model, catalog, _ = parts
    hist = np.array([3, 8, 12])
    got = QueryTower(model, catalog.behavior).retrieve([hist], [None], n=25)[0]
    ranked = HeadScorer(model, relevance_weight=0.5).score([got])[0]
    rel = ranked.relevance  # (25,) P(relevant) from the model's relevance head
    assert ((rel > 0) & (rel < 1)).all() and 0.0 < ranked.diversity < 1.0
    want = torch.log_softmax(torch.from_numpy(got.interest), 0).numpy() + 0.5 * np.log(rel)
    np.testing.assert_allclose(ranked.scores, want, rtol=1e-4, atol=1e-5)


def test_recommend_distinct_unseen_items(parts, model_dir) -> None:
    front, stages = frontend(parts, model_dir)
    catalog = parts[1]
    user = next(iter(parts[2]._histories))
    seen = set(catalog.item_ids[parts[2].get(user)].tolist())
    out = run_sync(front.recommend(RecommendRequest(user_id=user, k=10), stages))
    ids = [item["id"] for item in out["items"]]
    assert len(ids) == 10 == len(set(ids)) and not set(ids) & seen
    assert out["lam_source"] == "default" and out["lam"] == front.cfg.default_lam
    assert {"retrieve", "rank", "rerank", "total"} <= set(out["timings_ms"])


def test_unknown_items_truncation_and_k_bound(parts, model_dir) -> None:
    front, stages = frontend(parts, model_dir)
    raw = parts[1].item_ids[1:41].tolist()  # 40 known items > max_history = 30
    out = run_sync(front.recommend(RecommendRequest(history=[*raw, -7], k=5, lam=0.5), stages))
    assert out["unknown_items"] == [-7] and out["history_truncated"]
    assert out["history_used"] == 30 and out["lam_source"] == "request"
    assert not {i["id"] for i in out["items"]} & set(raw[-30:])  # the kept (most recent) ones
    with pytest.raises(RequestError) as err:
        front.resolve(RecommendRequest(history=raw, k=21))
    assert err.value.field_name == "k"


@pytest.mark.parametrize("req", [{}, {"user_id": -123}, {"history": [-1, -2]}])
def test_cold_start_is_popular_and_diverse(parts, model_dir, req) -> None:
    front, stages = frontend(parts, model_dir, similarity="category")
    out = run_sync(front.recommend(RecommendRequest(k=10, **req), stages))
    assert out["cold_start"] and out["lam_source"] == "cold_start" and len(out["items"]) == 10
    assert out["lam"] == front.cfg.cold_start_lam == ServeConfig().cold_start_lam  # 0.7
    counts = parts[1].counts
    picked = [parts[1].index_of[item["id"]] for item in out["items"]]
    assert np.median(counts[picked]) >= np.percentile(counts[1:], 75)  # popular
    cats = torch.as_tensor(parts[1].categories)
    top_pop = np.argsort(-counts[1:], kind="stable")[:10] + 1  # the plain popular list
    # lam 0 is exactly the popular order; the cold-start lam is strictly more diverse than it
    plain = run_sync(front.recommend(RecommendRequest(k=10, lam=0.0, **req), stages))
    assert [parts[1].index_of[i["id"]] for i in plain["items"]] == top_pop.tolist()
    assert plain["lam_source"] == "request" and plain["cold_start"]
    ild_top = float(ild_jaccard(torch.as_tensor(top_pop)[None], cats)[0])
    assert float(ild_jaccard(torch.tensor([picked]), cats)[0]) > ild_top, ild_top


def test_exclude_seen_false_may_show_history_items(parts, model_dir) -> None:
    """The request's `exclude_seen: false` reaches retrieval: history items can come back
    (they never do with the default true)."""
    front, stages = frontend(parts, model_dir)
    catalog, users = parts[1], parts[2]
    shown = {True: 0, False: 0}
    for user in list(users._histories)[:40]:
        seen = set(catalog.item_ids[users.get(user)].tolist())
        for exclude in (True, False):
            req = RecommendRequest(user_id=user, k=20, lam=0.0, exclude_seen=exclude)
            out = run_sync(front.recommend(req, stages))
            assert len(out["items"]) == 20
            shown[exclude] += len({item["id"] for item in out["items"]} & seen)
    assert shown[True] == 0 and shown[False] > 0, shown


def test_raising_lam_raises_ild(parts, model_dir) -> None:
    front, stages = frontend(parts, model_dir)
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
    app.add_middleware(BodyGuard)

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            async def chunks():
                for _ in range(5):
                    yield b"x" * 30

            json_body = {"content-type": "application/json"}
            return [
                await client.post("/", content=b'"' + b"x" * 98 + b'"', headers=json_body),
                await client.post("/", content=b"x" * 101, headers=json_body),
                # no content-length: streamed
                await client.post("/", content=chunks(), headers=json_body),
            ]

    ok, declared, streamed = run_sync(go())
    assert ok.status_code == 200 and ok.json() == {"n": 100}
    assert declared.status_code == 413 and "serve.max_body_bytes" in declared.json()["detail"]
    assert streamed.status_code == 413


def test_app_builder_and_serve_config_file(model_dir) -> None:
    with pytest.raises(ValueError, match="model_dir"):
        build_app(ServeConfig(), RerankConfig(), None)
    with pytest.raises(ValueError, match="'modeldir'"):
        app_builder({"modeldir": str(model_dir)})
    with pytest.raises(ValueError, match="max_k"):
        app_builder({"model_dir": str(model_dir), "serve": {"max_k": 500}})
    with pytest.raises(ValueError, match="rerank_method"):  # a rerank: field, not a serve: one
        app_builder({"model_dir": str(model_dir), "serve": {"rerank_method": "mmr"}})
    app = app_builder(
        {"model_dir": str(model_dir), "rerank": {"method": "mmr"}, "serve": {"max_k": 30}}
    )
    ingress = app._bound_deployment  # what `serve.run(app)` would deploy, without Ray
    handles, built_dir, cfg, rerank = ingress.init_args
    assert ingress.name == "Ingress" and built_dir == str(model_dir)
    assert cfg.max_k == 30 and rerank.method == "mmr"  # the args reach the deployments
    assert {name: h._bound_deployment.name for name, h in handles.items()} == {
        "retriever": "Retriever",
        "ranker": "Ranker",
    }  # no policy_dir: no Policy deployment
    for name, handle in handles.items():
        dep = handle._bound_deployment
        assert dep.init_args[:2] == (name, str(model_dir)) and dep.init_args[3].method == "mmr"
        assert dep.ray_actor_options["num_cpus"] > 0
    for field, value in (("port", 8001), ("host", "0.0.0.0"), ("route_prefix", "/x")):
        with pytest.raises(ValueError, match=f"serve.{field} would be ignored"):
            app_builder({"model_dir": str(model_dir), "serve": {field: value}})


@pytest.mark.parametrize("name", ["config.yaml", "config_composed.yaml"])
def test_serve_config_files_name_the_deployments_the_app_builds(model_dir, name) -> None:
    """Ray refuses a config file naming a deployment the app does not create (what
    `serve: {fused: true}` did to the one file there was): each file matches its own mode."""
    from ray.serve._private.build_app import build_app as ray_build_app
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve" / name).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app_cfg,) = schema.applications
    assert app_cfg.import_path == "serve.app:app_builder"
    assert raw["http_options"]["host"] == "127.0.0.1"  # loopback unless exposed on purpose
    replay = proxy_retry.controller_env(2, 2.0, 1.0)  # serve.proxy_retries etc., as jobs.serve
    assert raw["controller_options"]["runtime_env"]["env_vars"] == replay
    built = ray_build_app(app_builder({**app_cfg.args, "model_dir": str(model_dir)}), name="x")
    assert {d.name for d in app_cfg.deployments} == {d.name for d in built.deployments}
    fused = bool(app_cfg.args.get("serve", {}).get("fused"))
    assert fused == (len(built.deployments) == 1)
    assert fused == (name == "config.yaml")  # the default file deploys the fused app
    (ingress_cfg,) = [d for d in app_cfg.deployments if d.name == "Ingress"]
    assert ingress_cfg.max_queued_requests >= 1  # overload is shed (503), not queued
    assert ingress_cfg.backpressure_config.retry_after_s >= 1
    for dep in app_cfg.deployments:
        auto = dep.autoscaling_config
        assert auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"]
        assert dep.ray_actor_options.num_cpus > 0


def test_policy_chooses_lam_from_request_state(parts, model_dir, tmp_path) -> None:
    from rl.features import request_observation
    from rl.policy import LamPolicy
    from tests.serve_support import make_policy_dir

    policy_dir = make_policy_dir(tmp_path)
    front, stages = frontend(parts, model_dir, str(policy_dir))
    assert front.has_policy
    user = next(iter(parts[2]._histories))
    out = run_sync(front.recommend(RecommendRequest(user_id=user, k=10), stages))
    assert out["lam_source"] == "policy" and "policy" in out["timings_ms"]
    # the same lam by hand: retrieval -> ranking -> observation -> LamPolicy
    hist = parts[2].get(user)
    model, catalog, _ = parts
    got = QueryTower(model, catalog.behavior).retrieve([hist], [hist], 50)
    ranked = HeadScorer(model).score(got)[0]
    policy = LamPolicy.load(policy_dir)
    obs = request_observation(
        hist, parts[1].categories, ranked.diversity, ranked.scores, policy.env_cfg
    )
    assert out["lam"] == pytest.approx(float(policy.choose(obs[None])[0]))
    assert round(out["lam"] * 10) == pytest.approx(out["lam"] * 10)  # discrete lam grid
    given = run_sync(front.recommend(RecommendRequest(user_id=user, k=10, lam=0.25), stages))
    assert given["lam"] == 0.25 and given["lam_source"] == "request"


def test_stages_come_from_the_registry(parts, model_dir, tmp_path) -> None:
    """The fused app builds; the policy stage runs only with a policy_dir; adding it changes
    nothing else (a request with lam answers alike)."""
    from serve.stages import STAGES
    from tests.serve_support import make_policy_dir

    fused = build_app(ServeConfig(fused=True), RerankConfig(), str(model_dir))._bound_deployment
    assert fused.name == "Ingress" and fused.init_args[0] == {}  # no stage deployments
    front, local = frontend(parts, model_dir)
    _, with_policy = frontend(parts, model_dir, str(make_policy_dir(tmp_path)))
    assert local.names == {"retriever", "ranker"}
    assert with_policy.names == {stage.name for stage in STAGES} >= {"policy"}
    user = next(iter(parts[2]._histories))
    req = RecommendRequest(user_id=user, k=10, lam=0.5)
    a, b = (run_sync(front.recommend(req, st)) for st in (with_policy, local))
    assert a["items"] == b["items"]
    front.has_policy = True
    out = run_sync(front.recommend(RecommendRequest(user_id=user, k=10), with_policy))
    assert out["lam_source"] == "policy"
    with pytest.raises(RuntimeError, match="'policy' is not running"):
        run_sync(local.run("policy", parts[2].get(user), None))


def test_catalog_needs_request_behavior_in_meta(model_dir, tmp_path) -> None:
    """Serving learns the request events' behavior token from the prepared data's meta."""
    import json
    import shutil

    export = shutil.copytree(model_dir / "export", tmp_path / "export")
    meta = json.loads((export / "data_meta.json").read_text())
    assert Catalog.load(export).behavior == BEHAVIOR_TOKENS[meta["request_behavior"]]
    for bad in ({}, {"request_behavior": "clicked"}):
        rest = {k: v for k, v in meta.items() if k != "request_behavior"}
        (export / "data_meta.json").write_text(json.dumps({**rest, **bad}))
        with pytest.raises(ValueError, match=r"data_meta\.json.*request_behavior"):
            Catalog.load(export)


def test_deployment_options_limits_and_replica_switch() -> None:
    """serve.replicas pins every deployment's count; the queue limit and Retry-After reach
    Serve's options (what Serve answers 503 + Retry-After with when the queue is full)."""
    from serve.app import deployment_options
    from serve.config import DeploymentSpec

    spec = DeploymentSpec(max_ongoing_requests=3, max_queued_requests=5)
    auto = deployment_options(spec, "X", ServeConfig(retry_after_s=2.0))
    assert auto["max_ongoing_requests"] == 3 and auto["max_queued_requests"] == 5
    assert auto["backpressure_config"] == {"status_code": 503, "retry_after_s": 2.0}
    assert "autoscaling_config" in auto and "num_replicas" not in auto
    pinned = deployment_options(spec, "X", ServeConfig(replicas=2))
    assert pinned["num_replicas"] == 2 and "autoscaling_config" not in pinned
    with pytest.raises(ValueError, match="replicas"):
        ServeConfig(replicas=-1)
