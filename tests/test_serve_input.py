"""No 5xx on any input: the ingress's FastAPI app in-process (stages local, no Ray).

The real `serve.app.api` (its routes, middleware and schemas) with its state built from a tiny
model as an ingress replica builds it (`serve.app.attach`), driven through Starlette's
TestClient. Each hostile body gets a 4xx whose text names the problem.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from rec.rerank import RerankConfig
from serve import app as app_module
from serve.config import ServeConfig
from serve.frontend import LocalStages, run_sync
from serve.http import MAX_DEPTH, Admission, BodyGuard
from serve.stages import StageContext
from tests.serve_support import make_model_dir

LIMIT = 65536  # serve.max_body_bytes here: room for the deep-nesting bodies below


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    model_dir = make_model_dir(tmp_path_factory.mktemp("serve_input"))
    cfg = ServeConfig(max_k=20, max_history=30, max_body_bytes=LIMIT)
    ctx = StageContext(str(model_dir), cfg, RerankConfig(n_candidates=50), None)
    stages = LocalStages(ctx)
    api = app_module.api
    before = dict(api.state._state)
    app_module.attach(app_module.build_frontend(ctx, str(model_dir), stages), stages, cfg)
    with TestClient(api) as test_client:
        yield test_client
    api.state._state.clear()
    api.state._state.update(before)
    torch.set_num_threads(threads)  # the stages set it (serve.torch_threads)


def post(client, body: bytes, content_type: str | None = "application/json"):
    headers = {"content-type": content_type} if content_type else {}
    return client.post("/recommend", content=body, headers=headers)


def nested(depth: int) -> bytes:
    return b'{"history": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        (b'{"lam": NaN}', 422, "NaN"),
        (b'{"lam": Infinity}', 422, "Infinity"),
        (b'{"lam": -Infinity}', 422, "-Infinity"),
        (b'{"lam": 1e400}', 422, "overflows"),
        (b'{"user_id": 9223372036854775808}', 422, "64-bit"),
        (b'{"history": [1, -9223372036854775809]}', 422, "64-bit"),
        (b'{"k": 1' + b"0" * 5000 + b"}", 422, "64-bit"),  # Python's int() refuses > 4300 digits
        (b'{"k": 3, "k": 5}', 422, "duplicate key 'k'"),
        (nested(MAX_DEPTH + 1), 422, "nested deeper"),
        (nested(20000), 422, "nested deeper"),  # json's recursion limit, not a RecursionError 500
        (b'{"history": [[[1]]]}', 422, "history"),  # within the depth limit: the schema refuses
        ('{"kk\u00e9\U0001f600": 1}'.encode(), 422, "kk\u00e9\U0001f600"),  # extra field, echoed
        ('{"history": ["\u00e9t\u00e9"]}'.encode(), 422, "history"),
        (b'{"user_id": "\\ud800"}', 422, "surrogate"),  # a 422 echoing it could not be encoded
        (b'{"k": 3, "x": "\xff\xfe"}', 422, "UTF-8"),
        (b"\xef\xbb\xbf{}", 422, "invalid JSON"),  # a UTF-8 byte-order mark
        (b'{"k": 3,', 422, "invalid JSON"),
        (b"[1, 2]", 422, "body"),
        (b"null", 422, "body"),
    ],
)
def test_hostile_json_is_4xx_naming_the_problem(client, body, status, named) -> None:
    resp = post(client, body)
    assert resp.status_code == status, resp.text
    assert named in resp.content.decode("utf-8"), resp.text


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        (None, 415),  # a body must say it is JSON
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
        ("application/merge-patch+json", 200),
    ],
)
def test_content_type_must_be_json(client, content_type, status) -> None:
    resp = post(client, b'{"k": 3}', content_type)
    assert resp.status_code == status, resp.text
    if status == 415:
        assert "application/json" in resp.json()["detail"]
    else:
        assert len(resp.json()["items"]) == 3


def test_valid_unicode_free_request_and_empty_body(client) -> None:
    ok = post(client, json.dumps({"history": [1, 2, 3], "k": 4, "lam": 0.5}).encode())
    assert ok.status_code == 200 and len(ok.json()["items"]) == 4
    empty = post(client, b"", None)  # no body at all: the schema's "Field required"-style 422
    assert empty.status_code == 422


def test_oversized_body_is_413_without_reading_it() -> None:
    """A declared length over the limit is refused before one byte of the body is read."""
    reads = []

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app saw an oversized request")

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "headers": [(b"content-length", b"1000000000"), (b"content-type", b"application/json")],
    }
    run_sync(BodyGuard(app)(scope, receive, send))
    assert sent[0]["status"] == 413 and reads == []
    body = json.loads(sent[1]["body"])
    assert "1000000000 bytes is over the limit of 65536" in body["detail"]
    # Streamed (no Content-Length): reading stops at the first chunk past the limit.
    reads.clear(), sent.clear()
    scope["headers"] = [(b"content-type", b"application/json")]
    run_sync(BodyGuard(app)(scope, receive, send))
    assert sent[0]["status"] == 413 and len(reads) == 65536 // 1024 + 1


def test_admission_refuses_beyond_max_running_before_reading() -> None:
    """serve.max_running = 2: a third concurrent request is 503 + Retry-After at once, its
    body unread; /healthz always passes; a finished request frees its slot."""
    import asyncio
    from types import SimpleNamespace

    release, reads, sent = asyncio.Event(), [], []

    async def app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    state = SimpleNamespace(max_running=2, retry_after_s=1.5)

    def scope(path: str = "/recommend") -> dict:
        return {"type": "http", "method": "POST", "path": path, "app": SimpleNamespace(state=state)}

    async def main() -> None:
        guard = Admission(app)
        running = [asyncio.create_task(guard(scope(), receive, send)) for _ in range(2)]
        await asyncio.sleep(0)
        assert guard.running == 2
        await guard(scope(), receive, send)  # refused now, without waiting for a slot
        assert [m.get("status") for m in sent] == [503, None] and reads == []
        assert (b"retry-after", b"2") in sent[0]["headers"]  # ceil(serve.retry_after_s)
        assert "serve.max_running" in json.loads(sent[1]["body"])["detail"]
        health = asyncio.create_task(guard(scope("/healthz"), receive, send))
        release.set()
        await asyncio.gather(*running, health)
        assert guard.running == 0 and [m.get("status") for m in sent[2:]] == [200] * 3
        await guard(scope(), receive, send)  # slots free again
        assert sent[-1]["status"] == 200

    run_sync(main())


def test_proxy_replays_unanswered_idempotent_requests_then_503() -> None:
    """serve/proxy_retry.py around an app that behaves as Ray's proxy does when the ingress
    replica dies (returns having sent nothing): the same body is replayed and its answer
    passed on once; a replay that does not start answering within wait_s is dropped (its late
    messages never reach the client) and, retries spent, the client gets 503 + Retry-After;
    a non-idempotent route and a body over MAX_BODY are passed through untouched; a first
    try that never answers (a request Ray's router lost) is cancelled after first_wait_s and
    replayed."""
    import asyncio

    from serve.proxy_retry import MAX_BODY, RetryUnanswered

    bodies: list[bytes] = []

    async def proxy(scope, receive, send):  # attempt 1 dies, 2 hangs, 3 answers
        bodies.append((await receive())["body"])
        if len(bodies) == 2:
            await asyncio.sleep(0.5)
        if len(bodies) >= 2:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    async def losing(scope, receive, send):  # attempt 1 never answers (until cancelled)
        bodies.append((await receive())["body"])
        if len(bodies) == 1:
            await asyncio.Event().wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(path: str, retries: int, headers=(), app=proxy) -> list[dict]:
        sent: list[dict] = []
        messages = [{"type": "http.request", "body": b'{"k": 3}', "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else await asyncio.Event().wait()

        async def send(message):
            sent.append(message)

        async def main() -> None:
            scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
            retry = RetryUnanswered(app, retries, wait_s=0.1, retry_after_s=0.5, first_wait_s=0.3)
            await asyncio.wait_for(retry(scope, receive, send), 5.0)  # a lost try fails here
            await asyncio.sleep(0.6)  # the abandoned attempt wakes up: nothing more is sent

        run_sync(main())
        return sent

    sent = call("/recommend", retries=2)
    assert bodies == [b'{"k": 3}'] * 3 and [m.get("status") for m in sent] == [200, None]
    bodies.clear()
    sent = call("/recommend", retries=1)  # the one replay hangs: 503
    assert len(bodies) == 2 and [m.get("status") for m in sent] == [503, None]
    assert (b"retry-after", b"1") in sent[0]["headers"]  # ceil(0.5), as Ray writes it
    bodies.clear()
    assert call("/other", retries=2) == [] and len(bodies) == 1  # POST elsewhere: no replay,
    # and Ray's proxy dying without an answer stays uvicorn's 500
    bodies.clear()
    big = [(b"content-length", str(MAX_BODY + 1).encode())]
    assert call("/recommend", retries=2, headers=big) == [] and len(bodies) == 1
    bodies.clear()
    sent = call("/recommend", retries=1, app=losing)  # the first try lost: replayed, answered
    assert len(bodies) == 2 and [m.get("status") for m in sent] == [200, None]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_in_process_finds_no_5xx(client, mode) -> None:
    """Every operation of /openapi.json, seeded (derandomized): the same cases every run."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app_module.api)
    calls = []
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(
            max_examples=60,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            resp = case.call_and_validate(checks=[not_a_server_error])
            calls.append(resp.status_code)

        try:
            check()
        except Unsatisfiable:
            assert mode == "negative", op.label  # nothing about GET /healthz can be invalid
    assert len(calls) >= 60 and max(calls) < 500


class LostStages:
    """Stages whose every call failed after its retries, as HandleStages reports lost replicas."""

    names = frozenset({"retriever", "ranker"})

    async def run(self, name: str, *args) -> None:
        raise app_module.StageUnavailable(f"stage {name!r} unavailable after 4 tries")


def test_handle_callers_get_the_routes_status_codes(client) -> None:
    """Ingress.recommend (deployment handles) and POST /recommend share one error mapping."""
    from fastapi import HTTPException

    from serve.schemas import RecommendRequest

    state = app_module.api.state
    known = state.front.catalog.item_ids[1:4].tolist()
    with pytest.raises(HTTPException) as bad:
        run_sync(app_module.answer(RecommendRequest(history=known, k=21)))  # serve.max_k = 20
    assert bad.value.status_code == 422 and bad.value.detail[0]["loc"] == ["body", "k"]
    assert client.post("/recommend", json={"history": known, "k": 21}).status_code == 422
    state.stages, real = LostStages(), state.stages
    try:
        with pytest.raises(HTTPException) as lost:
            run_sync(app_module.answer(RecommendRequest(history=known, k=3)))
        over_http = client.post("/recommend", json={"history": known, "k": 3})
    finally:
        state.stages = real
    assert lost.value.status_code == 503 and lost.value.headers == {"Retry-After": "1"}
    assert over_http.status_code == 503 and over_http.headers["retry-after"] == "1"
    assert "retriever" in over_http.json()["detail"]
