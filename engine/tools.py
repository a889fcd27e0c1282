"""Tool calling: the prompt that offers tools, the grammar that guarantees a valid call, and the
parser that turns model output back into OpenAI tool calls.

Format: Hermes/Qwen style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Models whose
chat template takes `tools=` get them through it; others (the default SmolLM2) get the generic
system prompt below. A broken call is left as text, never an error.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Sequence

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: str  # JSON Schema, as JSON text


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as JSON text (OpenAI's shape)


def tool_prompt(tools: Sequence[ToolSpec]) -> str:
    """The generic instructions for templates without tool support."""
    listing = "\n".join(json.dumps({"name": t.name, "description": t.description,
                                    "parameters": json.loads(t.parameters)}) for t in tools)
    return ("You can call these functions:\n" + listing + "\nTo call one, answer with exactly "
            '<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>. '
            "Function results come back inside <tool_response></tool_response>.")


def tool_schema(tool: ToolSpec) -> dict[str, Any]:
    """OpenAI's tool object, as chat templates expect it in `tools=`."""
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": json.loads(tool.parameters)}}


def native_tool_template(template: str) -> bool:
    """A chat template that renders `tools` itself in the `<tool_call>` format this module parses."""
    return "tools" in template and "<tool_call>" in template


def render_call(name: str, arguments: str) -> str:
    """An earlier assistant call, as the model would have written it."""
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


def render_result(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def closed(schema: Any) -> Any:
    """Objects that list their properties and don't say otherwise get `additionalProperties:
    false` (as OpenAI's strict mode requires): otherwise a small model can invent keys forever."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def call_grammar(tools: Sequence[ToolSpec], only: Optional[str] = None) -> str:
    """llguidance grammar: exactly one `<tool_call>` whose JSON names a tool (or `only`) and whose
    arguments match that tool's parameters."""
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": t.name},
                               "arguments": closed(json.loads(t.parameters)) or {"type": "object"}}}
               for t in tools if only is None or t.name == only]
    return _lark(json.dumps({"anyOf": options, "x-guidance": {"whitespace_flexible": False}}, sort_keys=True))


@lru_cache(maxsize=128)
def _lark(schema_json: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(f'start: "<tool_call>" %json {schema_json} "</tool_call>"')


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split model output into (remaining text, calls). Malformed calls stay in the text."""
    calls: list[ToolCall] = []

    def take(match: re.Match) -> str:
        try:
            payload = json.loads(match.group(1))
        except ValueError:
            return match.group(0)
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return match.group(0)
        args = payload.get("arguments", {})
        if isinstance(args, str):  # some models quote the arguments object
            try:
                args = json.loads(args)
            except ValueError:
                return match.group(0)
        if not isinstance(args, dict):
            return match.group(0)
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", payload["name"], json.dumps(args, ensure_ascii=False)))
        return ""

    rest = _CALL.sub(take, text)
    return rest.strip(), calls
