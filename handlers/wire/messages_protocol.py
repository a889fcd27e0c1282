"""Anthropic Messages API: request bodies -> a Conversation, engine results -> Message objects
and Anthropic's stream events.

Connexion has validated the body against openapi.yaml; what is checked here is what a schema
can't say (the first turn is the user's, a tool_result answers a tool_use of the turn before…).
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Optional, Sequence

from engine.errors import InvalidRequest
from engine.engine import grammar_for
from engine.request import ChatMessage, Conversation, Finished, SamplingParams
from engine.request import ToolCall, ToolSpec
from engine.request import ImageInput, attachment_marker
from engine.request import Thinking
from handlers.conversation.generation import newest_user_index
from handlers.wire.tools import offer_tools

_CHOICES = {"auto": "auto", "any": "required", "none": "none", "tool": "named"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# Claude Code's first system block: a tag for Anthropic's billing whose suffix changes with every
# prompt. Shown to the model it would only make every run's prompt differ from its first token,
# and the prompt cache would miss the 12-19k tokens of identical system prompt and tools after it.
BILLING_HEADER = "x-anthropic-billing-header:"


def _system(value: Any) -> str:
    """The `system` field's text, without Claude Code's billing tag."""
    if value is None:
        return ""
    if isinstance(value, str):
        return _drop_billing(value)
    texts = [b.get("text") or "" for b in value]
    return "\n".join(t for t in texts if not t.lstrip().startswith(BILLING_HEADER))


def _drop_billing(text: str) -> str:
    """A system string whose first line is the billing tag, without that line."""
    if not text.lstrip().startswith(BILLING_HEADER):
        return text
    return text.lstrip().partition("\n")[2]


def _result_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = [b.get("text") or "" for b in content if b.get("type") == "text"]
    images = sum(1 for b in content if b.get("type") == "image")
    return "\n".join(texts + ([attachment_marker(images)] if images else []))


def _image(block: dict[str, Any], where: str) -> ImageInput:
    source = block.get("source") or {}
    if source.get("type") == "base64" and source.get("data"):
        return ImageInput(f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}", f"{where}.source")
    if source.get("type") == "url" and source.get("url"):
        return ImageInput(source["url"], f"{where}.source.url")
    raise InvalidRequest("An image block needs a base64 or url source.", param=f"{where}.source")


def _message(index: int, message: dict[str, Any], open_calls: set[str]) -> list[ChatMessage]:
    """One message as engine turns: a user message's tool results become tool turns (before
    the text it carries), an assistant message's tool_use blocks its calls."""
    role, content = message["role"], message["content"]
    if role == "system":
        return [ChatMessage("system", _system_turn(index, content))]
    if isinstance(content, str):
        return [ChatMessage(role, content)]
    texts: list[str] = []
    images: list[ImageInput] = []
    calls: list[ToolCall] = []
    results: list[ChatMessage] = []
    for j, block in enumerate(content):
        kind, where = block["type"], f"messages.{index}.content.{j}"
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "image":
            if role != "user":
                raise InvalidRequest("Only user messages can carry images.", param=where)
            images.append(_image(block, where))
        elif kind == "tool_use":
            if role != "assistant":
                raise InvalidRequest("tool_use blocks belong in assistant messages.", param=where)
            for name in ("id", "name"):
                if not block.get(name):
                    raise InvalidRequest(f"A tool_use block needs '{name}'.", param=f"{where}.{name}")
            calls.append(ToolCall(block["id"], block["name"], json.dumps(block.get("input") or {})))
            open_calls.add(block["id"])
        elif kind == "tool_result":
            use_id = block.get("tool_use_id")
            if role != "user":
                raise InvalidRequest("tool_result blocks belong in user messages.", param=where)
            if not use_id or use_id not in open_calls:
                raise InvalidRequest(f"tool_result block(s) with tool_use_id '{use_id}' have no matching tool_use "
                                     "block in the previous assistant message.", param=f"{where}.tool_use_id")
            text = _result_text(block.get("content"))
            results.append(ChatMessage("tool", ("Error: " + text) if block.get("is_error") else text,
                                       tool_call_id=use_id))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier reasoning is not shown to the model again
        else:
            raise InvalidRequest(f"Content blocks of type '{kind}' are not supported.", param=f"{where}.type")
    if role == "user":
        open_calls.clear()  # a tool_use must be answered in the very next user turn
    text = "\n".join(t for t in texts if t)
    if results:
        return results + ([ChatMessage(role, text, tuple(images))] if text or images else [])
    return [ChatMessage(role, text, tuple(images), tool_calls=tuple(calls))]


def _system_turn(index: int, content: Any) -> str:
    """A `system` message in `messages` (Claude Code sends its environment, deferred tools and
    skills this way): text blocks only."""
    if isinstance(content, str):
        return _drop_billing(content)
    for j, block in enumerate(content):
        if block["type"] != "text":
            raise InvalidRequest(f"A system message holds text blocks only, not '{block['type']}'.",
                                 param=f"messages.{index}.content.{j}.type")
        if not isinstance(block.get("text"), str):
            raise InvalidRequest("A text block needs 'text'.", param=f"messages.{index}.content.{j}.text")
    return _system(content)


def conversation(body: dict[str, Any], max_tokens: Optional[int]) -> Conversation:
    """A messages (or count_tokens) body -> a Conversation."""
    messages = body["messages"]
    if not messages:
        raise InvalidRequest("messages: at least one message is required.", param="messages")
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is None or messages[first]["role"] != "user":
        where = len(messages) - 1 if first is None else first
        raise InvalidRequest("The first message (after any system messages) must use the 'user' role.",
                             param=f"messages.{where}.role")
    newest = newest_user_index([m["role"] for m in messages])
    turns: list[ChatMessage] = []
    system = _system(body.get("system"))
    if system:
        turns.append(ChatMessage("system", system))
    open_calls: set[str] = set()
    newest_media = False
    for i, m in enumerate(messages):
        if m["role"] == "system" and not _system_turn(i, m["content"]):
            continue  # nothing left once the billing tag is gone
        for turn in _message(i, m, open_calls):
            newest_media = newest_media or (i == newest and bool(turn.images))
            turns.append(turn)
    specs = [ToolSpec(t["name"], t.get("description") or "", json.dumps(t["input_schema"]))
             for t in client_tools(body)]
    choice = body.get("tool_choice") or {}
    tools, tool_choice = offer_tools(specs, _CHOICES[choice["type"]] if choice else None, choice.get("name"))
    fmt = (body.get("output_config") or {}).get("format")
    grammar = grammar_for({"type": "json_schema", "json_schema": {"schema": fmt["schema"]}},
                          "output_config.format.schema") if fmt else None
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=None if body.get("temperature") is None else float(body["temperature"]),
        top_p=float(body.get("top_p", 1.0)),
        top_k=int(body.get("top_k", 0)),
        stop=tuple(body.get("stop_sequences") or ()),
        grammar=grammar,
    )
    return Conversation(body["model"], turns, params, tuple(tools), frozenset({"image"} if newest_media else ()),
                        continue_final=messages[-1]["role"] == "assistant", tool_choice=tool_choice,
                        thinking=thinking(body.get("thinking"), max_tokens))


def client_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The client tools the model is offered; Anthropic's versioned tool types are left out
    (`left_out_tools`). A client tool needs its input_schema."""
    tools = []
    for i, tool in enumerate(body.get("tools") or []):
        if tool.get("type", "custom") != "custom":
            continue
        if tool.get("input_schema") is None:
            raise InvalidRequest(f"Tool '{tool['name']}' needs input_schema.", param=f"tools.{i}.input_schema")
        tools.append(tool)
    return tools


def left_out_tools(body: dict[str, Any]) -> tuple[str, ...]:
    """The warning for Anthropic's own tool types (web search, code execution, bash, text editor...):
    the server can neither run them nor describe them to the model, so they are left out."""
    kinds = [t["type"] for t in body.get("tools") or [] if t.get("type", "custom") != "custom"]
    return (f"Anthropic tool types this server can't run were left out of the prompt: {', '.join(kinds)}",) \
        if kinds else ()


def thinking(value: Optional[dict[str, Any]], max_tokens: Optional[int]) -> Thinking:
    """Anthropic's `thinking`: enabled with a budget (below max_tokens, as Anthropic requires),
    disabled, or adaptive (the model's own default)."""
    if not value:
        return Thinking()
    if value.get("type") == "disabled":
        return Thinking(enabled=False)
    budget = value.get("budget_tokens")
    if value.get("type") == "enabled" and budget is not None and max_tokens is not None and budget >= max_tokens:
        raise InvalidRequest(f"thinking.budget_tokens ({budget}) must be less than max_tokens ({max_tokens}).",
                             param="thinking.budget_tokens")
    return Thinking(budget=budget if value.get("type") == "enabled" else None)


def thinking_block(text: str) -> dict[str, Any]:
    """A thinking block. `signature` is empty: openmlx's thinking is not signed, and a thinking
    block sent back in history is dropped anyway."""
    return {"type": "thinking", "thinking": text, "signature": ""}


# --- shaping ---------------------------------------------------------------------------
def stop_reason(done: Finished, calls: Sequence[ToolCall]) -> str:
    if done.finish_reason == "length":
        return "max_tokens"
    if calls:
        return "tool_use"
    return "stop_sequence" if done.stop_sequence else "end_turn"


def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, Any]:
    """Anthropic counts cached prompt tokens apart: input + cache_read is the whole prompt."""
    return {"input_tokens": prompt_tokens - cached_tokens, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached_tokens, "cache_creation_input_tokens": 0,
            "cache_creation": None, "server_tool_use": None, "service_tier": "standard",
            "inference_geo": None, "output_tokens_details": None}


def delta_usage(done: Finished) -> dict[str, Any]:
    """The final counts message_delta carries: Message usage without the per-message fields."""
    full = usage(done.prompt_tokens, done.cached_tokens, done.completion_tokens)
    return {k: v for k, v in full.items() if k not in ("cache_creation", "service_tier", "inference_geo")}


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    """A tool_use block; a call cut off by max_tokens has the input that parses so far ({} if none)."""
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
            "input": call_input(call), "caller": {"type": "direct"}}


def call_input(call: ToolCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "citations": None}


def message(mid: str, model: str, content: list[dict[str, Any]], done: Optional[Finished],
            calls: Sequence[ToolCall] = (), prompt_tokens: int = 0, cached_tokens: int = 0) -> dict[str, Any]:
    """The Message object (with `done` None: the empty one message_start carries)."""
    if done is not None:
        prompt_tokens, cached_tokens = done.prompt_tokens, done.cached_tokens
    return {"id": mid, "type": "message", "role": "assistant", "content": content, "model": model,
            "stop_reason": stop_reason(done, calls) if done else None,
            "stop_sequence": done.stop_sequence if done else None, "stop_details": None, "container": None,
            "usage": usage(prompt_tokens, cached_tokens, done.completion_tokens if done else 0)}
