"""The one path every conversational API takes: chat completions, responses and messages.

Each API parses its own request into a `Conversation` (engine messages, sampling, tools) and
shapes its own answer; checking the modality, preparing the prompt, running the generation and
parsing tool calls happen here once, so the prompt cache, scheduler, limits and metrics apply
to all three alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from engine.engine import Engine, Prepared
from engine.errors import InvalidRequest
from engine.scheduler import StreamHandle
from engine.text import ChatMessage, Finished, SamplingParams, TokenLogprob
from engine.tools import ToolCall, ToolSpec, parse_tool_calls
from handlers import sse
from handlers.metrics import GenerationObserver


@dataclass(frozen=True)
class Conversation:
    """An API request in the engine's terms."""

    model: str
    messages: list[ChatMessage]
    params: SamplingParams
    tools: tuple[ToolSpec, ...] = ()  # tools on offer: the output is parsed for calls
    newest_has_media: bool = False  # the newest user turn carries an image/audio part
    continue_final: bool = False  # a last assistant message is continued (Anthropic's prefill)
    media_param: str = "messages"


@dataclass
class Answer:
    """A finished generation: text with tool calls taken out, and the accounting."""

    text: str
    calls: list[ToolCall]
    done: Finished
    logprobs: list[TokenLogprob] = field(default_factory=list)


def check_modality(engine: Engine, conv: Conversation) -> None:
    """An image or audio part in the newest user turn needs a model that reads it (400 naming one)."""
    if not conv.newest_has_media:
        return
    info = engine.model_info(conv.model)
    if info.type == "vision":
        return
    vision = [m.id for m in engine.list_models() if m.type == "vision"]
    hint = f"Use a vision model such as '{vision[0]}'." if vision else "No vision model is available on this server."
    raise InvalidRequest(f"The model '{conv.model}' accepts text only, and the newest message has an "
                         f"image or audio part. {hint}", param=conv.media_param, code="model_not_multimodal")


async def prepare(engine: Engine, conv: Conversation) -> Prepared:
    """Check the modality, load the model, apply the chat template, check the context budget."""
    check_modality(engine, conv)
    return await engine.prepare_chat(conv.model, conv.messages, conv.params, conv.tools, conv.continue_final)


def split_calls(conv: Conversation, text: str) -> tuple[str, list[ToolCall]]:
    """With tools on offer, the text and the calls in it; else the text unchanged."""
    return parse_tool_calls(text) if conv.tools else (text, [])


async def answer(engine: Engine, conv: Conversation, prepared: Prepared, route: str) -> Answer:
    """Run the generation to its end (non-streaming)."""
    text, done, logprobs = await sse.collect(engine.stream(prepared), GenerationObserver(route, conv.model))
    text, calls = split_calls(conv, text)
    return Answer(text, calls, done, logprobs)


def start_stream(engine: Engine, conv: Conversation, prepared: Prepared,
                 route: str) -> tuple[StreamHandle, GenerationObserver]:
    """Queue the generation for a streamed answer."""
    return engine.stream(prepared), GenerationObserver(route, conv.model)


async def count_tokens(engine: Engine, conv: Conversation) -> int:
    """Prompt tokens the conversation takes with this model's tokenizer and template."""
    check_modality(engine, conv)
    return await engine.count_chat_tokens(conv.model, conv.messages, conv.tools)


def media_count(parts: Sequence[dict[str, Any]], kinds: tuple[str, ...]) -> int:
    return sum(1 for p in parts if p.get("type") in kinds)


def media_marker(count: int) -> str:
    """What an earlier turn's images become for a text model (as the seed does)."""
    return f"[{count} {'attachment was' if count == 1 else 'attachments were'} attached]"


def newest_user_index(roles: Sequence[str]) -> Optional[int]:
    return max((i for i, r in enumerate(roles) if r == "user"), default=None)
