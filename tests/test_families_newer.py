"""More families people run (issue 51's "plus the ones you find common"): which format each real
template picks (Granite 4, Laguna, Nemotron 3 Nano, LFM2.5, MiniMax M3), and the two formats they
need that the others don't cover: LFM2's pythonic calls and MiniMax M3's namespaced XML with its
`<mm:think>` reasoning. The texts are the ones llama.cpp's tests/test-chat.cpp records for each
family; the templates are the makers' (tests/data/templates/, from llama.cpp)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.constrained.toolcalls import for_template, minimax_m3, pythonic
from engine.constrained.tools import ToolCall, ToolSpec
from engine.generation.reasoning import ReasoningFormat, plan, template_style
from engine.request import ChatMessage, Thinking

TEMPLATES = Path(__file__).parent / "data" / "templates"
M3 = minimax_m3.NS


def _tool(name: str, props: dict, required: tuple[str, ...] = ()) -> ToolSpec:
    return ToolSpec(name, "", json.dumps({"type": "object", "properties": props, "required": list(required)}))


TOOLS = [_tool("get_time", {"city": {"type": "string"}}, ("city",)),
         _tool("special_function", {"arg1": {"type": "integer"}}, ("arg1",)),
         _tool("toggle", {"enabled": {"type": "boolean"}}),
         _tool("set_config", {"config": {"type": "object"}}),
         _tool("python", {"code": {"type": "string"}}),
         _tool("magic", {"ref": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
                         "opts": {"type": "object", "properties": {"deep": {"type": "boolean"}}}}),
         _tool("empty_args", {})]


@pytest.mark.parametrize("template, fmt, style", [
    ("ibm-granite-granite-4.0.jinja", "hermes", None),
    ("poolside-Laguna-XS.2.jinja", "glm", "think"),
    ("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja", "qwen3_xml", "think"),
    ("LFM2.5-Instruct.jinja", "lfm2", "think"),
    ("LFM2.5-8B-A1B.jinja", "lfm2", "think"),
    ("MiniMax-M3.jinja", "minimax_m3", "minimax3"),
])
def test_format_and_reasoning_style_from_the_real_template(template, fmt, style):
    text = (TEMPLATES / template).read_text()
    found, native = for_template(text)
    assert (found.name, native) == (fmt, True)
    assert template_style(text) == style


# --- LFM2 / LFM2.5: pythonic calls -------------------------------------------------------------
LFM = [
    ("<|tool_call_start|>[special_function(arg1=1)]<|tool_call_end|>", "", [("special_function", {"arg1": 1})]),
    ('<|tool_call_start|>[get_time(city="XYZCITY")]<|tool_call_end|>', "", [("get_time", {"city": "XYZCITY"})]),
    ("<|tool_call_start|>[toggle(enabled=True)]<|tool_call_end|>", "", [("toggle", {"enabled": True})]),
    ("<|tool_call_start|>[toggle(enabled=None)]<|tool_call_end|>", "", [("toggle", {"enabled": None})]),
    ('<|tool_call_start|>[set_config(config={"enabled": True, "count": 3})]<|tool_call_end|>', "",
     [("set_config", {"config": {"enabled": True, "count": 3}})]),
    ('<|tool_call_start|>[set_config(config={"enabled": true, "note": null})]<|tool_call_end|>', "",
     [("set_config", {"config": {"enabled": True, "note": None}})]),
    ('<|tool_call_start|>[Calendar.create_event(title="demo", participants=["Alice", "Bob"])]<|tool_call_end|>', "",
     [("Calendar.create_event", {"title": "demo", "participants": ["Alice", "Bob"]})]),
    ("Use this format: [link text](url). Example: [Wikipedia](https://www.wikipedia.org).",
     "Use this format: [link text](url). Example: [Wikipedia](https://www.wikipedia.org).", []),
    ("<|tool_call_start|>[python(code=\"def hello():\\n    print('hey')\")]<|tool_call_end|>", "",
     [("python", {"code": "def hello():\n    print('hey')"})]),
    ('<|tool_call_start|>[python(code="print(\\"hi\\")")]<|tool_call_end|>', "", [("python", {"code": 'print("hi")'})]),
    ('Let me check the time.<|tool_call_start|>[get_time(city="Paris")]<|tool_call_end|>', "Let me check the time.",
     [("get_time", {"city": "Paris"})]),
    ("<|tool_call_start|>[special_function(arg1=1), toggle(enabled=False)]<|tool_call_end|>", "",
     [("special_function", {"arg1": 1}), ("toggle", {"enabled": False})]),
    ("<|tool_call_start|>[special_function(arg1=-2)]<|tool_call_end|>", "", [("special_function", {"arg1": -2})]),
]
# Not calls: stay text, never evaluated.
LFM_TEXT = ["<|tool_call_start|>[__import__('os').system('x')]<|tool_call_end|>",
            "<|tool_call_start|>[get_time('Paris')]<|tool_call_end|>",
            "<|tool_call_start|>[get_time(city=x)]<|tool_call_end|>",
            "<|tool_call_start|>[get_time(**{'city': 'P'})]<|tool_call_end|>",
            "<|tool_call_start|>get_time(city='P')<|tool_call_end|>",
            "<|tool_call_start|>[get_time(city=1+2)]<|tool_call_end|>",
            "<|tool_call_start|>[get_time(city='Par"]


@pytest.mark.parametrize("output, text, calls", LFM)
def test_lfm2_calls(output, text, calls):
    left, found = pythonic.FORMAT.parse(output, TOOLS)
    assert left == text and [(c.name, json.loads(c.arguments)) for c in found] == calls


@pytest.mark.parametrize("output", LFM_TEXT)
def test_lfm2_what_is_not_a_call_stays_text(output):
    assert pythonic.FORMAT.parse(output, TOOLS) == (output, [])


def test_lfm2_render_reads_back():
    args = {"city": "Paris", "n": 3, "ok": True, "none": None, "nested": {"a": [1, "b", False]}, "q": 'say "hi"\n'}
    written = pythonic.FORMAT.render_call("get_time", json.dumps(args))
    assert written.startswith("<|tool_call_start|>[get_time(city=\"Paris\", n=3, ok=True, none=None")
    _, (call,) = pythonic.FORMAT.parse(written, TOOLS)
    assert json.loads(call.arguments) == args


def test_lfm25_instruct_gets_earlier_calls_as_the_text_the_model_wrote(hf_tokenizer):
    """LFM2.5-Instruct's template lists the tools but writes no calls of its own: an earlier call
    goes back in the assistant's content, as the model wrote it; the result as a `tool` turn."""
    from engine.generation.turns import render_turn

    text = (TEMPLATES / "LFM2.5-Instruct.jinja").read_text()
    fmt, native = for_template(text)
    ours = [ChatMessage("user", "Time in Paris?"),
            ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_time", '{"city": "Paris"}'),)),
            ChatMessage("tool", "12:00", tool_call_id="call_1")]
    turns = [render_turn(m, fmt, native, renders_calls="tool_calls" in text) for m in ours]
    prompt = hf_tokenizer.apply_chat_template(turns, chat_template=text, tokenize=False, add_generation_prompt=True)
    assert '<|im_start|>assistant\n<|tool_call_start|>[get_time(city="Paris")]<|tool_call_end|><|im_end|>' in prompt
    assert "<|im_start|>tool\n12:00<|im_end|>" in prompt


# --- MiniMax M3: namespaced XML, <mm:think> ---------------------------------------------------------
def _m3(*invokes: str) -> str:
    return f"{M3}<tool_call>\n" + "".join(invokes) + f"{M3}</tool_call>"


def _invoke(name: str, body: str = "") -> str:
    return f'{M3}<invoke name="{name}">{body}{M3}</invoke>\n'


M3_CASES = [
    (_m3(_invoke("get_time", f"{M3}<city>Tokyo{M3}</city>")), "", [("get_time", {"city": "Tokyo"})]),
    (_m3(_invoke("special_function", f"{M3}<arg1>1{M3}</arg1>")), "", [("special_function", {"arg1": 1})]),
    (_m3(_invoke("empty_args")), "", [("empty_args", {})]),
    (_m3(_invoke("get_time", f"{M3}<city>Paris{M3}</city>"), _invoke("special_function", f"{M3}<arg1>2{M3}</arg1>")),
     "", [("get_time", {"city": "Paris"}), ("special_function", {"arg1": 2})]),
    ("Let me call the function." + _m3(_invoke("special_function", f"{M3}<arg1>1{M3}</arg1>")),
     "Let me call the function.", [("special_function", {"arg1": 1})]),
    (_m3(_invoke("magic", f"{M3}<ref>-14{M3}</ref>{M3}<tags>{M3}<item>a{M3}</item>{M3}<item>b{M3}</item>{M3}</tags>"
                          f"{M3}<opts>{M3}<deep>true{M3}</deep>{M3}</opts>")),
     "", [("magic", {"ref": -14, "tags": ["a", "b"], "opts": {"deep": True}})]),
]


@pytest.mark.parametrize("output, text, calls", M3_CASES)
def test_minimax_m3_calls(output, text, calls):
    left, found = minimax_m3.FORMAT.parse(output, TOOLS)
    assert left == text and [(c.name, json.loads(c.arguments)) for c in found] == calls


@pytest.mark.parametrize("output", [
    _m3(_invoke("get_time", f"{M3}<city>Tokyo")),  # unclosed parameter
    _m3(_invoke("get_time", f"stray text{M3}<city>Tokyo{M3}</city>")),
    _m3("no invoke here\n"),
])
def test_minimax_m3_malformed_stays_text(output):
    assert minimax_m3.FORMAT.parse(output, TOOLS) == (output, [])


def test_minimax_m3_follow_up_renders_as_its_template_does(hf_tokenizer):
    """The call the server hands the template renders exactly as the model wrote it (`to_xml`),
    nested values included."""
    from engine.generation.turns import render_turn

    text = (TEMPLATES / "MiniMax-M3.jinja").read_text()
    fmt, native = for_template(text)
    args = {"ref": 3, "tags": ["a", "b"], "opts": {"deep": True}}
    call = ToolCall("call_1", "magic", json.dumps(args))
    turns = [render_turn(m, fmt, native, renders_calls=True) for m in
             (ChatMessage("user", "Go"), ChatMessage("assistant", "", tool_calls=(call,)),
              ChatMessage("tool", "done", tool_call_id="call_1"))]
    prompt = hf_tokenizer.apply_chat_template(turns, chat_template=text, tokenize=False, add_generation_prompt=True)
    assert fmt.render_call("magic", call.arguments) in prompt
    _, (back,) = fmt.parse(fmt.render_call("magic", call.arguments), TOOLS)
    assert json.loads(back.arguments) == args


@pytest.mark.parametrize("output, reasoning, answer", [
    ("</mm:think>Hello, world!\nWhat's up?", "", "Hello, world!\nWhat's up?"),
    ("<mm:think>I'm\nthinking</mm:think>Hello, world!", "I'm\nthinking", "Hello, world!"),
    ("<mm:think>Let me check the time</mm:think>" + _m3(_invoke("get_time", f"{M3}<city>Tokyo{M3}</city>")),
     "Let me check the time", _m3(_invoke("get_time", f"{M3}<city>Tokyo{M3}</city>"))),
])
def test_minimax_m3_reasoning_split(output, reasoning, answer):
    assert ReasoningFormat(opened=False, style="minimax3").split(output) == (reasoning, answer)


def test_minimax_m3_thinking_mode_reaches_its_template():
    text = (TEMPLATES / "MiniMax-M3.jinja").read_text()
    budgets = (512, 2048, 8192)
    assert plan(text, None, Thinking(enabled=False), {}, False, budgets).template_kwargs["thinking_mode"] == "disabled"
    assert plan(text, None, Thinking(enabled=True), {}, False, budgets).template_kwargs["thinking_mode"] == "enabled"
    assert plan(text, None, Thinking(), {}, False, budgets).template_kwargs["thinking_mode"] == "adaptive"
    assert plan(text, None, Thinking(), {}, True, budgets).template_kwargs["thinking_mode"] == "disabled"


# --- fixtures (forced-call grammars of these formats: tests/test_families.py FORCED) --------------
@pytest.fixture(scope="module")
def hf_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))



# --- end to end through HTTP (slow: tiny models trained to write each call, tests/call_writers.py) ---
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
ARGS = {"city": "Paris", "days": 3}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
NEWER = {
    # LFM2.5-Instruct: its call markup are special tokens; its template writes no calls of its own.
    "lfm25-tiny": dict(template="LFM2.5-Instruct.jinja", added=[("<|tool_call_start|>", True), ("<|tool_call_end|>", True)],
                       eos=["<|im_end|>"], kwargs={},
                       continuation='<|tool_call_start|>[get_weather(city="Paris", days=3)]<|tool_call_end|>',
                       reasoning=None),
    # MiniMax M3: the marker as an added token; thinking in <mm:think>, adaptive by default.
    "minimax-m3-tiny": dict(template="MiniMax-M3.jinja", added=[(M3, False), ("<mm:think>", False), ("</mm:think>", False)],
                            eos=["[e~["], kwargs={"thinking_mode": "adaptive"},
                            continuation="<mm:think>Need the weather.</mm:think>" + _m3(_invoke(
                                "get_weather", f"{M3}<city>Paris{M3}</city>{M3}<days>3{M3}</days>")),
                            reasoning="Need the weather."),
}


@pytest.fixture(scope="module")
def newer_server(tmp_path_factory, default_model_dir):
    from engine.config import openmlx_home
    from tests.call_writers import Example, build
    from tests.process import Server

    root = tmp_path_factory.mktemp("newer-families")
    cache = openmlx_home() / "test-assets" / "families"
    folders = {name: build(root / name, default_model_dir, f["template"], f["added"], f["eos"],
                           [Example(ASK, f["continuation"], [WEATHER], f["kwargs"])], cache=cache)
               for name, f in NEWER.items()}
    s = Server([a for folder in folders.values() for a in ("--model-dir", str(folder))] + ["--max-models", "2"],
               env={"HF_HUB_OFFLINE": "1"})
    s.folders = folders
    yield s
    s.stop()


@pytest.mark.slow
@pytest.mark.parametrize("model", list(NEWER))
def test_newer_family_calls_end_to_end(newer_server, model):
    """Chat (stream and not), Responses and Messages get the call; thinking apart; the follow-up
    turn's prompt is as long as the template renders it for the client's messages."""
    import httpx
    from transformers import AutoTokenizer

    url, fam = newer_server.url, NEWER[model]
    body = {"model": model, "messages": ASK, "tools": [WEATHER], "max_tokens": 80, "temperature": 0}
    out = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
    choice = out["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and not choice["message"].get("content"), out
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == ARGS
    assert choice["message"].get("reasoning_content") == fam["reasoning"]
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines()
                  if line.startswith("data: {") and json.loads(line[6:])["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    streamed = [tc for d in deltas for tc in d.get("tool_calls") or ()]
    assert streamed[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(tc["function"].get("arguments") or "" for tc in streamed)) == ARGS
    described = {"description": WEATHER["function"]["description"], "parameters": WEATHER["function"]["parameters"]}
    tool = {"type": "function", "name": "get_weather", **described}
    resp = httpx.post(url + "/v1/responses", timeout=120, json={"model": model, "input": ASK[0]["content"],
                                                                "tools": [tool], "max_output_tokens": 80,
                                                                "temperature": 0}).json()
    assert [json.loads(i["arguments"]) for i in resp["output"] if i["type"] == "function_call"] == [ARGS]
    msg = httpx.post(url + "/v1/messages", timeout=120, json={
        "model": model, "messages": ASK, "max_tokens": 80, "temperature": 0,
        "tools": [{"name": "get_weather", "description": described["description"],
                   "input_schema": described["parameters"]}]}).json()
    assert [b["input"] for b in msg["content"] if b["type"] == "tool_use"] == [ARGS] and msg["stop_reason"] == "tool_use"
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21C"}]
    after = httpx.post(url + "/v1/chat/completions", timeout=120,
                       json={**body, "messages": history, "max_tokens": 1}).json()
    hf = AutoTokenizer.from_pretrained(str(newer_server.folders[model]))
    client = [dict(m) for m in history]
    if model == "lfm25-tiny":  # its template writes no calls: the client sends the model's text back
        client[1] = {"role": "assistant", "content": fam["continuation"]}
    else:
        client[1] = {**client[1], "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": ARGS}}]}
    ids = hf.apply_chat_template(client, tools=[WEATHER], add_generation_prompt=True, tokenize=True, return_dict=False,
                                 **fam["kwargs"])
    assert after["usage"]["prompt_tokens"] == len(ids["input_ids"] if isinstance(ids, dict) else ids)
