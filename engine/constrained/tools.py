"""Tool calling's shared pieces: what a tool and a call are, what the client chose, the generic
prompt for chat templates without tool support, and strict-mode schemas.

How a model writes calls (and how they are read back and constrained) is per format:
engine/constrained/toolcalls/. A broken call is left as text, never an error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence


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
    complete: bool = True  # False: cut off by max_tokens, `arguments` is what was written of them


@dataclass(frozen=True)
class ToolChoice:
    """What the client asked for: "auto" (text or a call; a started call is constrained),
    "required" (one valid call) or "named" (one valid call of `name`)."""

    mode: str = "auto"
    name: Optional[str] = None


def tool_prompt(tools: Sequence[ToolSpec]) -> str:
    """The generic instructions for templates without tool support (Hermes format)."""
    listing = "\n".join(json.dumps({"name": t.name, "description": t.description,
                                    "parameters": json.loads(t.parameters)}) for t in tools)
    return ("You can call these functions:\n" + listing + "\nTo call one, answer with exactly "
            '<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>. '
            "Function results come back inside <tool_response></tool_response>.")


def tool_schema(tool: ToolSpec) -> dict[str, Any]:
    """OpenAI's tool object, as chat templates expect it in `tools=`."""
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": json.loads(tool.parameters)}}


def render_result(content: str) -> str:
    """A tool's result in a template without tool support (the generic prompt's format)."""
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
