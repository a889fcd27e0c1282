"""OpenAI request bodies -> engine types, and engine results -> OpenAI response objects.

Connexion has already validated each body against openapi.yaml; what is checked here is what a
schema can't say (e.g. logit_bias keys must be token ids, images only for vision models).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from engine.request import Fields
from engine.errors import InvalidRequest
from engine.engine import grammar_for
from engine.request import ToolCall, ToolChoice, ToolSpec
from engine.request import ChatMessage, SamplingParams, TokenLogprob
from engine.request import ImageInput, attachment_marker
from engine.request import Thinking
from handlers.wire.response_tools import custom_input
from handlers.wire.tools import chat_tools, history_call

SYSTEM_FINGERPRINT = "openmlx-0.1.0"


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[ChatMessage]
    params: SamplingParams
    stream: bool
    include_usage: bool
    newest_media: frozenset[str]  # "image" / "audio": what the last user message carries
    tools: tuple[ToolSpec, ...] = ()  # tools offered: the output is parsed for tool calls
    image_chunk_size: Optional[int] = None
    tool_choice: Optional[ToolChoice] = None
    n: int = 1  # independent choices
    fields: Fields = Fields()  # max_completion_tokens is named when the client sent it
    thinking: Thinking = Thinking()
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    custom_tools: frozenset[str] = frozenset()  # names of the custom (freeform) tools on offer

    @property
    def tools_active(self) -> bool:
        return bool(self.tools)


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]  # OpenAI's four forms, as a batch
    params: SamplingParams  # what each choice is sampled with (logprobs on when best_of needs them)
    stream: bool
    include_usage: bool
    n: int = 1
    best_of: int = 1  # candidates generated per prompt; the n with the highest logprob sum are returned
    echo: bool = False
    logprobs: Optional[int] = None  # the request's legacy `logprobs` (None: no logprobs returned)

    @property
    def score_prompt(self) -> Optional[int]:
        """Alternatives per prompt token to score (echo with logprobs), else None."""
        return self.logprobs if self.echo and self.logprobs is not None else None


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _logit_bias(value: Optional[dict[str, float]]) -> tuple[tuple[int, float], ...]:
    if not value:
        return ()
    pairs: dict[int, float] = {}
    for key, bias in value.items():
        # ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses.
        if not (key.isascii() and key.isdigit()) or len(key) > 12:
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}.", param="logit_bias")
        token = int(key)
        if token in pairs:  # "253" and "0253": one token twice would add up past the ±100 bound
            raise InvalidRequest(f"logit_bias names token {token} more than once ({key!r}).", param="logit_bias")
        pairs[token] = float(bias)
    return tuple(pairs.items())


def sampling_params(body: dict[str, Any]) -> SamplingParams:
    """The decoding fields shared by chat and completions."""
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")

    def number(name: str, default: Optional[float]) -> Optional[float]:
        value = body.get(name)
        return default if value is None else float(value)

    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if isinstance(logprobs, int) and not isinstance(logprobs, bool):  # legacy completions: top-N
        logprobs, top = True, logprobs
    if top and not logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
    response_format = body.get("response_format") or {"type": "text"}
    if response_format.get("type") == "json_schema" and not (response_format.get("json_schema") or {}).get("schema"):
        raise InvalidRequest("response_format json_schema needs json_schema.schema.",
                             param="response_format.json_schema.schema")
    return SamplingParams(
        grammar=grammar_for(response_format),
        logprobs=bool(logprobs),
        top_logprobs=int(top or 0),
        max_tokens=max_tokens,
        temperature=number("temperature", None),  # None: the model's default
        top_p=number("top_p", 1.0),
        seed=body.get("seed"),
        stop=_stops(body.get("stop")),
        presence_penalty=number("presence_penalty", 0.0),
        frequency_penalty=number("frequency_penalty", 0.0),
        logit_bias=_logit_bias(body.get("logit_bias")),
    )


def _media_kinds(parts: list[dict[str, Any]]) -> frozenset[str]:
    kinds = {"image_url": "image", "input_audio": "audio", "file": "file"}
    return frozenset(kinds[p["type"]] for p in parts if p.get("type") in kinds)


def _flatten(index: int, message: dict[str, Any]) -> ChatMessage:
    """A message's text: parts joined by newlines; media in *earlier* turns become a marker.
    Tool results and earlier calls are rendered the way the model is told to write them."""
    role, content = message["role"], message.get("content")
    if role == "tool":
        if not message.get("tool_call_id"):
            raise InvalidRequest(f"messages[{index}] (tool) needs tool_call_id.", param=f"messages.{index}.tool_call_id")
        text = content if isinstance(content, str) else _flatten(index, {"role": "user", "content": content}).content
        return ChatMessage("tool", text or "", tool_call_id=message["tool_call_id"])
    if role == "assistant" and message.get("tool_calls"):
        calls = tuple(history_call(index, i, c) for i, c in enumerate(message["tool_calls"]))
        text = _flatten(index, {"role": "assistant", "content": content}).content
        return ChatMessage("assistant", text, tool_calls=calls)
    if content is None:
        if role != "assistant":
            raise InvalidRequest(f"messages[{index}] ({role}) needs content.", param=f"messages.{index}.content")
        return ChatMessage(role, "")
    if isinstance(content, str):
        return ChatMessage(role, content)
    texts = [p.get("text") or p.get("refusal") or "" for p in content if p.get("type") in ("text", "refusal")]
    images = []
    for j, p in enumerate(content):
        if p.get("type") == "image_url":
            if not isinstance(p.get("image_url"), dict) or not p["image_url"].get("url"):
                raise InvalidRequest("An image_url part needs image_url.url.",
                                     param=f"messages.{index}.content.{j}.image_url")
            images.append(ImageInput(p["image_url"]["url"], f"messages.{index}.content.{j}.image_url.url"))
    others = sum(1 for p in content if p.get("type") in ("input_audio", "file"))
    if others:  # no model here reads these yet: a marker, as for images in a text model's history
        texts.append(attachment_marker(others))
    return ChatMessage(role, "\n".join(t for t in texts if t), tuple(images))


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    """Validate what the schema can't and build the engine's view of a chat request."""
    messages = body["messages"]
    newest_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    newest_media = _media_kinds(messages[newest_user]["content"]) \
        if newest_user is not None and isinstance(messages[newest_user].get("content"), list) else frozenset()
    options = body.get("stream_options") or {}
    stream = bool(body.get("stream"))
    flat = [_flatten(i, m) for i, m in enumerate(messages)]
    params = sampling_params(body)
    tools, choice, custom = chat_tools(body)
    return ChatRequest(
        model=body["model"],
        messages=flat,
        params=params,
        stream=stream,
        include_usage=stream and bool(options.get("include_usage")),
        newest_media=newest_media,
        tools=tuple(tools),
        image_chunk_size=body.get("image_chunk_size"),
        tool_choice=choice,
        n=int(body.get("n") or 1),
        fields=Fields(max_tokens="max_completion_tokens" if body.get("max_completion_tokens") is not None
                      else "max_tokens"),
        thinking=chat_thinking(body),
        template_kwargs=template_kwargs(body.get("chat_template_kwargs")),
        custom_tools=custom,
    )


# apply_chat_template's own parameters: as template variables they would change how the prompt
# is built (tokenize, return_dict, ...) or clash with what the server passes.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def template_kwargs(value: Optional[dict[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """`chat_template_kwargs`: extra variables for the chat template, never its own parameters."""
    clash = sorted(set(value or {}) & _RESERVED_TEMPLATE_KWARGS)
    if clash:
        raise InvalidRequest(f"chat_template_kwargs can't set '{clash[0]}': the server sets it.",
                             param=f"chat_template_kwargs.{clash[0]}")
    return tuple((value or {}).items())


def effort_thinking(effort: Optional[str], budget: Optional[int] = None) -> Thinking:
    """A reasoning effort (OpenAI's none | minimal | low | medium | high) and/or a token budget:
    none and minimal turn thinking off; the others are budgets the server sets (--reasoning-budgets)."""
    if effort in ("none", "minimal"):
        return Thinking(enabled=False)
    return Thinking(budget=budget, effort=effort)


def chat_thinking(body: dict[str, Any]) -> Thinking:
    """Chat's `reasoning_effort`, OpenRouter's `reasoning: {effort, max_tokens, enabled}`, and
    `chat_template_kwargs.enable_thinking` (vLLM's switch)."""
    reasoning = body.get("reasoning") or {}
    if reasoning.get("enabled") is False or (body.get("chat_template_kwargs") or {}).get("enable_thinking") is False:
        return Thinking(enabled=False)
    return effort_thinking(reasoning.get("effort") or body.get("reasoning_effort"), reasoning.get("max_tokens"))


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms (a string, strings, token ids, lists of token ids) as a batch."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    options = body.get("stream_options") or {}
    stream = bool(body.get("stream"))
    n = int(body.get("n") or 1)
    best_of = int(body.get("best_of") or n)
    if best_of < n:
        raise InvalidRequest(f"best_of ({best_of}) must be at least n ({n}).", param="best_of")
    if stream and best_of > n:
        raise InvalidRequest("best_of above n can't be streamed (the best are known only at the end).",
                             param="best_of")
    params = sampling_params(body)
    logprobs = body.get("logprobs")
    if best_of > n and not params.logprobs:  # candidates are ranked by their logprob sums
        params = replace(params, logprobs=True)
    return CompletionRequest(
        model=body["model"],
        prompts=completion_prompts(body["prompt"]),
        params=params,
        stream=stream,
        include_usage=stream and bool(options.get("include_usage")),
        n=n, best_of=best_of, echo=bool(body.get("echo")),
        logprobs=None if logprobs is None else int(logprobs),
    )


# --- responses ---------------------------------------------------------------------------
def warning_headers(warnings: tuple[str, ...]) -> dict[str, str]:
    """The policy's WARNs for this model, as the documented X-OpenMLX-Warning header."""
    if not warnings:
        return {}
    return {"X-OpenMLX-Warning": "; ".join(warnings).encode("latin-1", "replace").decode("latin-1")}


def json_ok(body: dict[str, Any], warnings: tuple[str, ...]) -> tuple[dict[str, Any], int, dict[str, str]]:
    """A 200 JSON answer (the operation also documents text/event-stream, so say which)."""
    return body, 200, {"Content-Type": "application/json", **warning_headers(warnings)}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          reasoning_tokens: Optional[int] = None) -> dict[str, Any]:
    """OpenAI's usage; `reasoning_tokens` (a reasoning model's thinking) under completion_tokens_details."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens,
                           "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": min(reasoning_tokens, completion_tokens)}
    return out


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: Optional[Sequence[TokenLogprob]]) -> Optional[dict[str, Any]]:
    """OpenAI's chat `logprobs` object, or None when not requested."""
    if entries is None:
        return None
    return {"content": [{**_token_entry(e.token, e.logprob),
                         "top_logprobs": [_token_entry(t, lp) for t, lp in e.top]} for e in entries],
            "refusal": None}


def completion_logprobs(entries: Optional[Sequence[TokenLogprob]], offset: int = 0) -> Optional[dict[str, Any]]:
    """The legacy completions `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    if entries is None:
        return None
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    # A prompt's first token has no logprob (echo): null there, as OpenAI and vLLM send it.
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) if e.logprob is not None else None for e in entries],
            "text_offset": offsets}


def tool_call_object(call: ToolCall, custom: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A call as chat completions returns it: a function call, or a custom tool's call."""
    if call.name in custom:
        return {"id": call.id, "type": "custom", "custom": {"name": call.name, "input": custom_input(call.arguments)}}
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def chat_choice(index: int, text: str, finish: str, logprobs: Optional[Sequence[TokenLogprob]] = None,
                tool_calls: Sequence[ToolCall] = (), reasoning: Optional[str] = None,
                custom: frozenset[str] = frozenset()) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text if (text or not tool_calls) else None,
                               "refusal": None}
    if reasoning:  # a reasoning model's thinking (vLLM's and DeepSeek's name); absent when it did not think
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = [tool_call_object(c, custom) for c in tool_calls]
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": chat_logprobs(logprobs)}


def chat_completion(cid: str, created: int, model: str, choices: Sequence[dict[str, Any]],
                    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
                    reasoning_tokens: Optional[int] = None) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT, "choices": list(choices),
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens),
    }


def tool_call_deltas(calls: Sequence[ToolCall], piece: int = 24, first_index: int = 0,
                     custom: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Streamed calls as OpenAI sends them: index, id, type and name first, then argument pieces;
    a custom tool's call whole, in one delta."""
    deltas = []
    for i, call in enumerate(calls, start=first_index):
        if call.name in custom:
            deltas.append({"tool_calls": [{"index": i, **tool_call_object(call, custom)}]})
            continue
        deltas.append({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                       "function": {"name": call.name, "arguments": ""}}]})
        for start in range(0, len(call.arguments), piece):
            deltas.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments[start:start + piece]}}]})
    return deltas


def chat_chunk(cid: str, created: int, model: str, delta: dict[str, Any],
               finish: Optional[str] = None, with_usage_field: bool = False,
               logprobs: Optional[Sequence[TokenLogprob]] = None, index: int = 0) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": chat_logprobs(logprobs)}],
    }
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def text_choice(index: int, text: str, finish: Optional[str], logprobs: Optional[Sequence[TokenLogprob]] = None,
                offset: int = 0) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": completion_logprobs(logprobs, offset)}


def usage_chunk(obj: str, cid: str, created: int, model: str, prompt_tokens: int,
                completion_tokens: int, cached_tokens: int = 0, reasoning_tokens: Optional[int] = None) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: empty choices, real usage."""
    return {"id": cid, "object": obj, "created": created, "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens)}


def text_completion(cid: str, created: int, model: str, text: str, finish: Optional[str],
                    counts: Optional[tuple[int, int, int]] = None,
                    logprobs: Optional[Sequence[TokenLogprob]] = None, offset: int = 0,
                    index: int = 0) -> dict[str, Any]:
    return completion_body(cid, created, model, [text_choice(index, text, finish, logprobs, offset)], counts)


def completion_body(cid: str, created: int, model: str, choices: Sequence[dict[str, Any]],
                    counts: Optional[tuple[int, int, int]] = None) -> dict[str, Any]:
    """A text_completion object (a response, or one streamed chunk) with these choices; `counts`:
    (prompt, completion, cached prompt) tokens for its usage."""
    body: dict[str, Any] = {
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT, "choices": list(choices),
    }
    if counts is not None:
        body["usage"] = usage(*counts)
    return body
