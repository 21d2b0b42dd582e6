"""The Serve application over real HTTP on a local Ray: answers, bad input, fuzzing, failures.

One Serve instance (jobs.serve.run: tiny untrained model and an untrained RLlib lam policy)
serves every test of this module.
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from jobs import serve as serve_job
from jobs.config import RunConfig
from rec.config_loader import load_config
from rec.metrics import ild_jaccard
from serve.catalog import Catalog, UserHistories
from tests.serve_support import make_model_dir, make_policy_dir

pytestmark = pytest.mark.ray

PORT = 8127
URL = f"http://127.0.0.1:{PORT}"
APP = "rec_http_test"


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    model_dir = make_model_dir(tmp_path_factory.mktemp("serve_http"))
    policy_dir = make_policy_dir(tmp_path_factory.mktemp("serve_http_policy"))
    cfg = load_config(
        RunConfig,
        None,
        [
            f"model_dir={model_dir}",
            f"policy_dir={policy_dir}",
            f"serve.port={PORT}",
            f"serve.app_name={APP}",
            "rerank.n_candidates=50",
            "serve.max_k=20",
            "serve.max_history=30",
            "serve.max_body_bytes=4096",
        ],
    )
    assert serve_job.run(cfg, block=False) == URL
    catalog = Catalog.load(model_dir / "export")
    users = UserHistories.load(model_dir / "data", 20)
    yield catalog, users
    serve.shutdown()


def post(body, **kw) -> httpx.Response:
    return httpx.post(f"{URL}/recommend", json=body, timeout=30, **kw)


def test_health_docs_items(server) -> None:
    catalog, users = server
    health = httpx.get(f"{URL}/healthz", timeout=10).json()
    assert health == {
        "status": "ok",
        "n_items": catalog.n_items,
        "n_users": len(users),
        "policy": True,
        "rerank": "dpp/embedding",
    }
    assert httpx.get(f"{URL}/docs", timeout=10).status_code == 200
    assert "/recommend" in httpx.get(f"{URL}/openapi.json", timeout=10).json()["paths"]
    raw = int(catalog.item_ids[5])
    item = httpx.get(f"{URL}/items/{raw}", timeout=10).json()
    assert item["index"] == 5 and item["id"] == raw
    assert httpx.get(f"{URL}/items/-42", timeout=10).status_code == 404
    assert httpx.get(f"{URL}/items/abc", timeout=10).status_code == 422


def test_k_distinct_items_not_in_history(server) -> None:
    catalog, users = server
    user = next(iter(users._histories))
    extra = catalog.item_ids[[2, 9, 14]].tolist()
    resp = post({"user_id": user, "history": extra, "k": 12})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ids = [item["id"] for item in body["items"]]
    seen = set(catalog.item_ids[users.get(user)].tolist()) | set(extra)
    assert len(ids) == 12 == len(set(ids)) and not set(ids) & seen
    assert body["lam_source"] == "policy" and not body["cold_start"]
    assert 0.0 <= body["lam"] <= 1.0 and body["timings_ms"]["policy"] > 0
    assert body["timings_ms"]["total"] > 0 and body["timings_ms"]["retrieve_compute"] > 0
    cold = post({"history": [], "k": 5}).json()
    assert cold["cold_start"] and len(cold["items"]) == 5 and cold["lam_source"] == "cold_start"


def test_raising_lam_raises_ild_over_http(server) -> None:
    catalog, users = server
    cats = torch.as_tensor(catalog.categories)
    ild = {}
    for lam in (0.0, 0.9):
        lists = []
        for user in list(users._histories)[:25]:
            body = post({"user_id": user, "k": 10, "lam": lam}).json()
            assert body["lam"] == lam and body["lam_source"] == "request"
            lists.append([catalog.index_of[item["id"]] for item in body["items"]])
        ild[lam] = float(ild_jaccard(torch.tensor(lists), cats).mean())
    assert ild[0.9] > ild[0.0], ild


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"k": "10"}, "k"),
        ({"k": 2.5}, "k"),
        ({"k": 0}, "k"),
        ({"k": -3}, "k"),
        ({"k": 21}, "k"),  # above serve.max_k = 20
        ({"lam": -0.1}, "lam"),
        ({"lam": 1.5}, "lam"),
        ({"lam": "high"}, "lam"),
        ({"history": "1,2,3"}, "history"),
        ({"history": [1, "x"]}, "history"),
        ({"user_id": "alice"}, "user_id"),
        ({"exclude_seen": "yes"}, "exclude_seen"),
        ({"kk": 3}, "kk"),
        ([1, 2], "body"),
    ],
)
def test_bad_input_is_422_naming_the_field(server, body, field) -> None:
    resp = post(body)
    assert resp.status_code == 422, resp.text
    locs = [err["loc"] for err in resp.json()["detail"]]
    assert any(field in loc for loc in locs), locs


def test_malformed_json_oversized_and_long_history(server) -> None:
    catalog, _ = server
    bad = httpx.post(
        f"{URL}/recommend",
        content=b'{"k": 3,',
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert bad.status_code == 422 and "json" in bad.text.lower()
    huge = post({"history": [1] * 5000})  # ~15 kB > serve.max_body_bytes = 4096
    assert huge.status_code == 413 and "max_body_bytes" in huge.json()["detail"]
    known = catalog.item_ids[1:61].tolist()  # 60 items > serve.max_history = 30
    body = post({"history": [*known, 10**12], "k": 5}).json()
    assert body["history_truncated"] and body["history_used"] == 30
    assert body["unknown_items"] == [10**12]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_5xx(server, mode) -> None:
    """Every operation of /openapi.json, valid (positive) and invalid (negative) inputs."""
    schema = schemathesis.openapi.from_url(f"{URL}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /recommend", "GET /items/{item_id}"}
    calls = []
    for op in operations:

        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            resp = case.call_and_validate(base_url=URL, checks=[not_a_server_error], timeout=30)
            calls.append(resp.status_code)

        try:
            check()
        except Unsatisfiable:
            # No input of this operation can be invalid (GET /healthz, /docs): nothing to send.
            assert mode == "negative", op.label
    assert calls and max(calls) < 500


def replica_actor_names(deployment: str) -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"{APP}#{deployment}#" in a["name"]
    )


def running_replicas(deployment: str) -> int:
    from ray import serve

    dep = serve.status().applications[APP].deployments[deployment]
    return int(dep.replica_states.get("RUNNING", 0))


def test_killed_replica_is_replaced_during_load(server) -> None:
    import ray

    catalog, _ = server
    (victim,) = replica_actor_names("Ranker")
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                history = catalog.item_ids[np.random.randint(1, catalog.n_items, 5)].tolist()
                try:
                    code = client.post(f"{URL}/recommend", json={"history": history}).status_code
                except httpx.HTTPError:
                    code = -1
                results.append(code)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        names = replica_actor_names("Ranker")
        if names and names != [victim] and running_replicas("Ranker") >= 1:
            break
        time.sleep(0.5)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    errors = sum(code != 200 for code in results)
    print(f"[replica kill] {len(results)} requests during the kill, {errors} errors")
    assert victim not in replica_actor_names("Ranker") and running_replicas("Ranker") == 1
    assert results[-20:] == [200] * 20  # recovered: the last requests all succeed
    assert errors < len(results) / 2
