"""Serve autoscaling on a local Ray: under load the ranker's replicas rise within their bounds
and fall back to the minimum afterwards (small delays so the test runs in well under a minute).
The load goes through the ingress's deployment handle, so no HTTP port is needed (none to race
for); the ingress reaches the ranker through handles either way.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from rec.rerank import RerankConfig
from serve.app import build_app
from serve.catalog import Catalog
from serve.config import AutoscalingSpec, DeploymentSpec, ServeConfig
from serve.schemas import RecommendRequest
from tests.serve_support import make_model_dir

pytestmark = pytest.mark.ray

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
    cfg = ServeConfig(max_k=20, ranker=ranker)
    app = build_app(cfg, RerankConfig(n_candidates=50), str(model_dir))
    serve.start(proxy_location="Disabled")
    handle = serve.run(app, name=APP, route_prefix=None)
    yield Catalog.load(model_dir / "export"), handle
    serve.shutdown()


def ranker_replicas() -> int:
    from ray import serve

    dep = serve.status().applications[APP].deployments["Ranker"]
    return int(dep.replica_states.get("RUNNING", 0))


async def closed_loop(server, stop: threading.Event, concurrency: int) -> int:
    catalog, handle = server

    async def one(rng: np.random.Generator) -> int:
        done = 0
        while not stop.is_set():
            history = catalog.item_ids[rng.integers(1, catalog.n_items, 5)].tolist()
            out = await handle.recommend.remote(RecommendRequest(history=history, k=10))
            done += len(out["items"]) == 10
        return done

    rngs = [np.random.default_rng(i) for i in range(concurrency)]
    return sum(await asyncio.gather(*(one(r) for r in rngs)))


def test_ranker_scales_up_under_load_and_back_down(server) -> None:
    assert ranker_replicas() == MIN
    stop, served = threading.Event(), []
    thread = threading.Thread(
        target=lambda: served.append(asyncio.run(closed_loop(server, stop, 16)))
    )
    thread.start()
    seen, deadline = [], time.monotonic() + 60
    try:
        while time.monotonic() < deadline and max(seen, default=0) < MAX:
            seen.append(ranker_replicas())
            time.sleep(0.5)  # poll interval (the deadline bounds the wait)
    finally:
        stop.set()
        thread.join()
    assert max(seen) == MAX, seen  # rose to the bound
    assert served[0] > 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ranker_replicas() > MIN:
        seen.append(ranker_replicas())
        time.sleep(0.5)
    assert ranker_replicas() == MIN, seen  # fell back without load
    assert max(seen) <= MAX and min(seen) >= MIN
