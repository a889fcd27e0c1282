"""What the tool-call formats share: the call schema, grammar compilation, reading a payload."""
from __future__ import annotations

import json
import re
import uuid
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

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


def special_trigger(fmt: Any, tokenizer: Any) -> bool:
    """Whether the tokenizer holds one of the format's call triggers as a special token (one a
    grammar written as text can't emit: llguidance keeps special tokens apart from text)."""
    # A transformers tokenizer has the table itself; mlx-lm's wrapper holds one as `_tokenizer`.
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if not isinstance(decoder, dict):
        decoder = getattr(getattr(tokenizer, "_tokenizer", None), "added_tokens_decoder", None)
    if not isinstance(decoder, dict):
        return False
    special = {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
    return any(t in special for t in fmt.triggers)


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


def new_call(name: str, arguments: dict[str, Any]) -> ToolCall:
    """A ToolCall with a fresh id; the arguments as OpenAI's JSON text."""
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False))


def json_call(name: str, arguments_json: str) -> Optional[ToolCall]:
    """A call whose arguments the model wrote as one JSON object; None when they aren't one."""
    try:
        args = json.loads(arguments_json)
    except ValueError:
        return None
    return new_call(name, args) if isinstance(args, dict) and name else None


def property_schema(tools: Sequence[ToolSpec], name: str, key: str) -> Any:
    """The JSON schema of argument `key` of tool `name` (None when the tool or key is unknown)."""
    for tool in tools:
        if tool.name == name:
            try:
                props = json.loads(tool.parameters).get("properties") or {}
            except (ValueError, AttributeError):
                return None
            return props.get(key) if isinstance(props, dict) else None
    return None


def _types(schema: Any) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    found = set(kind) if isinstance(kind, list) else {kind} if isinstance(kind, str) else set()
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or ():
            found |= _types(option)
    if "enum" in schema and not found:
        found |= {"string" if isinstance(v, str) else "number" for v in schema["enum"]}
    return found


def text_values(arguments: str) -> list[tuple[str, str]]:
    """A call's JSON arguments as the XML formats write them back into history: (key, text) pairs,
    a string as it is and anything else as JSON (the inverse of `typed_value`)."""
    args = json.loads(arguments) if arguments.strip() else {}
    return [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in args.items()]


def typed_value(raw: str, schema: Any) -> Any:
    """A parameter value written as bare text (the XML formats: Qwen3-Coder, GLM, MiniMax), typed
    by the tool's schema: a string stays the text; a number, boolean, array, object or null is
    read as JSON (the text again when it isn't valid JSON). A key the schema doesn't list stays
    text, as the models' own parsers do."""
    types = _types(schema)
    if not types or types == {"string"}:
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    named = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "array": list,
             "object": dict, "null": type(None)}
    if any(isinstance(value, named[t]) and not (t in ("number", "integer") and isinstance(value, bool))
           for t in types if t in named):
        return value
    return raw if "string" in types else value


def tag(text: str, tags: Any) -> str:
    """A grammar literal for call markup: the single token when this tokenizer holds `text` as
    one (a special token a text grammar could never emit), else the characters."""
    return f"<[{tags[text]}]>" if text in tags else json.dumps(text)


# Where JSON allows whitespace, a family's forced call may write one space: the models write their
# arguments compactly (gpt-oss) or as json.dumps and Jinja's tojson do (`{"city": "Paris"}`:
# Devstral, DeepSeek, Kimi), and a grammar that forbids their own spacing makes them write garbage
# values instead. One space at most, so a weak model can't run on in whitespace.
CALL_JSON_SPACING = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?"}


def json_schema_rule(schema: Any) -> str:
    """A Lark `%json` rule for one value of `schema` in a family's call, compact or with single
    spaces (CALL_JSON_SPACING)."""
    body = schema if isinstance(schema, dict) else {}
    return "%json " + json.dumps({**closed(body), "x-guidance": CALL_JSON_SPACING})


def tool_properties(tool: ToolSpec) -> tuple[list[tuple[str, Any]], set[str]]:
    """A tool's parameters in schema order, and which are required."""
    schema = json.loads(tool.parameters) if tool.parameters else {}
    props = schema.get("properties") or {}
    return list(props.items()), set(schema.get("required") or ())


def text_value_rule(schema: Any, close: str, tags: Any = {}) -> str:
    """A Lark rule for one bare-text parameter value (the XML formats) and the markup that closes
    it: a string is text without `<`, the close folded into the same regex (the text can't run
    into it); anything else JSON of its schema, then the close."""
    if _types(schema) in (set(), {"string"}):
        if close in tags:
            return f"/[^<]*/ {tag(close, tags)}"
        escaped = "".join("\\n" if c == "\n" else "\\" + c if c in ".^$*+?()[]{}|\\/" else c for c in close)
        return "/[^<]*" + escaped + "/"
    return f"{json_schema_rule(schema)} {tag(close, tags)}"


def params_rule(tool: ToolSpec, write: Callable[[str, Any], str]) -> str:
    """A Lark sequence of a tool's parameters in schema order, the required ones mandatory;
    `write(key, schema)` is one parameter in the format's markup (text_value_rule for its value)."""
    props, required = tool_properties(tool)
    items = [write(key, schema) for key, schema in props]
    return " ".join(item if key in required else f"({item})?" for (key, _), item in zip(props, items)) or '""'


class JsonSection:
    """Calls inside a section of special tokens, each call `call_open NAME sep {JSON} call_close`
    (DeepSeek V3.1, Kimi K2). `name_pattern` reads the name (and, for Kimi, the call's own id)
    out of what stands between call_open and sep."""

    anywhere = True

    def __init__(self, name: str, section: tuple[str, str], call: tuple[str, str], sep: str,
                 name_pattern: str = r"(?P<name>[^\s<]+)") -> None:
        self.name = name
        self.section, self.call, self.sep = section, call, sep
        self.triggers = (section[0],)
        s0, s1, c0, c1 = (re.escape(x) for x in (*section, *call))
        self._section = re.compile(rf"{s0}(.*?)(?:{s1}|$)", re.DOTALL)
        self._call = re.compile(rf"{c0}\s*{name_pattern}\s*{re.escape(sep)}(.*?){c1}", re.DOTALL)

    def detect(self, template: str) -> bool:
        return self.section[0] in template

    def call_id(self, m: re.Match, index: int) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    def render_call(self, name: str, arguments: str) -> str:
        return f"{self.section[0]}{self.call[0]}{name}{self.sep}{arguments}{self.call[1]}{self.section[1]}"

    def parse(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []

        def take(section: re.Match) -> str:
            found = []
            for m in self._call.finditer(section.group(1)):
                call = json_call(m.group("name"), m.group(m.lastindex or 0))
                if call is None:
                    return section.group(0)
                found.append(ToolCall(self.call_id(m, len(calls) + len(found)), call.name, call.arguments))
            if not found or self._call.sub("", section.group(1)).strip():
                return section.group(0)  # not (only) well-formed calls: text
            calls.extend(found)
            return ""

        return self._section.sub(take, text).strip(), calls

    def grammar_name(self, name: str, index: int) -> str:
        return json.dumps(name)

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None,
                     tags: Any = {}) -> str:
        calls = " | ".join(f"{self.grammar_name(t.name, 0)} {tag(self.sep, tags)} {json_schema_rule(parameters(t))}"
                           for t in tools if only is None or t.name == only)
        return lark(f"start: {tag(self.section[0], tags)} {tag(self.call[0], tags)} ({calls}) "
                    f"{tag(self.call[1], tags)} {tag(self.section[1], tags)}")

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> Optional[str]:
        return None  # calls under auto are parsed, not constrained
