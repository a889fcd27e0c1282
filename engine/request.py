"""One generation request in the engine's terms: what every API (chat completions, completions,
responses, messages) parses its body into, what the engine hands back once it is checked, and the
events a generation yields. Value types only: the runners import these, never the reverse."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from engine.constrained.tools import ToolCall, ToolChoice, ToolSpec


@dataclass(frozen=True)
class Fields:
    """What an API calls the generic parts of a request, so each 400 names the client's field."""

    max_tokens: str = "max_tokens"
    prompt: str = "messages"
    media: str = "messages"


@dataclass(frozen=True)
class ImageInput:
    """One image part of a message, as the client sent it and (once fetched) its bytes."""

    source: str  # a data:, http(s):// or file: URL, or a path
    param: str  # where it is in the request, for errors
    data: Optional[bytes] = None

    def with_data(self, data: bytes) -> "ImageInput":
        return replace(self, data=data)

    @property
    def digest(self) -> str:
        """Identity for stable numbering: the same picture sent again keeps its number."""
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else self.source


def attachment_marker(count: int) -> str:
    """What images become in a turn the model can't see them in (as the seed does)."""
    return f"[{count} {'attachment was' if count == 1 else 'attachments were'} attached]"


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn: its text flattened from content parts, and its images (a vision model sees
    them; for a text model each turn's images become a short marker)."""

    role: str
    content: str
    images: tuple[ImageInput, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: Optional[str] = None  # a "tool" turn: the call it answers

    @property
    def text_only(self) -> str:
        """The content as a text model gets it."""
        if not self.images:
            return self.content
        return (self.content + "\n" if self.content else "") + attachment_marker(len(self.images))


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one request (already validated by the API layer)."""

    max_tokens: Optional[int] = None
    temperature: Optional[float] = None  # None: the model's configured default, else 1.0 (engine.defaults)
    top_p: float = 1.0
    top_k: int = 0  # 0: off (Anthropic's top_k)
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False  # report each generated token's log probability
    top_logprobs: int = 0  # and this many most likely alternatives
    grammar: Optional[str] = None  # llguidance grammar the output must follow (JSON modes)
    # Set by the runner for a reasoning model: close the thinking block after this many tokens
    # (engine/generation/reasoning.py), knowing whether the template opened it.
    thinking_budget: Optional[int] = None
    thinking_opened: bool = False
    thinking_style: str = "think"  # how the family writes its thinking (reasoning.STYLES)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log probability (and the top alternatives when asked)."""

    token: str
    logprob: Optional[float]  # None only for a prompt's first token (nothing scores it)
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text that is safe to send, with the logprobs of the tokens that
    produced it since the last delta (empty unless requested)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end of a generation, with honest accounting."""

    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache instead of computed
    stop_sequence: Optional[str] = None  # the stop string that ended the text, if one did
    drafted: int = 0  # speculative decoding: tokens guessed, and how many of them were kept
    accepted: int = 0


@dataclass(frozen=True)
class Started:
    """The generation got its turn: how much of the prompt the prompt cache covers."""

    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Pass:
    """A pass over a long prompt ended: nothing for the client. The worker runs the other
    streams for as long as the pass took before this one's next pass (engine/scheduler.py), so a
    long prompt doesn't stall them. `wait`: no pass was run; the stream waits for another's
    prefill (a prefix it shares), and the others run at least WAIT_S before it looks again."""

    wait: bool = False


PASS = Pass()
WAIT = Pass(wait=True)
WAIT_S = 0.05

GenerationEvent = Started | TextDelta | Finished | Pass


@dataclass(frozen=True)
class Thinking:
    """What a request asks of a reasoning model (engine/generation/reasoning.py)."""

    enabled: Optional[bool] = None  # None: the model's own default; False: `enable_thinking: false`
    budget: Optional[int] = None  # tokens of thinking before the server closes the block
    effort: Optional[str] = None  # low | medium | high: a budget set by the server (--reasoning-budgets)


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
    thinking: Thinking = Thinking()  # a reasoning model's thinking: on/off, budget or effort
    template_kwargs: tuple[tuple[str, Any], ...] = ()  # chat_template_kwargs: extra template variables


@dataclass(frozen=True)
class Prepared:
    """A request that passed every check and is ready to generate (Runner.plan makes it)."""

    model_id: str
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    runner: Any  # the loaded Runner (engine/runners.py)
    raw_text: bool = False  # a text completion (keeps the first token's leading space)
    vision: Any = None  # a vision model's passes, engine/media/vision.py VisionPlan (prompt is then unused)
    prefix: Any = None  # a shared prefill of the prompt, engine/generation/scoring.py Prefix (n choices, echoed logprobs)
    reasoning: Any = None  # engine/generation/reasoning.py ReasoningFormat: a reasoning model's output is thinking, then the answer

    def reasoning_tokens(self, reasoning: str) -> int:
        """Tokens the thinking took: its text (not the tags), as this model's tokenizer counts it."""
        if self.reasoning is None or not reasoning:
            return 0
        return len(self.runner.tokenizer.encode(reasoning, add_special_tokens=False))

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

    def split_calls(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        """The text and the tool calls in it, in this model's format."""
        return self.runner.split_calls(text, tools)

    @property
    def tool_format(self) -> Any:
        """How this model writes tool calls (engine/toolcalls ToolFormat)."""
        return self.runner.tool_format[0]
