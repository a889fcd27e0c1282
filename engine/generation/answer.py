"""One streamed answer as neutral events, which each API encodes in its own words.

The engine's events (Started, TextDelta, Finished) become: the answer started; a reasoning
model's thinking, in pieces, then closed; its text opened, pieces of it, its text closed; each
tool call, whole; the answer finished. With tools on offer,
text goes out as it comes until a call may be starting (the model's call trigger); the rest is
held and parsed at the end, so call markup never reaches the text. Chat completions, Responses
and Messages are each a small encoder of these events (handlers/chat.py, handlers/responses.py,
handlers/messages.py); the non-streamed answer is split the same way (`split_answer`). Handlers
reach this module through the facade (engine.engine).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from engine.request import Conversation, Finished, Prepared, Started, TextDelta, TokenLogprob
from engine.constrained.toolcalls import CallWatcher, cut_call
from engine.constrained.toolcalls.common import bare_call
from engine.generation.reasoning import REASONING
from engine.constrained.tools import ToolCall


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


@dataclass(frozen=True)
class AnswerStarted:
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class ReasoningPiece:
    text: str  # a piece of a reasoning model's thinking (sent before any text)


@dataclass(frozen=True)
class ReasoningClosed:
    text: str  # the whole thinking
    tokens: int  # what it took, as the model's tokenizer counts it


@dataclass(frozen=True)
class TextOpened:
    pass


@dataclass(frozen=True)
class TextPiece:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TextClosed:
    text: str  # the whole text, calls taken out (what the non-streamed answer says)
    done: Finished


@dataclass(frozen=True)
class CallMade:
    index: int  # the call's position among this answer's calls
    call: ToolCall


@dataclass(frozen=True)
class AnswerFinished:
    done: Finished
    text: str
    calls: tuple[ToolCall, ...]
    reasoning_tokens: Optional[int] = None  # None: not a reasoning model


AnswerEvent = Union[AnswerStarted, ReasoningPiece, ReasoningClosed, TextOpened, TextPiece, TextClosed, CallMade,
                    AnswerFinished]


class AnswerStream:
    """One choice's engine events -> neutral events. `text_opened`: the encoder opens the text
    at the start itself (Messages does without tools), so TextOpened is not sent."""

    def __init__(self, conv: Conversation, prepared: Prepared, text_opened: bool = False) -> None:
        self.conv, self.prepared = conv, prepared
        self.watcher = CallWatcher(prepared.tool_format) if conv.tools else None
        self.parts: list[str] = []
        self.opened = text_opened
        self.thinking = prepared.reasoning.splitter() if prepared.reasoning is not None else None
        self.thought: list[str] = []
        self.reasoning_tokens: Optional[int] = None  # set once the thinking is closed

    def on(self, ev: Any) -> list[AnswerEvent]:
        if isinstance(ev, Started):
            return [AnswerStarted(ev.prompt_tokens, ev.cached_tokens)]
        if isinstance(ev, TextDelta):
            return self._text(ev)
        if isinstance(ev, Finished):
            return self._finish(ev)
        return []

    def _text(self, ev: TextDelta) -> list[AnswerEvent]:
        if self.thinking is None:
            return self._answer_text(ev)
        out: list[AnswerEvent] = []
        for channel, piece in self.thinking.feed(ev.text):
            out += self._channel(channel, piece, ev)
        return out

    def _channel(self, channel: str, piece: str, ev: TextDelta) -> list[AnswerEvent]:
        if channel == REASONING:
            self.thought.append(piece)
            return [ReasoningPiece(piece)]
        return self._close_thinking() + self._answer_text(TextDelta(piece, ev.logprobs))

    def _close_thinking(self) -> list[AnswerEvent]:
        if self.thinking is None or self.reasoning_tokens is not None:
            return []
        thought = "".join(self.thought)
        self.reasoning_tokens = self.prepared.reasoning_tokens(thought)
        return [ReasoningClosed(thought, self.reasoning_tokens)]

    def _answer_text(self, ev: TextDelta) -> list[AnswerEvent]:
        self.parts.append(ev.text)
        text = self.watcher.feed(ev.text) if self.watcher else ev.text
        # Without tools a piece may carry only logprobs (its text held back by a stop string).
        if not text and (self.watcher or not ev.logprobs):
            return []
        out: list[AnswerEvent] = [] if self.opened or not text else [TextOpened()]
        self.opened = self.opened or bool(text)
        return out + [TextPiece(text, ev.logprobs)]

    def _finish(self, done: Finished) -> list[AnswerEvent]:
        head: list[AnswerEvent] = []
        if self.thinking is not None:
            for channel, piece in self.thinking.finish():
                head += self._channel(channel, piece, TextDelta(piece))
            head += self._close_thinking()
        return head + self._finish_answer(done, self.reasoning_tokens)

    def _finish_answer(self, done: Finished, reasoning_tokens: Optional[int]) -> list[AnswerEvent]:
        text, calls = split_calls(self.conv, self.prepared, "".join(self.parts), done)
        unsent = self.watcher.unsent() if self.watcher and not calls else ""
        out: list[AnswerEvent] = []
        if self.opened or text or not calls:
            piece = unsent if self.opened else text
            if not self.opened:
                out.append(TextOpened())
            if piece:
                out.append(TextPiece(piece))
            out.append(TextClosed(text, done))
        out += [CallMade(i, c) for i, c in enumerate(calls)]
        return out + [AnswerFinished(done, text, tuple(calls), reasoning_tokens)]
