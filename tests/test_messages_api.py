"""End to end: Anthropic's Messages API with the official `anthropic` SDK on the real default model."""
from __future__ import annotations

import anthropic
import httpx
import pytest

from conftest import MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"top_k": 1}  # the SDK no longer has a temperature argument; greedy decoding via top_k
WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_create_answers_with_real_usage(claude, hf_tokenizer):
    m = claude.messages.create(model=MODEL, max_tokens=20, messages=QUESTION, extra_body=GREEDY)
    assert m.role == "assistant" and m.type == "message"
    assert "Paris" in m.content[0].text
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    prompt = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(prompt)


def test_system_string_and_blocks_agree(claude):
    a = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=QUESTION)
    b = claude.messages.count_tokens(model=MODEL, system=[{"type": "text", "text": "Be brief."}], messages=QUESTION)
    none = claude.messages.count_tokens(model=MODEL, messages=QUESTION)
    assert a.input_tokens == b.input_tokens != none.input_tokens  # (the template has a default system prompt)


def test_max_tokens_and_stop_sequence(claude):
    m = claude.messages.create(model=MODEL, max_tokens=3, messages=QUESTION, extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3
    m = claude.messages.create(model=MODEL, max_tokens=20, messages=QUESTION, stop_sequences=["France"],
                               extra_body=GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "France"
    assert "France" not in m.content[0].text


def test_stream_matches_non_stream(claude):
    plain = claude.messages.create(model=MODEL, max_tokens=30, messages=QUESTION, extra_body=GREEDY)
    with claude.messages.stream(model=MODEL, max_tokens=30, messages=QUESTION, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == plain.content[0].text == final.content[0].text
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_stream_event_order(server):
    body = {"model": MODEL, "max_tokens": 8, "messages": QUESTION, "stream": True, **GREEDY}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=60) as r:
        names = [line[len("event: "):] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}


def test_next_turn_hits_the_prompt_cache(claude):
    first = claude.messages.create(model=MODEL, max_tokens=20, messages=QUESTION, extra_body=GREEDY)
    turns = QUESTION + [{"role": "assistant", "content": first.content[0].text},
                        {"role": "user", "content": "And of Germany?"}]
    second = claude.messages.create(model=MODEL, max_tokens=20, messages=turns, extra_body=GREEDY)
    whole_first = first.usage.input_tokens + first.usage.cache_read_input_tokens + first.usage.output_tokens
    assert second.usage.cache_read_input_tokens >= whole_first - 1
    assert "Berlin" in second.content[0].text


def test_tool_use_round_trip(claude):
    m = claude.messages.create(model=MODEL, max_tokens=60, tools=[WEATHER], tool_choice={"type": "any"},
                               messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert m.stop_reason == "tool_use"
    use = m.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and set(use.input) == {"city"}
    follow = claude.messages.create(model=MODEL, max_tokens=20, tools=[WEATHER], messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"}]}])
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_streamed_tool_use_matches_non_stream(claude):
    kwargs = dict(model=MODEL, max_tokens=60, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
                  messages=[{"role": "user", "content": "Weather in Rome?"}], extra_body=GREEDY)
    plain = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[-1].input == plain.content[-1].input


def test_prefill_continues_the_assistant_turn(claude):
    m = claude.messages.create(model=MODEL, max_tokens=10, extra_body=GREEDY, messages=QUESTION + [
        {"role": "assistant", "content": "The capital of France is"}])
    assert m.content[0].text.strip().startswith("Paris")


def test_x_api_key_and_bearer_both_work(default_model_dir):
    from conftest import Server

    s = Server(["--api-key", "sekrit"])
    try:
        body = {"model": MODEL, "max_tokens": 2, "messages": QUESTION}
        ok = httpx.post(s.url + "/v1/messages", json=body, headers={"x-api-key": "sekrit",
                                                                     "anthropic-version": "2023-06-01"}, timeout=60)
        assert ok.status_code == 200, ok.text
        assert httpx.post(s.url + "/v1/messages", json=body, headers={"Authorization": "Bearer sekrit"},
                          timeout=60).status_code == 200
        bad = httpx.post(s.url + "/v1/messages", json=body, headers={"x-api-key": "wrong"}, timeout=60)
        assert bad.status_code == 401
        assert bad.json()["type"] == "error" and bad.json()["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=s.url, api_key="wrong", max_retries=0).messages.create(
                model=MODEL, max_tokens=2, messages=QUESTION)
    finally:
        s.stop()


@pytest.mark.parametrize("body", [
    {"model": MODEL, "messages": QUESTION},  # no max_tokens
    {"model": MODEL, "max_tokens": 5, "messages": []},
    {"model": MODEL, "max_tokens": 5, "messages": [{"role": "assistant", "content": "hi"}]},
    {"model": MODEL, "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "42"}]}]},
    {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]},
    {"model": MODEL, "max_tokens": 5, "messages": QUESTION, "tool_choice": {"type": "any"}},
    {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
    {"model": MODEL, "max_tokens": 0, "messages": QUESTION},
    {"model": MODEL, "max_tokens": 5, "messages": QUESTION, "temperature": 1.5},
    # a system message's text block without its text (found by the fuzzer: a 500 before)
    {"model": MODEL, "max_tokens": 5, "messages": QUESTION + [{"role": "system", "content": [{"type": "text"}]}]},
])
def test_bad_input_is_a_clear_400_in_anthropic_shape(server, body):
    r = httpx.post(server.url + "/v1/messages", json=body, timeout=60)
    assert r.status_code == 400, r.text
    data = r.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert data["error"]["message"]
    assert data["request_id"] == r.headers["x-request-id"]


def test_bad_input_through_the_sdk(claude):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "assistant", "content": "hi"}])
    assert "first message" in e.value.body["error"]["message"]


def test_unknown_model_is_404_not_found_error(server):
    r = httpx.post(server.url + "/v1/messages", json={"model": "nope", "max_tokens": 5, "messages": QUESTION},
                   timeout=60)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
