"""The one path every conversational API takes: chat completions, responses and messages.

Each API parses its own request into the engine's `Conversation` (messages, sampling, tools, and
its own names for max_tokens, the prompt and its media) and shapes its own answer; preparing,
running the generation and parsing tool calls (engine/generation/answer.py) happen here once, so the prompt cache, scheduler,
limits and metrics apply to all three alike.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from engine.engine import Answer, Engine, split_answer
from engine.request import Conversation, Prepared
from handlers.conversation import choices
from handlers.conversation.images import ImageSources, load_all


async def prepare(engine: Engine, conv: Conversation, sources: Optional[ImageSources] = None) -> Prepared:
    """The engine prepares the request (modality, model, template, budget) on its worker; the
    images a vision model will see are loaded here first (URLs and files are the API's)."""
    sources = sources or ImageSources()
    return await engine.prepare(conv, lambda messages: load_all(messages, sources, conv.fields.media))


async def answer(engine: Engine, conv: Conversation, prepared: Prepared, route: str) -> Answer:
    """Run the generation to its end (non-streaming)."""
    (result,) = await choices.collect([lambda: engine.stream(prepared)], route, conv.model)
    return replace(split_answer(conv, prepared, result.text, result.done), logprobs=result.logprobs)


async def count_tokens(engine: Engine, conv: Conversation) -> int:
    """Prompt tokens the conversation takes with this model's tokenizer and template."""
    return await engine.count_tokens(conv)


def newest_user_index(roles: Sequence[str]) -> Optional[int]:
    return max((i for i, r in enumerate(roles) if r == "user"), default=None)
