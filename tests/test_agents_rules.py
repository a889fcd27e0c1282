"""Coding agents as shipped (issue 43), the rules that need no server: the recorded request bodies
(tests/data/agents/) hold what the bugs were about, the budget is clamped to the room left, think
tags are split out with thinking off, every spec path is a metrics route, and Codex's tool types
are read. The bodies replayed through a server: tests/test_agents_replay.py."""
from __future__ import annotations

import json
import re

import pytest

from engine.generation.budget import BudgetPolicy, max_new_tokens
from engine.generation.reasoning import ReasoningFormat, Thinking, plan
from engine.errors import ContextLengthExceeded, InvalidRequest
from handlers.app import spec_path
from handlers.metrics import route_label, spec_routes
from handlers.wire.response_tools import parse_tools
from tests.agent_models import claude_body, codex_body, recorded


def test_recorded_bodies_are_what_the_clients_send():
    """The recordings hold what the bugs were about, untrimmed."""
    _, headers, cc = claude_body("claude_code_hello", trimmed=False)
    assert cc["max_tokens"] == 32000 and cc["stream"] is True
    assert cc["system"][0]["text"].startswith("x-anthropic-billing-header:")
    assert [m["role"] for m in cc["messages"]] == ["user", "system"]
    assert "claude-code" in headers["anthropic-beta"]
    _, _, cx = codex_body(trimmed=False)
    kinds = [t["type"] for t in cx["tools"]]
    assert "namespace" in kinds and "web_search" in kinds
    namespace = next(t for t in cx["tools"] if t["type"] == "namespace")
    assert namespace["name"] == "multi_agent_v1" and namespace["tools"]
    for name in ("claude_code_hello", "claude_code_add", "codex_hello", "aider_hello", "opencode_hello"):
        text = json.dumps(recorded(name)).replace("/tmp/opencode", "")  # opencode's own scratch dir, in its tool text
        assert "/tmp/" not in text and "/root/" not in text  # local paths scrubbed


# --- rules without a server -------------------------------------------------------------------
def test_budget_is_clamped_to_the_room_left():
    policy = BudgetPolicy()
    assert max_new_tokens(20000, 32000, 32768, policy) == 12768
    assert max_new_tokens(100, 50, 32768, policy) == 50
    with pytest.raises(ContextLengthExceeded):  # a prompt that alone fills the context
        max_new_tokens(32768, 32000, 32768, policy)
    with pytest.raises(InvalidRequest):  # the server's cap still says no
        max_new_tokens(100, 5000, 32768, BudgetPolicy(cap=4096))


def test_think_tags_are_split_with_thinking_off():
    """A template that closed an empty block (thinking off) and a model that writes one anyway:
    neither tag reaches the answer."""
    fmt = ReasoningFormat(opened=False)
    assert fmt.split("</think>\n\nParis.") == ("", "Paris.")
    assert fmt.split("<think>\nhmm\n</think>\n\nParis.") == ("hmm\n", "Paris.")
    budgets = BudgetPolicy().effort_budgets
    template = "{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    # With tools under auto the grammar starts at a call, so a block may come first: still parsed.
    off = plan(template, None, Thinking(enabled=False), {}, True, budgets)
    assert off.parse and off.budget is None and off.template_kwargs == {"enable_thinking": False}


def test_every_spec_path_is_a_metrics_route():
    routes = spec_routes(spec_path())
    import yaml

    for path in yaml.safe_load(spec_path().read_text())["paths"]:
        concrete = re.sub(r"\{[^}]+\}", "x1", path)
        assert route_label(routes, concrete) == path
    assert route_label(routes, "/v1/models/org/name") == "/v1/models/{model}"
    assert route_label(routes, "/v1/responses/input_tokens") == "/v1/responses/input_tokens"
    assert route_label(routes, "/nowhere") == "other"


def test_tool_types():
    tools = parse_tools([
        {"type": "function", "name": "f", "parameters": {"type": "object"}},
        {"type": "namespace", "name": "ns", "description": "d", "tools": [
            {"type": "function", "name": "g"}, {"type": "custom", "name": "h"}]},
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar", "syntax": "lark", "definition": "start: X"}},
        {"type": "web_search", "external_web_access": False}, {"type": "local_shell"}])
    assert [s.name for s in tools.specs] == ["f", "ns__g", "ns__h", "apply_patch"]
    assert "start: X" in tools.specs[3].description and "web_search, local_shell" in tools.warnings[0]
    assert json.loads(tools.specs[3].parameters)["required"] == ["input"]
    from engine.constrained.tools import ToolCall

    assert tools.call_item(ToolCall("call_1", "ns__g", "{}"))["namespace"] == "ns"
    custom = tools.call_item(ToolCall("call_2", "ns__h", '{"input": "*** Begin Patch"}'))
    assert custom["type"] == "custom_tool_call" and custom["input"] == "*** Begin Patch" and custom["name"] == "h"
