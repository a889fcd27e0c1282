"""Tool-call formats: one small module per way models write calls, chosen by the chat template.

Each format knows how its models write a call (to render earlier calls and to constrain new
ones with a grammar) and how to read calls back out of generated text. A template that renders
`tools` in one of these formats gets the tools through the template; any other template gets the
generic prompt (engine/constrained/tools.py) and the Hermes format.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Mapping, Optional, Protocol, Sequence

from engine.constrained.toolcalls.common import held_back
from engine.constrained.tools import ToolCall, ToolSpec


class ToolFormat(Protocol):
    name: str
    triggers: tuple[str, ...]  # text that starts a call in the output (held back while streaming)
    anywhere: bool  # calls may follow text (else only at the start of the answer)

    def detect(self, template: str) -> bool:
        """Does this chat template render tools in this format?"""

    def render_call(self, name: str, arguments: str) -> str:
        """An earlier call as the model writes it (for prompts without native rendering)."""

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        """(text without the calls, calls). Malformed calls stay in the text. `tools` types the
        formats whose values are bare text (a string parameter stays text, a number is JSON)."""

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Mapping[str, int] = {}) -> str:
        """llguidance grammar: exactly one valid call (of `only` when given). `tags`: the call's
        markup strings that this tokenizer holds as single tokens (written as those tokens)."""

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> Optional[str]:
        """llguidance grammar: free text, and a call once started is valid (None: calls under
        auto are parsed only, the format's call start being markup a text trigger can't see)."""


def formats() -> list[ToolFormat]:
    from engine.constrained.toolcalls import (deepseek, gemma4, glm, harmony, hermes, invoke_xml, kimi, llama3,
                                              minimax_m3, mistral, pythonic, qwen3_xml)

    # Most specific first: GLM's and Qwen3's XML templates write <tool_call> too (MiniMax M3's
    # behind its marker), Mistral and Llama templates may mention JSON.
    return [harmony.FORMAT, gemma4.FORMAT, kimi.FORMAT, deepseek.FORMAT, invoke_xml.DSML, invoke_xml.MINIMAX,
            minimax_m3.FORMAT, pythonic.FORMAT, glm.FORMAT, qwen3_xml.FORMAT, mistral.ARGS_FORMAT, mistral.FORMAT,
            llama3.FORMAT, hermes.FORMAT]


def names() -> list[str]:
    """Every format's name (the config file's `tool_parser` takes one)."""
    return [f.name for f in formats()]


def by_name(name: str) -> ToolFormat:
    """The format called `name` (KeyError when there is none)."""
    return {f.name: f for f in formats()}[name]


def for_template(template: str, override: Optional[str] = None) -> tuple[ToolFormat, bool]:
    """The format a chat template uses and whether it renders tools itself (native).
    `override`: the config file's `tool_parser`, a format's name (the template must then render
    the tools itself to count as native) or `generic` (the generic prompt and Hermes format)."""
    from engine.constrained.toolcalls import hermes

    renders_tools = bool(template) and "tools" in template
    if override == "generic":
        return hermes.FORMAT, False
    if override:
        return by_name(override), renders_tools
    if renders_tools:
        for fmt in formats():
            if fmt.detect(template):
                return fmt, True
    from engine.constrained.toolcalls import deepseek

    if template and deepseek.FORMAT.detect(template):
        # DeepSeek V3.1's template renders calls and results but not the tools: its model card's
        # own tool prompt describes them (deepseek.tool_prompt), not the generic one.
        return deepseek.FORMAT, True
    return hermes.FORMAT, False


def own_tool_prompt(fmt: ToolFormat, template: str, tools: Sequence[ToolSpec]) -> Optional[str]:
    """The system text that describes `tools` in the family's own words, for a native template
    that renders calls but not the tool list (DeepSeek V3.1); None when the template lists them."""
    write = getattr(fmt, "tool_prompt", None)
    if not tools or write is None or "tools" in template:
        return None
    return write(tools)


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)(")?')
_ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def cut_call(fmt: ToolFormat, text: str, tools: Sequence[ToolSpec]) -> tuple[str, Optional[ToolCall]]:
    """A call that max_tokens cut off, as OpenAI returns one: (the text before it, the call with
    the arguments written so far). The format's markup never becomes answer text. (text, None)
    when no call was started."""
    hits = [i for i in (text.find(t) for t in fmt.triggers) if i >= 0]
    if not hits:
        return text, None
    start = min(hits)
    if fmt.name == "mistral_args" and "[ARGS]" in text[start:]:  # `[TOOL_CALLS]name[ARGS]{partial`
        name, arguments = text[start + len(fmt.triggers[0]):].split("[ARGS]", 1)
        return text[:start].strip(), ToolCall(f"call_{uuid.uuid4().hex[:24]}", name.strip(), arguments.lstrip(),
                                              complete=False)
    if fmt.name not in ("hermes", "llama3", "mistral"):  # markup, not JSON: the tool's name if it was written
        written = [t.name for t in tools if t.name in text[start:]]
        return text[:start].strip(), ToolCall(f"call_{uuid.uuid4().hex[:24]}", written[0] if written else "", "",
                                              complete=False)
    if not fmt.anywhere and text[:start].strip():
        return text, None  # this format's calls only open an answer: this is text
    payload = text[start:]
    opened = payload[payload.find("{"):] if "{" in payload else ""
    named = _NAME.search(payload)
    if named is None and not '{"name"'.startswith("".join(opened.split())[:7]):
        return text, None  # a brace that opens plain JSON text, not a call
    name = named.group(1) if named else ""
    if named is None or named.group(2) is None:  # the name itself was cut: complete it if only one fits
        fits = [t.name for t in tools if t.name.startswith(name)]
        name = fits[0] if len(fits) == 1 else name
    found = _ARGUMENTS.search(payload)
    arguments = payload[found.end():] if found else ""
    try:  # arguments complete, the closing markup cut: keep just the object
        value, end = json.JSONDecoder().raw_decode(arguments)
        if isinstance(value, dict):
            arguments = arguments[:end]
    except ValueError:
        pass
    return text[:start].strip(), ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, arguments, complete=False)


BARE_STARTS = ("{", "```json")  # how an answer that is one bare call object opens


class CallWatcher:
    """While streaming with tools on offer: text is sent as it comes until a call may be
    starting; from the format's trigger on, it is held so the call can be parsed whole."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.triggers = fmt.triggers
        self.anywhere = fmt.anywhere
        self.pending = ""
        self.sent = ""
        self.capturing = False

    def feed(self, piece: str) -> str:
        """Add generated text; return what can be sent now."""
        if self.capturing:
            self.pending += piece
            return ""
        text = self.pending + piece
        if not self.sent:
            # An answer that opens like a bare JSON call (small models drop their tags; `bare_call`
            # reads it at the end) is held whole, so the call never streams out as text too.
            head = text.lstrip()
            if any(head.startswith(t) for t in BARE_STARTS):
                self.capturing, self.pending = True, text
                return ""
            if not head or any(t.startswith(head) for t in BARE_STARTS):
                self.pending = text
                return ""
        if self.anywhere:
            hits = [i for i in (text.find(t) for t in self.triggers) if i >= 0]
            if hits:
                self.capturing, cut = True, min(hits)
                self.pending, out = text[cut:], text[:cut]
            else:
                keep = held_back(text, self.triggers)
                self.pending, out = text[len(text) - keep:], text[:len(text) - keep]
        elif self.sent:  # calls come only at the start of the answer: past it, all is text
            self.pending, out = "", text
        else:
            head = text.lstrip()
            if any(head.startswith(t) for t in self.triggers):
                self.capturing, self.pending, out = True, text, ""
            elif not head or any(t.startswith(head) for t in self.triggers):
                self.pending, out = text, ""
            else:
                self.pending, out = "", text
        self.sent += out
        return out

    def unsent(self) -> str:
        return self.pending
