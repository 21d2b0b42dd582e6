"""ASGI pieces of the ingress that FastAPI does not provide: admission and a body guard.

`Admission` (outermost) answers 503 + Retry-After, before reading anything, to a request that
finds `app.state.max_running` requests already running in this replica (serve.max_running; 0:
off). It is the overload limit of the ingress: Serve's own (max_ongoing_requests +
max_queued_requests) holds a request in the router and re-polls replicas, so the requests it
admits wait there (bench/README.md "Serving under overload"). /healthz is never refused.

`BodyGuard` answers, before the app sees the request:
    413  a body over serve.max_body_bytes: declared (Content-Length, nothing read) or streamed
         (read only up to the limit);
    415  a non-empty body that is not `application/json` (or `...+json`);
    422  a body that is not strict JSON (FastAPI's error shape, `type: json_invalid`): not UTF-8,
         a syntax error, NaN / Infinity / -Infinity or a float that overflows to infinity,
         integers beyond int64, duplicate object keys, nesting deeper than MAX_DEPTH, lone
         UTF-16 surrogates (which no UTF-8 response, e.g. a 422 echoing them, could encode).
Python's `json` (which FastAPI uses) accepts all of these, and several then surfaced as 500s
(a NaN lam, an id numpy cannot hold, an error body that cannot be encoded). One strict parse
here covers every route; the body is then replayed to the app unchanged.

The limit is read per request from `app.state.max_body_bytes` (set by the ingress from
`serve.max_body_bytes`), so the module-level FastAPI app needs no config at import time.
"""

from __future__ import annotations

import json
import math
from typing import Any

DEFAULT_MAX_BODY_BYTES = 65536
MAX_DEPTH = 32  # the request schemas nest 2 deep; deeper input can only be an attack or a bug
INT64 = (-(2**63), 2**63 - 1)
BODY_METHODS = {"POST", "PUT", "PATCH"}


class BadJSON(ValueError):
    """A body that is not strict JSON; the message names the problem."""


def _constant(name: str) -> Any:
    raise BadJSON(f"{name} is not a JSON number (only finite numbers are accepted)")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJSON(f"number {text[:40]} overflows a 64-bit float")
    return value


def _int(text: str) -> int:
    if len(text) > 20:  # longer than any int64: refuse before converting (CPU)
        raise BadJSON(f"integer {text[:24]}... is beyond the 64-bit range")
    value = int(text)
    if not INT64[0] <= value <= INT64[1]:
        raise BadJSON(f"integer {text} is beyond the 64-bit range")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise BadJSON(f"duplicate key {key!r} in an object")
        out[key] = value
    return out


def _check_tree(value: Any) -> None:
    """Depth and strings of a parsed value, iteratively (no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                raise BadJSON(f"JSON nested deeper than {MAX_DEPTH} levels")
            items = node.items() if isinstance(node, dict) else ((None, v) for v in node)
            for key, child in items:
                if key is not None:
                    _check_string(key)
                stack.append((child, depth + 1))
        elif isinstance(node, str):
            _check_string(node)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadJSON("a string holds a lone UTF-16 surrogate (not valid Unicode)") from None


def strict_json(body: bytes) -> Any:
    """Parse a request body strictly; raises BadJSON naming the problem."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadJSON(f"body is not UTF-8 (byte {err.start})") from None
    try:
        value = json.loads(
            text,
            parse_constant=_constant,
            parse_float=_float,
            parse_int=_int,
            object_pairs_hook=_object,
        )
    except json.JSONDecodeError as err:
        raise BadJSON(f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise BadJSON(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    _check_tree(value)
    return value


def is_json(content_type: bytes | None) -> bool:
    media = (content_type or b"").split(b";")[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


class Admission:
    """503 + Retry-After for a request beyond `app.state.max_running` running ones (0: off)."""

    def __init__(self, app: Any) -> None:
        self.app, self.running = app, 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        state = getattr(scope.get("app"), "state", None)
        limit = int(getattr(state, "max_running", 0) or 0)
        if scope["type"] != "http" or not limit or scope.get("path") == "/healthz":
            await self.app(scope, receive, send)
            return
        if self.running >= limit:
            retry = str(max(1, math.ceil(getattr(state, "retry_after_s", 1.0))))
            detail = f"overloaded: {limit} requests running (serve.max_running); retry later"
            await _reply(send, 503, detail, [(b"retry-after", retry.encode())])
            return
        self.running += 1  # one event loop per replica: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1


class BodyGuard:
    """413 / 415 / 422 for bodies that are too large, not JSON, or not strict JSON (above)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        state = getattr(scope.get("app"), "state", None)
        limit = int(getattr(state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES))
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, int(declared), limit)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, size, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and not is_json(headers.get(b"content-type")):
            got = (headers.get(b"content-type") or b"none").decode("latin-1")[:60]
            detail = f"content-type {got!r} is not supported: send application/json"
            await _reply(send, 415, detail)
            return
        if body:
            try:
                strict_json(body)
            except BadJSON as err:
                detail = [{"type": "json_invalid", "loc": ["body"], "msg": str(err)}]
                await _reply(send, 422, detail)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Any, size: int, limit: int) -> None:
    detail = f"request body: {size} bytes is over the limit of {limit} (serve.max_body_bytes)"
    await _reply(send, 413, detail)


async def _reply(send: Any, status: int, detail: Any, extra: list | None = None) -> None:
    payload = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": payload})
