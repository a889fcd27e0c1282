"""Chat messages as a chat template's turns: tool calls and results as structured fields for
templates that render tools themselves, as text in the generic prompt's format for the others."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Sequence

from engine.constrained.toolcalls import ToolFormat
from engine.constrained.toolcalls.common import json_or_text
from engine.constrained.tools import ToolSpec, render_result, tool_prompt
from engine.request import ChatMessage


def render_turn(m: ChatMessage, fmt: ToolFormat, native: bool, renders_calls: bool = True) -> dict[str, Any]:
    """One message as a chat-template turn. Templates with tool support get calls and results
    as structured fields; others get them as text in the generic prompt's format.
    `renders_calls` False: a template that lists the tools but writes no calls of its own
    (LFM2.5-Instruct's) gets an earlier call as the text the model wrote, in its content."""
    role = "system" if m.role == "developer" else m.role
    if m.role == "tool":
        if native:
            return {"role": "tool", "content": m.text_only, "tool_call_id": m.tool_call_id}
        return {"role": "user", "content": render_result(m.text_only)}
    if m.tool_calls:
        if native and renders_calls:
            return {"role": "assistant", "content": m.content,
                    "tool_calls": [{"id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": json_or_text(c.arguments)}}
                                   for c in m.tool_calls]}
        calls = "".join(fmt.render_call(c.name, c.arguments) for c in m.tool_calls)
        if native:  # the model's own call text, as it wrote it
            return {"role": role, "content": m.content + calls}
        return {"role": role, "content": (m.content + "\n" if m.content else "") + calls}
    return {"role": role, "content": m.text_only}



def with_tool_prompt(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec],
                     prompt: Optional[str] = None) -> list[ChatMessage]:
    """Messages with tool instructions (the generic ones unless `prompt` is given) in the system
    turn (added if there is none)."""
    out = list(messages)
    prompt = prompt if prompt is not None else tool_prompt(tools)
    if out and out[0].role in ("system", "developer"):
        out[0] = replace(out[0], content=out[0].content + "\n\n" + prompt)
    else:
        out.insert(0, ChatMessage("system", prompt))
    return out
