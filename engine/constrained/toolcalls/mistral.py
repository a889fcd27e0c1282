"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 templates) and the newer
`[TOOL_CALLS]name[ARGS]{...}` (Mistral Small 3.2, Magistral, Devstral, Ministral 3: their templates
write `[ARGS]`). Both are read either way; earlier calls and forced calls are written in the
template's own spelling."""
from __future__ import annotations

import json
import re
from typing import Mapping, Sequence

from engine.constrained.toolcalls.common import (COMPACT, arguments_schema, json_or_text, json_schema_rule, lark,
                                                  make_call, parameters, struct_tag_grammar, tag)
from engine.constrained.tools import ToolCall, ToolSpec

TAG = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NEW_STYLE = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_-]+)\s*\[ARGS\]\s*")


class Mistral:
    triggers = (TAG,)  # text that starts a call
    anywhere = True  # calls may follow text (else only at the start of the answer)

    def __init__(self, name: str, args_style: bool) -> None:
        self.name = name
        self.args_style = args_style  # `[TOOL_CALLS]name[ARGS]{...}`, else a JSON list

    def detect(self, template: str) -> bool:
        return TAG in template and (ARGS in template) == self.args_style

    def render_call(self, name: str, arguments: str) -> str:
        if self.args_style:
            return TAG + name + ARGS + arguments
        args = json_or_text(arguments)
        return TAG + json.dumps([{"name": name, "arguments": args}], separators=COMPACT)

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        at = text.find(TAG)
        if at < 0:
            return text.strip(), []
        head, body = text[:at], text[at:]
        calls: list[ToolCall] = []
        decoder = json.JSONDecoder()
        if _NEW_STYLE.match(body):
            pos = 0
            while (m := _NEW_STYLE.match(body, pos)):
                try:
                    args, end = decoder.raw_decode(body, m.end())
                except ValueError:
                    return text.strip(), []
                call = make_call(json.dumps({"name": m.group(1), "arguments": args}), "arguments")
                if call is None:
                    return text.strip(), []
                calls.append(call)
                pos = end
                while pos < len(body) and body[pos].isspace():
                    pos += 1
            return (head + body[pos:]).strip(), calls
        try:
            payload, end = decoder.raw_decode(body, len(TAG))
        except ValueError:
            return text.strip(), []
        items = payload if isinstance(payload, list) else [payload]
        for item in items:
            call = make_call(json.dumps(item), "arguments", "parameters")
            if call is None:
                return text.strip(), []
            calls.append(call)
        return (head + body[end:]).strip(), calls

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Mapping[str, int] = {}) -> str:
        # [TOOL_CALLS] (and [ARGS]) are special tokens in Mistral's tokenizers: written as those.
        if self.args_style:
            calls = " | ".join(f"{json.dumps(t.name)} {tag(ARGS, tags)} {json_schema_rule(parameters(t))}"
                               for t in tools if only is None or t.name == only)
            return lark(f"start: {tag(TAG, tags)} ({calls})")
        return lark(f'start: {tag(TAG, tags)} "[" %json ' + arguments_schema(tools, only, "arguments") + ' "]"')

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> str:
        if self.args_style:
            return struct_tag_grammar(tools, TAG, TAG + "{name}" + ARGS, "")
        return struct_tag_grammar(tools, TAG, TAG + '[{"name":"{name}","arguments":', "}]")


FORMAT = Mistral("mistral", args_style=False)
ARGS_FORMAT = Mistral("mistral_args", args_style=True)
