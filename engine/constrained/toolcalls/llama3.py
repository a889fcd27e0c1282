"""Llama 3.1+ JSON tool calls: `{"name": ..., "parameters": {...}}`, optionally after
`<|python_tag|>`, several separated by `;`."""
from __future__ import annotations

import json
from typing import Mapping, Sequence

from engine.constrained.toolcalls.common import COMPACT, arguments_schema, json_or_text, lark, make_call, struct_tag_grammar
from engine.constrained.tools import ToolCall, ToolSpec

TAG = "<|python_tag|>"


class Llama3:
    name = "llama3"
    triggers = ("{", TAG)  # text that starts a call
    anywhere = False  # calls may follow text (else only at the start of the answer)

    def detect(self, template: str) -> bool:
        return TAG in template or ("<|start_header_id|>" in template and '"parameters"' in template)

    def render_call(self, name: str, arguments: str) -> str:
        args = json_or_text(arguments)
        return json.dumps({"name": name, "parameters": args}, separators=COMPACT)

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        body = text.strip()
        if body.startswith(TAG):
            body = body[len(TAG):].strip()
        if not body.startswith("{"):
            return text.strip(), []
        calls = []
        decoder = json.JSONDecoder()
        at = 0
        while at < len(body):
            try:
                payload, end = decoder.raw_decode(body, at)
            except ValueError:
                return text.strip(), []  # not (only) calls: keep it all as text
            call = make_call(json.dumps(payload), "parameters", "arguments")
            if call is None:
                return text.strip(), []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \n\t;":
                at += 1
        return "", calls

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Mapping[str, int] = {}) -> str:
        return lark("start: %json " + arguments_schema(tools, only, "parameters"))

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> str:
        return struct_tag_grammar(tools, "{", '{"name":"{name}","parameters":', "}")


FORMAT = Llama3()
