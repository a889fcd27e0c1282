"""Tool calling on the real default model: grammar-guaranteed calls, streaming deltas, round trips."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from conftest import MODEL
from engine.constrained.toolcalls import hermes

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_required_call_is_valid(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    params = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), params)


def test_named_call(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, tools=[WEATHER, TIME], max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       temperature=0.8, seed=5)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


def test_stream_reassembles_to_the_non_stream_call(client):
    kwargs = dict(model=MODEL, messages=MSG, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    deltas = [d for c in chunks if c.choices[0].delta.tool_calls for d in c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == whole.function.name
    assert all(d.index == 0 for d in deltas) and all(d.id is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == whole.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_result_round_trip(client):
    first = client.chat.completions.create(model=MODEL, messages=MSG, tools=[WEATHER], tool_choice="required",
                                           max_tokens=60, temperature=0).choices[0].message
    call = first.tool_calls[0]
    history = MSG + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=30, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


def test_auto_and_none(client):
    auto = client.chat.completions.create(model=MODEL, messages=MSG, tools=[WEATHER], tool_choice="auto",
                                          max_tokens=40, temperature=0)
    assert auto.choices[0].message.content or auto.choices[0].message.tool_calls
    none = client.chat.completions.create(model=MODEL, messages=MSG, tools=[WEATHER], tool_choice="none",
                                          max_tokens=10, temperature=0)
    assert not none.choices[0].message.tool_calls


@pytest.mark.parametrize("extra,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"messages": MSG + [{"role": "tool", "content": "x"}]}, "messages.1.tool_call_id"),
])
def test_bad_tool_input(server, extra, param):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": MSG, "max_tokens": 5, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_langchain_bind_tools(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=60,
                     max_retries=0)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather" and "city" in msg.tool_calls[0]["args"]


# --- the parser on recorded outputs ------------------------------------------------------
def test_parser_one_call_with_text():
    text, calls = hermes.FORMAT.parse('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    assert text == "Let me check." and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}


def test_parser_two_calls_and_quoted_arguments():
    out = ('<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>\n'
           '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    text, calls = hermes.FORMAT.parse(out)
    assert text == "" and [c.name for c in calls] == ["a", "b"] and json.loads(calls[0].arguments) == {"x": 1}


@pytest.mark.parametrize("broken", [
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>{"name": "a", "arguments": [1, 2]}</tool_call>',
    '<tool_call>{"name": "a", "arguments": {"x": 1}}',  # never closed
])
def test_parser_leaves_broken_calls_as_text(broken):
    text, calls = hermes.FORMAT.parse(broken)
    assert calls == [] and text == broken.strip()


# --- prompting: the model's own template when it renders tools, else the generic prompt ---
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def _runner(folder):
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine.generation.text import TextRunner

    return TextRunner.load("t", probe(folder), "keep", MemoryGate())


def test_native_template_gets_the_tools(fixture_models, tmp_path):
    import shutil

    from engine.generation.text import ChatMessage
    from engine.constrained.tools import ToolSpec

    folder = tmp_path / "hermes"
    shutil.copytree(fixture_models["tiny"], folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = HERMES_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    runner = _runner(folder)
    spec = ToolSpec("get_weather", "Weather", json.dumps(WEATHER["function"]["parameters"]))
    text = runner.tokenizer.decode(runner.encode_chat([ChatMessage("user", "hi")], [spec]))
    assert text.startswith("<|im_start|>system\nTools:") and '"name": "get_weather"' in text
    assert "You can call these functions" not in text  # no generic prompt on top


def test_generic_prompt_for_templates_without_tools(default_model_dir):
    from engine.generation.text import ChatMessage
    from engine.constrained.tools import ToolSpec

    runner = _runner(default_model_dir)
    spec = ToolSpec("get_weather", "Weather", json.dumps(WEATHER["function"]["parameters"]))
    text = runner.tokenizer.decode(runner.encode_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "hi")],
                                                      [spec]))
    assert "Be brief.\n\nYou can call these functions" in text and "get_weather" in text


def test_auto_streams_text_as_it_comes(client):
    """With tools on offer, text that is not a call is streamed piece by piece, not held to the end."""
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Say hello to me in one friendly sentence."}],
                  tools=[WEATHER], max_tokens=24, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    assert not plain.choices[0].message.tool_calls
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True)
              if c.choices and c.choices[0].delta.content]
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content for c in chunks).strip() == plain.choices[0].message.content


def test_strict_tool_with_unsupported_keyword_is_400(server):
    tool = {"type": "function", "function": {"name": "tag", "strict": True, "parameters": {
        "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": MSG, "tools": [tool]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools.0.function.parameters"
    assert "uniqueItems" in r.json()["error"]["message"]
    # Not strict, under auto: accepted (a started call is then parsed, not constrained).
    tool["function"]["strict"] = False
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": MSG, "tools": [tool], "max_tokens": 4})
    assert r.status_code == 200, r.text


CUT = {"model": MODEL, "messages": MSG, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 6,
       "temperature": 0}


def _no_markup(text):
    assert "<tool_call>" not in (text or "") and '"name"' not in (text or "")


def test_forced_call_cut_by_max_tokens_is_a_partial_call_in_every_api(server, client):
    """A limit hit mid-call returns the call with its cut-off arguments (as OpenAI does), never
    the template's markup as the answer."""
    r = client.chat.completions.create(**CUT)
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    _no_markup(choice.message.content)
    assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == "get_weather"
    arguments = choice.message.tool_calls[0].function.arguments
    assert '{"city":"Paris","unit":"celsius"}'.startswith(arguments) or arguments.startswith("{")

    stream = client.chat.completions.create(**CUT, stream=True)
    content, names, finish = "", [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        names += [c.function.name for c in delta.tool_calls or [] if c.function and c.function.name]
        finish = chunk.choices[0].finish_reason or finish
    _no_markup(content)
    assert names == ["get_weather"] and finish == "length"

    resp = httpx.post(server.url + "/v1/responses", timeout=60, json={
        "model": MODEL, "input": MSG[0]["content"], "max_output_tokens": 6, "temperature": 0,
        "tool_choice": "required", "tools": [{"type": "function", **WEATHER["function"]}]}).json()
    assert resp["status"] == "incomplete"
    assert [o["type"] for o in resp["output"]] == ["function_call"] and resp["output"][0]["status"] == "incomplete"
    _no_markup(resp["output_text"])

    msg = httpx.post(server.url + "/v1/messages", timeout=60, json={
        "model": MODEL, "messages": MSG, "max_tokens": 6, "temperature": 0, "tool_choice": {"type": "any"},
        "tools": [{"name": "get_weather", "description": "Current weather",
                   "input_schema": WEATHER["function"]["parameters"]}]}).json()
    assert msg["stop_reason"] == "max_tokens"
    assert [b["type"] for b in msg["content"]] == ["tool_use"] and msg["content"][0]["name"] == "get_weather"
    with httpx.stream("POST", server.url + "/v1/messages", timeout=60, json={
            "model": MODEL, "messages": MSG, "max_tokens": 6, "temperature": 0, "stream": True,
            "tool_choice": {"type": "any"}, "tools": [{"name": "get_weather", "description": "Current weather",
                                                       "input_schema": WEATHER["function"]["parameters"]}]}) as s:
        events = [json.loads(l[6:]) for l in s.iter_lines() if l.startswith("data: ")]
    texts = [e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta"]
    _no_markup("".join(texts))
    assert any(e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use" for e in events)


def test_cut_call_parser_per_format():
    from engine.constrained.toolcalls import cut_call, hermes, llama3, mistral
    from engine.constrained.tools import ToolSpec

    tools = [ToolSpec("final_answer", "", "{}"), ToolSpec("get_weather", "", "{}")]
    text, call = cut_call(hermes.FORMAT, 'Sure. <tool_call>{"name":"final_', tools)
    assert text == "Sure." and call.name == "final_answer" and call.arguments == "" and not call.complete
    text, call = cut_call(hermes.FORMAT, '<tool_call>{"name":"get_weather","arguments":{"city":"Par', tools)
    assert text == "" and call.arguments == '{"city":"Par'
    _, call = cut_call(hermes.FORMAT, '<tool_call>{"name":"get_weather","arguments":{"city":"P"}}</tool', tools)
    assert call.arguments == '{"city":"P"}'
    assert cut_call(hermes.FORMAT, "no call here", tools) == ("no call here", None)
    _, call = cut_call(mistral.FORMAT, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"ci', tools)
    assert call.name == "get_weather" and call.arguments == '{"ci'
    _, call = cut_call(llama3.FORMAT, '{"name": "get_weather", "parameters": {"city": "Pa', tools)
    assert call.name == "get_weather" and call.arguments == '{"city": "Pa'
    assert cut_call(llama3.FORMAT, '{"answer": 42, "more', tools)[1] is None  # plain JSON text


# --- custom (freeform) tools and allowed_tools on chat/completions ----------------------------------
PATCH = {"type": "custom", "custom": {"name": "apply_patch", "description": "Apply a patch to the repository",
                                      "format": {"type": "grammar", "grammar": {
                                          "definition": 'start: "*** Begin Patch" /(.|\\n)*/ "*** End Patch"',
                                          "syntax": "lark"}}}}
FORCE_PATCH = {"type": "custom", "custom": {"name": "apply_patch"}}


def test_a_custom_tool_call_comes_back_as_a_custom_call(server):
    """Codex-style freeform tool on chat/completions: the call carries the tool's free-text
    `input` (OpenAI's ChatCompletionMessageCustomToolCall), in our spec and OpenAI's."""
    from contract import schemas

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Create hello.py"}], "tools": [PATCH, WEATHER],
            "tool_choice": FORCE_PATCH, "max_tokens": 40, "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    (call,) = out["choices"][0]["message"]["tool_calls"]
    assert call["type"] == "custom" and call["custom"]["name"] == "apply_patch" and "function" not in call
    assert isinstance(call["custom"]["input"], str)  # what this 135M model writes there (at greedy: "")
    assert not schemas.ours("CreateChatCompletionResponse", out)
    assert not schemas.openai("CreateChatCompletionResponse", out)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert [d["type"] for d in deltas] == ["custom"] and deltas[0]["custom"] == call["custom"]
    assert all(not schemas.ours("CreateChatCompletionStreamResponse", c) for c in chunks)
    # The call goes back into history as sent; its result follows as a tool message.
    history = body["messages"] + [{"role": "assistant", "content": None, "tool_calls": [call]},
                                  {"role": "tool", "tool_call_id": call["id"], "content": "Done."}]
    after = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={**body, "messages": history,
                                                                               "tool_choice": "none", "max_tokens": 4})
    assert after.status_code == 200, after.text


def test_allowed_tools_offers_only_those(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": MSG, "tools": [WEATHER, TIME, PATCH], "max_tokens": 40, "temperature": 0,
        "tool_choice": {"type": "allowed_tools", "allowed_tools": {
            "mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}}})
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time"


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "custom"}]}, "tools.0.custom"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [PATCH], "tool_choice": {"type": "custom", "custom": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [PATCH], "tool_choice": {"type": "custom"}}, "tool_choice.custom"),
    ({"tools": [PATCH, WEATHER], "tool_choice": {"type": "allowed_tools"}}, "tool_choice.allowed_tools"),
    ({"tools": [PATCH], "tool_choice": {"type": "allowed_tools", "allowed_tools": {
        "mode": "auto", "tools": [{"type": "function", "function": {"name": "get_weather"}}]}}},
     "tool_choice.allowed_tools.tools"),
    ({"tools": [PATCH, {"type": "custom", "custom": {"name": "apply_patch"}}]}, "tools"),
    ({"messages": MSG + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "custom"}]}]},
     "messages.1.tool_calls.0.custom"),
])
def test_bad_custom_tool_input(server, extra, param):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": MSG, "max_tokens": 5, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.headers.get("x-request-id")
