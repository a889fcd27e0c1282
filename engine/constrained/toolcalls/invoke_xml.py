"""`<invoke name=…>` XML calls, in two spellings:

MiniMax M2:  <minimax:tool_call>\\n<invoke name="NAME">\\n<parameter name="KEY">VALUE</parameter>\\n</invoke>\\n</minimax:tool_call>
DeepSeek V3.2 (DSML): <｜DSML｜function_calls>\\n<｜DSML｜invoke name="NAME">\\n
    <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>\\n</｜DSML｜invoke>\\n</｜DSML｜function_calls>

Values are bare text, typed by the tool's schema (DSML's `string` attribute says so itself)."""
from __future__ import annotations

import json
import re
from typing import Mapping, Optional, Sequence

from engine.constrained.toolcalls.common import (lark, new_call, params_rule, property_schema, tag,
                                                  text_value_rule, text_values, typed_value)
from engine.constrained.tools import ToolCall, ToolSpec


class InvokeXml:
    anywhere = True

    def __init__(self, name: str, block: str, prefix: str) -> None:
        self.name = name
        self.block, self.prefix = block, prefix  # "minimax:tool_call" / "function_calls"; "" / "｜DSML｜"
        self.open, self.close = f"<{prefix}{block}>", f"</{prefix}{block}>"
        self.triggers = (self.open,)
        p = re.escape(prefix)
        self._block = re.compile(re.escape(self.open) + r"(.*?)" + re.escape(self.close), re.DOTALL)
        self._invoke = re.compile(rf'<{p}invoke name="([^"]+)">(.*?)</{p}invoke>', re.DOTALL)
        self._param = re.compile(rf'<{p}parameter name="([^"]+)"(?:\s+string="(true|false)")?>(.*?)</{p}parameter>',
                                 re.DOTALL)

    def detect(self, template: str) -> bool:
        return self.open in template or (self.prefix and self.prefix in template and "invoke" in template)

    def render_call(self, name: str, arguments: str) -> str:
        params = "".join(f'<{self.prefix}parameter name="{k}">{v}</{self.prefix}parameter>\n'
                         for k, v in text_values(arguments))
        return f'{self.open}\n<{self.prefix}invoke name="{name}">\n{params}</{self.prefix}invoke>\n{self.close}'

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []

        def take(block: re.Match) -> str:
            found = []
            for m in self._invoke.finditer(block.group(1)):
                name, body, args = m.group(1), m.group(2), {}
                for key, string, value in self._param.findall(body):
                    value = value.strip("\n")
                    args[key] = value if string == "true" else \
                        typed_value(value, {"type": "object"} if string == "false" else property_schema(tools, name, key))
                if self._param.sub("", body).strip():
                    return block.group(0)  # something in it that isn't a parameter: text
                found.append(new_call(name, args))
            if not found or self._invoke.sub("", block.group(1)).strip():
                return block.group(0)
            calls.extend(found)
            return ""

        return self._block.sub(take, text).strip(), calls

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Mapping[str, int] = {}) -> str:
        p = self.prefix

        def param(key: str, schema: object) -> str:
            return f'{json.dumps(f"<{p}parameter name={json.dumps(key)}>")} {text_value_rule(schema, f"</{p}parameter>{chr(10)}")}'

        calls = " | ".join(f'{json.dumps(f"<{p}invoke name={json.dumps(t.name)}>{chr(10)}")} {params_rule(t, param)} '
                           f'{json.dumps(f"</{p}invoke>{chr(10)}")}' for t in tools if only is None or t.name == only)
        return lark(f'start: {tag(self.open, tags)} "\\n" ({calls}) {tag(self.close, tags)}')

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> Optional[str]:
        return None  # calls under auto are parsed, not constrained


MINIMAX = InvokeXml("minimax", "minimax:tool_call", "")
DSML = InvokeXml("deepseek_dsml", "function_calls", "｜DSML｜")
