"""Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (also the generic
prompt's format)."""
from __future__ import annotations

import json
import re
from typing import Mapping, Sequence

from engine.constrained.toolcalls.common import COMPACT, arguments_schema, json_or_text, lark, make_call, struct_tag_grammar
from engine.constrained.tools import ToolCall, ToolSpec

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class Hermes:
    name = "hermes"
    triggers = ("<tool_call>",)  # text that starts a call
    anywhere = True  # calls may follow text (else only at the start of the answer)

    def detect(self, template: str) -> bool:
        return "<tool_call>" in template

    def render_call(self, name: str, arguments: str) -> str:
        args = json_or_text(arguments)
        return "<tool_call>" + json.dumps({"name": name, "arguments": args}, separators=COMPACT) + "</tool_call>"

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []

        def take(match: re.Match) -> str:
            call = make_call(match.group(1), "arguments")
            if call is None:
                return match.group(0)
            calls.append(call)
            return ""

        rest = _CALL.sub(take, text)
        return rest.strip(), calls

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Mapping[str, int] = {}) -> str:
        # Qwen's vocabulary holds <tool_call> as one token: a grammar spelling it in characters
        # would refuse that token, and the model, asked for a call, answers just "<tool_call>".
        def tag(text: str) -> str:
            return f"<[{tags[text]}]>" if text in tags else json.dumps(text)

        return lark(f"start: {tag('<tool_call>')} %json " + arguments_schema(tools, only, "arguments")
                    + f" {tag('</tool_call>')}")

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> str:
        return struct_tag_grammar(tools, "<tool_call>", '<tool_call>{"name":"{name}","arguments":', "}</tool_call>")


FORMAT = Hermes()
