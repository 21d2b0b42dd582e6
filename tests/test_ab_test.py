"""A/B through the endpoint (rl/online.py, jobs/ab_test.py): simulated users fed by the
recommender's own request path agree with the offline evaluation episode by episode.

In-process (no Ray): the same Frontend + stages the fused Serve app runs, called directly.
Over HTTP (one Ray test): jobs.serve + jobs.ab_test end to end, with the served policy arm.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rec.rerank import RerankConfig
from rl.arms import fixed, play
from rl.calibrate import load_prepared
from rl.config import EnvConfig
from rl.online import ABConfig, Endpoint, ab_test, play_online, served_world, table
from rl.world import WorldConfig, build_world, load_world, save_world
from serve.catalog import UserHistories
from serve.config import ServeConfig
from serve.engine import Ranked
from serve.frontend import Frontend, LocalStages, RequestError, run_sync
from serve.policy import PolicyScorer, session_record
from serve.schemas import RecommendRequest
from serve.stages import StageContext
from tests.serve_support import make_model_dir, make_policy_dir

N = 30  # env pool = the endpoint's retrieval top-N (rerank.n_candidates): the exact setting
ENV = EnvConfig(user_model="session", k=5, n_candidates=N, max_steps=8)
ENV.session.popularity_weight = 0.5  # the session user's popularity term is exercised too
SEED = 10_000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model directory, its simulator world (saved) and each world user's history."""
    model_dir = make_model_dir(tmp_path_factory.mktemp("ab_model"))
    world = build_world(model_dir, WorldConfig(n_users=40, n_candidates=40, history_len=10))
    path = save_world(world, tmp_path_factory.mktemp("ab_world") / "world.npz")
    data = load_world(path, ENV.types)
    events = np.concatenate(load_prepared(model_dir / "data").items)
    counts = np.log1p(np.bincount(events, minlength=data.n_items + 1))
    data.item_popularity = (counts - counts.mean()) / counts.std()  # (n_items + 1,)
    items = load_prepared(model_dir / "data").items
    histories = [items[r][:-1] for r in world.users.tolist()]
    return model_dir, path, data, histories


class InProcess:
    """The endpoint's request path without HTTP or Ray: Frontend + LocalStages (what the
    fused app runs in its ingress), the body validated by the same pydantic schema."""

    def __init__(self, model_dir, policy_dir=None) -> None:
        cfg, rerank = ServeConfig(max_k=N, max_history=50), RerankConfig(n_candidates=N)
        ctx = StageContext(model_dir, cfg, rerank, policy_dir)
        self.stages = LocalStages(ctx)
        vectors = ctx.model.item_table().numpy()
        self.front = Frontend(
            cfg, rerank, ctx.catalog, UserHistories({}), vectors, policy_dir is not None
        )
        self.catalog, self.item_ids, self.requests = ctx.catalog, ctx.catalog.item_ids, 0

    def recommend(self, body: dict) -> dict:
        self.requests += 1
        return run_sync(self.front.recommend(RecommendRequest(**body), self.stages))


def test_online_episodes_equal_offline_ones_in_process(tiny) -> None:
    model_dir, _, data, histories = tiny
    endpoint = InProcess(model_dir)
    users = np.arange(10, 30)
    served = served_world(data, endpoint, histories, endpoint.item_ids, users, N)
    # The world's own ranker view (logged tokens, raw interest logit) is not the served one.
    assert not np.array_equal(
        np.sort(served.candidates[users]), np.sort(data.candidates[users, :N])
    )
    for lam in (0.0, 0.4, 1.0):
        on = play_online(served, ENV, users, endpoint, histories, endpoint.item_ids, lam, 30, SEED)
        off = play(served, ENV, users, fixed(lam), 30, SEED)
        assert np.array_equal(on.users, off.users)
        np.testing.assert_allclose(on.returns, off.returns, atol=1e-9)
        np.testing.assert_allclose(on.lengths, off.lengths)
        np.testing.assert_allclose(on.ild, off.ild, atol=1e-12)
    assert on.lengths.max() > N // ENV.k  # some session outlived the pool: recycling is covered
    report = ab_test(
        served, ENV, users, endpoint, histories, endpoint.item_ids,
        ABConfig(lams=[0.5], policy=False, boots=100), 20, SEED,
    )  # fmt: skip
    row = report["arms"]["lam=0.5"]
    assert table(report).splitlines()[1].startswith("lam=0.5")
    assert row["identical_episodes"] == 1.0 and row["cis_overlap"]
    lo, hi = row["online"]["ild"]["ci95"]
    assert lo <= row["online"]["ild"]["mean"] <= hi


def test_served_policy_plays_the_offline_policy_episodes_in_process(tiny, tmp_path) -> None:
    """The served policy replays each request's session into the env's observation: online and
    offline choose the same lam at every slate, so the episodes are identical (with a
    start-of-session observation they were not)."""
    from rec import artifacts
    from rl.policy import LamPolicy, write_policy_meta

    model_dir, _, data, histories = tiny
    policy_dir = make_policy_dir(tmp_path / "policy", seed=3)
    write_policy_meta(policy_dir, ENV, {"algorithm": "untrained (test)"})
    artifacts.write_manifest(policy_dir, kind="policy", producer="tests", config={})
    endpoint = InProcess(model_dir, policy_dir)
    users = np.arange(10, 30)
    served = served_world(data, endpoint, histories, endpoint.item_ids, users, N)
    arm = LamPolicy.load(policy_dir).arm()
    on = play_online(served, ENV, users, endpoint, histories, endpoint.item_ids, None, 30, SEED)
    off = play(served, ENV, users, arm, 30, SEED)
    np.testing.assert_array_equal(on.users, off.users)
    np.testing.assert_allclose(on.returns, off.returns, atol=1e-9)
    np.testing.assert_allclose(on.lam, off.lam, atol=1e-6)  # the env reports float32 lam
    assert np.unique(np.round(on.lam, 3)).size > 3  # the policy's lam moves with the state
    types = PolicyScorer(make_policy_dir(tmp_path / "types"), data.item_categories)
    body = RecommendRequest(session=[{"items": [int(endpoint.item_ids[1])], "lam": 0.2}])
    ranked = Ranked(np.zeros(N, np.float32), np.zeros(N, np.float32), 0.5)
    with pytest.raises(RequestError, match="session"):  # its satiation is hidden per user
        types.choose(
            [histories[0]], [ranked], None, [session_record(endpoint.catalog, body.session)]
        )


@pytest.mark.parametrize(
    "slate, where",
    [
        ({"items": [1, 2], "clicked": [3], "lam": 0.5}, ("session", 0, "clicked")),
        ({"items": [1, 1], "lam": 0.5}, ("session", 0, "items")),
        ({"items": [1, 2], "clicked": [2, 2], "lam": 0.5}, ("session", 0, "clicked")),
        ({"items": [1, 2], "lam": 1.5}, ("session", 0, "lam")),
        ({"items": [], "lam": 0.5}, ("session", 0, "items")),
        ({"items": [1], "lam": 0.5, "clicks": [1]}, ("session", 0, "clicks")),
    ],
)
def test_a_bad_session_is_refused_naming_the_field(slate, where) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        RecommendRequest(history=[1], session=[slate])
    assert [e["loc"] for e in err.value.errors()] == [where]
    with pytest.raises(ValidationError, match="session"):  # bounded: MAX_SESSION_SLATES
        RecommendRequest(session=[{"items": [1], "lam": 0.0}] * 201)


def test_session_clicks_enter_the_history_and_shown_items_never_repeat(tiny) -> None:
    model_dir, _, data, histories = tiny
    endpoint = InProcess(model_dir)
    seen: list[dict] = []
    record = endpoint.recommend
    endpoint.recommend = lambda body: seen.append(body) or record(body)
    users = np.arange(5)
    served = served_world(data, endpoint, histories, endpoint.item_ids, users, N)
    seen.clear()
    play_online(
        served, ENV, users, endpoint, histories, endpoint.item_ids, 0.3, 6, 0,
        clicks_in_history=True,
    )  # fmt: skip
    grew = [b for b in seen if b["shown"] and len(b["history"]) > 0]
    assert grew and any(len(b["history"]) > len(seen[0]["history"]) for b in seen)
    for body in seen:
        answer = record(body)
        assert not {it["id"] for it in answer["items"]} & set(body["shown"])


def test_ab_config_rejects_bad_values() -> None:
    for kw in ({"lams": [1.5]}, {"lams": [], "policy": False}, {"episodes": 1}, {"boots": 3}):
        with pytest.raises(ValueError, match="ab"):
            ABConfig(**kw)


def test_endpoint_retries_503_after_retry_after() -> None:
    answers = [(503, b'{"detail": "busy"}'), (200, b'{"items": []}')]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            code, body = answers.pop(0)
            self.send_response(code)
            self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert Endpoint(url).recommend({"k": 1}) == {"items": []} and not answers
        answers[:] = [(422, b'{"detail": "k"}')]
        with pytest.raises(RuntimeError, match="422"):
            Endpoint(url).recommend({"k": 1})
    finally:
        server.shutdown()


@pytest.mark.ray
def test_ab_test_job_against_jobs_serve(ray_local, tiny, tmp_path) -> None:
    """jobs.serve (fused, with an untrained policy) + jobs.ab_test: every arm, the served
    policy's included, online equals offline episode by episode."""
    from ray import serve

    from jobs import ab_test as ab_job
    from jobs import serve as serve_job
    from jobs.config import RunConfig
    from rec import artifacts
    from rec.config_loader import load_config
    from rl.policy import write_policy_meta
    from tests.ports import free_port

    model_dir, world_path, _, _ = tiny
    policy_dir = make_policy_dir(tmp_path / "policy")
    write_policy_meta(policy_dir, ENV, {"algorithm": "untrained (test)"})
    (policy_dir / "world.npz").write_bytes(world_path.read_bytes())
    artifacts.write_manifest(policy_dir, kind="policy", producer="tests", config={})
    port = free_port()
    overrides = [
        f"model_dir={model_dir}",
        f"policy_dir={policy_dir}",
        f"output_dir={tmp_path / 'ab'}",
        f"serve.port={port}",
        "serve.app_name=ab_test",
        "serve.fused=true",
        f"rerank.n_candidates={N}",
        f"serve.max_k={N}",
        "serve.ingress.num_cpus=0.25",
        "policy.eval_fraction=0.5",
        "ab.episodes=24",
        "ab.lams=[0.0,0.6]",
        "ab.boots=200",
    ]
    cfg = load_config(RunConfig, None, overrides)
    serve_job.run(cfg, block=False)
    try:
        report = ab_job.run(cfg)
    finally:
        serve.shutdown()
    assert json.loads((tmp_path / "ab" / "ab_test.json").read_text())["arms"] == report["arms"]
    assert set(report["arms"]) == {"lam=0", "lam=0.6", "policy"}
    # The policy arm too: the served policy replays each request's session (rl/features.py).
    for name in ("lam=0", "lam=0.6", "policy"):
        assert report["arms"][name]["identical_episodes"] == 1.0, name
