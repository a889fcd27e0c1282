"""What the tool-call formats share: the call schema, grammar compilation, reading a payload."""
from __future__ import annotations

import json
import re
import uuid
from functools import lru_cache
from typing import Any, Optional, Sequence

from engine.constrained.tools import ToolCall, ToolSpec, closed


# Calls are written compactly, as the grammars make the model write them, so an earlier call
# renders into the next prompt exactly as it was generated (and the prompt cache still matches).
COMPACT = (",", ":")


def json_or_text(text: str) -> Any:
    """`text` parsed as JSON, or the text itself when it isn't JSON (a call's arguments as a
    model wrote them, rendered back into a prompt either way)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parameters(tool: ToolSpec) -> Any:
    return closed(json.loads(tool.parameters)) or {"type": "object"}


def arguments_schema(tools: Sequence[ToolSpec], only: Optional[str], key: str) -> str:
    """JSON schema (as text) of one call object: a tool's name and its arguments under `key`."""
    options = [{"type": "object", "additionalProperties": False, "required": ["name", key],
                "properties": {"name": {"const": t.name}, key: parameters(t)}}
               for t in tools if only is None or t.name == only]
    # Not key-sorted: the grammar writes keys in schema order, "name" first as models and render_call do.
    return json.dumps({"anyOf": options, "x-guidance": {"whitespace_flexible": False}})


@lru_cache(maxsize=128)
def lark(grammar: str) -> str:
    """A Lark grammar compiled once (clients resend the same tools with every request)."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(grammar)


def struct_tag_grammar(tools: Sequence[ToolSpec], trigger: str, begin: str, end: str) -> str:
    """Free text; once `trigger` appears, a call to one of the tools with valid arguments
    (llguidance's lazy structural tags). `begin` has a `{name}` placeholder."""
    from llguidance import StructTag

    tags = [StructTag(trigger=trigger, begin=begin.replace("{name}", t.name),
                      grammar=json.dumps({**parameters(t), "x-guidance": {"whitespace_flexible": False}}), end=end)
            for t in tools]
    return lark(StructTag.to_grammar(tags, assume_special=False))


def make_call(payload_json: str, *keys: str) -> Optional[ToolCall]:
    """A ToolCall from a JSON object with "name" and its arguments under one of `keys`; None if
    it isn't one (the text then stays text)."""
    try:
        payload = json.loads(payload_json)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None
    args: Any = next((payload[k] for k in keys if k in payload), {})
    if isinstance(args, str):  # some models quote the arguments object
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", payload["name"], json.dumps(args, ensure_ascii=False))


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def bare_call(text: str, tools: Sequence[ToolSpec]) -> Optional[ToolCall]:
    """A whole answer that is exactly one JSON call object naming an offered tool, bare or in a
    ```json fence, read as that call. Small models (Qwen2.5-Coder-0.5B at greedy, in llama.cpp
    too) often write their call this way without their template's tags. Only the whole answer
    counts: JSON inside prose stays text."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    if not (body.startswith("{") and body.endswith("}")):
        return None
    call = make_call(body, "arguments", "parameters")
    if call is None or call.name not in {t.name for t in tools}:
        return None
    return call


def added_tokens(tokenizer: Any) -> dict[str, int]:
    """A tokenizer's added tokens (markup such as <tool_call>) by their text, so a grammar can
    write them as the single tokens the model emits."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper around transformers'
    vocab = getattr(inner, "get_added_vocab", None)
    return {str(text): int(i) for text, i in vocab().items()} if callable(vocab) else {}


def held_back(text: str, candidates: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `candidates`:
    what must be held back because it may still become one of them (a stop string, or the
    trigger that starts a tool call)."""
    best = 0
    for candidate in candidates:
        for n in range(min(len(candidate) - 1, len(text)), best, -1):
            if text.endswith(candidate[:n]):
                best = n
                break
    return best
