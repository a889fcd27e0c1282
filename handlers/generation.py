"""The one path every conversational API takes: chat completions, responses and messages.

Each API parses its own request into a `Conversation` (engine messages, sampling, tools) and
shapes its own answer; checking the modality, preparing the prompt, running the generation and
parsing tool calls happen here once, so the prompt cache, scheduler, limits and metrics apply
to all three alike.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Optional, Sequence

from engine.engine import Engine, Prepared
from engine.errors import InvalidRequest
from engine.scheduler import StreamHandle
from engine.text import ChatMessage, Finished, SamplingParams, TokenLogprob
from engine.toolcalls import CallWatcher, cut_call
from engine.tools import ToolCall, ToolChoice, ToolSpec
from handlers import sse
from handlers.images import ImageSources, load_all
from handlers.metrics import GenerationObserver


@dataclass(frozen=True)
class Conversation:
    """An API request in the engine's terms."""

    model: str
    messages: list[ChatMessage]
    params: SamplingParams
    tools: tuple[ToolSpec, ...] = ()  # tools on offer: the output is parsed for calls
    newest_media: frozenset[str] = frozenset()  # "image" / "audio": what the newest user turn carries
    continue_final: bool = False  # a last assistant message is continued (Anthropic's prefill)
    media_param: str = "messages"
    image_chunk_size: Optional[int] = None  # images per vision pass (None: the server's default)
    tool_choice: Optional[ToolChoice] = None  # with tools: auto (default), required or named


@dataclass
class Answer:
    """A finished generation: text with tool calls taken out, and the accounting."""

    text: str
    calls: list[ToolCall]
    done: Finished
    logprobs: list[TokenLogprob] = field(default_factory=list)


async def check_modality(engine: Engine, conv: Conversation) -> str:
    """The model's type; an image (audio) part in the newest user turn needs a vision (audio)
    model: a 400 naming one otherwise. The store is read off the event loop."""
    return await asyncio.to_thread(_check_modality, engine, conv)


def _check_modality(engine: Engine, conv: Conversation) -> str:
    info = engine.model_info(conv.model)
    for media, kind in (("image", "vision"), ("audio", "audio")):
        if media in conv.newest_media and info.type != kind:
            others = [m.id for m in engine.list_models() if m.type == kind]
            hint = f"Use a {kind} model such as '{others[0]}'." if others else f"No {kind} model is available on this server."
            raise InvalidRequest(f"The model '{conv.model}' is a {info.type} model and the newest message has "
                                 f"an {media} part. {hint}", param=conv.media_param, code="model_not_multimodal")
    return info.type


async def prepare(engine: Engine, conv: Conversation, sources: Optional[ImageSources] = None) -> Prepared:
    """Check the modality, load the images a vision model will see, load the model, apply the
    chat template, check the context budget."""
    kind = await check_modality(engine, conv)
    messages = conv.messages
    if kind == "vision" and any(m.images for m in messages):
        messages = await load_all(messages, sources or ImageSources(), conv.media_param)
    return await engine.prepare_chat(conv.model, messages, conv.params, conv.tools, conv.continue_final,
                                     conv.image_chunk_size, conv.tool_choice)


def split_calls(conv: Conversation, prepared: Prepared, text: str, done: Finished) -> tuple[str, list[ToolCall]]:
    """With tools on offer, the text and the calls in it (in the model's format); else the text.
    A call that max_tokens cut off comes back as a call with the arguments written so far
    (`complete=False`), never as markup in the text."""
    if not conv.tools:
        return text, []
    text, calls = prepared.split_calls(text)
    if done.finish_reason == "length":
        text, cut = cut_call(prepared.tool_format, text, conv.tools)
        calls += [cut] if cut else []
    return text, calls


class ToolTextStream:
    """Streaming with tools on offer: text goes out as it comes until a call may be starting
    (the model's call trigger); the rest is held and parsed at the end."""

    def __init__(self, conv: Conversation, prepared: Prepared) -> None:
        self.conv, self.prepared = conv, prepared
        self.watcher = CallWatcher(prepared.tool_format) if conv.tools else None
        self.parts: list[str] = []

    def feed(self, text: str) -> str:
        self.parts.append(text)
        return self.watcher.feed(text) if self.watcher else text

    def finish(self, done: Finished) -> tuple[str, str, list[ToolCall]]:
        """(everything generated with the calls taken out, as the non-stream answer's text is;
        the part of the text not sent yet; the calls), parsed once."""
        text, calls = split_calls(self.conv, self.prepared, "".join(self.parts), done)
        if self.watcher is None:
            return text, "", []
        return text, ("" if calls else self.watcher.unsent()), calls


async def answer(engine: Engine, conv: Conversation, prepared: Prepared, route: str) -> Answer:
    """Run the generation to its end (non-streaming)."""
    text, done, logprobs = await sse.collect(engine.stream(prepared), GenerationObserver(route, conv.model))
    text, calls = split_calls(conv, prepared, text, done)
    return Answer(text, calls, done, logprobs)


def start_stream(engine: Engine, conv: Conversation, prepared: Prepared,
                 route: str) -> tuple[StreamHandle, GenerationObserver]:
    """Queue the generation for a streamed answer."""
    return engine.stream(prepared), GenerationObserver(route, conv.model)


async def count_tokens(engine: Engine, conv: Conversation) -> int:
    """Prompt tokens the conversation takes with this model's tokenizer and template."""
    await check_modality(engine, conv)
    return await engine.count_chat_tokens(conv.model, conv.messages, conv.tools)


def newest_user_index(roles: Sequence[str]) -> Optional[int]:
    return max((i for i, r in enumerate(roles) if r == "user"), default=None)
