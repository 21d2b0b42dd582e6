"""Serving from object storage without Ray: model, data and policy read from s3:// URIs on a
real S3 server (tests/s3_server.py), copied once into a node-local cache, then loaded.

The Ray side (replicas on another node reading the same URIs) is tests/test_two_node.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rec import storage
from rec.rerank import RerankConfig
from serve import cache
from serve.app import build_app, resolve_dir
from serve.catalog import Catalog, UserHistories
from serve.config import ServeConfig
from serve.frontend import Frontend, LocalStages, run_sync
from serve.schemas import RecommendRequest
from serve.stages import StageContext
from tests.serve_support import make_model_dir, make_policy_dir

pytest_plugins = ["tests.s3_server"]


@pytest.fixture(scope="module")
def local_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serve_s3")
    return make_model_dir(root / "model"), make_policy_dir(root / "policy")


@pytest.fixture
def on_s3(s3, local_dirs, tmp_path, monkeypatch) -> tuple[str, str, Path]:
    """(model_dir URI, policy_dir URI, this test's cache root), uploaded to a fresh bucket."""
    model, policy = local_dirs
    model_uri, policy_uri = storage.join(s3.uri, "run", "model"), storage.join(s3.uri, "policy")
    storage.upload_dir(model, model_uri)
    storage.upload_dir(policy, policy_uri)
    monkeypatch.setattr(cache, "CACHE_ROOT", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)  # a stray relative folder (e.g. "s3:") would land here
    return model_uri, policy_uri, tmp_path / "cache"


def _front(ctx: StageContext, model_dir: str) -> tuple[Frontend, LocalStages]:
    users = UserHistories.from_split(cache.test_split(model_dir), ctx.model.cfg.max_len)
    vectors = ctx.model.item_table().detach().numpy()
    stages = LocalStages(ctx)
    front = Frontend(ctx.cfg, ctx.rerank, ctx.catalog, users, vectors, "policy" in stages.names)
    return front, stages


def test_stages_serve_the_same_answers_from_s3_as_from_local(on_s3, local_dirs) -> None:
    model_uri, policy_uri, cache_root = on_s3
    cfg, rerank = ServeConfig(max_k=20), RerankConfig(n_candidates=50)
    torch.set_num_threads(1)
    remote = StageContext(model_uri, cfg, rerank, policy_uri)
    local = StageContext(str(local_dirs[0]), cfg, rerank, str(local_dirs[1]))
    assert remote.export_dir.is_relative_to(cache_root)
    assert local.export_dir == local_dirs[0] / "export"  # local paths are read in place
    answers = []
    for ctx, model_dir in ((remote, model_uri), (local, str(local_dirs[0]))):
        front, stages = _front(ctx, model_dir)
        assert front.has_policy and len(front.users) > 100
        user = min(front.users._histories)
        answers.append(run_sync(front.recommend(RecommendRequest(user_id=user, k=10), stages)))
    strip = [{k: v for k, v in a.items() if k != "timings_ms"} for a in answers]
    assert strip[0] == strip[1]
    # export, test split and policy: one folder each, no partial copy left behind
    copies = sorted(p.name.split("-")[0] for p in cache_root.iterdir() if p.is_dir())
    assert copies == ["export", "policy", "test"], copies
    assert not [p for p in cache_root.iterdir() if p.name.startswith(".tmp-")]
    assert not list(Path.cwd().glob("s3*"))


def test_a_second_replica_on_the_node_reuses_the_copy(on_s3, local_dirs) -> None:
    model_uri, _, cache_root = on_s3
    cfg, rerank = ServeConfig(), RerankConfig()
    first = StageContext(model_uri, cfg, rerank).export_dir
    stamp = (first / "model_config.json").stat().st_mtime_ns
    second = StageContext(model_uri, cfg, rerank).export_dir
    assert second == first and (second / "model_config.json").stat().st_mtime_ns == stamp
    assert Catalog.load(second).n_items == Catalog.load(local_dirs[0] / "export").n_items


def test_build_app_checks_uris_without_making_local_paths(on_s3) -> None:
    model_uri, policy_uri, cache_root = on_s3
    assert resolve_dir(model_uri) == model_uri
    assert resolve_dir("outputs/x").endswith(os.path.join("outputs", "x"))
    build_app(ServeConfig(), RerankConfig(), model_uri, policy_uri)  # binds; nothing copied
    assert not cache_root.exists()
    with pytest.raises(ValueError, match="looks like a URI whose '//' was lost"):
        build_app(ServeConfig(), RerankConfig(), "s3:/bucket/run/model")
    with pytest.raises(ValueError, match="has no export/model_config.json"):
        build_app(ServeConfig(), RerankConfig(), storage.join(model_uri, "nope"))
    with pytest.raises(ValueError, match="policy_dir .* does not exist"):
        build_app(ServeConfig(), RerankConfig(), model_uri, storage.join(policy_uri, "nope"))
    assert not list(Path.cwd().glob("s3*"))


def test_a_missing_bucket_is_one_line_naming_it(on_s3) -> None:
    bad = "s3://no-such-bucket-raydiv/run/model"
    with pytest.raises(ValueError) as err:
        build_app(ServeConfig(), RerankConfig(), bad)
    text = str(err.value)
    assert "no-such-bucket-raydiv" in text and "does not exist" in text and "\n" not in text


def test_deployment_resources_reach_ray_actor_options() -> None:
    from serve.app import deployment_options
    from serve.config import DeploymentSpec

    spec = DeploymentSpec(num_cpus=0.5, resources={"worker_node": 0.01})
    assert deployment_options(spec)["ray_actor_options"] == {
        "num_cpus": 0.5,
        "resources": {"worker_node": 0.01},
    }
    assert deployment_options(DeploymentSpec())["ray_actor_options"] == {"num_cpus": 0.25}
