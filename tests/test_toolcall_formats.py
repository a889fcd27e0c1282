"""Tool-call formats (engine/constrained/toolcalls): detection by template, parsing recorded model outputs
(malformed ones stay text), rendering, and the grammars that constrain calls."""
from __future__ import annotations

import functools
import json

import pytest

from engine.generation.text import ChatMessage
from engine.generation.turns import render_turn
from engine.constrained.toolcalls import CallWatcher, for_template, hermes, llama3, mistral
from engine.constrained.tools import ToolCall, ToolSpec

WEATHER = ToolSpec("get_weather", "Weather in a city", json.dumps(
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))

QWEN = "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> <tool_call>{% endif %}"
LLAMA31 = "{% if tools %}Environment: ipython{% endif %}<|start_header_id|>{{ '<|python_tag|>' }}"
MISTRAL = "{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"
PLAIN = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize("template, name, native", [(QWEN, "hermes", True), (LLAMA31, "llama3", True),
                                                    (MISTRAL, "mistral", True), (PLAIN, "hermes", False),
                                                    ("", "hermes", False)])
def test_format_chosen_by_template(template, name, native):
    fmt, is_native = for_template(template)
    assert (fmt.name, is_native) == (name, native)


@pytest.mark.parametrize("fmt, output, text, calls", [
    (hermes.FORMAT, 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me look.", [("get_weather", {"city": "Paris"})]),
    (hermes.FORMAT, '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call><tool_call>{"name": "b", '
                    '"arguments": {}}</tool_call>', "", [("a", {"x": 1}), ("b", {})]),
    (hermes.FORMAT, '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
     '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', []),
    (hermes.FORMAT, "<tool_call>[1, 2]</tool_call>", "<tool_call>[1, 2]</tool_call>", []),
    (llama3.FORMAT, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
     "", [("get_weather", {"city": "Paris"})]),
    (llama3.FORMAT, '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}', "",
     [("a", {"x": 1}), ("b", {})]),
    (llama3.FORMAT, "The weather is {nice}.", "The weather is {nice}.", []),
    (llama3.FORMAT, '{"name": "a", "parameters": {"x": 1}', '{"name": "a", "parameters": {"x": 1}', []),
    (llama3.FORMAT, '{"city": "Paris"}', '{"city": "Paris"}', []),
    (mistral.FORMAT, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}]', "",
     [("get_weather", {"city": "Paris"})]),
    (mistral.FORMAT, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [("get_weather", {"city": "Paris"})]),
    (mistral.FORMAT, 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"ci', 'Sure.[TOOL_CALLS][{"name": '
                     '"get_weather", "arguments": {"ci', []),
    (mistral.FORMAT, "No calls here.", "No calls here.", []),
])
def test_parsers_on_recorded_outputs(fmt, output, text, calls):
    rest, found = fmt.parse(output)
    assert rest == text
    assert [(c.name, json.loads(c.arguments)) for c in found] == calls
    assert all(c.id.startswith("call_") for c in found)


@pytest.mark.parametrize("fmt", [hermes.FORMAT, llama3.FORMAT, mistral.FORMAT])
def test_rendered_calls_parse_back(fmt):
    rest, calls = fmt.parse(fmt.render_call("get_weather", '{"city": "Rome"}'))
    assert rest == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Rome"}')]


def test_turns_native_and_generic():
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    assistant = ChatMessage("assistant", "", tool_calls=(call,))
    result = ChatMessage("tool", "Sunny", tool_call_id="call_1")
    native = render_turn(assistant, hermes.FORMAT, native=True)
    assert native["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert render_turn(result, hermes.FORMAT, native=True) == {"role": "tool", "content": "Sunny",
                                                               "tool_call_id": "call_1"}
    generic = render_turn(assistant, hermes.FORMAT, native=False)
    assert generic["content"] == '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    assert render_turn(result, hermes.FORMAT, native=False) == {"role": "user",
                                                                "content": "<tool_response>\nSunny\n</tool_response>"}


def test_call_watcher_streams_text_and_holds_calls():
    w = CallWatcher(hermes.FORMAT)
    out = "".join(w.feed(p) for p in ["Let me ", "check <to", "ol_call>{\"name\"", ": 1}"])
    assert out == "Let me check " and w.unsent().startswith("<tool_call>")
    w = CallWatcher(hermes.FORMAT)
    assert "".join(w.feed(p) for p in ["a <b>", " c <", "d"]) == "a <b> c <d" and w.unsent() == ""
    w = CallWatcher(llama3.FORMAT)  # calls only at the start of the answer
    assert w.feed("  ") == "" and w.feed('{"name"') == "" and w.unsent() == '  {"name"'
    w = CallWatcher(llama3.FORMAT)
    assert w.feed("The {x}") == "The {x}" and w.feed(" {y}") == " {y}"


def test_call_watcher_holds_an_answer_that_opens_like_a_bare_call():
    """Qwen2.5-Coder-0.5B writes its call as bare JSON (no <tool_call>): held whole, so the
    stream does not send the call as text and then as a call."""
    w = CallWatcher(hermes.FORMAT)
    assert w.feed(" {") == "" and w.feed('"name": "f"') == "" and w.unsent() == ' {"name": "f"'
    w = CallWatcher(hermes.FORMAT)
    assert w.feed("``") == "" and w.feed("`json\n{") == "" and w.unsent() == "```json\n{"
    w = CallWatcher(hermes.FORMAT)  # a code block that is not JSON streams once it says so
    assert w.feed("``") == "" and w.feed("`python\nx") == "```python\nx" and w.feed(" = 1") == " = 1"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(default_model_dir)


@functools.lru_cache(maxsize=1)
def _lltok(tokenizer):
    """The grammar engine's tokenizer, built once for the module's tokenizer."""
    from engine.constrained.structured import ll_tokenizer

    return ll_tokenizer(tokenizer)


def _accepted(tokenizer, grammar: str, text: str) -> bool:
    import llguidance

    matcher = llguidance.LLMatcher(_lltok(tokenizer), grammar)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    return matcher.validate_tokens(tokens) == len(tokens)


@pytest.mark.parametrize("fmt", [hermes.FORMAT, mistral.FORMAT])
def test_auto_grammar_allows_text_and_constrains_a_started_call(tokenizer, fmt):
    grammar = fmt.auto_grammar([WEATHER])
    assert _accepted(tokenizer, grammar, "Hello <b>there</b>, it is { sunny } today.")
    good = fmt.render_call("get_weather", '{"city": "Paris"}')
    assert _accepted(tokenizer, grammar, "Let me check. " + good)
    trigger = fmt.triggers[0]
    assert not _accepted(tokenizer, grammar, "Let me check. " + trigger + '{"name": "nope"')
    assert not _accepted(tokenizer, grammar, good.replace('"city"', '"town"'))


@pytest.mark.parametrize("fmt", [hermes.FORMAT, llama3.FORMAT, mistral.FORMAT])
def test_call_grammar_takes_exactly_a_valid_call(tokenizer, fmt):
    grammar = fmt.call_grammar([WEATHER])
    assert _accepted(tokenizer, grammar, fmt.render_call("get_weather", '{"city": "Paris"}'))
    assert not _accepted(tokenizer, grammar, "Sure! ")
    assert not _accepted(tokenizer, grammar, fmt.render_call("get_weather", '{"town": "Paris"}'))
