"""/v1/responses: create (plain and streamed), retrieve, delete, input items, input token count."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any, Optional

from connexion import request

from engine.errors import EngineError
from engine.engine import AnswerStream, answer
from handlers.conversation import cache_scope, choices, generation
from handlers.wire import sse
from handlers.wire import responses_protocol as rp
from handlers.wire.protocol import json_ok, now, warning_headers
from handlers.conversation.response_store import ResponseStore, StoredResponse

ROUTE = "responses"


class ResponseNotFound(EngineError):
    status = 404
    type = "invalid_request_error"
    code = "response_not_found"


def _store() -> ResponseStore:
    return request.state.responses


def _owner() -> str:
    """Who is asking: the hash of the request's API key ("" on a server without keys)."""
    return getattr(request.state, "cache_owner", "") or ""


def _stored(response_id: str, param: Optional[str] = None) -> StoredResponse:
    """A stored response the caller's API key made; another key's is not found (404, not 403:
    whether an id exists under another key is not told)."""
    entry = _store().get(response_id)
    if entry is None or entry.owner != _owner():
        raise ResponseNotFound(f"No response with id '{response_id}' is stored on this server.", param=param)
    return entry


def _parse(body: dict[str, Any]) -> rp.ParsedResponseRequest:
    previous = body.get("previous_response_id")
    if previous:
        entry = _stored(previous, "previous_response_id")
        kinds = ("function_call", "custom_tool_call")
        calls = {i["call_id"] for i in entry.response["output"] if i["type"] in kinds}
        calls |= {i["call_id"] for i in entry.input_items if i["type"] in kinds}
        return rp.parse(body, entry.history, calls)
    return rp.parse(body)


def _keep(parsed: rp.ParsedResponseRequest, response: dict[str, Any], text: str, calls: list, owner: str) -> None:
    if not parsed.echo["store"]:
        return
    _store().put(StoredResponse(response, parsed.input_items, rp.history_after(parsed, text, calls), time.time(),
                                owner))


async def create(body: dict):
    engine = request.state.engine
    parsed = await asyncio.to_thread(_parse, body)  # off the loop: schemas and strict tools compile while parsing
    conv = replace(parsed.conv, cache=cache_scope.of(body))
    prepared = await generation.prepare(engine, conv, request.state.image_sources)
    rid, created = rp.new_id("resp"), now()
    if not body.get("stream"):
        out = await generation.answer(engine, conv, prepared, ROUTE)
        status, _ = rp.status_of(out.done)
        output = [rp.reasoning_item(rp.new_id("rs"), out.reasoning, status)] if out.reasoning else []
        if out.text or not out.calls:
            output.append(rp.message_item(rp.new_id("msg"), out.text, status))
        output += [parsed.tools.call_item(c) for c in out.calls]
        response = rp.response_object(rid, created, parsed.echo, output, out.done,
                                      reasoning_tokens=out.reasoning_tokens)
        _keep(parsed, response, out.text, out.calls, _owner())
        return json_ok(response, prepared.warnings + parsed.tools.warnings)

    return _stream(engine, parsed, prepared, rid, created)


class _Encoder:
    """The Responses API's semantic events for one answer's neutral events: a reasoning item
    when a reasoning model thought, a message item when there is text, then a function_call item
    per call, then the response."""

    def __init__(self, parsed: rp.ParsedResponseRequest, rid: str, created: int, owner: str) -> None:
        self.parsed, self.rid, self.created, self.owner = parsed, rid, created, owner
        self.seq = iter(range(1 << 62))
        self.msg_id = rp.new_id("msg")
        self.rs_id = rp.new_id("rs")
        self.output: list[dict[str, Any]] = []
        self.msg_index = 0  # the message item's place in `output` (after a reasoning item)
        self.thinking = False  # a reasoning item is open
        self.last_event = time.monotonic()

    def ev(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "sequence_number": next(self.seq), **fields}

    def first(self) -> list[dict[str, Any]]:
        start = rp.response_object(self.rid, self.created, self.parsed.echo, [], None)
        return [self.ev("response.created", response=start), self.ev("response.in_progress", response=start)]

    def _reasoning(self, ev: answer.AnswerEvent) -> list[dict[str, Any]]:
        where = {"item_id": self.rs_id, "output_index": 0, "content_index": 0}
        out = []
        if isinstance(ev, answer.ReasoningPiece):
            if not self.thinking:
                self.thinking = True
                out.append(self.ev("response.output_item.added", output_index=0,
                                   item=rp.reasoning_item(self.rs_id, "", "in_progress") | {"content": []}))
            return out + [self.ev("response.reasoning_text.delta", **where, delta=ev.text)]
        if isinstance(ev, answer.ReasoningClosed) and self.thinking:
            item = rp.reasoning_item(self.rs_id, ev.text, "completed")
            self.output.append(item)
            return [self.ev("response.reasoning_text.done", **where, text=ev.text),
                    self.ev("response.output_item.done", output_index=0, item=item)]
        return []

    def __call__(self, ev: answer.AnswerEvent) -> list[dict[str, Any]]:
        out = self._encode(ev)
        if out:
            self.last_event = time.monotonic()
        return out

    def keepalive(self) -> str:
        """An SSE comment; after sse.EVENT_KEEPALIVE_S with nothing else, also `response.in_progress`
        (the response so far): Codex's idle timeout counts events and never sees comments."""
        if time.monotonic() - self.last_event < sse.EVENT_KEEPALIVE_S:
            return sse.COMMENT_KEEPALIVE
        self.last_event = time.monotonic()
        so_far = rp.response_object(self.rid, self.created, self.parsed.echo, list(self.output), None)
        return sse.COMMENT_KEEPALIVE + sse.named_event(self.ev("response.in_progress", response=so_far))

    def _encode(self, ev: answer.AnswerEvent) -> list[dict[str, Any]]:
        if isinstance(ev, (answer.ReasoningPiece, answer.ReasoningClosed)):
            return self._reasoning(ev)
        msg = {"item_id": self.msg_id, "output_index": self.msg_index, "content_index": 0}
        if isinstance(ev, answer.TextOpened):
            self.msg_index = msg["output_index"] = len(self.output)
            return [self.ev("response.output_item.added", output_index=self.msg_index,
                            item=rp.message_item(self.msg_id, "", "in_progress") | {"content": []}),
                    self.ev("response.content_part.added", **msg, part=rp.output_text(""))]
        if isinstance(ev, answer.TextPiece):
            return [self.ev("response.output_text.delta", **msg, delta=ev.text, logprobs=[])] if ev.text else []
        if isinstance(ev, answer.TextClosed):
            item = rp.message_item(self.msg_id, ev.text, rp.status_of(ev.done)[0])
            self.output.append(item)
            return [self.ev("response.output_text.done", **msg, text=ev.text, logprobs=[]),
                    self.ev("response.content_part.done", **msg, part=rp.output_text(ev.text)),
                    self.ev("response.output_item.done", output_index=self.msg_index, item=item)]
        if isinstance(ev, answer.CallMade):
            i, item = len(self.output), self.parsed.tools.call_item(ev.call)
            self.output.append(item)
            where = {"item_id": item["id"], "output_index": i}
            if item["type"] == "custom_tool_call":
                return [self.ev("response.output_item.added", output_index=i,
                                item=item | {"status": "in_progress", "input": ""}),
                        self.ev("response.custom_tool_call_input.delta", **where, delta=item["input"]),
                        self.ev("response.custom_tool_call_input.done", **where, input=item["input"]),
                        self.ev("response.output_item.done", output_index=i, item=item)]
            return [self.ev("response.output_item.added", output_index=i,
                            item=item | {"status": "in_progress", "arguments": ""}),
                    self.ev("response.function_call_arguments.delta", **where, delta=ev.call.arguments),
                    self.ev("response.function_call_arguments.done", **where,
                            name=item["name"], arguments=ev.call.arguments),
                    self.ev("response.output_item.done", output_index=i, item=item)]
        if isinstance(ev, answer.AnswerFinished):
            response = rp.response_object(self.rid, self.created, self.parsed.echo, self.output, ev.done,
                                          reasoning_tokens=ev.reasoning_tokens)
            _keep(self.parsed, response, ev.text, list(ev.calls), self.owner)
            return [self.ev("response.completed" if response["status"] == "completed" else "response.incomplete",
                            response=response)]
        return []

    def error(self, exc: Optional[EngineError]) -> dict[str, Any]:
        err = sse.openai_error_event(exc)["error"]
        return self.ev("error", code=err["code"] or err["type"], message=err["message"], param=err["param"])


def _stream(engine: Any, parsed: rp.ParsedResponseRequest, prepared: Any, rid: str, created: int):
    stream = AnswerStream(parsed.conv, prepared)  # with tools, a call is held until it can be parsed
    encoder = _Encoder(parsed, rid, created, _owner())
    return sse.choices_response(choices.events([lambda: engine.stream(prepared)], ROUTE, parsed.conv.model),
                                encoder.first(), lambda _i, ev: [c for n in stream.on(ev) for c in encoder(n)],
                                headers=warning_headers(prepared.warnings + parsed.tools.warnings),
                                encode=sse.named_event, done=None, on_error=encoder.error,
                                keepalive=encoder.keepalive)


async def input_tokens(body: dict):
    engine = request.state.engine
    parsed = await asyncio.to_thread(_parse, {**body, "stream": False})
    count = await generation.count_tokens(engine, parsed.conv)
    return {"object": "response.input_tokens", "input_tokens": count}


async def retrieve(response_id: str):
    return _stored(response_id, "response_id").response


async def delete(response_id: str):
    _stored(response_id, "response_id")  # another key's response is not found
    if not _store().delete(response_id):
        raise ResponseNotFound(f"No response with id '{response_id}' is stored on this server.", param="response_id")
    return {"id": response_id, "object": "response", "deleted": True}


async def input_items(response_id: str, limit: int = 20, order: str = "desc", after: Optional[str] = None,
                      include: Optional[list] = None):
    items = list(_stored(response_id, "response_id").input_items)
    if order == "desc":
        items.reverse()
    if after:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise ResponseNotFound(f"No input item with id '{after}' in response '{response_id}'.", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}
