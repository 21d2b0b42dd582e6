"""A request whose ingress replica dies before answering is sent again, inside Ray Serve's HTTP
proxy; when no replica answers in time the client gets 503 + Retry-After -- never Ray's 500.

Why here: Ray 2.60's HTTP proxy turns a replica's death (RayActorError) into a 500 and sends
nothing before it (ray/serve/_private/http_util.py `get_http_response_status`: only
back-pressure and DeploymentUnavailableError become 503; proxy.py `send_request_to_replica`
does not retry), and a custom request router only picks the replica before the request is
sent. The one hook Ray offers on that path is RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: an
import path to a function returning Starlette middlewares, which the proxy wraps around its
ASGI app (`configure_http_middlewares`). `middlewares` below is that function; jobs.serve puts
the variable in the Serve controller's runtime_env (`controller_options`), which the proxy
actor inherits.

`RetryUnanswered` buffers the request body (up to MAX_BODY bytes), runs the proxy and watches
what it sends: if it finished without starting a response (Ray's 500 path: the replica died),
the request is replayed -- the router has by then dropped the dead replica, so it goes to
another one, or waits for the replacement. A replay that has not started its answer within
`wait_s` is cancelled; after `retries` replays the client gets 503 + Retry-After. The first
try gets `first_wait_s` (long: it may legitimately wait for a replacement replica): Ray 2.60's
router can hold a request whose replica died as it was sent and never route it again (seen in
tests/test_serve_http.py's kill test: 60 s, until the client gave up, while the other replica
served the other client), so a first try not started by then is cancelled and replayed. Only
idempotent requests are replayed: GET and HEAD, and POST to a path ending in one of
POST_SUFFIXES (a recommendation changes nothing on the server). Pure ASGI: no Ray import.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

from rec.logs import get_logger

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.proxy_retry:middlewares"
# Settings travel to the proxy process as environment variables (Ray calls `middlewares` with
# no arguments): replays, seconds a replay may wait for its answer to start, Retry-After.
RETRIES_ENV, WAIT_ENV, RETRY_AFTER_ENV, FIRST_WAIT_ENV = (
    "RAYDIV_PROXY_RETRIES",
    "RAYDIV_PROXY_RETRY_WAIT_S",
    "RAYDIV_PROXY_RETRY_AFTER_S",
    "RAYDIV_PROXY_FIRST_WAIT_S",
)
POST_SUFFIXES = ("/recommend",)
MAX_BODY = 1 << 20  # larger bodies pass through unbuffered (the ingress answers 413 anyway)

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[dict, Receive, Send], Awaitable[None]]

log = get_logger("serve")


def controller_env(
    retries: int, wait_s: float, retry_after_s: float, first_wait_s: float = 20.0
) -> dict[str, str]:
    """The env_vars for `serve.start(controller_options={"runtime_env": {"env_vars": ...}})`."""
    return {
        CALLBACK_ENV: CALLBACK,
        RETRIES_ENV: str(retries),
        WAIT_ENV: str(wait_s),
        RETRY_AFTER_ENV: str(retry_after_s),
        FIRST_WAIT_ENV: str(first_wait_s),
    }


def middlewares() -> list:
    """Ray's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    from starlette.middleware import Middleware

    return [
        Middleware(
            RetryUnanswered,
            retries=int(os.environ.get(RETRIES_ENV, "2")),
            wait_s=float(os.environ.get(WAIT_ENV, "2.0")),
            retry_after_s=float(os.environ.get(RETRY_AFTER_ENV, "1.0")),
            first_wait_s=float(os.environ.get(FIRST_WAIT_ENV, "20.0")),
        )
    ]


class RetryUnanswered:
    """ASGI middleware: replay an idempotent request that got no response start (module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        retries: int = 2,
        wait_s: float = 2.0,
        retry_after_s: float = 1.0,
        first_wait_s: float = 20.0,
    ) -> None:
        self.app, self.retries, self.wait_s, self.first_wait_s = app, retries, wait_s, first_wait_s
        self.retry_after = str(max(0, math.ceil(retry_after_s)))  # as Ray writes it

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if not self.retries or not _idempotent(scope):
            await self.app(scope, receive, send)
            return
        body, whole = await _read_body(scope, receive)
        if not whole:  # too large to buffer: one try, nothing to replay
            await self.app(scope, _replay(body, receive), send)
            return
        for attempt in range(self.retries + 1):
            receive_body = _replay(body, receive)
            if attempt == 0:  # the first try may take its time, within first_wait_s
                if await self._first(scope, receive_body, send):
                    return
            elif await self._attempt(scope, receive_body, send, self.wait_s):
                return
            log.warning(
                "%s %s: no answer from the ingress replica (attempt %d of %d)",
                scope.get("method"), scope.get("path"), attempt + 1, self.retries + 1,
            )  # fmt: skip
        await _send_503(send, self.retry_after)

    async def _first(self, scope: dict, receive: Receive, send: Send) -> bool:
        """The first try, run in this task (no new task per request: the common path) under a
        timer that cancels it if no answer started within first_wait_s. True once it started."""
        started, state = asyncio.Event(), {"expired": False}
        tracked = _tracked(send, started, state)
        me = asyncio.current_task()

        def expire() -> None:
            if not started.is_set():
                state["expired"] = True  # late messages of this try are dropped from now on
                me.cancel()

        timer = asyncio.get_running_loop().call_later(self.first_wait_s, expire)
        try:
            await self.app(_fresh(scope), receive, tracked)
        except asyncio.CancelledError:
            if not state["expired"]:
                raise  # cancelled from outside (client gone)
        except Exception:
            if started.is_set():
                raise  # after the answer started: nothing to replay
        finally:
            timer.cancel()
            if state["expired"]:
                me.uncancel()  # our own cancel, consumed here: the replay runs on
        return started.is_set()

    async def _attempt(self, scope: dict, receive: Receive, send: Send, wait: float) -> bool:
        """Run the app once as a task; True once it started a response (then it runs to the
        end); False when it finished or `wait` passed without one."""
        started, state = asyncio.Event(), {"expired": False}
        tracked = _tracked(send, started, state)
        task = asyncio.ensure_future(self.app(_fresh(scope), receive, tracked))
        waiter = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({task, waiter}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if started.is_set():
                await task  # the answer streams through; errors after the start propagate
                return True
        except BaseException:  # cancelled from outside (client gone): take the attempt along
            task.cancel()
            raise
        finally:
            waiter.cancel()
        task.cancel()  # a replay still waiting for a replica: give up on it (no-op if done)
        state["expired"] = True  # nothing the abandoned attempt sends now reaches the client
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # the failed attempt's own error: retrieved, replaced by a retry
        return False


def _tracked(send: Send, started: asyncio.Event, state: dict) -> Send:
    """`send` that passes messages on from the response start, until the attempt expired."""

    async def tracked(message: Message) -> None:
        if state["expired"]:
            return
        if message["type"] == "http.response.start":
            started.set()
        if started.is_set():
            await send(message)

    return tracked


def _fresh(scope: dict) -> dict:
    """A fresh scope per attempt: Ray's request-id middleware appends a header in place."""
    return {**scope, "headers": list(scope["headers"])}


def _idempotent(scope: dict) -> bool:
    if scope["type"] != "http":
        return False
    method = scope.get("method", "")
    return method in ("GET", "HEAD") or (
        method == "POST" and scope.get("path", "").endswith(POST_SUFFIXES)
    )


async def _read_body(scope: dict, receive: Receive) -> tuple[list[Message], bool]:
    """(the body messages read, whether that is the whole body). Nothing is read from a body
    declared larger than MAX_BODY; a streamed one is read up to the first message past it."""
    for name, value in scope.get("headers", []):
        if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY:
            return [], False
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, True  # a disconnect: replayed as is, the app sees it
        size += len(message.get("body", b""))
        if size > MAX_BODY:
            return messages, False
        if not message.get("more_body", False):
            return messages, True


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _send_503(send: Send, retry_after: str) -> None:
    body = json.dumps({"detail": "no ingress replica answered; retry"}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", retry_after.encode()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
