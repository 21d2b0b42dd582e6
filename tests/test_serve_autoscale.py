"""Serve autoscaling on a local Ray: under load the ranker's replicas rise within their bounds
and fall back to the minimum afterwards (small delays so the test runs in well under a minute).
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from rec.rerank import RerankConfig
from serve.app import build_app
from serve.catalog import Catalog
from serve.config import AutoscalingSpec, DeploymentSpec, ServeConfig
from tests.serve_support import make_model_dir

pytestmark = pytest.mark.ray

PORT = 8128
URL = f"http://127.0.0.1:{PORT}"
APP = "rec_autoscale_test"
MIN, MAX = 1, 2


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    model_dir = make_model_dir(tmp_path_factory.mktemp("serve_autoscale"))
    ranker = DeploymentSpec(
        num_cpus=0.25,
        autoscaling=AutoscalingSpec(
            min_replicas=MIN,
            max_replicas=MAX,
            # The ranker answers in ~1 ms, so even heavy load keeps well under one request in
            # flight per replica: a low target is what makes it scale here.
            target_ongoing_requests=0.1,
            upscale_delay_s=1.0,
            downscale_delay_s=3.0,
            look_back_period_s=2.0,
        ),
    )
    cfg = ServeConfig(port=PORT, max_k=20, ranker=ranker)
    app = build_app(cfg, RerankConfig(n_candidates=50), str(model_dir))
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(app, name=APP, route_prefix="/")
    yield Catalog.load(model_dir / "export")
    serve.shutdown()


def ranker_replicas() -> int:
    from ray import serve

    dep = serve.status().applications[APP].deployments["Ranker"]
    return int(dep.replica_states.get("RUNNING", 0))


async def closed_loop(catalog: Catalog, stop: threading.Event, concurrency: int) -> int:
    async def one(client: httpx.AsyncClient, rng: np.random.Generator) -> int:
        done = 0
        while not stop.is_set():
            history = catalog.item_ids[rng.integers(1, catalog.n_items, 5)].tolist()
            resp = await client.post(f"{URL}/recommend", json={"history": history, "k": 10})
            done += resp.status_code == 200
        return done

    async with httpx.AsyncClient(timeout=30) as client:
        rngs = [np.random.default_rng(i) for i in range(concurrency)]
        return sum(await asyncio.gather(*(one(client, r) for r in rngs)))


def test_ranker_scales_up_under_load_and_back_down(server) -> None:
    assert ranker_replicas() == MIN
    stop, served = threading.Event(), []
    thread = threading.Thread(
        target=lambda: served.append(asyncio.run(closed_loop(server, stop, 16)))
    )
    thread.start()
    seen, deadline = [], time.time() + 60
    try:
        while time.time() < deadline and max(seen, default=0) < MAX:
            seen.append(ranker_replicas())
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert max(seen) == MAX, seen  # rose to the bound
    assert served[0] > 0
    deadline = time.time() + 60
    while time.time() < deadline and ranker_replicas() > MIN:
        seen.append(ranker_replicas())
        time.sleep(0.5)
    assert ranker_replicas() == MIN, seen  # fell back without load
    assert max(seen) <= MAX and min(seen) >= MIN
