"""/v1/messages and /v1/messages/count_tokens (Anthropic's Messages API)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any, Optional

from connexion import request

from engine.errors import EngineError
from engine.engine import AnswerStream, answer
from handlers.conversation import cache_scope, choices, generation
from handlers.wire import sse
from handlers.wire import messages_protocol as mp
from handlers.wire.errors import anthropic_error_body
from handlers.wire.protocol import json_ok, warning_headers

ROUTE = "messages"


async def create(body: dict):
    engine = request.state.engine
    conv = await asyncio.to_thread(mp.conversation, body, body["max_tokens"])  # off the loop: schemas and strict tools compile while parsing
    conv = replace(conv, cache=cache_scope.of(body))
    prepared = await generation.prepare(engine, conv, request.state.image_sources)
    mid = mp.new_id("msg")
    model = body["model"]
    warnings = prepared.warnings + mp.left_out_tools(body)
    if not body.get("stream"):
        out = await generation.answer(engine, conv, prepared, ROUTE)
        content = ([mp.thinking_block(out.reasoning)] if out.reasoning else []) \
            + ([mp.text_block(out.text)] if out.text or not out.calls else []) \
            + [mp.tool_use_block(c) for c in out.calls]
        return json_ok(mp.message(mid, model, content, out.done, out.calls), warnings)

    # Without tools the text block opens with the message, as Anthropic's does; with tools (or a
    # thinking block first) it opens on the first text, since the answer may be calls only.
    opened = not conv.tools and prepared.reasoning is None
    stream = AnswerStream(conv, prepared, text_opened=opened)
    blocks = {"next": 0, "text": 0, "thinking": None}  # the next block's index; the open ones'
    # The block a content event may go to now: ("text" | "thinking", index), or None between blocks;
    # `early`: a text block a keep-alive opened before the answer had any (see keepalive()).
    state: dict[str, Any] = {"open": None, "early": None,
                             "last_event": time.monotonic()}
    started = {"sent": False}  # message_start went out (at the answer's start, or with the first ping)

    def open_block(kind: str, block: dict[str, Any]) -> list[dict[str, Any]]:
        blocks[kind], blocks["next"] = blocks["next"], blocks["next"] + 1
        state["open"] = (kind, blocks[kind])
        return [{"type": "content_block_start", "index": blocks[kind], "content_block": block}]

    def close_early() -> list[dict[str, Any]]:
        """The keep-alive's empty text block ends where the answer starts another kind of block."""
        if state["early"] is None:
            return []
        i, state["early"], state["open"] = state["early"], None, None
        return [{"type": "content_block_stop", "index": i}]

    def encode(ev: answer.AnswerEvent) -> list[dict[str, Any]]:
        out = encode_event(ev)
        if any(c["type"] != "ping" for c in out):
            state["last_event"] = time.monotonic()
        return out

    def encode_event(ev: answer.AnswerEvent) -> list[dict[str, Any]]:
        """Anthropic's stream events for one answer's neutral events."""
        if isinstance(ev, answer.TextOpened) and state["early"] is not None:
            state["early"] = None  # the answer's text goes on in the block the keep-alive opened
            return []
        if isinstance(ev, (answer.ReasoningPiece, answer.CallMade, answer.AnswerFinished)):
            head = close_early()
            if head:
                return head + encode_event(ev)
        if isinstance(ev, answer.AnswerStarted):
            if started["sent"]:
                return []
            started["sent"] = True
            start = {"type": "message_start",
                     "message": mp.message(mid, model, [], None, (), ev.prompt_tokens, ev.cached_tokens)}
            return [start, *(open_block("text", mp.text_block("")) if opened else []), {"type": "ping"}]
        if isinstance(ev, answer.ReasoningPiece):
            head = open_block("thinking", mp.thinking_block("")) if blocks["thinking"] is None else []
            return head + [{"type": "content_block_delta", "index": blocks["thinking"],
                            "delta": {"type": "thinking_delta", "thinking": ev.text}}]
        if isinstance(ev, answer.ReasoningClosed):
            if blocks["thinking"] is None:
                return []
            state["open"] = None
            return [{"type": "content_block_delta", "index": blocks["thinking"],
                     "delta": {"type": "signature_delta", "signature": ""}},
                    {"type": "content_block_stop", "index": blocks["thinking"]}]
        if isinstance(ev, answer.TextOpened):
            return open_block("text", mp.text_block(""))
        if isinstance(ev, answer.TextPiece):
            return [{"type": "content_block_delta", "index": blocks["text"],
                     "delta": {"type": "text_delta", "text": ev.text}}] if ev.text else []
        if isinstance(ev, answer.TextClosed):
            state["open"] = None
            return [{"type": "content_block_stop", "index": blocks["text"]}]
        if isinstance(ev, answer.CallMade):
            i, block = blocks["next"], mp.tool_use_block(ev.call)
            blocks["next"] += 1
            partial = json.dumps(block["input"]) if ev.call.complete else ev.call.arguments  # a cut-off call: as written
            return [{"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}},
                    {"type": "content_block_delta", "index": i,
                     "delta": {"type": "input_json_delta", "partial_json": partial}},
                    {"type": "content_block_stop", "index": i}]
        if isinstance(ev, answer.AnswerFinished):
            return [{"type": "message_delta",
                     "delta": {"stop_reason": mp.stop_reason(ev.done, ev.calls), "stop_sequence": ev.done.stop_sequence,
                               "stop_details": None, "container": None},
                     "usage": mp.delta_usage(ev.done)},
                    {"type": "message_stop"}]
        return []

    def on_error(exc: Optional[EngineError]) -> dict[str, Any]:
        if exc is None:
            return anthropic_error_body(500, "The server had an error while generating.")
        return anthropic_error_body(exc.status, exc.message)

    def keepalive() -> str:
        """Anthropic's `ping`; while the prompt is still being read, message_start goes first (its
        usage counts the whole prompt as input; message_delta has the cached share at the end).
        After sse.EVENT_KEEPALIVE_S with nothing but pings (Claude Code's watchdog skips
        them: its SDK drops pings before it looks), also an empty delta in the open block (a
        text block opened for it when none is: the answer's text goes on in it, or it is closed
        empty before a thinking or tool_use block), which every client's watchdog counts."""
        if not started["sent"]:
            return "".join(sse.named_event(c) for c in encode(answer.AnswerStarted(len(prepared.prompt), 0)))
        out = [{"type": "ping"}]
        if time.monotonic() - state["last_event"] >= sse.EVENT_KEEPALIVE_S:
            if state["open"] is None:
                out += open_block("text", mp.text_block(""))
                state["early"] = blocks["text"]
            kind, i = state["open"]
            out.append({"type": "content_block_delta", "index": i,
                        "delta": {"type": "thinking_delta", "thinking": ""} if kind == "thinking"
                        else {"type": "text_delta", "text": ""}})
            state["last_event"] = time.monotonic()
        return "".join(sse.named_event(c) for c in out)

    return sse.choices_response(choices.events([lambda: engine.stream(prepared)], ROUTE, model), (),
                                lambda _i, ev: [c for n in stream.on(ev) for c in encode(n)],
                                headers=warning_headers(warnings), encode=sse.named_event, done=None,
                                on_error=on_error, keepalive=keepalive)


async def count_tokens(body: dict):
    engine = request.state.engine
    conv = await asyncio.to_thread(mp.conversation, body, None)
    return {"input_tokens": await generation.count_tokens(engine, conv)}
