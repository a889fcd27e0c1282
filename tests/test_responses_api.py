"""End to end: OpenAI's Responses API with the official `openai` SDK on the real default model."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import MODEL

QUESTION = "What is the capital of France?"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_create_answers_with_real_usage(client, hf_tokenizer):
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=20, temperature=0)
    assert r.status == "completed" and r.incomplete_details is None
    assert "Paris" in r.output_text
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
    assert r.usage.input_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_instructions_become_the_system_turn(client, hf_tokenizer):
    r = client.responses.create(model=MODEL, instructions="Answer in one word.", input=QUESTION,
                                max_output_tokens=2, temperature=0)
    prompt = hf_tokenizer.apply_chat_template([{"role": "system", "content": "Answer in one word."},
                                               {"role": "user", "content": QUESTION}],
                                              add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.usage.input_tokens == len(prompt)
    assert r.instructions == "Answer in one word."


def test_max_output_tokens_gives_incomplete(client):
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3, temperature=0)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_stream_events_in_order_and_equal_to_non_stream(client):
    plain = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=30, temperature=0, store=False)
    types, seqs, deltas = [], [], []
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=30, temperature=0) as stream:
        for event in stream:
            types.append(event.type)
            seqs.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert seqs == list(range(len(seqs)))
    assert "".join(deltas) == final.output_text == plain.output_text
    assert final.usage.output_tokens == plain.usage.output_tokens
    # A streamed response is stored like a plain one.
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_previous_response_id_continues_and_hits_the_prompt_cache(client):
    first = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=20, temperature=0)
    second = client.responses.create(model=MODEL, input="And of Germany?", previous_response_id=first.id,
                                     max_output_tokens=20, temperature=0)
    assert "Berlin" in second.output_text
    assert second.previous_response_id == first.id
    # The whole first turn (prompt and answer) came from the prompt cache.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.total_tokens - 1
    assert second.usage.input_tokens > first.usage.total_tokens


def test_retrieve_delete_and_input_items(client):
    r = client.responses.create(model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
                                max_output_tokens=5, temperature=0)
    assert client.responses.retrieve(r.id).id == r.id
    items = client.responses.input_items.list(r.id)
    assert [i.type for i in items.data] == ["message"]
    assert items.data[0].content[0].text == QUESTION
    deleted = client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True)


def test_store_false_keeps_nothing(client):
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_unknown_previous_response_id_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_doesnotexist")
    assert e.value.body["param"] == "previous_response_id"


def test_input_tokens_counts_like_create(client):
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2, store=False)
    counted = client.responses.input_tokens.count(model=MODEL, input=QUESTION)
    assert counted.input_tokens == r.usage.input_tokens


def test_function_call_round_trip(client):
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                tool_choice="required", max_output_tokens=60, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert set(json.loads(calls[0].arguments)) == {"city"}
    follow = client.responses.create(
        model=MODEL, previous_response_id=r.id, tools=[WEATHER], max_output_tokens=20, temperature=0,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}])
    assert follow.status in ("completed", "incomplete")
    # Without the stored history the output answers no call: a clear 400.
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, max_output_tokens=5,
                                input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "x"}])
    assert e.value.body["param"] == "input.0.call_id"


def test_streamed_function_call_matches_non_stream(client):
    kwargs = dict(model=MODEL, input="Weather in Rome?", tools=[WEATHER],
                  tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60, temperature=0)
    plain = client.responses.create(**kwargs, store=False)
    with client.responses.stream(**kwargs) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in types
    p_call = [o for o in plain.output if o.type == "function_call"][0]
    s_call = [o for o in final.output if o.type == "function_call"][0]
    assert (s_call.name, s_call.arguments) == (p_call.name, p_call.arguments)


def test_text_format_json_schema_is_constrained(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="Name a city in France as JSON.", max_output_tokens=60, temperature=0,
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    assert set(json.loads(r.output_text)) == {"city"}


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
    ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input.0.content.0.type"),
    ({"model": MODEL, "input": [{"type": "function_call", "name": "f"}]}, "input.0.call_id"),
    ({"model": MODEL, "input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"model": MODEL, "input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice"),
    ({"model": MODEL, "input": "hi", "background": True}, "background"),
    # A hosted tool is left out with a warning (tests/test_agents_replay.py); one with a field its
    # type doesn't have, or a type no one defines, is a 400.
    ({"model": MODEL, "input": "hi", "tools": [{"type": "web_search", "bogus": 1}]}, "tools.0.bogus"),
    ({"model": MODEL, "input": "hi", "tools": [{"type": "teleport"}]}, "tools.0.type"),
    ({"model": MODEL, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]}]}, "input"),
])
def test_bad_input_is_a_clear_400(server, body, param):
    r = httpx.post(server.url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert r.headers["x-request-id"]


def test_unknown_model_is_404(server):
    r = httpx.post(server.url + "/v1/responses", json={"model": "nope", "input": "hi"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
