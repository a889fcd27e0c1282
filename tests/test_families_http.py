"""The 2026 model families' tool calls and reasoning end to end through HTTP, on tiny models
trained to write each family's call (tests/call_writers.py): chat, streamed chat, responses and
messages, and a follow-up turn's prompt as the family's template renders it. The parsers, formats
and grammars themselves: tests/test_families.py."""
from __future__ import annotations

import json

import pytest

from tests.test_families import WEATHER_TOOL


# --- end to end through HTTP: tiny models trained to write each family's call ------------------------

WEATHER_ARGS = {"city": "Paris", "days": 3}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
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
        reasoning="Need the weather."),
}


# Training the two tiny models takes minutes on a busy 2-core CPU the first time (then they are
# cached under ~/.cache/openmlx/test-assets/families): behind --run-slow.
e2e = pytest.mark.slow


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, default_model_dir):
    from tests.call_writers import Example, build

    from engine.config import openmlx_home

    root = tmp_path_factory.mktemp("families")
    cache = openmlx_home() / "test-assets" / "families"  # trained once per machine (minutes on a busy CPU)
    return {name: build(root / name, default_model_dir, f["template"], f["added"], f["eos"],
                        [Example(ASK, f["continuation"], [WEATHER_TOOL])], cache=cache)
            for name, f in FAMILIES.items()}


@pytest.fixture(scope="module")
def family_server(family_models):
    from tests.process import Server

    args = [a for folder in family_models.values() for a in ("--model-dir", str(folder))]
    s = Server(args + ["--max-models", "2"], env={"HF_HUB_OFFLINE": "1"})
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


@e2e
@pytest.mark.parametrize("model", list(FAMILIES))
def test_chat_call_in_the_familys_format(family_server, model):
    out = _post(family_server, "/v1/chat/completions", {"model": model, "messages": ASK, "tools": [WEATHER_TOOL],
                                                        "max_tokens": 80, "temperature": 0})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == WEATHER_ARGS
    assert not choice["message"].get("content")  # no markup left as text
    assert choice["message"].get("reasoning_content") == FAMILIES[model]["reasoning"]


@e2e
@pytest.mark.parametrize("model", list(FAMILIES))
def test_chat_stream_sends_the_call_whole(family_server, model):
    chunks = _stream(family_server, "/v1/chat/completions", {"model": model, "messages": ASK, "tools": [WEATHER_TOOL],
                                                             "max_tokens": 80, "temperature": 0})
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    text = "".join(d.get("content") or "" for d in deltas)
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    calls: dict[int, dict] = {}  # OpenAI's pieces of each call, by index
    for tc in (tc for d in deltas for tc in d.get("tool_calls") or ()):
        call = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
        call["name"] += tc.get("function", {}).get("name") or ""
        call["arguments"] += tc.get("function", {}).get("arguments") or ""
    assert text == ""  # never markup as text
    assert reasoning == (FAMILIES[model]["reasoning"] or "")
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == WEATHER_ARGS
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "tool_calls"


@e2e
@pytest.mark.parametrize("model", list(FAMILIES))
def test_responses_function_call_item(family_server, model):
    tool = {"type": "function", "name": "get_weather", "description": WEATHER_TOOL["function"]["description"],
            "parameters": WEATHER_TOOL["function"]["parameters"]}
    out = _post(family_server, "/v1/responses", {"model": model, "input": ASK[0]["content"], "tools": [tool],
                                                 "max_output_tokens": 80, "temperature": 0})
    calls = [item for item in out["output"] if item["type"] == "function_call"]
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == WEATHER_ARGS
    assert not [item for item in out["output"] if item["type"] == "message"]


@e2e
@pytest.mark.parametrize("model", list(FAMILIES))
def test_messages_tool_use_block(family_server, model):
    tool = {"name": "get_weather", "description": WEATHER_TOOL["function"]["description"],
            "input_schema": WEATHER_TOOL["function"]["parameters"]}
    out = _post(family_server, "/v1/messages", {"model": model, "messages": ASK, "tools": [tool], "max_tokens": 80,
                                                "temperature": 0})
    uses = [b for b in out["content"] if b["type"] == "tool_use"]
    assert out["stop_reason"] == "tool_use"
    assert len(uses) == 1 and uses[0]["name"] == "get_weather" and uses[0]["input"] == WEATHER_ARGS
    assert not [b for b in out["content"] if b["type"] == "text" and "<" in b["text"]]


@e2e
@pytest.mark.parametrize("model", list(FAMILIES))
def test_follow_up_prompt_is_the_templates_own(family_server, family_models, model):
    """The call and its result in history: the server's prompt has exactly as many tokens as
    transformers' apply_chat_template renders for the client's messages (the same tokens: the
    unit test in tests/test_families.py compares them one by one)."""
    from transformers import AutoTokenizer

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(WEATHER_ARGS)}}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21C"}]
    out = _post(family_server, "/v1/chat/completions", {"model": model, "messages": history, "tools": [WEATHER_TOOL],
                                                        "max_tokens": 1, "temperature": 0})
    hf = AutoTokenizer.from_pretrained(str(family_models[model]))
    client = [dict(m) for m in history]
    client[1] = {**client[1], "tool_calls": [{**call, "function": {**call["function"], "arguments": WEATHER_ARGS}}]}
    ids = hf.apply_chat_template(client, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=True,
                                 return_dict=False, **({"enable_thinking": True} if model == "gpt-oss-tiny" else {}))
    assert out["usage"]["prompt_tokens"] == len(ids["input_ids"] if isinstance(ids, dict) else ids)
