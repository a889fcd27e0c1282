"""Pythonic calls in special tokens (Liquid's LFM2 / LFM2.5):

    <|tool_call_start|>[get_weather(city="Paris", days=3), get_time(city="Paris")]<|tool_call_end|>

Arguments are keyword arguments whose values are Python literals (`True`, `None`, dicts, lists);
JSON's `true`/`false`/`null` are read too, as llama.cpp's parser reads them. The call is read with
Python's own parser (`ast`), never evaluated: anything but a list of calls with literal keyword
arguments stays text."""
from __future__ import annotations

import ast
import json
import re
from typing import Any, Mapping, Optional, Sequence

from engine.constrained.toolcalls.common import json_schema_rule, lark, new_call, tag, tool_properties
from engine.constrained.tools import ToolCall, ToolSpec

OPEN, CLOSE = "<|tool_call_start|>", "<|tool_call_end|>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class NotLiteral(ValueError):
    pass


def _literal(node: ast.AST) -> Any:
    """A Python (or JSON) literal's value; NotLiteral for anything else (names, calls, operators)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)) \
            and not isinstance(node.operand.value, bool):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        keys = [_literal(k) for k in node.keys]  # type: ignore[arg-type]
        if not all(isinstance(k, str) for k in keys):
            raise NotLiteral("dict keys must be strings")
        return dict(zip(keys, (_literal(v) for v in node.values)))
    raise NotLiteral(type(node).__name__)


def _name(node: ast.AST) -> str:
    """A called name, dotted names included (`Calendar.create_event`)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _name(node.value) + "." + node.attr
    raise NotLiteral("not a name")


def read_calls(body: str) -> Optional[list[tuple[str, dict[str, Any]]]]:
    """`[f(a=1), g(b="x")]` as (name, arguments) pairs; None when it is anything else."""
    if len(body) > 1_000_000:
        return None
    try:
        tree = ast.parse(body.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    out = []
    try:
        for call in tree.elts:
            if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
                return None
            out.append((_name(call.func), {k.arg: _literal(k.value) for k in call.keywords}))
    except (NotLiteral, RecursionError):
        return None
    return out


def python_literal(value: Any) -> str:
    """A JSON value written as a Python literal (what the model writes: True, None, "text")."""
    if value is True or value is False or value is None:
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {python_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


class Pythonic:
    name = "lfm2"
    triggers = (OPEN,)
    anywhere = True

    def detect(self, template: str) -> bool:
        # LFM2.5-Instruct's template lists the tools ("List of tools: [") but renders no calls.
        return OPEN in template or "List of tools: [" in template

    def render_call(self, name: str, arguments: str) -> str:
        args = json.loads(arguments) if arguments.strip() else {}
        inner = ", ".join(f"{k}={python_literal(v)}" for k, v in (args.items() if isinstance(args, dict) else ()))
        return f"{OPEN}[{name}({inner})]{CLOSE}"

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []

        def take(m: re.Match) -> str:
            found = read_calls(m.group(1))
            if found is None:
                return m.group(0)
            calls.extend(new_call(name, args) for name, args in found)
            return ""

        return _BLOCK.sub(take, text).strip(), calls

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Mapping[str, int] = {}) -> str:
        def arguments(tool: ToolSpec) -> str:
            # Values as JSON of their schema (JSON's literals are read back as Python's would be);
            # required keywords first, so the commas between them are fixed.
            props, required = tool_properties(tool)
            items = [(key in required, f'{json.dumps(key + "=")} {json_schema_rule(schema)}') for key, schema in props]
            must = [item for req, item in items if req]
            may = [item for req, item in items if not req]
            if must:
                return ' ", " '.join(must) + "".join(f' (", " {item})?' for item in may)
            if not may:
                return '""'
            return "(" + may[0] + "".join(f' (", " {item})?' for item in may[1:]) + ")?"

        calls = " | ".join(f'{json.dumps(t.name + "(")} {arguments(t)} ")"'
                           for t in tools if only is None or t.name == only)
        return lark(f'start: {tag(OPEN, tags)} "[" ({calls}) "]" {tag(CLOSE, tags)}')

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> Optional[str]:
        return None  # calls under auto are parsed, not constrained


FORMAT = Pythonic()
