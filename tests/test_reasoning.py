"""Reasoning models (issue 31): thinking split from the answer on every API, a thinking budget
the server enforces, and the template switches.

End to end on the real default model served with a Qwen3-style chat template (the template opens
`<think>` for the answer, and `enable_thinking: false` renders a closed, empty block), and on the
same weights with `reasoning_parser: none`. Unit tests cover the text splitter and the plan.
"""
from __future__ import annotations

import argparse
import json

import httpx
import pytest

from contract import schemas
from engine.generation.budget import BudgetPolicy
from engine.generation.reasoning import ReasoningFormat, Thinking, plan, prompt_opens_block
from handlers.commands.settings import effort_budgets
from tests.process import Server

QWEN3_STYLE = """{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{%- endif %}"""
STORY = [{"role": "user", "content": "Write a short story about a cat."}]
BUDGETS = (10, 20, 30)  # --reasoning-budgets: low, medium, high


# --- the splitter and the plan (no model) ---------------------------------------------------
@pytest.mark.parametrize("opened,text,expected", [
    (True, "Let me see.\n</think>\n\nParis.", ("Let me see.\n", "Paris.")),  # template opened the block
    (False, "  <think>\nhmm</think>Paris", ("hmm", "Paris")),  # the model opens it itself
    (False, "Paris <think> is a tag", ("", "Paris <think> is a tag")),  # a tag later is text
    (True, "cut off while thinking", ("cut off while thinking", "")),
    (False, "<thi", ("", "<thi")),  # a partial tag that never completes is answer text
    (False, "", ("", "")),
])
def test_split_whole_and_in_single_characters(opened, text, expected):
    fmt = ReasoningFormat(opened)
    assert fmt.split(text) == expected
    splitter = fmt.splitter()
    pieces = [p for ch in text for p in splitter.feed(ch)] + splitter.finish()
    joined = ("".join(t for c, t in pieces if c == "reasoning"), "".join(t for c, t in pieces if c == "content"))
    assert joined == expected
    # A stream never shows part of a tag: where the answer has no '<', no piece has one.
    if "<" not in "".join(expected):
        assert not any("<" in t for _, t in pieces), pieces


def test_reasoning_before_answer_in_every_piece_order():
    splitter = ReasoningFormat(True).splitter()
    channels = [c for chunk in ["Think", "ing.</th", "ink>", "\n\nAns", "wer"] for c, _ in splitter.feed(chunk)]
    assert channels == ["reasoning", "reasoning", "content", "content"]


def test_prompt_opens_block():
    assert prompt_opens_block("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_block("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_block("<|im_start|>assistant\n")


def test_plan():
    budgets = BudgetPolicy().effort_budgets
    think = plan(QWEN3_STYLE, None, Thinking(effort="medium"), {}, False, budgets)
    assert think.parse and think.budget == budgets[1] and think.template_kwargs == {"enable_thinking": True}
    off = plan(QWEN3_STYLE, None, Thinking(enabled=False), {"x": 1}, False, budgets)
    assert off.template_kwargs == {"x": 1, "enable_thinking": False} and off.budget == 0
    # A grammar holds from the first token: no thinking asked for, nothing parsed.
    json_mode = plan(QWEN3_STYLE, None, Thinking(), {}, True, budgets)
    assert not json_mode.parse and json_mode.template_kwargs == {"enable_thinking": False}
    assert not plan("{{ messages }}", None, Thinking(budget=5), {}, False, budgets).parse  # not a thinking template
    assert plan("{{ messages }}", "think", Thinking(), {}, False, budgets).parse  # the config file says so
    assert not plan(QWEN3_STYLE, "none", Thinking(), {}, False, budgets).parse


@pytest.mark.parametrize("text", ["1,2", "a,b,c", "0,1,2", "1,2,3,4", ""])
def test_reasoning_budgets_flag_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        effort_budgets(text)


def test_reasoning_budgets_flag_reads_three():
    assert effort_budgets(" 64, 128,256") == (64, 128, 256)


# --- end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def think_server(tmp_path_factory, default_model_dir):
    folder = tmp_path_factory.mktemp("reasoning")
    (folder / "template.jinja").write_text(QWEN3_STYLE)
    (folder / "config.yaml").write_text(json.dumps({"models": [
        {"source": str(default_model_dir), "id": "smol-think", "chat_template": str(folder / "template.jinja")},
        {"source": str(default_model_dir), "id": "smol-raw", "chat_template": str(folder / "template.jinja"),
         "reasoning_parser": "none"}]}))
    s = Server(["--config", str(folder / "config.yaml"), "--reasoning-budgets", ",".join(map(str, BUDGETS)),
                "--max-models", "2"])
    yield s
    s.stop()


def _post(server, path, body):
    r = httpx.post(server.url + path, json={"temperature": 0, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _events(server, path, body):
    out = []
    with httpx.stream("POST", server.url + path, json={"temperature": 0, "stream": True, **body}, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def _no_tags(*texts):
    return all("<think>" not in t and "</think>" not in t for t in texts)


def test_chat_budget_splits_thinking_from_answer(think_server):
    body = _post(think_server, "/v1/chat/completions",
                 {"model": "smol-think", "messages": STORY, "max_tokens": 40, "reasoning": {"max_tokens": 12}})
    message = body["choices"][0]["message"]
    assert message["reasoning_content"].strip() and message["content"].strip(), message
    assert _no_tags(message["reasoning_content"], message["content"])
    assert 0 < body["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 12
    assert schemas.ours("CreateChatCompletionResponse", body) == []
    assert schemas.openai("CreateChatCompletionResponse", body) == []


def test_chat_stream_sends_thinking_before_the_answer(think_server):
    chunks = _events(think_server, "/v1/chat/completions",
                     {"model": "smol-think", "messages": STORY, "max_tokens": 30, "reasoning_effort": "low",
                      "stream_options": {"include_usage": True}})
    kinds = [k for c in chunks for ch in c["choices"] for k in ("reasoning_content", "content")
             if ch["delta"].get(k)]
    assert kinds and kinds[0] == "reasoning_content" and "content" in kinds
    assert kinds == sorted(kinds, key=lambda k: k == "content"), kinds  # no thinking after the answer began
    thought = "".join(ch["delta"].get("reasoning_content", "") for c in chunks for ch in c["choices"])
    answer = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert _no_tags(thought, answer)
    usage = chunks[-1]["usage"]
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] <= BUDGETS[0]
    for c in chunks:
        assert schemas.ours("CreateChatCompletionStreamResponse", c) == []
        assert schemas.openai("CreateChatCompletionStreamResponse", c) == []


def test_messages_thinking_block_then_text(think_server):
    req = {"model": "smol-think", "messages": STORY, "max_tokens": 30,
           "thinking": {"type": "enabled", "budget_tokens": 8}}
    message = _post(think_server, "/v1/messages", req)
    assert [b["type"] for b in message["content"]] == ["thinking", "text"], message
    assert message["content"][0]["thinking"].strip() and message["content"][1]["text"].strip()
    assert schemas.anthropic("Message", message) == []
    events = _events(think_server, "/v1/messages", req)
    deltas = [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"]
    assert deltas[0] == "thinking_delta" and "text_delta" in deltas
    assert deltas.index("signature_delta") < deltas.index("text_delta")
    starts = [(e["index"], e["content_block"]["type"]) for e in events if e["type"] == "content_block_start"]
    assert starts == [(0, "thinking"), (1, "text")]
    for e in events:
        assert schemas.event_errors(schemas.anthropic_spec_path(), "MessageStreamEvent", e) == [] or e["type"] == "ping"


def test_messages_budget_must_be_below_max_tokens(think_server):
    r = httpx.post(think_server.url + "/v1/messages", json={
        "model": "smol-think", "messages": STORY, "max_tokens": 8, "thinking": {"type": "enabled", "budget_tokens": 8}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert "budget_tokens" in r.json()["error"]["message"]


def test_responses_reasoning_item_first(think_server):
    req = {"model": "smol-think", "input": STORY[0]["content"], "max_output_tokens": 30, "reasoning": {"effort": "low"}}
    response = _post(think_server, "/v1/responses", req)
    assert [o["type"] for o in response["output"]] == ["reasoning", "message"], response["output"]
    reasoning = response["output"][0]["content"][0]
    assert reasoning["type"] == "reasoning_text" and reasoning["text"].strip()
    assert response["output"][1]["content"][0]["text"].strip()
    assert 0 < response["usage"]["output_tokens_details"]["reasoning_tokens"] <= BUDGETS[0]
    assert schemas.ours("ResponseObject", response) == []
    assert schemas.openai("Response", response) == []
    events = [e for e in _events(think_server, "/v1/responses", req)]
    names = [e["type"] for e in events]
    assert names.index("response.reasoning_text.delta") < names.index("response.reasoning_text.done") \
        < names.index("response.output_text.delta")
    for e in events:
        assert schemas.event_errors(schemas.openai_spec_path(), "ResponseStreamEvent", e) == [], e


@pytest.mark.parametrize("switch", [{"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"},
                                    {"reasoning": {"enabled": False}}])
def test_thinking_off_gives_no_reasoning(think_server, switch):
    on = _post(think_server, "/v1/chat/completions", {"model": "smol-think", "messages": STORY, "max_tokens": 1})
    off = _post(think_server, "/v1/chat/completions", {"model": "smol-think", "messages": STORY, "max_tokens": 8,
                                                       **switch})
    # The template rendered its closed, empty block: the prompt is longer by it.
    assert off["usage"]["prompt_tokens"] > on["usage"]["prompt_tokens"]
    assert "reasoning_content" not in off["choices"][0]["message"]
    assert "completion_tokens_details" in off["usage"]  # still a reasoning model: 0 reasoning tokens
    assert off["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_messages_thinking_disabled(think_server):
    message = _post(think_server, "/v1/messages", {"model": "smol-think", "messages": STORY, "max_tokens": 8,
                                                    "thinking": {"type": "disabled"}})
    assert [b["type"] for b in message["content"]] == ["text"]


def test_reasoning_parser_none_leaves_the_text_alone(think_server):
    body = _post(think_server, "/v1/chat/completions", {"model": "smol-raw", "messages": STORY, "max_tokens": 20,
                                                        "reasoning": {"max_tokens": 4}})
    message = body["choices"][0]["message"]
    assert "reasoning_content" not in message and "completion_tokens_details" not in body["usage"]
    assert message["content"].strip()


def test_completions_return_raw_text(think_server):
    body = _post(think_server, "/v1/completions", {"model": "smol-think", "prompt": "<think>\nHello", "max_tokens": 4})
    assert "reasoning_content" not in body["choices"][0] and body["choices"][0]["text"]


@pytest.mark.parametrize("bad,param", [
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"reasoning": {"max_tokens": -1}}, "reasoning"),
    ({"chat_template_kwargs": "enable_thinking=false"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs.tokenize"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt"),
])
def test_bad_reasoning_fields(think_server, bad, param):
    r = httpx.post(think_server.url + "/v1/chat/completions",
                   json={"model": "smol-think", "messages": STORY, "max_tokens": 4, **bad}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param) and r.headers.get("x-request-id")


def test_thinking_with_tools_on_offer(think_server):
    """Under tool_choice auto a reasoning model thinks first (its calls are parsed, not held to a
    grammar from the first token); a required call turns thinking off and is constrained."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    auto = _post(think_server, "/v1/chat/completions", {"model": "smol-think", "messages": ask, "tools": [tool],
                                                        "max_tokens": 24, "reasoning": {"max_tokens": 6}})
    assert auto["choices"][0]["message"].get("reasoning_content"), auto
    required = _post(think_server, "/v1/chat/completions", {"model": "smol-think", "messages": ask, "tools": [tool],
                                                            "tool_choice": "required", "max_tokens": 40})
    message = required["choices"][0]["message"]
    assert "reasoning_content" not in message and json.loads(message["tool_calls"][0]["function"]["arguments"])
