"""One generation request in the engine's terms: what every API (chat completions, completions,
responses, messages) parses its body into, what the engine hands back once it is checked, and the
events a generation yields. Value types only: the runners import these, never the reverse."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

from engine.constrained.toolcalls import ToolFormat
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
    temperature: Optional[float] = None  # None: the model's configured default, else 1.0 (Engine._defaults)
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
class CacheScope:
    """Whose prompt cache entries a request may reuse (engine/generation/prompt_cache.py): the
    caller's API key, as a hash (the key itself never reaches the engine; "" when the server has no
    keys: one shared space), and the request's `cache_salt`, which isolates further. `cached_tokens`
    reports the prefix a prompt shares with an entry, so an entry reused across callers would tell
    one caller another's prompt."""

    owner: str = ""
    salt: str = ""

    @property
    def key(self) -> str:
        """The space's name: "" for the shared one, else a hash of owner and salt (what the disk
        store writes: neither the salt nor the owner's hash is kept in the clear)."""
        if not self.owner and not self.salt:
            return ""
        return hashlib.sha256(f"{len(self.owner)}:{self.owner}:{self.salt}".encode()).hexdigest()[:32]


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
    cache: CacheScope = CacheScope()  # whose prompt cache entries it may reuse


class Planner(Protocol):
    """What a Prepared and the facade call on the runner that planned it (engine/runners.py
    `Runner` is one); the runner's other parts are the engine's business."""

    tokenizer: Any  # mlx_lm's TokenizerWrapper (a library type this module does not import)
    warnings: tuple[str, ...]

    @property
    def tool_format(self) -> tuple[ToolFormat, bool]: ...

    def split_calls(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]: ...

    def share_prefill(self, prepared: Prepared, score_top: Optional[int] = None) -> Iterator[Pass]: ...

    def run(self, prepared: Prepared, cancelled: Callable[[], bool]) -> Iterator[GenerationEvent]: ...


class SharedPrefix(Protocol):
    """A prompt's shared prefill (engine/generation/scoring.py `Prefix`), as far as a Prepared reads it."""

    logprobs: tuple[TokenLogprob, ...]


class ThinkingSplitter(Protocol):
    """Thinking and answer apart while they stream: (channel, text) pieces."""

    def feed(self, text: str) -> list[tuple[str, str]]: ...

    def finish(self) -> list[tuple[str, str]]: ...


class ThinkingFormat(Protocol):
    """How a reasoning model marks its thinking (engine/generation/reasoning.py `ReasoningFormat`)."""

    def splitter(self) -> ThinkingSplitter: ...

    def split(self, text: str) -> tuple[str, str]: ...


@dataclass(frozen=True)
class Prepared:
    """A request that passed every check and is ready to generate (Runner.plan makes it)."""

    model_id: str
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    runner: Planner  # the loaded model's runner (engine/runners.py)
    raw_text: bool = False  # a text completion (keeps the first token's leading space)
    # A vision model's passes: engine/media/vision.py VisionPlan, which only its runner reads (the
    # prompt is then unused); `object` keeps this module below the media it would otherwise import.
    vision: Optional[object] = None
    prefix: Optional[SharedPrefix] = None  # a shared prefill of the prompt (n choices, echoed logprobs)
    reasoning: Optional[ThinkingFormat] = None  # a reasoning model's output is thinking, then the answer
    # Where a later prompt may resume a model whose cache can't be cut back (hybrid/recurrent,
    # engine/generation/prompt_cache.py), besides the prompt's end: the start of the generation prompt.
    resume_at: tuple[int, ...] = ()
    cache: CacheScope = CacheScope()  # whose prompt cache entries it may reuse and adds to

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
    def tool_format(self) -> ToolFormat:
        """How this model writes tool calls (engine/constrained/toolcalls ToolFormat)."""
        return self.runner.tool_format[0]
