"""Qwen3-Coder and Qwen3.5+ XML calls:

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

Values are bare text, typed by the tool's schema (a string stays text, anything else is JSON)."""
from __future__ import annotations

import json
import re
from typing import Mapping, Optional, Sequence

from engine.constrained.toolcalls.common import (lark, new_call, params_rule, property_schema, tag,
                                                  text_value_rule, text_values, typed_value)
from engine.constrained.tools import ToolCall, ToolSpec

_CALL = re.compile(r"(?:<tool_call>\s*)?<function=([^>\n]+)>(.*?)</function>(?:\s*</tool_call>)?", re.DOTALL)
_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def read_params(body: str, name: str, tools: Sequence[ToolSpec]) -> Optional[dict]:
    """The parameters of one call's body; None when anything but parameters is in it."""
    args = {}
    for m in _PARAM.finditer(body):
        args[m.group(1).strip()] = typed_value(m.group(2), property_schema(tools, name, m.group(1).strip()))
    return args if not _PARAM.sub("", body).strip() else None


class Qwen3Xml:
    name = "qwen3_xml"
    triggers = ("<tool_call>", "<function=")
    anywhere = True

    def detect(self, template: str) -> bool:
        return "<function=" in template and "<parameter=" in template

    def render_call(self, name: str, arguments: str) -> str:
        params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in text_values(arguments))
        return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []

        def take(m: re.Match) -> str:
            name = m.group(1).strip()
            args = read_params(m.group(2), name, tools)
            if args is None:
                return m.group(0)
            calls.append(new_call(name, args))
            return ""

        return _CALL.sub(take, text).strip(), calls

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Mapping[str, int] = {}) -> str:
        def param(key: str, schema: object) -> str:
            return f'{json.dumps(f"<parameter={key}>" + chr(10))} {text_value_rule(schema, chr(10) + "</parameter>" + chr(10))}'

        calls = " | ".join(f'{json.dumps(f"<function={t.name}>" + chr(10))} {params_rule(t, param)} "</function>"'
                           for t in tools if only is None or t.name == only)
        return lark(f'start: {tag("<tool_call>", tags)} "\\n" ({calls}) "\\n" {tag("</tool_call>", tags)}')

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> Optional[str]:
        return None  # calls under auto are parsed, not constrained


FORMAT = Qwen3Xml()
