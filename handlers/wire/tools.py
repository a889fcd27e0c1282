"""Tools on offer, for every API: the checks they share (`offer_tools`, `check_strict`), and chat
completions' own `tools`, `tool_choice` (named, allowed_tools) and earlier turns' calls, function
or custom, as the engine's types."""
from __future__ import annotations

import json
from typing import Any, Optional

from engine.errors import InvalidRequest
from engine.request import ToolCall, ToolChoice, ToolSpec
from handlers.wire.response_tools import custom_spec


def history_call(index: int, i: int, call: dict[str, Any]) -> ToolCall:
    """An earlier turn's call: a function's arguments as sent; a custom tool's input as the
    one-string-parameter call the model was offered (`custom_spec`)."""
    kind = call.get("type") or "function"
    if not isinstance(call.get(kind), dict):
        raise InvalidRequest(f"A {kind} tool call needs '{kind}'.", param=f"messages.{index}.tool_calls.{i}.{kind}")
    if kind == "custom":
        return ToolCall(call.get("id") or f"call_{i}", call["custom"]["name"], json.dumps({"input": call["custom"]["input"]}))
    return ToolCall(call.get("id") or f"call_{i}", call["function"]["name"], call["function"].get("arguments") or "{}")


def _tool_spec(i: int, tool: dict[str, Any]) -> ToolSpec:
    kind = tool["type"]
    if not isinstance(tool.get(kind), dict):
        raise InvalidRequest(f"A {kind} tool needs '{kind}'.", param=f"tools.{i}.{kind}")
    if kind == "custom":
        custom = tool["custom"]
        return custom_spec(custom["name"], custom.get("description") or "", custom.get("format"))
    f = tool["function"]
    return ToolSpec(f["name"], f.get("description", ""),
                    json.dumps(f.get("parameters") or {"type": "object", "properties": {}}))


def _chosen_name(choice: dict[str, Any], param: str) -> str:
    kind = choice["type"]
    if not isinstance(choice.get(kind), dict):
        raise InvalidRequest(f"A {kind} tool_choice needs '{kind}'.", param=f"{param}.{kind}")
    return choice[kind]["name"]


def chat_tools(body: dict[str, Any]) -> tuple[list[ToolSpec], Optional[ToolChoice], frozenset[str]]:
    """Chat completions' tools and tool_choice -> what the engine gets (see `offer_tools`), and
    the names of the custom tools (their calls go back as `custom` calls)."""
    raw = body.get("tools") or []
    specs = [_tool_spec(i, t) for i, t in enumerate(raw)]
    custom = frozenset(t["custom"]["name"] for t in raw if t["type"] == "custom")
    check_strict([(i, t["function"]) for i, t in enumerate(raw) if t["type"] == "function"],
                 "tools.{i}.function.parameters")
    choice = body.get("tool_choice")
    if not isinstance(choice, dict):
        return (*offer_tools(specs, choice), custom)
    if choice["type"] != "allowed_tools":
        return (*offer_tools(specs, "named", _chosen_name(choice, "tool_choice")), custom)
    allowed = choice.get("allowed_tools")
    if not isinstance(allowed, dict):
        raise InvalidRequest("An allowed_tools tool_choice needs 'allowed_tools'.", param="tool_choice.allowed_tools")
    names = [_chosen_name(t, f"tool_choice.allowed_tools.tools.{j}") for j, t in enumerate(allowed["tools"])]
    unknown = next((n for n in names if n not in {s.name for s in specs}), None)
    if unknown is not None:
        raise InvalidRequest(f"tool_choice.allowed_tools names '{unknown}', which is not in tools.",
                             param="tool_choice.allowed_tools.tools")
    offer_tools(specs, None)  # the full list's own checks (unique names) first
    return (*offer_tools([s for s in specs if s.name in names], allowed["mode"]), custom)


def offer_tools(specs: list[ToolSpec], choice: Optional[str], name: Optional[str] = None,
                param: str = "tool_choice") -> tuple[list[ToolSpec], Optional[ToolChoice]]:
    """The tools on offer (none when the choice is "none") and what the client chose: the engine
    turns it into the model's call grammar. Shared by chat, responses and messages."""
    if choice is not None and not specs and choice != "none":
        raise InvalidRequest(f"{param} needs tools.", param=param)
    names = [t.name for t in specs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise InvalidRequest(f"Two tools are named '{duplicate}'; tool names must be unique.", param="tools")
    if not specs or choice == "none":
        return [], None
    if choice == "named" and name not in names:
        raise InvalidRequest(f"{param} names '{name}', which is not in tools.", param=param)
    return specs, ToolChoice(choice or "auto", name if choice == "named" else None)


def check_strict(tools: list[tuple[int, dict[str, Any]]], param: str) -> None:
    """`strict: true` promises the arguments match the schema: a schema the grammar compiler
    can't take (unsupported keywords) is a 400 naming it, before anything runs."""
    from engine.engine import schema_problem

    for i, tool in tools:
        if tool.get("strict"):
            problem = schema_problem(tool.get("parameters") or {"type": "object"})
            if problem:
                raise InvalidRequest(f"Tool '{tool.get('name')}' is strict, and its parameters schema can't be "
                                     f"enforced: {problem}", param=param.format(i=i))
