"""OpenAI Responses API: request bodies -> a Conversation, engine results -> Response objects
and the semantic stream events.

Connexion has validated the body against openapi.yaml; what is checked here is what a schema
can't say (a function_call_output must answer a call, item references can't be resolved…).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from engine.errors import InvalidRequest
from engine.engine import grammar_for
from engine.request import ChatMessage, Conversation, Finished, SamplingParams
from engine.request import ToolCall, ToolChoice, ToolSpec
from engine.request import ImageInput
from engine.request import Fields
from handlers.conversation.generation import newest_user_index
from handlers.wire.protocol import effort_thinking, now
from handlers.wire.tools import check_strict, offer_tools
from handlers.wire.response_tools import ResponseTools, parse_tools

def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class ParsedResponseRequest:
    conv: Conversation
    input_items: list[dict[str, Any]]  # this request's input as items with ids (for input_items)
    new_messages: list[ChatMessage]  # the turns this request adds to the stored history
    history: list[ChatMessage]  # from previous_response_id
    call_ids: set[str]  # function calls the conversation has made so far
    echo: dict[str, Any] = field(default_factory=dict)  # the request's settings a Response object repeats
    tools: ResponseTools = field(default_factory=ResponseTools)  # what the model is offered, and calls' shapes


def _part_text(part: dict[str, Any]) -> str:
    return part.get("text") or part.get("refusal") or ""


def _content(content: Any, where: str) -> tuple[str, tuple[ImageInput, ...]]:
    """(text, images) of a message's content."""
    if isinstance(content, str):
        return content, ()
    images = []
    for i, part in enumerate(content or []):
        if part["type"] in ("input_file", "input_audio"):
            raise InvalidRequest(f"{part['type']} content is not supported.", param=f"{where}.content.{i}.type")
        if part["type"] == "input_image":
            if not part.get("image_url"):
                raise InvalidRequest("input_image needs image_url (file_id is not supported).",
                                     param=f"{where}.content.{i}.image_url")
            images.append(ImageInput(part["image_url"], f"{where}.content.{i}.image_url"))
    texts = [_part_text(p) for p in content or [] if p["type"] in ("input_text", "output_text", "refusal")]
    return "\n".join(t for t in texts if t), tuple(images)


def _item_with_id(item: dict[str, Any]) -> dict[str, Any]:
    """The input item as input_items lists it."""
    kind = item.get("type") or "message"
    if kind == "message":
        content = item["content"]
        if isinstance(content, str):
            content = [{"type": "input_text" if item["role"] != "assistant" else "output_text", "text": content}]
        out = {"id": item.get("id") or new_id("msg"), "type": "message", "role": item["role"],
               "status": "completed", "content": content}
        return out
    if kind == "function_call":
        ns = {"namespace": item["namespace"]} if item.get("namespace") else {}
        return {"id": item.get("id") or new_id("fc"), "type": "function_call", "status": "completed",
                "call_id": item["call_id"], **ns, "name": item["name"], "arguments": item.get("arguments") or "{}"}
    if kind == "custom_tool_call":
        ns = {"namespace": item["namespace"]} if item.get("namespace") else {}
        return {"id": item.get("id") or new_id("ctc"), "type": "custom_tool_call", "status": "completed",
                "call_id": item["call_id"], **ns, "name": item["name"], "input": item.get("input") or ""}
    return {"id": item.get("id") or new_id("fco"), "type": kind, "status": "completed",
            "call_id": item["call_id"], "output": item["output"]}


def _required(item: dict[str, Any], index: int, *names: str) -> None:
    for name in names:
        if item.get(name) is None:
            raise InvalidRequest(f"input[{index}] ({item.get('type') or 'message'}) needs '{name}'.",
                                 param=f"input.{index}.{name}")


def input_messages(raw: Any, call_ids: set[str]) -> tuple[list[ChatMessage], list[dict[str, Any]], bool]:
    """The input's turns as engine messages, its items with ids, and whether the newest user turn
    has an image. `call_ids` (calls made so far) grows with the input's own function calls."""
    if isinstance(raw, str):
        return [ChatMessage("user", raw)], [_item_with_id({"role": "user", "content": raw})], False
    items = list(raw or [])
    roles = [i.get("role") if (i.get("type") or "message") == "message" else "" for i in items]
    newest = newest_user_index(roles)
    messages: list[ChatMessage] = []
    newest_media = False
    for index, item in enumerate(items):
        kind = item.get("type") or "message"
        where = f"input.{index}"
        if kind == "message":
            _required(item, index, "role", "content")
            text, images = _content(item["content"], where)
            if images and item["role"] != "user":
                raise InvalidRequest("Only user messages can carry images.", param=f"{where}.content")
            newest_media = newest_media or (index == newest and bool(images))
            messages.append(ChatMessage(item["role"], text, images))
        elif kind in ("function_call", "custom_tool_call"):
            _required(item, index, "call_id", "name")
            # The model wrote it under the name it was offered (NAMESPACE__NAME; a custom tool's
            # input as the one string argument): shown again the same way.
            name = ResponseTools().exposed(item["name"], item.get("namespace"))
            arguments = (item.get("arguments") or "{}") if kind == "function_call" \
                else json.dumps({"input": item.get("input") or ""})
            call = ToolCall(item["call_id"], name, arguments)
            call_ids.add(item["call_id"])
            if messages and messages[-1].role == "assistant":  # calls join the assistant turn they belong to
                last = messages.pop()
                messages.append(replace(last, tool_calls=last.tool_calls + (call,)))
            else:
                messages.append(ChatMessage("assistant", "", tool_calls=(call,)))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            _required(item, index, "call_id", "output")
            if item["call_id"] not in call_ids:
                raise InvalidRequest(f"No function call with call_id '{item['call_id']}' precedes this output.",
                                     param=f"{where}.call_id")
            output = item["output"]
            text = output if isinstance(output, str) else _content(output, where)[0]
            messages.append(ChatMessage("tool", text, tool_call_id=item["call_id"]))
        elif kind == "reasoning":
            continue  # nothing to show the model
        else:
            raise InvalidRequest(f"Input items of type '{kind}' are not supported.", param=f"{where}.type")
    return messages, [_item_with_id(i) for i in items if (i.get("type") or "message") != "reasoning"], newest_media


def _format(text: Optional[dict[str, Any]]) -> dict[str, Any]:
    fmt = (text or {}).get("format") or {"type": "text"}
    if fmt["type"] == "json_schema":
        if not fmt.get("schema"):
            raise InvalidRequest("text.format json_schema needs schema.", param="text.format.schema")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "response"), "schema": fmt["schema"],
                                                        "strict": fmt.get("strict")}}
    return {"type": fmt["type"]}


def _tools(body: dict[str, Any], offered: ResponseTools) -> tuple[list[ToolSpec], Optional[ToolChoice]]:
    raw = body.get("tools") or []
    check_strict([(i, t) for i, t in enumerate(raw) if t["type"] == "function"], "tools.{i}.parameters")
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return offer_tools(offered.specs, "named", offered.exposed(choice["name"], choice.get("namespace")))
    return offer_tools(offered.specs, choice)


# How the Responses API names max_tokens, the prompt and its media, for every 400.
FIELDS = Fields(max_tokens="max_output_tokens", prompt="input", media="input")


def parse(body: dict[str, Any], history: Sequence[ChatMessage] = (), call_ids: Optional[set[str]] = None) -> ParsedResponseRequest:
    """A create-response body (with the stored history of `previous_response_id`) -> a Conversation."""
    call_ids = set(call_ids or ())
    new, items, newest_media = input_messages(body.get("input", ""), call_ids)
    instructions = body.get("instructions")
    messages = ([ChatMessage("system", instructions)] if instructions else []) + list(history) + new
    offered = parse_tools(body.get("tools") or [])
    tools, choice = _tools(body, offered)
    params = SamplingParams(
        max_tokens=body.get("max_output_tokens"),
        temperature=None if body.get("temperature") is None else float(body["temperature"]),
        top_p=1.0 if body.get("top_p") is None else float(body["top_p"]),
        grammar=grammar_for(_format(body.get("text")), "text.format.schema"),
    )
    conv = Conversation(body["model"], messages, params, tuple(tools), frozenset({"image"} if newest_media else ()),
                        tool_choice=choice, fields=FIELDS,
                        thinking=effort_thinking((body.get("reasoning") or {}).get("effort")))
    return ParsedResponseRequest(conv, items, new, list(history), call_ids, echo_fields(body, offered), offered)


# --- shaping ---------------------------------------------------------------------------
def usage(done: Optional[Finished], reasoning_tokens: Optional[int] = None) -> Optional[dict[str, Any]]:
    if done is None:
        return None
    thought = min(reasoning_tokens or 0, done.completion_tokens)
    return {"input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": done.cached_tokens},
            "output_tokens": done.completion_tokens, "output_tokens_details": {"reasoning_tokens": thought},
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A reasoning model's thinking as OpenAI's open-weight models return it: reasoning_text content."""
    return {"id": item_id, "type": "reasoning", "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [output_text(text)]}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def status_of(done: Finished) -> tuple[str, Optional[dict[str, str]]]:
    if done.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def echo_fields(body: dict[str, Any], offered: Optional[ResponseTools] = None) -> dict[str, Any]:
    """The request's settings a Response object repeats, as OpenAI does, read once from the body."""
    text = body.get("text") or {}
    return {
        "instructions": body.get("instructions"), "model": body["model"],
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "previous_response_id": body.get("previous_response_id"),
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0,
        "top_p": body.get("top_p") if body.get("top_p") is not None else 1.0,
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": (offered or parse_tools(body.get("tools") or [])).echo,  # the tools offered (no hosted ones)
        "text": {"format": text.get("format") or {"type": "text"}},
        "store": body.get("store") is not False,
        "metadata": body.get("metadata") or {},
        "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None}
        if body.get("reasoning") else None,
    }


def response_object(rid: str, created: int, echo: dict[str, Any], output: list[dict[str, Any]],
                    done: Optional[Finished], status: str = "in_progress",
                    reasoning_tokens: Optional[int] = None) -> dict[str, Any]:
    """The Response object, with the request's settings (`echo_fields`) as OpenAI repeats them."""
    incomplete = None
    if done is not None:
        status, incomplete = status_of(done)
    return {
        "id": rid, "object": "response", "created_at": created,
        "completed_at": now() if status == "completed" else None,
        "status": status, "error": None, "incomplete_details": incomplete,
        "instructions": echo["instructions"], "model": echo["model"], "output": output,
        "output_text": "".join(c["text"] for o in output if o["type"] == "message" for c in o["content"]),
        **{k: echo[k] for k in ("parallel_tool_calls", "previous_response_id", "max_output_tokens", "temperature",
                                "top_p", "tool_choice", "tools", "text")},
        "truncation": "disabled", "store": echo["store"],
        "metadata": echo["metadata"], "reasoning": echo["reasoning"], "service_tier": "default",
        **({"usage": usage(done, reasoning_tokens)} if done is not None else {}),  # absent (not null) until the end
    }


def history_after(parsed: ParsedResponseRequest, text: str, calls: Sequence[ToolCall]) -> list[ChatMessage]:
    """The conversation a follow-up (`previous_response_id`) continues: without instructions."""
    return parsed.history + parsed.new_messages + [ChatMessage("assistant", text, tool_calls=tuple(calls))]
