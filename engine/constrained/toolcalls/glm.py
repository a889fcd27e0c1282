"""GLM-4.5 / 4.6 / 4.7: `<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value></tool_call>`
(4.5/4.6 put a newline after the name and after each tag pair, 4.7 none). Values are bare text,
typed by the tool's schema."""
from __future__ import annotations

import json
import re
from typing import Mapping, Optional, Sequence

from engine.constrained.toolcalls.common import (lark, new_call, params_rule, property_schema, tag,
                                                  text_value_rule, text_values, typed_value)
from engine.constrained.tools import ToolCall, ToolSpec

_CALL = re.compile(r"<tool_call>\s*([^<>\n{]+?)\s*((?:<arg_key>.*?</arg_key>\s*<arg_value>.*?</arg_value>\s*)*)"
                   r"</tool_call>", re.DOTALL)
_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


class Glm:
    name = "glm"
    triggers = ("<tool_call>",)
    anywhere = True

    def detect(self, template: str) -> bool:
        return "<arg_key>" in template

    def render_call(self, name: str, arguments: str) -> str:
        pairs = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in text_values(arguments))
        return f"<tool_call>{name}{pairs}</tool_call>"

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []

        def take(m: re.Match) -> str:
            name = m.group(1).strip()
            args = {k.strip(): typed_value(v, property_schema(tools, name, k.strip()))
                    for k, v in _PAIR.findall(m.group(2))}
            calls.append(new_call(name, args))
            return ""

        return _CALL.sub(take, text).strip(), calls

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Mapping[str, int] = {}) -> str:
        # GLM-4.5/4.6 write a newline after the name and after each tag pair, 4.7 none: either is
        # the model's own call.
        def param(key: str, schema: object) -> str:
            return (f'{tag("<arg_key>", tags)} {json.dumps(key)} {tag("</arg_key>", tags)} NL? '
                    f'{tag("<arg_value>", tags)} {text_value_rule(schema, "</arg_value>", tags)} NL?')

        calls = " | ".join(f"{json.dumps(t.name)} NL? {params_rule(t, param)}"
                           for t in tools if only is None or t.name == only)
        return lark(f'start: {tag("<tool_call>", tags)} ({calls}) {tag("</tool_call>", tags)}\nNL: "\\n"')

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> Optional[str]:
        return None  # calls under auto are parsed, not constrained


FORMAT = Glm()
