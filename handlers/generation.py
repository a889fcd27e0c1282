"""The one path every conversational API takes: chat completions, responses and messages.

Each API parses its own request into the engine's `Conversation` (messages, sampling, tools, and
its own names for max_tokens, the prompt and its media) and shapes its own answer; preparing,
running the generation and parsing tool calls happen here once, so the prompt cache, scheduler,
limits and metrics apply to all three alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from engine.engine import Engine
from engine.request import Conversation, Finished, Prepared, TokenLogprob
from engine.constrained.toolcalls import cut_call
from engine.constrained.toolcalls.common import bare_call
from engine.constrained.tools import ToolCall
from handlers import choices
from handlers.images import ImageSources, load_all


@dataclass
class Answer:
    """A finished generation: text with tool calls (and a reasoning model's thinking) taken out,
    and the accounting."""

    text: str
    calls: list[ToolCall]
    done: Finished
    logprobs: list[TokenLogprob] = field(default_factory=list)
    reasoning: Optional[str] = None  # a reasoning model's thinking (None: not a reasoning model)
    reasoning_tokens: Optional[int] = None


def split_answer(conv: Conversation, prepared: Prepared, text: str, done: Finished) -> Answer:
    """A finished output as an Answer: a reasoning model's thinking (and the tokens it took)
    apart, then the tool calls taken out of the rest (`split_calls`)."""
    reasoning, tokens = None, None
    if prepared.reasoning is not None:
        reasoning, text = prepared.reasoning.split(text)
        tokens = prepared.reasoning_tokens(reasoning)
    text, calls = split_calls(conv, prepared, text, done)
    return Answer(text, calls, done, reasoning=reasoning, reasoning_tokens=tokens)


async def prepare(engine: Engine, conv: Conversation, sources: Optional[ImageSources] = None) -> Prepared:
    """The engine prepares the request (modality, model, template, budget) on its worker; the
    images a vision model will see are loaded here first (URLs and files are the API's)."""
    sources = sources or ImageSources()
    return await engine.prepare(conv, lambda messages: load_all(messages, sources, conv.fields.media))


def split_calls(conv: Conversation, prepared: Prepared, text: str, done: Finished) -> tuple[str, list[ToolCall]]:
    """With tools on offer, the text and the calls in it (in the model's format); else the text.
    A call that max_tokens cut off comes back as a call with the arguments written so far
    (`complete=False`), never as markup in the text."""
    if not conv.tools:
        return text, []
    text, calls = prepared.split_calls(text, conv.tools)
    if not calls and done.finish_reason == "stop":
        bare = bare_call(text, conv.tools)  # the whole answer is one call object, without tags
        if bare is not None:
            return "", [bare]
    if done.finish_reason == "length":
        text, cut = cut_call(prepared.tool_format, text, conv.tools)
        calls += [cut] if cut else []
    return text, calls


async def answer(engine: Engine, conv: Conversation, prepared: Prepared, route: str) -> Answer:
    """Run the generation to its end (non-streaming)."""
    (result,) = await choices.collect([lambda: engine.stream(prepared)], route, conv.model)
    return replace(split_answer(conv, prepared, result.text, result.done), logprobs=result.logprobs)


async def count_tokens(engine: Engine, conv: Conversation) -> int:
    """Prompt tokens the conversation takes with this model's tokenizer and template."""
    return await engine.count_tokens(conv)


def newest_user_index(roles: Sequence[str]) -> Optional[int]:
    return max((i for i, r in enumerate(roles) if r == "user"), default=None)
