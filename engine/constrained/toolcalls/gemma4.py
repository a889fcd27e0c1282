"""Gemma 4: `<|tool_call>call:NAME{key:VALUE,…}<tool_call|>`, in Gemma's own object notation:
keys bare, strings between `<|"|>` marks, numbers, booleans, null, arrays and objects as in JSON
(`call:get_time{city:<|"|>Paris<|"|>,days:3}`)."""
from __future__ import annotations

import json
import re
from typing import Any, Mapping, Optional, Sequence

from engine.constrained.toolcalls.common import json_schema_rule, lark, new_call, tag, tool_properties
from engine.constrained.tools import ToolCall, ToolSpec

OPEN, CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_CALL = re.compile(re.escape(OPEN) + r"call:([^\s{<]+)(\{.*?\})" + re.escape(CLOSE), re.DOTALL)
_STRING = re.compile(re.escape(QUOTE) + r"(.*?)" + re.escape(QUOTE), re.DOTALL)
_HELD = "\ue000"  # marks a string held aside while the rest is read as JSON (a private-use character)
_KEY = re.compile(r"([{,]\s*)([A-Za-z_][\w.\-]*)\s*:")


def to_json(value: str) -> Any:
    """Gemma's object notation as Python values (ValueError when it isn't well formed)."""
    strings: list[str] = []

    def hold(m: re.Match) -> str:
        strings.append(m.group(1))
        return f'"{_HELD}{len(strings) - 1}"'

    body = _KEY.sub(lambda m: f'{m.group(1)}"{m.group(2)}":', _STRING.sub(hold, value))
    if QUOTE in body:
        raise ValueError("an unclosed string")
    parsed = json.loads(body)

    def restore(v: Any) -> Any:
        if isinstance(v, str) and v.startswith(_HELD):
            return strings[int(v[1:])]
        if isinstance(v, list):
            return [restore(x) for x in v]
        if isinstance(v, dict):
            return {restore(k): restore(x) for k, x in v.items()}
        return v

    return restore(parsed)


def from_json(value: Any) -> str:
    """A value in Gemma's notation (as its template's format_argument writes it)."""
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{from_json(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ",".join(from_json(v) for v in value) + "]"
    return json.dumps(value)


class Gemma4:
    name = "gemma4"
    triggers = (OPEN,)
    anywhere = True

    def detect(self, template: str) -> bool:
        return OPEN in template

    def render_call(self, name: str, arguments: str) -> str:
        return f"{OPEN}call:{name}{from_json(json.loads(arguments or '{}'))}{CLOSE}"

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []

        def take(m: re.Match) -> str:
            try:
                args = to_json(m.group(2))
            except ValueError:
                return m.group(0)
            if not isinstance(args, dict):
                return m.group(0)
            calls.append(new_call(m.group(1), args))
            return ""

        return _CALL.sub(take, text).strip(), calls

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Mapping[str, int] = {}) -> str:
        # The parameters (the required ones, and any of the others), sorted as Gemma's template
        # writes them: strings between quote marks, numbers, booleans and null as JSON; arrays and
        # objects as bare notation text.
        quote = tag(QUOTE, tags)
        rules: list[str] = []

        def value(schema: Any) -> str:
            kind = schema.get("type") if isinstance(schema, dict) else None
            if kind == "string":
                return f"{quote} /[^<]*/ {quote}"
            if kind in ("number", "integer", "boolean", "null"):
                return json_schema_rule(schema)
            return '/[^<]*/'

        def call(index: int, tool: ToolSpec) -> str:
            props, required = tool_properties(tool)
            props = sorted(props)
            # args_T_I_S: the parameters from the I-th on; S: whether one was written (a comma first).
            for i in range(len(props), -1, -1):
                for started in (0, 1):
                    name = f"args_{index}_{i}_{started}"
                    if i == len(props):
                        rules.append(f'{name}: ""')
                        continue
                    key, schema = props[i]
                    item = f'{json.dumps(("," if started else "") + key + ":")} {value(schema)} args_{index}_{i + 1}_1'
                    skip = f" | args_{index}_{i + 1}_{started}" if key not in required else ""
                    rules.append(f"{name}: {item}{skip}")
            return f'{json.dumps("call:" + tool.name + "{")} args_{index}_0_0 "}}"'

        calls = " | ".join(call(i, t) for i, t in enumerate(tools) if only is None or t.name == only)
        return lark(f"start: {tag(OPEN, tags)} ({calls}) {tag(CLOSE, tags)}\n" + "\n".join(rules))

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> Optional[str]:
        return None  # calls under auto are parsed, not constrained


FORMAT = Gemma4()
