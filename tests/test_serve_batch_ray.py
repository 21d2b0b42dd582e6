"""`@serve.batch` under concurrency (serve/app.py: StageDeployment): 32 distinct requests sent
at once through the deployed application each get their own answer, equal to the answer the
same request gets alone. Called through the ingress's deployment handle: no HTTP, no port.

That the concurrent requests really shared batches is read from Ray Serve's own metric
`serve_actual_batch_size` (a histogram per deployment), scraped from the node's metrics
endpoint: a test whose requests each ran alone would prove nothing about batching.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from rec.rerank import RerankConfig
from serve.app import build_app
from serve.catalog import Catalog
from serve.config import ServeConfig
from serve.schemas import RecommendRequest
from tests.serve_support import make_model_dir

pytestmark = pytest.mark.ray

APP = "rec_batch_test"
N = 32
BATCHED = ("Retriever", "Ranker")  # the stage deployments every known-history request reaches
METRICS_DEADLINE_S = 60  # Ray exports metrics every few seconds (RAY_metrics_report_interval_ms)


@pytest.fixture(scope="module")
def ingress(ray_local, tmp_path_factory):
    from ray import serve

    model_dir = make_model_dir(tmp_path_factory.mktemp("serve_batch"))
    # batches of up to 32, and a 50 ms window so that concurrent requests do share a batch
    cfg = ServeConfig(max_k=20, batch_max_size=N, batch_wait_s=0.05)
    app = build_app(cfg, RerankConfig(n_candidates=50), str(model_dir))
    serve.start(proxy_location="Disabled")
    handle = serve.run(app, name=APP, route_prefix=None)
    yield handle, Catalog.load(model_dir / "export").item_ids
    serve.delete(APP)
    serve.shutdown()


def requests(item_ids) -> list[RecommendRequest]:
    """32 distinct requests: different known histories (so every one runs the batched
    retriever and ranker, none is a cold start), lengths, k and lam."""
    n = len(item_ids) - 1  # row 0 is padding
    return [
        RecommendRequest(
            history=[int(item_ids[1 + (37 * i + 11 * j) % n]) for j in range(1 + i % 9)],
            k=5 + i % 10,
            lam=(i % 5) / 4,
        )
        for i in range(N)
    ]


_SAMPLE = re.compile(r"^ray_serve_actual_batch_size_(count|bucket)\{(.*)\} (\S+)$")


def batch_counts(ray) -> dict[str, tuple[float, float]]:
    """deployment -> (batches run, batches of one request) of this app, summed over replicas,
    from every node's Prometheus endpoint."""
    found: dict[str, list[float]] = {}
    for node in ray.nodes():
        text = httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10).text
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if not m or f'application="{APP}"' not in m[2]:
                continue
            deployment = re.search(r'deployment="([^"]+)"', m[2])[1]
            counts = found.setdefault(deployment, [0.0, 0.0])
            if m[1] == "count":
                counts[0] += float(m[3])
            elif 'le="1.0"' in m[2]:
                counts[1] += float(m[3])
    return {d: (c[0], c[1]) for d, c in found.items()}


def test_concurrent_requests_get_their_own_answers(ingress, ray_local) -> None:
    ingress, item_ids = ingress
    reqs = requests(item_ids)
    alone = [ingress.recommend.remote(r).result(timeout_s=60) for r in reqs]  # one at a time

    async def together() -> list[dict]:
        return await asyncio.gather(*(ingress.recommend.remote(r) for r in reqs))

    at_once = asyncio.run(together())
    for i, (a, b) in enumerate(zip(alone, at_once, strict=True)):
        assert len(b["items"]) == reqs[i].k and b["lam"] == reqs[i].lam, i
        assert not b["cold_start"] and not a["cold_start"], i
        # The same items in the same order; scores equal up to float32 batch arithmetic (a
        # row's logits may differ in the last bits with the batch's padding and shape).
        assert [x["id"] for x in b["items"]] == [x["id"] for x in a["items"]], i
        assert [x["score"] for x in b["items"]] == pytest.approx(
            [x["score"] for x in a["items"]], rel=1e-4, abs=1e-5
        )
    assert len({tuple(x["id"] for x in b["items"]) for b in at_once}) > N // 2  # distinct

    # The stages did batch: some batch held more than one request. Polled, as the metrics
    # reach the endpoint on Ray's export interval, not at once.
    deadline, counts = time.monotonic() + METRICS_DEADLINE_S, {}
    while time.monotonic() < deadline:
        counts = batch_counts(ray_local)
        if all(d in counts and counts[d][0] > counts[d][1] for d in BATCHED):
            break
        time.sleep(1)  # the next scrape; not synchronisation (the loop ends on the deadline)
    for d in BATCHED:
        batches, singles = counts.get(d, (0.0, 0.0))
        assert batches > singles, f"{d}: {batches} batches, {singles} of one request: {counts}"
