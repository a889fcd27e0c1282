"""/v1/responses: create (plain and streamed), retrieve, delete, input items, input token count."""
from __future__ import annotations

import time
from typing import Any, Optional

from connexion import request

from engine.errors import EngineError
from engine.text import Finished, TextDelta
from handlers import generation, sse
from handlers import responses_protocol as rp
from handlers.protocol import json_ok, now, warning_headers
from handlers.response_store import ResponseStore, StoredResponse

ROUTE = "responses"


class ResponseNotFound(EngineError):
    status = 404
    type = "invalid_request_error"
    code = "response_not_found"


def _store() -> ResponseStore:
    return request.state.responses


def _stored(response_id: str, param: Optional[str] = None) -> StoredResponse:
    entry = _store().get(response_id)
    if entry is None:
        raise ResponseNotFound(f"No response with id '{response_id}' is stored on this server.", param=param)
    return entry


def _parse(body: dict[str, Any]) -> rp.ParsedResponseRequest:
    previous = body.get("previous_response_id")
    if previous:
        entry = _stored(previous, "previous_response_id")
        calls = {i["call_id"] for i in entry.response["output"] if i["type"] == "function_call"}
        calls |= {i["call_id"] for i in entry.input_items if i["type"] == "function_call"}
        return rp.parse(body, entry.history, calls)
    return rp.parse(body)


def _keep(body: dict[str, Any], parsed: rp.ParsedResponseRequest, response: dict[str, Any],
          text: str, calls: list) -> None:
    if body.get("store") is False:
        return
    _store().put(StoredResponse(response, parsed.input_items, rp.history_after(parsed, text, calls), time.time()))


async def create(body: dict):
    engine = request.state.engine
    parsed = _parse(body)
    conv = parsed.conv
    prepared = await generation.prepare(engine, conv, request.state.image_sources)
    rid, created = rp.new_id("resp"), now()
    if not body.get("stream"):
        out = await generation.answer(engine, conv, prepared, ROUTE)
        status, _ = rp.status_of(out.done)
        output = []
        if out.text or not out.calls:
            output.append(rp.message_item(rp.new_id("msg"), out.text, status))
        output += [rp.call_item(c) for c in out.calls]
        response = rp.response_object(rid, created, body, output, out.done)
        _keep(body, parsed, response, out.text, out.calls)
        return json_ok(response, prepared.warnings)

    handle, observer = generation.start_stream(engine, conv, prepared, ROUTE)
    seq = iter(range(1 << 62))
    msg_id = rp.new_id("msg")

    def ev(type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "sequence_number": next(seq), **fields}

    def open_text() -> list[dict[str, Any]]:
        return [ev("response.output_item.added", output_index=0,
                   item=rp.message_item(msg_id, "", "in_progress") | {"content": []}),
                ev("response.content_part.added", item_id=msg_id, output_index=0, content_index=0,
                   part=rp.output_text(""))]

    def text_part_events(text: str, status: str, opened: bool) -> list[dict[str, Any]]:
        """The message item's closing events (and its opening ones when text was held back)."""
        out = []
        if not opened:
            out += open_text()
            if text:
                out.append(ev("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                              delta=text, logprobs=[]))
        out += [ev("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=text, logprobs=[]),
                ev("response.content_part.done", item_id=msg_id, output_index=0, content_index=0, part=rp.output_text(text)),
                ev("response.output_item.done", output_index=0, item=rp.message_item(msg_id, text, status))]
        return out

    start = rp.response_object(rid, created, body, [], None)
    first_events = [ev("response.created", response=start), ev("response.in_progress", response=start)]
    out = generation.ToolTextStream(conv, prepared)  # with tools, a call is held until it can be parsed
    opened: list[bool] = []  # the message item has been announced

    def on_delta(delta: TextDelta) -> Optional[dict[str, Any]]:
        text = out.feed(delta.text)
        if not text:
            return None
        events = [] if opened else open_text()
        opened.append(True)
        events.append(ev("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                         delta=text, logprobs=[]))
        return events  # type: ignore[return-value]

    def on_finish(done: Finished) -> list[dict[str, Any]]:
        text, unsent, calls = out.finish(done)
        status, _ = rp.status_of(done)
        events: list[dict[str, Any]] = []
        output = []
        index = 0
        if opened or text or not calls:
            if opened and unsent:
                events.append(ev("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                                 delta=unsent, logprobs=[]))
            events += text_part_events(text, status, opened=bool(opened))
            output.append(rp.message_item(msg_id, text, status))
            index = 1
        for i, call in enumerate(calls, start=index):
            item = rp.call_item(call)
            events += [ev("response.output_item.added", output_index=i, item=item | {"status": "in_progress", "arguments": ""}),
                       ev("response.function_call_arguments.delta", item_id=item["id"], output_index=i, delta=call.arguments),
                       ev("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                          name=call.name, arguments=call.arguments),
                       ev("response.output_item.done", output_index=i, item=item)]
            output.append(item)
        response = rp.response_object(rid, created, body, output, done)
        _keep(body, parsed, response, text, calls)
        events.append(ev("response.completed" if response["status"] == "completed" else "response.incomplete",
                         response=response))
        return events

    def on_error(exc: Optional[EngineError]) -> dict[str, Any]:
        err = sse.openai_error_event(exc)["error"]
        return ev("error", code=err["code"] or err["type"], message=err["message"], param=err["param"])

    return sse.stream_response(handle, observer, on_delta, on_finish, first_events, warning_headers(prepared.warnings),
                               encode=sse.named_event, done=None, on_error=on_error)


async def input_tokens(body: dict):
    engine = request.state.engine
    parsed = _parse({**body, "stream": False})
    count = await generation.count_tokens(engine, parsed.conv)
    return {"object": "response.input_tokens", "input_tokens": count}


async def retrieve(response_id: str):
    return _stored(response_id, "response_id").response


async def delete(response_id: str):
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
