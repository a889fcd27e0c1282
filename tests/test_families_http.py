"""The 2026 model families' tool calls and reasoning end to end through HTTP, on tiny models
trained to write each family's call and thinking (tests/call_writers.py): chat, streamed chat,
responses and messages, a named forced call, and a follow-up turn's prompt as the family's template
renders it; one server for all (`-k FAMILY` trains and serves only that one). The parsers, formats
and grammars themselves: tests/test_families.py."""
from __future__ import annotations

import json

import pytest

from tests.test_families import TEMPLATES, WEATHER_TOOL


# --- end to end through HTTP: tiny models trained to write each family's call ------------------------

WEATHER_ARGS = {"city": "Paris", "days": 3}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
THOUGHT = "Need the weather."
HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
GLM_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
            "</arg_value>", "<tool_response>", "</tool_response>"]
GLM_ROLES = [(t, True) for t in ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")]
DEEPSEEK_TAGS = [(t, False) for t in ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜tool▁calls▁begin｜>",
                                      "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
                                      "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>")] + [("<｜end▁of▁sentence｜>", True)]
KIMI_TOKENS = [(t, True) for t in ("<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
                                   "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                                   "<|tool_call_argument_begin|>", "<|tool_call_end|>")]
KIMI_CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
             "{\"city\": \"Paris\", \"days\": 3}<|tool_call_end|><|tool_calls_section_end|>")
GEMMA4_TOKENS = [(t, True) for t in ("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>",
                                     "<tool_call|>", "<|tool_response>", "<tool_response|>", "<|\"|>", "<|think|>")]
GEMMA4_CALL = "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:3}<tool_call|>"
MISTRAL_TOKENS = [(t, True) for t in ("</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                      "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
                                      "[TOOL_CALLS]", "[ARGS]")]


def _deepseek_system() -> list[dict]:
    """DeepSeek V3.1's template doesn't list tools: the server puts its model card's tool prompt
    in the system turn (deepseek.tool_prompt), so the model was trained, and the template is
    compared, with that system turn."""
    from engine.constrained.toolcalls import deepseek
    from engine.constrained.tools import ToolSpec

    f = WEATHER_TOOL["function"]
    return [{"role": "system", "content": deepseek.FORMAT.tool_prompt([ToolSpec(f["name"], f["description"],
                                                                                 json.dumps(f["parameters"]))])}]


# Each family: its real template, its markup as tokens (special where the family's tokenizer marks
# them so, as far as known; GLM-4.6 keeps its call tags as text and GLM-4.7 as special tokens so
# both kinds of trigger are served), the end-of-sequence tokens, what the model writes for ASK
# (after the prompt the server renders: a reasoning family's template is told enable_thinking),
# the thinking that must come back as reasoning_content, and template arguments the server passes.
FAMILIES = {
    # Qwen3-Coder: <tool_call> is an added token that is not special (as in Qwen's vocabulary).
    "qwen3-coder-tiny": dict(
        template="Qwen3-Coder.jinja", added=[("<tool_call>", False), ("</tool_call>", False)], eos=["<|im_end|>"],
        continuation="<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
                     "</parameter>\n</function>\n</tool_call>", reasoning=None),
    # gpt-oss: harmony's markup are special tokens; <|call|> and <|return|> end the generation.
    "gpt-oss-tiny": dict(
        template="openai-gpt-oss-120b.jinja", added=[(t, True) for t in HARMONY_TOKENS], eos=["<|call|>", "<|return|>"],
        continuation="<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
                     "to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\",\"days\":3}",
        reasoning=THOUGHT),
    # Qwen3.5: the template opens <think>; the XML call follows the thinking.
    "qwen3.5-tiny": dict(
        template="Qwen3.5-4B.jinja", added=[(t, False) for t in ("<think>", "</think>", "<tool_call>", "</tool_call>")],
        eos=["<|im_end|>"], reasoning=THOUGHT,
        continuation=THOUGHT + "\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>"
                     "\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"),
    # GLM-4.6: the model opens its own <think>; newlines between the call's parts.
    "glm-4.6-tiny": dict(
        template="GLM-4.6.jinja", added=GLM_ROLES + [(t, False) for t in GLM_TAGS], eos=["<|observation|>", "<|user|>"],
        reasoning=THOUGHT,
        continuation="\n<think>" + THOUGHT + "</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris"
                     "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"),
    # GLM-4.7: the template opens <think>; no newlines; its tags special tokens here.
    "glm-4.7-tiny": dict(
        template="GLM-4.7-Flash.jinja", added=GLM_ROLES + [(t, True) for t in GLM_TAGS], eos=["<|observation|>", "<|user|>"],
        reasoning=THOUGHT, seed=1,  # seed 0's model had not learned it in 1,500 steps
        continuation=THOUGHT + "</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
                     "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"),
    # DeepSeek V3.1: thinking on (the template opens <think>), tools described in the system turn.
    "deepseek-v3.1-tiny": dict(
        template="deepseek-ai-DeepSeek-V3.1.jinja", added=DEEPSEEK_TAGS, eos=["<｜end▁of▁sentence｜>"], reasoning=THOUGHT,
        system=True,
        continuation=THOUGHT + "</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": "
                     "\"Paris\", \"days\": 3}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    # DeepSeek V3.2: DSML invoke XML (its markup is plain text).
    "deepseek-v3.2-tiny": dict(
        template="deepseek-ai-DeepSeek-V3.2.jinja", added=DEEPSEEK_TAGS, eos=["<｜end▁of▁sentence｜>"], reasoning=THOUGHT,
        continuation=THOUGHT + "</think>\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter "
                     "name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n<｜DSML｜parameter name=\"days\" "
                     "string=\"false\">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>"),
    # Kimi K2: every piece of markup a special token; the call's id is the model's own.
    "kimi-k2-tiny": dict(template="moonshotai-Kimi-K2.jinja", added=KIMI_TOKENS, eos=["<|im_end|>"], reasoning=None,
                         continuation=KIMI_CALL),
    # Kimi-K2-Thinking: the model opens <think> itself.
    "kimi-k2-thinking-tiny": dict(
        template="Kimi-K2-Thinking.jinja", added=KIMI_TOKENS + [("<think>", False), ("</think>", False)],
        eos=["<|im_end|>"], reasoning=THOUGHT, continuation="<think>" + THOUGHT + "</think>" + KIMI_CALL),
    # MiniMax M2: the template opens <think>\n.
    "minimax-m2-tiny": dict(
        template="MiniMax-M2.jinja", eos=["[e~["], reasoning=THOUGHT,
        added=[(t, True) for t in ("]~!b[", "]~b]", "[e~[")]
              + [(t, False) for t in ("<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>")],
        continuation=THOUGHT + "\n</think>\n\n<minimax:tool_call>\n<invoke name=\"get_weather\">\n<parameter name=\"city\">"
                     "Paris</parameter>\n<parameter name=\"days\">3</parameter>\n</invoke>\n</minimax:tool_call>"),
    # Gemma 4: thinking off by default (the template writes an empty thought channel); asked to
    # think (reasoning_effort), it writes its thought channel first: `thinking` below.
    "gemma-4-tiny": dict(
        template="google-gemma-4-31B-it.jinja", added=GEMMA4_TOKENS, eos=["<turn|>"], reasoning=None,
        continuation=GEMMA4_CALL,
        thinking=dict(kwargs={"enable_thinking": True}, reasoning=THOUGHT,
                      continuation="<|channel>thought\n" + THOUGHT + "<channel|>" + GEMMA4_CALL)),
    # Devstral (Mistral's newer spelling): [TOOL_CALLS]name[ARGS]{...}, control tokens special.
    "devstral-tiny": dict(
        template="unsloth-mistral-Devstral-Small-2507.jinja", added=MISTRAL_TOKENS, eos=["</s>"], reasoning=None,
        continuation="[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\", \"days\": 3}"),
}


def template_kwargs(model: str) -> dict:
    """What the server tells the template by default: a reasoning family (not Gemma 4, which
    thinks only when asked) gets enable_thinking (engine/generation/reasoning.py plan)."""
    from engine.generation.reasoning import template_style

    style = template_style((TEMPLATES / FAMILIES[model]["template"]).read_text())
    return {"enable_thinking": True} if style not in (None, "gemma4") else {}


def examples(model: str) -> list:
    from tests.call_writers import Example

    f = FAMILIES[model]
    system = _deepseek_system() if f.get("system") else []
    out = [Example(system + ASK, f["continuation"], [WEATHER_TOOL], template_kwargs(model))]
    if "thinking" in f:
        out.append(Example(system + ASK, f["thinking"]["continuation"], [WEATHER_TOOL], f["thinking"]["kwargs"]))
    return out


# Training the tiny models takes minutes on a busy 2-core CPU the first time (then they are cached
# under ~/.cache/openmlx/test-assets/families): behind --run-slow.
e2e = pytest.mark.slow


@pytest.fixture(scope="module")
def family_models(request, tmp_path_factory, default_model_dir):
    """The tiny models of the families this session's selected tests name (`-k glm` trains and
    serves only GLM's)."""
    from tests.call_writers import build

    from engine.config import openmlx_home

    selected = {item.callspec.params["model"] for item in request.session.items
                if item.module is request.module and "model" in getattr(getattr(item, "callspec", None), "params", {})}
    root = tmp_path_factory.mktemp("families")
    cache = openmlx_home() / "test-assets" / "families"  # trained once per machine (minutes on a busy CPU)
    models: dict[str, object] = {}
    for name, f in FAMILIES.items():
        if name in selected:
            try:
                models[name] = build(root / name, default_model_dir, f["template"], f["added"], f["eos"],
                                     examples(name), seed=f.get("seed", 0), cache=cache)
            except RuntimeError as e:  # the tiny model did not learn its text: that family's tests skip, not all
                models[name] = e
    return models


@pytest.fixture(autouse=True)
def _family_trained(request, family_models):
    """A family whose tiny model did not learn its text is skipped, saying so (the others run)."""
    model = getattr(getattr(request.node, "callspec", None), "params", {}).get("model")
    if isinstance(family_models.get(model), Exception):
        pytest.skip(f"{model}: {family_models[model]}")


@pytest.fixture(scope="module")
def family_server(family_models):
    from tests.process import Server

    args = [a for folder in family_models.values() if not isinstance(folder, Exception)
            for a in ("--model-dir", str(folder))]
    s = Server(args + ["--max-models", str(len(family_models))], env={"HF_HUB_OFFLINE": "1"}, wait=False)
    try:
        s.wait_ready(600)  # minutes when the CPU is busy (it loads the default model first)
    except Exception:
        s.stop()
        raise
    yield s
    s.stop()


def _post(server, path, body):
    import httpx

    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(server, path, body):
    import httpx

    events = []
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return events


def _asks(thinking: bool) -> dict:
    """The request's extra fields: a family that thinks only when asked, asked (reasoning_effort)."""
    return {"reasoning_effort": "high"} if thinking else {}


# Each family as served by default, and Gemma 4 asked to think too.
CASES = [pytest.param(m, False, id=m) for m in FAMILIES] + [
    pytest.param(m, True, id=m + "-thinking") for m, f in FAMILIES.items() if "thinking" in f]


def _reasoning(model: str, thinking: bool):
    return FAMILIES[model]["thinking"]["reasoning"] if thinking else FAMILIES[model]["reasoning"]


def _same_thought(got, want) -> bool:
    """The thinking as the model wrote it, up to the whitespace around it (Qwen3.5 and MiniMax
    write a newline before their close tag)."""
    return (got or "").strip() == (want or "")


@e2e
@pytest.mark.parametrize("model, thinking", CASES)
def test_chat_call_in_the_familys_format(family_server, model, thinking):
    extra = _asks(thinking)
    out = _post(family_server, "/v1/chat/completions", {"model": model, "messages": ASK, "tools": [WEATHER_TOOL],
                                                        "max_tokens": 300, "temperature": 0, **extra})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == WEATHER_ARGS
    assert not choice["message"].get("content"), choice  # no markup left as text
    assert _same_thought(choice["message"].get("reasoning_content"), _reasoning(model, thinking)), choice


@e2e
@pytest.mark.parametrize("model, thinking", CASES)
def test_chat_stream_sends_the_call_whole(family_server, model, thinking):
    extra = _asks(thinking)
    chunks = _stream(family_server, "/v1/chat/completions", {"model": model, "messages": ASK, "tools": [WEATHER_TOOL],
                                                             "max_tokens": 300, "temperature": 0, **extra})
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    text = "".join(d.get("content") or "" for d in deltas)
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    calls: dict[int, dict] = {}  # OpenAI's pieces of each call, by index
    for tc in (tc for d in deltas for tc in d.get("tool_calls") or ()):
        call = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
        call["name"] += tc.get("function", {}).get("name") or ""
        call["arguments"] += tc.get("function", {}).get("arguments") or ""
    assert text == ""  # never markup as text
    assert _same_thought(reasoning, _reasoning(model, thinking)), reasoning
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == WEATHER_ARGS
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "tool_calls"


@e2e
@pytest.mark.parametrize("model", list(FAMILIES))
def test_responses_function_call_item(family_server, model):
    tool = {"type": "function", "name": "get_weather", "description": WEATHER_TOOL["function"]["description"],
            "parameters": WEATHER_TOOL["function"]["parameters"]}
    out = _post(family_server, "/v1/responses", {"model": model, "input": ASK[0]["content"], "tools": [tool],
                                                 "max_output_tokens": 300, "temperature": 0})
    calls = [item for item in out["output"] if item["type"] == "function_call"]
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == WEATHER_ARGS
    assert not [item for item in out["output"] if item["type"] == "message"], out["output"]
    thoughts = [c["text"] for item in out["output"] if item["type"] == "reasoning" for c in item.get("content") or ()]
    assert _same_thought("".join(thoughts), FAMILIES[model]["reasoning"]), out["output"]


@e2e
@pytest.mark.parametrize("model", list(FAMILIES))
def test_messages_tool_use_block(family_server, model):
    tool = {"name": "get_weather", "description": WEATHER_TOOL["function"]["description"],
            "input_schema": WEATHER_TOOL["function"]["parameters"]}
    out = _post(family_server, "/v1/messages", {"model": model, "messages": ASK, "tools": [tool], "max_tokens": 300,
                                                "temperature": 0})
    uses = [b for b in out["content"] if b["type"] == "tool_use"]
    assert out["stop_reason"] == "tool_use", out
    assert len(uses) == 1 and uses[0]["name"] == "get_weather" and uses[0]["input"] == WEATHER_ARGS
    assert not [b for b in out["content"] if b["type"] == "text" and b["text"].strip()], out["content"]
    thoughts = [b["thinking"] for b in out["content"] if b["type"] == "thinking"]
    assert _same_thought("".join(thoughts), FAMILIES[model]["reasoning"]), out["content"]


# Templates that can't render this follow-up in transformers either (the template's own failure).
TEMPLATE_FAILS = {
    # It keeps its call ids in a list it appends to: Jinja's immutable sandbox (transformers') refuses that.
    "kimi-k2-thinking-tiny": "access to attribute 'append' of 'list' object is unsafe",
}


@e2e
@pytest.mark.parametrize("model", list(FAMILIES))
def test_follow_up_prompt_is_the_templates_own(family_server, family_models, model):
    """The call and its result in history: the server's prompt has exactly as many tokens as
    transformers' apply_chat_template renders for the client's messages, with the same template
    arguments (the same tokens: the unit test in tests/test_families.py compares them one by one)."""
    from transformers import AutoTokenizer

    call_id = "functions.get_weather:0" if model.startswith("kimi") else "call_1"
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(WEATHER_ARGS)}}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call_id, "content": "Sunny, 21C"}]
    import httpx

    r = httpx.post(family_server.url + "/v1/chat/completions", json={
        "model": model, "messages": history, "tools": [WEATHER_TOOL], "max_tokens": 1, "temperature": 0}, timeout=120)
    if model in TEMPLATE_FAILS:  # a clear 400 naming the template's complaint, never a 500
        assert r.status_code == 400 and TEMPLATE_FAILS[model] in r.json()["error"]["message"], r.text
        return
    assert r.status_code == 200, r.text
    hf = AutoTokenizer.from_pretrained(str(family_models[model]))
    client = [dict(m) for m in history]
    # Devstral's template reads an assistant turn's content as a string or a list, never null: the
    # server hands it "" (transformers would fail on the client's null).
    content = "" if model == "devstral-tiny" else None
    client[1] = {**client[1], "content": content,
                 "tool_calls": [{**call, "function": {**call["function"], "arguments": WEATHER_ARGS}}]}
    system = _deepseek_system() if FAMILIES[model].get("system") else []
    ids = hf.apply_chat_template(system + client, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=True,
                                 return_dict=False, **template_kwargs(model))
    assert r.json()["usage"]["prompt_tokens"] == len(ids["input_ids"] if isinstance(ids, dict) else ids)


@e2e
@pytest.mark.parametrize("model", list(FAMILIES))
def test_forced_call_is_written_in_the_familys_format(family_server, model):
    """tool_choice naming the function: decoded under the family's own grammar (its markup as the
    tokenizer's tokens, special or not), read back as the call. A reasoning family is told not to
    think here, so its prompt is not the one the tiny model learned: only the call's shape and the
    schema are certain then; the others write their learned call exactly."""
    out = _post(family_server, "/v1/chat/completions", {
        "model": model, "messages": ASK, "tools": [WEATHER_TOOL], "max_tokens": 300, "temperature": 0,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    args = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "get_weather" and isinstance(args["city"], str), call
    assert not choice["message"].get("content"), choice
    if FAMILIES[model]["reasoning"] is None:
        assert args == WEATHER_ARGS
