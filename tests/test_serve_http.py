"""The Serve application over real HTTP on a local Ray: answers, bad input, fuzzing, overload,
replica loss.

One Serve instance (jobs.serve.run: tiny untrained model, an untrained RLlib lam policy, two
replicas of every deployment) serves every test of this module, on a port free at fixture time.
The in-process input tests (no Ray) are tests/test_serve_input.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

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
from tests.ports import free_port
from tests.serve_support import (
    Load,
    kill_and_wait_replaced,
    make_model_dir,
    make_policy_dir,
    prometheus_samples,
    replica_actor_names,
)
from tests.test_loopback import is_loopback, listeners

pytestmark = pytest.mark.ray

APP = "rec_http_test"
STAGES = ("Retriever", "Ranker", "Policy")
# Admission limits of the ingress (2 replicas), those of serve/config.yaml: 2 x 2 running + 16
# queued at the proxy; more concurrent requests get 503 + Retry-After at once (test_overload_*).
INGRESS_ONGOING, INGRESS_QUEUED = 2, 16
URL = ""  # set by the fixture (the port is chosen then)
MODEL_DIR = ""  # the fixture's model directory


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    global URL, MODEL_DIR
    port = free_port()
    model_dir = make_model_dir(tmp_path_factory.mktemp("serve_http"))
    MODEL_DIR = str(model_dir)
    policy_dir = make_policy_dir(tmp_path_factory.mktemp("serve_http_policy"))
    cfg = load_config(
        RunConfig,
        None,
        [
            f"model_dir={model_dir}",
            f"policy_dir={policy_dir}",
            f"serve.port={port}",
            f"serve.app_name={APP}",
            "rerank.n_candidates=50",
            "serve.max_k=20",
            "serve.max_history=30",
            "serve.max_body_bytes=4096",
            "serve.replicas=2",
            f"serve.ingress.max_ongoing_requests={INGRESS_ONGOING}",
            f"serve.ingress.max_queued_requests={INGRESS_QUEUED}",
            *(f"serve.{s.lower()}.num_cpus=0.125" for s in ("ingress", *STAGES)),
        ],
    )
    url = serve_job.run(cfg, block=False)
    assert url == f"http://127.0.0.1:{port}"
    URL = url
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
    # Every replica listens on loopback only: Ray's own bind of their gRPC server is [::]
    # (serve/ray_loopback.py).
    replicas = [row for row in listeners() if row["proc"].startswith("ray::ServeRep")]
    assert len(replicas) >= 8, replicas  # 8 replicas (4 deployments x 2), each listening
    assert all(is_loopback(row["ip"]) for row in replicas), replicas
    # Replicas log in the project's format (rec/logs.py) to their output, which Ray keeps in
    # its worker-*.out files (and forwards to a job's console); Serve's own per-request access
    # log is off (serve.access_log), so /items above left no line in Serve's replica logs.
    from ray._private.worker import _global_node

    logs = Path(_global_node.get_logs_dir_path())
    ours = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO \[serve\] (ingress|stage \w+) ready ")
    ready = {m[1] for f in logs.glob("worker-*.out") for m in map(ours.match, _lines(f)) if m}
    assert {"ingress", "stage retriever", "stage ranker", "stage policy"} <= ready, ready
    access = [line for f in logs.glob(f"serve/replica_{APP}_Ingress_*.log") for line in _lines(f)]
    assert access and not [line for line in access if "GET /items" in line], access[-5:]


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


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
        @settings(
            max_examples=25,
            deadline=None,
            derandomize=True,  # seeded: the same cases every run
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            resp = case.call_and_validate(base_url=URL, checks=[not_a_server_error], timeout=30)
            calls.append(resp.status_code)

        try:
            check()
        except Unsatisfiable:
            # No input of this operation can be invalid (GET /healthz, /docs): nothing to send.
            assert mode == "negative", op.label
    assert calls and max(calls) < 500


def test_overload_is_shed_with_503_and_retry_after(server) -> None:
    """Concurrency 64 against 2 ingress replicas x 2 running + 16 queued: the rest is 503 +
    Retry-After, nothing else, and the admitted requests' time inside the ingress stays near
    its unloaded value (the limits keep the replicas at their capacity).

    What is asserted is what holds on 2 shared cores with the 64 clients on them. Issue 15's
    target, the admitted requests' client-side p99 within 2x the unloaded p99, is printed, not
    asserted: measured 25-200x (bench/README.md "Serving under overload"), the time spent
    outside the ingress -- the proxy, Serve's router, and waiting for a CPU that 64 clients,
    the proxy and 8 replicas share: a bare uvicorn server with the same admission limit and
    no Ray measured 48x under the same load generator."""
    catalog, _ = server
    with Load(URL, catalog, workers=1) as alone:
        alone.wait_for(60)
    # A client told 503 + Retry-After: 1 comes back within a quarter of it (pressure stays on).
    with Load(URL, catalog, workers=64, backoff_s=0.25) as over:
        over.wait_for(300)
    assert alone.codes() == {200: len(alone.results)}
    unloaded = np.percentile([t for _, t, _ in alone.results], 99)
    admitted = [t for c, t, _ in over.results if c == 200]
    shed = [(t, retry) for c, t, retry in over.results if c == 503]
    inside = np.percentile(over.ingress_ms, 99), np.percentile(alone.ingress_ms, 99)
    print(
        f"[overload] {over.codes()} unloaded p99 {unloaded * 1e3:.0f} ms, admitted p99 "
        f"{np.percentile(admitted, 99) * 1e3:.0f} ms ({np.percentile(admitted, 99) / unloaded:.0f}x)"
        f", 503 p50 {np.median([t for t, _ in shed]) * 1e3:.0f} ms; inside the ingress p99 "
        f"{inside[0]:.0f} ms loaded vs {inside[1]:.0f} ms unloaded"
    )
    assert set(over.codes()) == {200, 503}  # shed (no queue limit: no 503), no 500, no timeout
    assert len(shed) > len(admitted)  # most of a 64-client overload is refused, not queued
    assert {retry for _, retry in shed} == {"1"}  # serve.retry_after_s
    assert len(admitted) >= 30  # and the server kept serving
    # Without the limits all 64 would run in the ingress at once, each waiting on the others'
    # stage calls (~20x); with them, at most 2 per replica do. Measured 1.2-3x for the fused
    # app (bench/README.md); 8x leaves room for the stage hops and other work on 2 cores.
    assert inside[0] <= 8 * inside[1], inside


def test_one_replica_of_every_deployment_killed_loses_no_request(server) -> None:
    """Two replicas per deployment, one of each killed: a stage call that hit a killed replica
    is retried on the other one by the ingress; a request in flight on the killed ingress
    replica is replayed by the HTTP proxy (serve/proxy_retry.py; Ray alone answers it 500).
    2 clients: what the one Ingress replica left takes with room (2 running + 16 queued):
    measured {200: 482} (2 queued), {200: 560} (16). With 2 queued, 4 clients resending at
    once measured {200: 583, 503: 588}, 3 {200: 512, 503: 25}: refused by that limit (Ray's
    router also refuses some requests below it when they arrive together), never 500."""
    catalog, _ = server
    victims = {dep: replica_actor_names(APP, dep)[:1] for dep in ("Ingress", *STAGES)}
    assert all(victims.values()), victims
    with Load(URL, catalog, workers=2, backoff_s=0.0) as load:
        load.wait_for(40)
        recovery = kill_and_wait_replaced(APP, victims)
        load.wait_for(40)  # answers served by the replacements too
    print(f"[replica kill] {load.codes()} during the kill, replaced in {recovery:.1f} s")
    codes = load.codes()
    # Measured (session 8, 2 clients, Ingress killed too): {200: 482}; stages only, 4 clients
    # (session 7): 1-2 % 503. Never a 500 (before: 500s, and this test accepted half the
    # requests failing). 503 + Retry-After when a call's retries run out.
    assert set(codes) <= {200, 503} and codes.get(503, 0) <= 0.02 * len(load.results), codes
    assert all(retry == "1" for c, _, retry in load.results if c == 503)


def test_every_replica_of_a_stage_killed_is_503_never_500(server) -> None:
    """Both Ranker and both Ingress replicas gone (what one replica's loss is with
    serve.replicas=1): requests are 503 + Retry-After (or wait for the replacement and
    succeed), never 500."""
    catalog, _ = server
    with Load(URL, catalog, workers=4, backoff_s=0.0) as load:
        load.wait_for(40)
        victims = {dep: replica_actor_names(APP, dep) for dep in ("Ingress", "Ranker")}
        recovery = kill_and_wait_replaced(APP, victims)
        deadline = time.monotonic() + 60  # recovered: 20 answers in a row are 200
        while [c for c, _, _ in load.results[-20:]] != [200] * 20:
            assert time.monotonic() < deadline, load.codes()
            load.wait_for(1)
    print(f"[all Ingress, Ranker replicas killed] {load.codes()}, replaced in {recovery:.1f} s")
    assert set(load.codes()) <= {200, 503}, load.codes()
    assert all(retry == "1" for c, _, retry in load.results if c == 503)


def wait_until_running(serve_cli: Path, name: str, timeout_s: float = 120.0) -> None:
    """Poll `serve status --name` until the application is RUNNING (`serve deploy` returns once
    the request is sent); any state but the ones on the way there fails at once."""
    import subprocess

    import yaml

    deadline = time.monotonic() + timeout_s
    while True:
        status = subprocess.run(
            [serve_cli, "status", "--name", name], capture_output=True, text=True
        )
        state = yaml.safe_load(status.stdout or "{}") or {}
        if state.get("status") == "RUNNING":
            return
        assert state.get("status") in (None, "NOT_STARTED", "DEPLOYING"), status.stdout
        assert time.monotonic() < deadline, status.stdout
        time.sleep(1)


def test_serve_build_file_deploys_fused_with_app_metrics(server, ray_local, tmp_path) -> None:
    """`serve build serve.app:app` (fused, from $RAYDIV_APP_ARGS) writes a config file that
    `serve deploy` (Ray's CLI, through the session Ray's dashboard) deploys beside the fixture's
    app; `serve status` reports it RUNNING; its metrics reach Prometheus."""
    import json
    import os
    import subprocess
    import sys

    import yaml
    from ray import serve

    catalog, _ = server
    args = {"model_dir": MODEL_DIR, "serve": {"fused": True, "max_k": 20}}
    args["rerank"] = {"n_candidates": 50}
    env = {**os.environ, "RAYDIV_APP_ARGS": json.dumps(args)}
    out = tmp_path / "built.yaml"
    serve_cli = Path(sys.executable).with_name("serve")
    build = [serve_cli, "build", "serve.app:app", "-o", out]
    subprocess.run(build, env=env, cwd=Path(__file__).parents[1], check=True, timeout=120)
    raw = yaml.safe_load(out.read_text())
    (app_cfg,) = raw["applications"]
    assert app_cfg["import_path"] == "serve.app:app"
    assert [d["name"] for d in app_cfg["deployments"]] == ["Ingress"]  # fused: one deployment
    app_cfg.update(name="built", route_prefix="/built")
    app_cfg["runtime_env"] = {"env_vars": {"RAYDIV_APP_ARGS": env["RAYDIV_APP_ARGS"]}}
    app_cfg["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.125
    out.write_text(yaml.safe_dump(raw))
    # The dashboard's address: RAY_DASHBOARD_ADDRESS, set by the session's Ray (conftest).
    subprocess.run([serve_cli, "deploy", out], check=True, timeout=120)
    try:
        wait_until_running(serve_cli, "built")
        known = catalog.item_ids[1:6].tolist()
        for body in ({"history": known, "k": 5}, {"history": [], "k": 5}):
            resp = httpx.post(f"{URL}/built/recommend", json=body, timeout=30)
            assert resp.status_code == 200, resp.text
        assert resp.json()["lam_source"] == "cold_start"
        deadline = time.monotonic() + 30  # Ray exports metrics every few seconds
        while True:
            counts = prometheus_samples(ray_local, "ray_recommender_requests_total", "built")
            latency = prometheus_samples(
                ray_local, "ray_recommender_stage_latency_ms_count", "built"
            )
            sources = {re.search(r'lam_source="(\w+)"', t)[1]: v for t, v in counts.items()}
            stages = {re.search(r'stage="(\w+)"', t)[1] for t in latency}
            if sources == {"default": 1.0, "cold_start": 1.0} and {"retrieve", "total"} <= stages:
                break
            assert time.monotonic() < deadline, (sources, stages)
            time.sleep(0.5)
    finally:
        serve.delete("built")
