"""DeepSeek V3.1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{JSON}<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`.
(V3.2 writes DSML `<invoke>` XML instead: invoke_xml.py.)"""
from __future__ import annotations

import json
from typing import Sequence

from engine.constrained.toolcalls.common import JsonSection
from engine.constrained.tools import ToolSpec


class DeepSeekV3(JsonSection):
    def tool_prompt(self, tools: Sequence[ToolSpec]) -> str:
        """DeepSeek V3.1's template doesn't list tools; its model card says to describe them in
        the system prompt in these words."""
        listing = "".join(f"### {t.name}\nDescription: {t.description}\n\nParameters: "
                          f"{json.dumps(json.loads(t.parameters))}\n\n" for t in tools)
        return ("## Tools\nYou have access to the following tools:\n\n" + listing
                + "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments"
                "<｜tool▁call▁end｜>{{additional_tool_calls}}<｜tool▁calls▁end｜>\n\n"
                "Where:\n- `tool_call_name` must be an exact match to one of the available tools\n"
                "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
                "- For multiple tool calls, chain them directly without separators or spaces")


FORMAT = DeepSeekV3("deepseek_v3", ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
                     ("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"), "<｜tool▁sep｜>")
