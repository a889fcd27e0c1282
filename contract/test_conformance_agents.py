"""The Responses and Messages APIs' real answers, validated against our spec and the official
documents (OpenAI's for /v1/responses, Anthropic's for /v1/messages): every JSON body and every
streamed event. The checks are shown to reject a broken body, so they cannot pass vacuously.
"""
from __future__ import annotations

import copy
import json

import httpx
import pytest

from conftest import MODEL
from contract import schemas

Q = "What is the capital of France?"
MSG = [{"role": "user", "content": Q}]
WEATHER_FN = {"type": "function", "name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": WEATHER_FN["parameters"]}


def named_events(resp: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) pairs of a named-event stream."""
    out, name = [], None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out


@pytest.fixture(scope="module")
def samples(server) -> dict[str, list]:
    u = server.url
    out: dict[str, list] = {"response_events": [], "message_events": []}
    with httpx.Client(timeout=120) as h:
        def post(path: str, body: dict) -> dict:
            return h.post(u + path, json=body).json()

        def stream(path: str, body: dict, key: str) -> None:
            with h.stream("POST", u + path, json={**body, "stream": True}) as r:
                out[key] += named_events(r)

        plain = post("/v1/responses", {"model": MODEL, "input": Q, "max_output_tokens": 12, "temperature": 0})
        out["responses"] = [
            plain,
            post("/v1/responses", {"model": MODEL, "input": Q, "max_output_tokens": 2}),
            post("/v1/responses", {"model": MODEL, "input": "Weather in Paris?", "tools": [WEATHER_FN],
                                   "tool_choice": "required", "max_output_tokens": 60, "temperature": 0,
                                   "instructions": "Be brief."}),
            post("/v1/responses", {"model": MODEL, "input": "And Germany?", "previous_response_id": plain["id"],
                                   "max_output_tokens": 4}),
            h.get(f"{u}/v1/responses/{plain['id']}").json(),
        ]
        stream("/v1/responses", {"model": MODEL, "input": Q, "max_output_tokens": 2}, "response_events")
        stream("/v1/responses", {"model": MODEL, "input": Q, "max_output_tokens": 12, "temperature": 0}, "response_events")
        stream("/v1/responses", {"model": MODEL, "input": "Weather in Paris?", "max_output_tokens": 60,
                                 "temperature": 0, "tools": [WEATHER_FN], "tool_choice": "required"},
               "response_events")
        out["input_items"] = [h.get(f"{u}/v1/responses/{plain['id']}/input_items").json()]
        out["input_tokens"] = [post("/v1/responses/input_tokens", {"model": MODEL, "input": Q})]
        out["openai_errors"] = [post("/v1/responses", {"model": MODEL, "input": Q, "previous_response_id": "resp_x"}),
                                post("/v1/responses", {"model": MODEL, "input": Q, "background": True}),
                                h.get(f"{u}/v1/responses/resp_nope").json()]
        out["deleted"] = [h.delete(f"{u}/v1/responses/{plain['id']}").json()]

        out["messages"] = [
            post("/v1/messages", {"model": MODEL, "max_tokens": 12, "messages": MSG}),
            post("/v1/messages", {"model": MODEL, "max_tokens": 2, "messages": MSG}),
            post("/v1/messages", {"model": MODEL, "max_tokens": 20, "messages": MSG, "stop_sequences": ["France"],
                                  "top_k": 1}),
            post("/v1/messages", {"model": MODEL, "max_tokens": 60, "messages": MSG, "tools": [WEATHER_TOOL],
                                  "tool_choice": {"type": "any"}, "top_k": 1}),
        ]
        stream("/v1/messages", {"model": MODEL, "max_tokens": 6, "messages": MSG}, "message_events")
        stream("/v1/messages", {"model": MODEL, "max_tokens": 60, "messages": MSG, "tools": [WEATHER_TOOL],
                                "tool_choice": {"type": "any"}, "top_k": 1}, "message_events")
        out["count_tokens"] = [post("/v1/messages/count_tokens", {"model": MODEL, "messages": MSG})]
        out["anthropic_errors"] = [post("/v1/messages", {"model": MODEL, "messages": MSG}),
                                   post("/v1/messages", {"model": "nope", "max_tokens": 2, "messages": MSG}),
                                   h.post(u + "/v1/messages", content=b"{",
                                          headers={"Content-Type": "application/json"}).json()]
    assert all(out.values())
    return out


OPENAI_PAIRS = [("responses", "ResponseObject", "Response"), ("input_items", "ResponseItemList", "ResponseItemList"),
                ("input_tokens", "ResponseInputTokens", "TokenCountsResource"),
                ("openai_errors", "ErrorResponse", "ErrorResponse"), ("deleted", "DeletedResponse", None)]
ANTHROPIC_PAIRS = [("messages", "AnthropicMessage", "Message"),
                   ("count_tokens", "CountMessageTokensResponse", "CountMessageTokensResponse"),
                   ("anthropic_errors", "AnthropicErrorResponse", "ErrorResponse")]


@pytest.mark.parametrize("kind,ours,theirs", OPENAI_PAIRS, ids=[p[0] for p in OPENAI_PAIRS])
def test_responses_api_conforms(samples, kind, ours, theirs):
    for body in samples[kind]:
        assert schemas.ours(ours, body) == [], body
        if theirs:
            assert schemas.openai(theirs, body) == [], body


@pytest.mark.parametrize("kind,ours,theirs", ANTHROPIC_PAIRS, ids=[p[0] for p in ANTHROPIC_PAIRS])
def test_messages_api_conforms(samples, kind, ours, theirs):
    for body in samples[kind]:
        assert schemas.ours(ours, body) == [], body
        assert schemas.anthropic(theirs, body) == [], body


def test_every_response_event_conforms(samples):
    events = samples["response_events"]
    assert {"response.created", "response.output_text.delta", "response.completed", "response.incomplete",
            "response.function_call_arguments.done"} <= {name for name, _ in events}
    for name, data in events:
        assert name == data["type"]
        assert schemas.event_errors(schemas.openai_spec_path(), "ResponseStreamEvent", data) == [], data


def test_every_message_event_conforms(samples):
    events = samples["message_events"]
    assert {"message_start", "content_block_delta", "message_delta", "message_stop", "ping"} <= {n for n, _ in events}
    for name, data in events:
        assert name == data["type"]
        if name == "ping":  # documented by Anthropic's streaming guide, not in its OpenAPI document
            assert data == {"type": "ping"}
            continue
        assert schemas.event_errors(schemas.anthropic_spec_path(), "MessageStreamEvent", data) == [], data


def test_validators_catch_broken_bodies(samples):
    response = copy.deepcopy(samples["responses"][0])
    response["status"] = "finished"
    assert schemas.openai("Response", response)
    event = copy.deepcopy(next(d for n, d in samples["response_events"] if n == "response.output_text.delta"))
    del event["sequence_number"]
    assert schemas.event_errors(schemas.openai_spec_path(), "ResponseStreamEvent", event)
    message = copy.deepcopy(samples["messages"][0])
    message["stop_reason"] = "done"
    assert schemas.anthropic("Message", message)
    m_event = copy.deepcopy(next(d for n, d in samples["message_events"] if n == "content_block_delta"))
    m_event["delta"]["type"] = "text"
    assert schemas.event_errors(schemas.anthropic_spec_path(), "MessageStreamEvent", m_event)
