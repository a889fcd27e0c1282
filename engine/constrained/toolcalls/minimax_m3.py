"""MiniMax M3's namespaced XML calls: every tag carries the `]<]minimax[>[` marker, and each
parameter is an element named after the parameter:

    ]<]minimax[>[<tool_call>
    ]<]minimax[>[<invoke name="get_time">]<]minimax[>[<city>Tokyo]<]minimax[>[</city>]<]minimax[>[</invoke>
    ]<]minimax[>[</tool_call>

Objects nest as elements, arrays as `<item>` elements (the template's `to_xml`); a bare value is
typed by the tool's schema, as the other XML formats' values are."""
from __future__ import annotations

import json
import re
from typing import Any, Mapping, Optional, Sequence

from engine.constrained.toolcalls.common import (lark, new_call, params_rule, property_schema, tag,
                                                  text_value_rule, typed_value)
from engine.constrained.tools import ToolCall, ToolSpec

NS = "]<]minimax[>["
OPEN, CLOSE = NS + "<tool_call>", NS + "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_INVOKE = re.compile(re.escape(NS) + r'<invoke name="([^"]+)">(.*?)' + re.escape(NS) + r"</invoke>", re.DOTALL)
_ELEMENT_OPEN = re.compile(re.escape(NS) + r"<([A-Za-z_][\w.\-]*)>")


def elements(text: str) -> Optional[list[tuple[str, str]]]:
    """The top-level `NS<key>…NS</key>` elements of `text` as (key, inner text); None when the
    text is anything else (unclosed elements, text between them)."""
    out, at = [], 0
    while True:
        rest = text[at:]
        if not rest.strip():
            return out
        m = _ELEMENT_OPEN.match(text, at + len(rest) - len(rest.lstrip()))
        if m is None:
            return None
        key, depth, pos = m.group(1), 1, m.end()
        opener, closer = f"{NS}<{key}>", f"{NS}</{key}>"
        while depth:  # the matching close, same-named elements nested inside counted
            nxt_close = text.find(closer, pos)
            if nxt_close < 0:
                return None
            nxt_open = text.find(opener, pos, nxt_close)
            if nxt_open >= 0:
                depth, pos = depth + 1, nxt_open + len(opener)
            else:
                depth, pos = depth - 1, nxt_close + len(closer)
        out.append((key, text[m.end():pos - len(closer)]))
        at = pos


def _value(inner: str, schema: Any) -> Any:
    """An element's value: nested elements as an object (or, all `<item>`, an array); bare text
    typed by `schema` (nested text with no schema: JSON when it reads as JSON, else the text)."""
    if NS in inner:
        children = elements(inner)
        if children is None:
            return inner
        if children and all(k == "item" for k, _ in children):
            item = schema.get("items") if isinstance(schema, dict) else None
            return [_value(v, item) for _, v in children]
        props = (schema.get("properties") or {}) if isinstance(schema, dict) else {}
        return {k: _value(v, props.get(k)) for k, v in children}
    if schema is None:
        try:
            return json.loads(inner)
        except ValueError:
            return inner
    return typed_value(inner, schema)


def to_xml(value: Any) -> str:
    """A JSON value as the template's `to_xml` writes it."""
    if isinstance(value, dict):
        return "".join(f"{NS}<{k}>{to_xml(v)}{NS}</{k}>" for k, v in value.items() if v is not None)
    if isinstance(value, list):
        return "".join(f"{NS}<item>{to_xml(v)}{NS}</item>" for v in value)
    if isinstance(value, bool):
        return json.dumps(value)
    return "" if value is None else str(value)


class MiniMaxM3:
    name = "minimax_m3"
    triggers = (OPEN,)
    anywhere = True

    def detect(self, template: str) -> bool:
        return NS in template

    def render_call(self, name: str, arguments: str) -> str:
        args = json.loads(arguments) if arguments.strip() else {}
        return f'{OPEN}\n{NS}<invoke name="{name}">{to_xml(args)}{NS}</invoke>\n{CLOSE}'

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []

        def take(block: re.Match) -> str:
            found = []
            for m in _INVOKE.finditer(block.group(1)):
                name, params = m.group(1), elements(m.group(2))
                if params is None:
                    return block.group(0)
                found.append(new_call(name, {k: _value(v, property_schema(tools, name, k)) for k, v in params}))
            if not found or _INVOKE.sub("", block.group(1)).strip():
                return block.group(0)
            calls.extend(found)
            return ""

        return _BLOCK.sub(take, text).strip(), calls

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Mapping[str, int] = {}) -> str:
        # A forced call writes each value as bare text (strings) or JSON (anything else), which
        # `parse` reads back by the schema; nested values are not written as elements. The
        # marker is one special token where the tokenizer holds it so (a text grammar can't emit it).
        ns = tag(NS, tags)

        def param(key: str, schema: object) -> str:
            if NS in tags:
                return f'{ns} {json.dumps(f"<{key}>")} {text_value_rule(schema, NS, tags)} {json.dumps(f"</{key}>")}'
            return f'{json.dumps(f"{NS}<{key}>")} {text_value_rule(schema, f"{NS}</{key}>")}'

        calls = " | ".join(f'{ns} {json.dumps(f"<invoke name={json.dumps(t.name)}>")} {params_rule(t, param)} '
                           f'{ns} {json.dumps(f"</invoke>{chr(10)}")}' for t in tools if only is None or t.name == only)
        return lark(f'start: {ns} "<tool_call>\\n" ({calls}) {ns} "</tool_call>"')

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> Optional[str]:
        return None  # calls under auto are parsed, not constrained


FORMAT = MiniMaxM3()
