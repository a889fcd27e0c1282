"""/v1/messages and /v1/messages/count_tokens (Anthropic's Messages API)."""
from __future__ import annotations

import json
from typing import Any, Optional

from connexion import request

from engine.errors import EngineError
from engine.text import Finished, Started, TextDelta
from handlers import generation, sse
from handlers import messages_protocol as mp
from handlers.errors import anthropic_error_body
from handlers.protocol import json_ok, warning_headers

ROUTE = "messages"


async def create(body: dict):
    engine = request.state.engine
    conv = mp.conversation(body, body["max_tokens"])
    prepared = await generation.prepare(engine, conv, request.state.image_sources)
    mid = mp.new_id("msg")
    model = body["model"]
    if not body.get("stream"):
        out = await generation.answer(engine, conv, prepared, ROUTE)
        content = ([mp.text_block(out.text)] if out.text or not out.calls else []) \
            + [mp.tool_use_block(c) for c in out.calls]
        return json_ok(mp.message(mid, model, content, out.done, out.calls), prepared.warnings)

    handle, observer = generation.start_stream(engine, conv, prepared, ROUTE)
    out = generation.ToolTextStream(conv, prepared)  # with tools, a call is held until it can be parsed
    opened: list[bool] = []  # the text block has started

    def open_text() -> list[dict[str, Any]]:
        opened.append(True)
        return [{"type": "content_block_start", "index": 0, "content_block": mp.text_block("")}]

    def on_start(started: Started) -> list[dict[str, Any]]:
        events = [{"type": "message_start",
                   "message": mp.message(mid, model, [], None, (), started.prompt_tokens, started.cached_tokens)}]
        if not conv.tools:
            events += open_text()
        return events + [{"type": "ping"}]

    def text_delta(text: str) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}

    def on_delta(delta: TextDelta) -> Optional[list[dict[str, Any]]]:
        text = out.feed(delta.text)
        if not text:
            return None
        return ([] if opened else open_text()) + [text_delta(text)]

    def on_finish(done: Finished) -> list[dict[str, Any]]:
        text, unsent, calls = out.finish(done)
        events: list[dict[str, Any]] = []
        index = 0
        if opened or text or not calls:
            if not opened:
                events += open_text()
                unsent = text
            if unsent:
                events.append(text_delta(unsent))
            events.append({"type": "content_block_stop", "index": 0})
            index = 1
        for i, call in enumerate(calls, start=index):
            block = mp.tool_use_block(call)
            events += [{"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}},
                       {"type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta",  # a cut-off call: what was written
                                  "partial_json": json.dumps(block["input"]) if call.complete else call.arguments}},
                       {"type": "content_block_stop", "index": i}]
        events += [{"type": "message_delta",
                    "delta": {"stop_reason": mp.stop_reason(done, calls), "stop_sequence": done.stop_sequence,
                              "stop_details": None, "container": None},
                    "usage": mp.delta_usage(done)},
                   {"type": "message_stop"}]
        return events

    def on_error(exc: Optional[EngineError]) -> dict[str, Any]:
        if exc is None:
            return anthropic_error_body(500, "The server had an error while generating.")
        return anthropic_error_body(exc.status, exc.message)

    return sse.stream_response(handle, observer, on_delta, on_finish, (), warning_headers(prepared.warnings),
                               on_start=on_start, encode=sse.named_event, done=None, on_error=on_error)


async def count_tokens(body: dict):
    engine = request.state.engine
    conv = mp.conversation(body, None)
    return {"input_tokens": await generation.count_tokens(engine, conv)}
