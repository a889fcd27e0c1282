"""Reasoning models: the thinking a model writes before its answer, kept apart from the answer.

Models of the Qwen3 / DeepSeek-R1 / QwQ / SmolLM3 kind write `<think>...</think>` and then the
answer. Either the model writes the opening tag itself, or the chat template already opened the
block at the end of the prompt and the model only closes it. Parsing works on text, so a tag that
spans several tokens (or arrives split across deltas) is found, and a stream never shows part of
a tag. A thinking budget is enforced while generating: past it, a logits processor writes the
closing text itself and the answer follows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from engine.constrained.toolcalls.common import held_back
from engine.request import Thinking  # noqa: F401  (the request's side; named here too for the APIs)

OPEN, CLOSE = "<think>", "</think>"
# What the server writes when the budget runs out: the close the templates expect, then the
# answer's start on its own paragraph (as Qwen3's templates render an earlier turn's thinking).
FORCED_CLOSE = "\n" + CLOSE + "\n\n"
REASONING, CONTENT = "reasoning", "content"


@dataclass(frozen=True)
class Style:
    """How one family writes its thinking: the text that opens and closes it, and what the
    server writes to close it when the budget runs out."""

    name: str
    open: str
    close: str
    forced_close: str


STYLES = {
    "think": Style("think", OPEN, CLOSE, FORCED_CLOSE),  # Qwen3/3.5, DeepSeek, GLM, Kimi-K2-Thinking, MiniMax
    "gemma4": Style("gemma4", "<|channel>thought", "<channel|>", "<channel|>"),  # Gemma 4's thought channel
    # MiniMax M3: its own tags; a turn without thinking starts with a bare close.
    "minimax3": Style("minimax3", "<mm:think>", "</mm:think>", "\n</mm:think>"),
    # gpt-oss: the analysis channel, then the final one (engine/constrained/toolcalls/harmony.py).
    "harmony": Style("harmony", "<|channel|>analysis", "<|end|>", "<|end|><|start|>assistant<|channel|>final<|message|>"),
}


def template_style(template: str) -> Optional[str]:
    """The thinking style a chat template writes or opens (None: it doesn't think)."""
    if "<|channel|>" in template and "<|message|>" in template:
        return "harmony"
    if "<|channel>" in template and "<channel|>" in template:
        return "gemma4"
    if "<mm:think>" in template:
        return "minimax3"
    if OPEN in template or CLOSE in template:
        return "think"
    return None


def template_thinks(template: str) -> bool:
    """Whether a chat template writes or opens a thinking block."""
    return template_style(template) is not None


def style_of(template: str, parser: Optional[str]) -> Optional[str]:
    """The config file's `reasoning_parser` (think | harmony | gemma4 | minimax3 | none), else the template's."""
    if parser == "none":
        return None
    return parser or template_style(template)


def is_reasoning_model(template: str, parser: Optional[str]) -> bool:
    """The config file's `reasoning_parser` says so, else the chat template."""
    return style_of(template, parser) is not None


def thinks(template: str, parser: Optional[str], thinking: Thinking) -> bool:
    """Whether this request's output will start with thinking: a reasoning model, thinking not
    switched off."""
    return thinking.enabled is not False and is_reasoning_model(template, parser)


def prompt_opens_block(prompt_tail: str, style: str = "think") -> bool:
    """Whether the rendered prompt ends inside an opened thinking block (the template opened it)."""
    tags = STYLES[style]
    opened = prompt_tail.rfind(tags.open)
    return opened >= 0 and prompt_tail.rfind(tags.close) < opened


@dataclass(frozen=True)
class ReasoningFormat:
    """How one prepared request's output is split: the family's style, and whether the block is
    already open."""

    opened: bool  # the template opened the block: output starts as thinking
    style: str = "think"

    def splitter(self) -> Any:
        if self.style == "harmony":
            from engine.constrained.toolcalls.harmony import HarmonySplitter

            return HarmonySplitter(self.opened)
        tags = STYLES[self.style]
        return ReasoningSplitter(self.opened, tags.open, tags.close)

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) of a whole output."""
        s = self.splitter()
        pieces = s.feed(text) + s.finish()
        return ("".join(t for c, t in pieces if c == REASONING), "".join(t for c, t in pieces if c == CONTENT))


class ReasoningSplitter:
    """Text deltas -> (channel, text) pieces, never showing part of a tag.

    States: `start` (the model may open a block: leading whitespace and a partial `<think>` are
    held), `thinking` (until `</think>`), `answer`. Whitespace between the close and the answer is
    dropped, as is leading whitespace of the thinking."""

    def __init__(self, opened: bool, open_tag: str = OPEN, close_tag: str = CLOSE) -> None:
        self.open, self.close = open_tag, close_tag
        self.state = "thinking" if opened else "start"
        self.buffer = ""
        self.at_section_start = True  # strip whitespace at the start of thinking and of the answer

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(self.open):
                    self.buffer, self.state, self.at_section_start = stripped[len(self.open):], "thinking", True
                    continue
                if stripped.startswith(self.close):  # closing a block the template opened and closed (thinking off)
                    self.buffer, self.state, self.at_section_start = stripped[len(self.close):], "answer", True
                    continue
                if not stripped or self.open.startswith(stripped) or self.close.startswith(stripped):
                    return out  # whitespace, or maybe a tag: wait
                self.state = "answer"
                continue
            if self.state == "thinking":
                end = self.buffer.find(self.close)
                if end >= 0:
                    self._emit(out, REASONING, self.buffer[:end])
                    self.buffer, self.state, self.at_section_start = self.buffer[end + len(self.close):], "answer", True
                    continue
                keep = held_back(self.buffer, [self.close])
                self._emit(out, REASONING, self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return out
            self._emit(out, CONTENT, self.buffer)
            self.buffer = ""
            return out

    def finish(self) -> list[tuple[str, str]]:
        """What is held at the end: an unclosed block's tail is thinking; anything else is answer."""
        out: list[tuple[str, str]] = []
        channel = REASONING if self.state == "thinking" else CONTENT
        if self.state == "start":
            self.buffer = self.buffer.strip() and self.buffer
        self._emit(out, channel, self.buffer)
        self.buffer = ""
        return out

    def _emit(self, out: list[tuple[str, str]], channel: str, text: str) -> None:
        if self.at_section_start:
            text = text.lstrip()
        if not text:
            return
        self.at_section_start = False
        if out and out[-1][0] == channel:
            out[-1] = (channel, out[-1][1] + text)
        else:
            out.append((channel, text))


def budget_processor(tokenizer: Any, budget: int, opened: bool, style: str = "think") -> Callable[[Any, Any], Any]:
    """An mlx-lm logits processor that closes the thinking block after `budget` generated tokens:
    while the model is still thinking at that point, the next tokens are forced to the closing
    text (FORCED_CLOSE); a model that closes the block itself, or never opens one, is left alone."""
    import mlx.core as mx

    tags = STYLES[style]
    close_ids = list(tokenizer.encode(tags.forced_close, add_special_tokens=False))
    state: dict[str, Any] = {"seen": None, "generated": [], "forced": 0, "done": False}

    def inside(text: str) -> Optional[bool]:
        """Whether the model is thinking; None: it may be opening a block (wait and see)."""
        if tags.close in text:
            return False
        if opened or text.lstrip().startswith(tags.open):
            return True
        return None if tags.open.startswith(text.lstrip()) else False

    def process(tokens: Any, logits: Any) -> Any:
        # The first call sees the (uncached part of the) prompt; later calls add one token each.
        if state["seen"] is None:
            state["seen"] = tokens.size
        else:
            state["generated"] += tokens[state["seen"]:].tolist()
            state["seen"] = tokens.size
        if state["done"]:
            return logits
        if state["forced"] == 0:
            if len(state["generated"]) < budget:
                return logits
            thinking = inside(tokenizer.decode(state["generated"]))
            if thinking is None:  # nothing written yet, or part of `<think>`: no close to force yet
                return logits
            if not thinking:
                state["done"] = True
                return logits
        if state["forced"] >= len(close_ids):
            state["done"] = True
            return logits
        token = close_ids[state["forced"]]
        state["forced"] += 1
        banned = mx.full(logits.shape, -float("inf"), dtype=logits.dtype)
        return mx.where(mx.arange(logits.shape[-1]) == token, mx.zeros_like(logits), banned)

    return process


@dataclass(frozen=True)
class ReasoningPlan:
    """What a runner does for one chat request on a (maybe) reasoning model."""

    template_kwargs: dict[str, Any]  # passed to the chat template (chat_template_kwargs, enable_thinking)
    parse: bool  # split the output at the thinking block
    budget: Optional[int]  # close the block after this many tokens (None: no limit)
    style: str = "think"  # how the family writes its thinking (STYLES)


def plan(template: str, parser: Optional[str], thinking: Thinking, template_kwargs: dict[str, Any],
         constrained: bool, effort_budgets: tuple[int, int, int]) -> ReasoningPlan:
    """Whether to parse thinking, what the template is told, and the budget.

    `parser`: the config file's `reasoning_parser` (think | harmony | gemma4 | minimax3 | none), else found
    from the template.
    With a grammar in force (JSON output, a required tool call) the model is asked not to think
    (`enable_thinking: false`) and nothing is parsed: the grammar holds from the first token."""
    kwargs = dict(template_kwargs)
    style = style_of(template, parser)
    reasoning_model = style is not None
    if thinking.enabled is False or (reasoning_model and constrained):
        kwargs.setdefault("enable_thinking", False)
    # A template that takes an effort (gpt-oss's `Reasoning: low|medium|high`) gets the request's.
    if thinking.effort and "reasoning_effort" in template:
        kwargs.setdefault("reasoning_effort", "high" if thinking.effort == "xhigh" else thinking.effort)
    if not reasoning_model:
        return ReasoningPlan(kwargs, False, None, style or "think")
    if constrained:
        # Thinking switched off, a model may still write a block before the grammar's part starts
        # (auto tool calls start the grammar at the call): it is split out all the same.
        if style == "minimax3":
            kwargs.setdefault("thinking_mode", "disabled")
        return ReasoningPlan(kwargs, thinking.enabled is False, None, style)
    # Said explicitly: mlx-lm's tokenizer otherwise passes enable_thinking=False for a vocabulary
    # without single <think> tokens, whatever the template does. Gemma 4 thinks only when asked:
    # its template's own default (off) stands unless the request asks for thinking (on, a budget
    # or an effort).
    asked = thinking.enabled is not None or thinking.budget is not None or thinking.effort is not None
    # Gemma 4's default is said explicitly too: left unset, mlx-lm's tokenizer passes
    # enable_thinking=True for any vocabulary holding <|channel> and <channel|>.
    kwargs.setdefault("enable_thinking", thinking.enabled is not False and (style != "gemma4" or asked))
    if style == "minimax3":
        # M3's template takes `thinking_mode` (enabled | disabled | adaptive, its default) instead.
        kwargs.setdefault("thinking_mode", "disabled" if thinking.enabled is False else "enabled" if asked
                          else "adaptive")
    budget = thinking.budget
    levels = {"low": 0, "medium": 1, "high": 2, "xhigh": 2}
    if budget is None and thinking.effort in levels:
        budget = effort_budgets[levels[thinking.effort]]
    if thinking.enabled is False:
        budget = 0  # a template that ignores enable_thinking still gets its block closed at once
    return ReasoningPlan(kwargs, True, budget, style)
