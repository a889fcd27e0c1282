"""Server-sent events for streamed answers.

Generation runs on the engine's worker; here we only await its events. A client that goes away
cancels the generation (the await raises CancelledError; the handle's cancel flag stops the
worker within a token). While nothing is sent for KEEPALIVE_S (a long prompt being read), a
keep-alive goes out: agents hang up on a silent stream (Claude Code after 360 s) and resend it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from starlette.responses import StreamingResponse

from engine.errors import EngineError
from handlers.wire.errors import engine_error_body, error_body

log = logging.getLogger("openmlx.http")

# Seconds of silence before a keep-alive; the environment variable is for tests.
KEEPALIVE_S = float(os.environ.get("OPENMLX_KEEPALIVE_S", "") or 5.0)
# An SSE comment line: every SSE parser (the openai and anthropic SDKs' included) skips it.
COMMENT_KEEPALIVE = ": keep-alive\n\n"
# Seconds with nothing but keep-alives before one carries an event of the API's own as well:
# clients' stream watchdogs count events, not bytes (Claude Code's skips `ping` and hangs up after
# 300 s; Codex's idle timeout, 300 s, never sees comment lines). The variable is for tests.
EVENT_KEEPALIVE_S = float(os.environ.get("OPENMLX_EVENT_KEEPALIVE_S", "") or 60.0)


def event(data: Any) -> str:
    """One OpenAI chat/completions event: `data:` only."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def named_event(data: dict[str, Any]) -> str:
    """One event named by its `type` (the Responses and Messages APIs' streams)."""
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def openai_error_event(exc: Optional[EngineError]) -> dict[str, Any]:
    if exc is None:
        return error_body("The server had an error while generating.", "server_error")
    return engine_error_body(exc)


def choices_response(events: AsyncIterator[tuple[int, Any]], first: Sequence[dict[str, Any]],
                     on_event: Callable[[int, Any], list[dict[str, Any]]],
                     last: Callable[[], list[dict[str, Any]]] = lambda: [],
                     headers: Optional[dict[str, str]] = None, *, encode: Callable[[Any], str] = event,
                     done: Optional[str] = "[DONE]",
                     on_error: Callable[[Optional[EngineError]], dict[str, Any]] = openai_error_event,
                     keepalive: Callable[[], str] = lambda: COMMENT_KEEPALIVE,
                     ) -> StreamingResponse:
    """SSE for one or several choices (handlers/conversation/choices.py): the `first` chunks, the chunks
    `on_event` makes of each choice's (index, event) as they come, the `last` chunks, then the
    `done` marker (OpenAI's `[DONE]`; None for APIs without one). A failure after the headers
    were sent becomes an error event (the status can't change anymore). `keepalive()`: the text
    sent after each KEEPALIVE_S without an event (an SSE comment unless the API has its own)."""

    async def body() -> AsyncIterator[str]:
        pending: Optional[asyncio.Future] = None
        try:
            for chunk in first:
                yield encode(chunk)
            source = events.__aiter__()
            while True:
                # The next event is awaited in a task of its own, so a timeout can send a
                # keep-alive without cancelling it.
                pending = asyncio.ensure_future(source.__anext__())
                while not (await asyncio.wait({pending}, timeout=KEEPALIVE_S))[0]:
                    yield keepalive()
                step, pending = pending, None
                try:
                    index, ev = step.result()
                except StopAsyncIteration:
                    break
                for chunk in on_event(index, ev):
                    yield encode(chunk)
            for chunk in last():
                yield encode(chunk)
            if done is not None:
                yield encode(done)
        except EngineError as e:
            yield encode(on_error(e))
        except Exception:
            log.exception("stream failed")
            yield encode(on_error(None))
        finally:
            if pending is not None:  # the client left while an event was awaited
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            await events.aclose()  # type: ignore[attr-defined]  (cancels every choice)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
