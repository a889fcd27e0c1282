"""ASGI middlewares around every request (handlers/app.py stacks them): X-Request-ID
(`RequestIdMiddleware`), the body's size and deadline (`BodyLimitMiddleware`), a request's work
ended when its client goes or --request-timeout passes (`RequestLifetimeMiddleware`), the spec as
written at /openapi.json (`SpecMiddleware`), 503 while shutting down (`DrainMiddleware`) and API
keys (`ApiKeyMiddleware`)."""
from __future__ import annotations

import asyncio
import json
import uuid
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from handlers.wire.errors import BodyTooLarge, BodyTooSlow, error_payload

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


async def send_error(scope: Scope, send: Send, status: int, message: str, code: str, type_: str | None = None,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """An OpenAI-shaped (Anthropic-shaped on /v1/messages) error answered straight from a middleware."""
    body = json.dumps(error_payload(scope.get("path", ""), status, message, type_, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Echo the client's X-Request-ID (if sane) or make one; expose it as scope["state"]."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given.decode("latin-1") if given and len(given) <= 128 and given.isascii() and given.strip() else ""
        rid = rid or f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)




class BodyLimitMiddleware:
    """413 before Connexion buffers a body larger than `max_bytes`.

    Content-Length is checked up front. A chunked body (`Transfer-Encoding: chunked`, no
    Content-Length, as streaming clients and proxies send) is read here, counted as it arrives,
    and handed on with its Content-Length: Connexion decides from that header alone whether a
    request has a body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, audio_max_bytes: int | None = None,
                 body_timeout_s: float = 60.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.audio_max_bytes = audio_max_bytes or max_bytes  # uploads to /v1/audio/* have their own
        # The whole body within this long of its head: a byte every few seconds would otherwise
        # hold a connection (and a slot under --max-connections) for as long as the client likes.
        self.body_timeout_s = body_timeout_s

    def _limit(self, scope: Scope) -> int:
        return self.audio_max_bytes if scope.get("path", "").startswith("/v1/audio/") else self.max_bytes

    async def _reject(self, scope: Scope, send: Send) -> None:
        await send_error(scope, send, 413, str(BodyTooLarge(self._limit(scope))), "request_too_large")

    async def _timed_out(self, scope: Scope, send: Send) -> None:
        await send_error(scope, send, 408, f"The request body did not arrive within {self.body_timeout_s:g} s "
                         "(--body-timeout).", "request_timeout", headers=((b"connection", b"close"),))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self._limit(scope)
            except ValueError:
                too_large = False
            if too_large:
                await self._reject(scope, send)
                return
        limit = self._limit(scope)
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        body_done = False

        async def next_part() -> Message:
            """The next message, within the body's deadline while the body is still arriving."""
            if body_done:
                return await receive()
            try:
                return await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise BodyTooSlow(self.body_timeout_s) from None

        if length is None and _header(scope, b"transfer-encoding") is not None:
            body = bytearray()
            while True:
                try:
                    message = await next_part()
                except BodyTooSlow:
                    await self._timed_out(scope, send)
                    return
                if message["type"] != "http.request":  # the client went away
                    return
                body += message.get("body", b"")
                if len(body) > limit:
                    await self._reject(scope, send)
                    return
                if not message.get("more_body"):
                    break
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"transfer-encoding"]
            scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
            receive = _replay(bytes(body), receive)
            body_done = True
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, body_done
            message = await next_part()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
                body_done = body_done or not message.get("more_body")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(scope, send)
        except BodyTooSlow:
            if not started:
                await self._timed_out(scope, send)


# Set for the request being handled when --request-timeout cuts it off (before the cancellation
# reaches its generation), so the accounting of what it generated says "timeout", not "cancelled".
_DEADLINE_PASSED: ContextVar[Optional[list[bool]]] = ContextVar("openmlx_deadline_passed", default=None)


def deadline_passed() -> bool:
    """Whether --request-timeout cut off the request this task works for."""
    flag = _DEADLINE_PASSED.get()
    return bool(flag and flag[0])


class RequestLifetimeMiddleware:
    """Ends a request's work when its client has gone, or when --request-timeout passes before
    its answer has started.

    A stream notices a disconnect by itself (Starlette listens while it sends), but a non-streamed
    answer would run to its end: 70 requests closed after 0.3 s held the whole queue, and everyone
    else got 429. Once the app has read the body, this watches the connection; a disconnect before
    the response is complete cancels the app's task, and the cancellation reaches the queued
    generation (choices.events cancels its handles). The same cancellation ends a request whose
    answer has not started within the timeout (preparing 16 prompts' shared prefills, say): it
    gets a 504. Once a stream has started, its own deadline (shared by all its choices) applies."""

    def __init__(self, app: ASGIApp, timeout_s: float | None = None) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        gone = asyncio.Event()
        body_read = asyncio.Event()
        started = complete = timed_out = False

        async def app_receive() -> Message:
            if body_read.is_set():  # after the body only the watcher reads the connection
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body"):
                body_read.set()
            return message

        async def app_send(message: Message) -> None:
            nonlocal started, complete
            if timed_out:
                return  # the 504 went out instead
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        async def watch() -> None:
            await body_read.wait()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not complete:
                        app.cancel()
                    return

        async def clock() -> None:
            nonlocal timed_out
            await asyncio.sleep(self.timeout_s or 0)
            if not started:
                timed_out = passed[0] = True
                app.cancel()

        passed = [False]
        token = _DEADLINE_PASSED.set(passed)  # the app's task (and the tasks it starts) copy it
        app = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        _DEADLINE_PASSED.reset(token)
        helpers = [asyncio.ensure_future(watch())]
        if self.timeout_s:
            helpers.append(asyncio.ensure_future(clock()))
        try:
            await app
        except asyncio.CancelledError:
            if not app.cancelled() or not (gone.is_set() or timed_out):
                raise  # cancelled from outside (shutdown), not by the client's going or the clock
        finally:
            for helper in helpers:
                helper.cancel()
            if not app.done():
                app.cancel()
        if timed_out and not gone.is_set():
            await send_error(scope, send, 504, f"The request took longer than this server's limit of "
                             f"{self.timeout_s:g} s (--request-timeout).", "timeout", headers=((b"retry-after", b"1"),))


class SpecMiddleware:
    """`/openapi.json` is the document as written: its components and `$ref`s, not Connexion's fully
    resolved copy (212 KB, no `$ref`, ~790 per-operation classes in a generated client, unused
    components for every linter). Converted from `openapi.yaml` once; Swagger UI reads it too."""

    def __init__(self, app: ASGIApp, spec: Path) -> None:
        import yaml

        self.app = app
        self.body = json.dumps(yaml.safe_load(spec.read_text())).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/openapi.json" or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self.body)).encode())]})
        await send({"type": "http.response.body", "body": self.body if scope.get("method") == "GET" else b""})


class DrainMiddleware:
    """While the server shuts down, every new API request gets 503 with Retry-After (the
    engine refuses generations itself; this covers the rest, e.g. /v1/models)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = scope.get("state", {}).get("engine") if scope["type"] == "http" else None
        if engine is None or not engine.scheduler.closing or not scope.get("path", "").startswith(("/v1/", "/api/")):
            await self.app(scope, receive, send)
            return
        await send_error(scope, send, 503, engine.scheduler.shutdown_reason, "shutting_down",
                         headers=((b"retry-after", b"5"), (b"connection", b"close")))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands over `body` once, then waits on the client (for disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _needs_key(path: str) -> bool:
    """The OpenAI and Anthropic routes, and Ollama's except /api/version (apps probe it first)."""
    return path.startswith("/v1/") or (path.startswith("/api/") and path != "/api/version")


class ApiKeyMiddleware:
    """When API keys are configured, `/v1/*` and `/api/*` need `Authorization: Bearer KEY` or (as Anthropic's
    clients send it) `x-api-key: KEY`; 401 otherwise.

    `/health`, the spec and the docs stay open. Keys are compared in constant time and never logged.
    """

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys if k]

    def _authorized(self, scope: Scope) -> Optional[bytes]:
        """The request's key when it is one of ours, else None."""
        import hmac

        header = _header(scope, b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            token = _header(scope, b"x-api-key") or b""
            if not token:
                return None
        token = token.strip()
        # Check every key (no early exit) so timing says nothing about which matched.
        return token if any([hmac.compare_digest(token, key) for key in self.keys]) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not _needs_key(scope.get("path", "")) \
                or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        token = self._authorized(scope)
        if token is not None:
            # Each key's prompt cache entries are its own (handlers/conversation/cache_scope.py): the engine
            # gets a hash of the key, never the key.
            from handlers.conversation.cache_scope import key_owner

            scope.setdefault("state", {})["cache_owner"] = key_owner(token)
            await self.app(scope, receive, send)
            return
        missing = _header(scope, b"authorization") is None and _header(scope, b"x-api-key") is None
        message = ("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'." if missing
                   else "Incorrect API key provided.")
        await send_error(scope, send, 401, message, "invalid_api_key", "invalid_request_error",
                         headers=((b"www-authenticate", b'Bearer realm="openmlx"'),))
