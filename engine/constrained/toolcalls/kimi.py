"""Kimi K2 (Instruct and Thinking): `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:N
<|tool_call_argument_begin|>{JSON}<|tool_call_end|>…<|tool_calls_section_end|>`. The model's own
`functions.NAME:N` is the call's id: Kimi's template writes that id back into history and names
the result by it."""
from __future__ import annotations

import json
import re

from engine.constrained.toolcalls.common import JsonSection


class Kimi(JsonSection):
    def call_id(self, m: re.Match, index: int) -> str:
        return m.group("id")

    def grammar_name(self, name: str, index: int) -> str:
        return json.dumps(f"functions.{name}:{index}")


FORMAT = Kimi("kimi_k2", ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"),
              ("<|tool_call_begin|>", "<|tool_call_end|>"), "<|tool_call_argument_begin|>",
              name_pattern=r"(?P<id>(?:functions\.)?(?P<name>[^\s<:]+)(?::\d+)?)")
