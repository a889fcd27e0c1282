"""One generation request in the engine's terms: what every API (chat completions, completions,
responses, messages) parses its body into, and what the engine hands back once it is checked."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from engine.budget import Fields
from engine.text import ChatMessage, SamplingParams, TokenLogprob
from engine.tools import ToolCall, ToolChoice, ToolSpec

if TYPE_CHECKING:
    from engine.scoring import Prefix
    from engine.toolcalls import ToolFormat
    from engine.vision import VisionPlan


@dataclass(frozen=True)
class Conversation:
    """A chat-shaped request: messages, sampling, tools, and the API's own field names."""

    model: str
    messages: list[ChatMessage]
    params: SamplingParams
    tools: tuple[ToolSpec, ...] = ()  # tools on offer: the output is parsed for calls
    newest_media: frozenset[str] = frozenset()  # "image" / "audio": what the newest user turn carries
    continue_final: bool = False  # a last assistant message is continued (Anthropic's prefill)
    image_chunk_size: Optional[int] = None  # images per vision pass (None: the server's default)
    tool_choice: Optional[ToolChoice] = None  # with tools: auto (default), required or named
    fields: Fields = Fields()  # how this API names max_tokens, the prompt and its media


@dataclass(frozen=True)
class Prepared:
    """A request that passed every check and is ready to generate (Runner.plan makes it)."""

    model_id: str
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    runner: Any  # the loaded Runner (engine/runners.py)
    raw_text: bool = False  # a text completion (keeps the first token's leading space)
    vision: Optional["VisionPlan"] = None  # a vision model's passes (prompt is then unused)
    prefix: Optional["Prefix"] = None  # a shared prefill of the prompt (n choices, echoed logprobs)

    @property
    def prompt_logprobs(self) -> tuple[TokenLogprob, ...]:
        """Each prompt token's log probability (after `Engine.share_prefill` with scoring)."""
        return self.prefix.logprobs if self.prefix is not None else ()

    def prompt_text(self) -> str:
        """The prompt as text (what `echo` puts before a completion)."""
        return self.runner.tokenizer.decode(self.prompt)

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.runner.warnings

    def split_calls(self, text: str) -> tuple[str, list[ToolCall]]:
        """The text and the tool calls in it, in this model's format."""
        return self.runner.split_calls(text)

    @property
    def tool_format(self) -> "ToolFormat":
        return self.runner.tool_format[0]
