"""gpt-oss harmony: the answer is a run of messages, each `<|start|>assistant` (left out for the
first: the prompt wrote it), a header and a body:

    <|channel|>analysis<|message|>THINKING<|end|>
    <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{JSON}<|call|>
    <|start|>assistant<|channel|>final<|message|>ANSWER<|return|>

The recipient may stand in the role header instead (` to=functions.NAME<|channel|>commentary`).
`analysis` is reasoning, `final` (and `commentary` without a recipient) is the answer, a message
to `functions.NAME` is a call. `<|call|>` and `<|return|>` end the generation (end-of-sequence
tokens), so they are usually not in the text.

HarmonySplitter reads this incrementally (engine/generation/reasoning.py uses it for the thinking);
the answer it emits is plain text, and each call in one canonical spelling that `parse` reads."""
from __future__ import annotations

import json
import re
from typing import Mapping, Optional, Sequence

from engine.constrained.toolcalls.common import held_back, json_call, json_schema_rule, lark, parameters, tag
from engine.constrained.tools import ToolCall, ToolSpec

START, CHANNEL, MESSAGE, END, CALL, RETURN, CONSTRAIN = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>",
                                                          "<|call|>", "<|return|>", "<|constrain|>")
ENDS = (END, CALL, RETURN, START)
CALL_OPEN = CHANNEL + "commentary to=functions."
_CANONICAL = re.compile(re.escape(CALL_OPEN) + r"([^\s<]+)" + re.escape(MESSAGE) + r"(.*?)(?:" + re.escape(CALL)
                        + r"|$)", re.DOTALL)
_RECIPIENT = re.compile(r"\bto=(\S+?)(?=\s|<\||$)")
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")
REASONING, CONTENT = "reasoning", "content"


class HarmonySplitter:
    """Text deltas -> (channel, text) pieces: `analysis` as reasoning, the rest as answer text,
    each call to a function as `<|channel|>commentary to=functions.NAME<|message|>ARGS<|call|>`."""

    def __init__(self, opened: bool = False) -> None:
        self.buffer = ""
        self.state = "body" if opened else "header"
        self.kind = REASONING if opened else CONTENT  # what the current body is
        self.is_call = False
        self.plain = False  # the current body is text without a harmony header

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "header":
                head = self.buffer.lstrip()
                if head.startswith(START + "assistant"):
                    head = head[len(START + "assistant"):].lstrip()
                if not head or any(m.startswith(head) for m in (START + "assistant", CHANNEL, "to=")):
                    return out  # a header still being written
                at = head.find(MESSAGE)
                if not head.startswith((CHANNEL, "to=")) or at < 0:
                    if head.startswith((CHANNEL, "to=")):
                        return out  # a header still being written
                    # No header: plain text, up to the next message's markup.
                    self.state, self.kind, self.is_call, self.plain = "body", CONTENT, False, True
                    self.buffer = head
                    continue
                self._header(head[:at], out)
                self.buffer, self.state, self.plain = head[at + len(MESSAGE):], "body", False
                continue
            markers = ENDS + ((CHANNEL,) if self.plain else ())
            ends = [(i, m) for m in markers if (i := self.buffer.find(m)) >= 0]
            if ends:
                at, marker = min(ends)
                self._emit(out, self.buffer[:at])
                self._close(out)
                self.buffer = self.buffer[at + (0 if marker in (START, CHANNEL) else len(marker)):]
                self.state = "header"
                continue
            keep = held_back(self.buffer, markers)
            self._emit(out, self.buffer[:len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return out

    def finish(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.state == "body":
            self._emit(out, self.buffer)
            self._close(out)
        elif self.buffer.strip():
            self._add(out, CONTENT, self.buffer)  # an unfinished header: left as text
        self.buffer = ""
        return out

    def _header(self, header: str, out: list[tuple[str, str]]) -> None:
        channels = _CHANNEL.findall(header)  # the last one counts (`commentary to=assistant<|channel|>analysis`)
        recipient = next((r for r in _RECIPIENT.findall(header) if r.startswith("functions.")), None)
        self.is_call = recipient is not None
        if recipient is not None:
            self.kind = CONTENT
            self._add(out, CONTENT, CALL_OPEN + recipient[len("functions."):] + MESSAGE)
        else:
            self.kind = REASONING if channels and channels[-1] == "analysis" else CONTENT

    def _close(self, out: list[tuple[str, str]]) -> None:
        if self.is_call:
            self._add(out, CONTENT, CALL)
        self.is_call = False

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        self._add(out, self.kind, text)

    @staticmethod
    def _add(out: list[tuple[str, str]], channel: str, text: str) -> None:
        if not text:
            return
        if out and out[-1][0] == channel:
            out[-1] = (channel, out[-1][1] + text)
        else:
            out.append((channel, text))


class Harmony:
    name = "harmony"
    triggers = (CALL_OPEN,)
    anywhere = True

    def detect(self, template: str) -> bool:
        return CHANNEL in template and MESSAGE in template

    def render_call(self, name: str, arguments: str) -> str:
        return f"{CALL_OPEN}{name} {CONSTRAIN}json{MESSAGE}{arguments}{CALL}"

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        """Calls out of harmony text (raw, or as HarmonySplitter wrote the answer); the analysis
        channel is not answer text. A call whose arguments aren't a JSON object stays text."""
        s = HarmonySplitter()
        answer = "".join(t for c, t in s.feed(text) + s.finish() if c == CONTENT)
        calls: list[ToolCall] = []

        def take(m: re.Match) -> str:
            call = json_call(m.group(1), m.group(2).strip())
            if call is None:
                return m.group(2)  # the arguments as text, not the markup
            calls.append(call)
            return ""

        return _CANONICAL.sub(take, answer).strip(), calls

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Mapping[str, int] = {}) -> str:
        calls = " | ".join(f'{json.dumps("commentary to=functions." + t.name + " ")} {tag(CONSTRAIN, tags)} "json" '
                           f'{tag(MESSAGE, tags)} {json_schema_rule(parameters(t))}'
                           for t in tools if only is None or t.name == only)
        return lark(f"start: {tag(CHANNEL, tags)} ({calls})")

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> Optional[str]:
        return None  # calls under auto are parsed, not constrained


FORMAT = Harmony()
