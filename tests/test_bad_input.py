"""Each bad input we thought of gets its OpenAI-shaped 4xx (never a 500) and an X-Request-ID."""
from __future__ import annotations

import httpx
import pytest

from conftest import MODEL

OK_MSG = [{"role": "user", "content": "hi"}]
CASES = [
    # (name, path, body or raw bytes, headers, status, param, code)
    ("malformed json", "/v1/chat/completions", b'{"model": ', None, 400, None, "invalid_json"),
    ("invalid utf-8", "/v1/chat/completions", b'{"model": "\xff\xfe"}', None, 400, None, "invalid_json"),
    ("missing model", "/v1/chat/completions", {"messages": OK_MSG}, None, 400, "model", None),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, None, 400, "messages", None),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, None, 400, "messages", None),
    ("messages not a list", "/v1/chat/completions", {"model": MODEL, "messages": "hi"}, None, 400, "messages", None),
    ("unknown role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
     None, 400, "messages.0.role", None),
    ("user without content", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]},
     None, 400, "messages.0.content", None),
    ("image_url part without image_url", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "tool", "tool_call_id": "c", "content": [{"type": "image_url"}]}]},
     None, 400, "messages.0.content.0.image_url", None),
    ("wrong type temperature", "/v1/chat/completions", {"model": MODEL, "messages": OK_MSG, "temperature": "hot"},
     None, 400, "temperature", None),
    ("temperature out of range", "/v1/chat/completions", {"model": MODEL, "messages": OK_MSG, "temperature": 3},
     None, 400, "temperature", None),
    ("negative max_tokens", "/v1/chat/completions", {"model": MODEL, "messages": OK_MSG, "max_tokens": -1},
     None, 400, "max_tokens", None),
    ("zero max_tokens", "/v1/chat/completions", {"model": MODEL, "messages": OK_MSG, "max_tokens": 0},
     None, 400, "max_tokens", None),
    ("n above 16", "/v1/chat/completions", {"model": MODEL, "messages": OK_MSG, "n": 17}, None, 400, "n", None),
    ("five stop strings", "/v1/chat/completions", {"model": MODEL, "messages": OK_MSG, "stop": list("abcde")},
     None, 400, "stop", None),
    ("function_call unsupported (deprecated)", "/v1/chat/completions",
     {"model": MODEL, "messages": OK_MSG, "function_call": "auto"}, None, 400, "function_call", None),
    ("top_logprobs above 20", "/v1/chat/completions",
     {"model": MODEL, "messages": OK_MSG, "logprobs": True, "top_logprobs": 21}, None, 400, "top_logprobs", None),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"model": MODEL, "messages": OK_MSG, "top_logprobs": 3}, None, 400, "top_logprobs", None),
    ("completions logprobs above 5", "/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 6}, None, 400,
     "logprobs", None),
    ("unknown response_format type", "/v1/chat/completions",
     {"model": MODEL, "messages": OK_MSG, "response_format": {"type": "xml"}}, None, 400,
     "response_format.type", None),
    ("logit_bias key not a token id", "/v1/chat/completions",
     {"model": MODEL, "messages": OK_MSG, "logit_bias": {"x": 1}}, None, 400, "logit_bias", None),
    ("logit_bias token out of vocabulary", "/v1/chat/completions",
     {"model": MODEL, "messages": OK_MSG, "logit_bias": {"999999": 1}}, None, 400, "logit_bias", None),
    ("image to a text model", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     None, 400, "messages", "model_not_multimodal"),
    ("unknown model", "/v1/chat/completions", {"model": "no/such-model", "messages": OK_MSG}, None, 404, "model",
     "model_not_found"),
    ("model id escaping the store", "/v1/chat/completions", {"model": "../../../etc/passwd", "messages": OK_MSG},
     None, 404, "model", "model_not_found"),
    ("absolute model path", "/v1/chat/completions", {"model": "/etc", "messages": OK_MSG}, None, 404, "model",
     "model_not_found"),
    ("wrong content type", "/v1/chat/completions", b"hello", {"Content-Type": "text/plain"}, 415, None,
     "unsupported_media_type"),
    ("completions prompt mixing text and ids", "/v1/completions", {"model": MODEL, "prompt": ["a", [1, 2]]}, None,
     400, "prompt", None),
    ("completions best_of below n", "/v1/completions", {"model": MODEL, "prompt": "a", "n": 2, "best_of": 1}, None,
     400, "best_of", None),
    ("completions empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, None, 400, None, None),
    ("unknown route", "/v1/nothing", {"a": 1}, None, 404, None, "unknown_url"),
]


@pytest.mark.parametrize("name,path,body,headers,status,param,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, name, path, body, headers, status, param, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers=headers or ({"Content-Type": "application/json"}
                                                          if isinstance(body, bytes) else None), timeout=60, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param
    if code:
        assert err["code"] == code
    assert r.headers.get("x-request-id")


def test_oversized_body_gets_413(server):
    body = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (11 << 20) + b'"}]}'
    r = httpx.post(server.url + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert r.headers["x-request-id"]


def test_method_not_allowed_keeps_allow_header(server):
    r = httpx.delete(server.url + "/v1/models")
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_prompt_longer_than_context_is_400(server):
    long = "word " * 9000
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": long}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("field", ["stop", "temperature", "max_tokens", "seed", "stream_options", "response_format"])
def test_null_optional_fields_are_accepted(server, field):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": OK_MSG, "max_tokens": 2, field: None} if field != "max_tokens"
                   else {"model": MODEL, "messages": OK_MSG, field: None, "max_completion_tokens": 2})
    assert r.status_code == 200, r.text


LONG = "word " * 9000  # past the default model's 8,192-token context


@pytest.mark.parametrize("path,body,param", [
    # A max_tokens larger than the room left is clamped, not refused (tests/test_agents_replay.py).
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("/v1/completions", {"prompt": LONG}, "prompt"),
    ("/v1/responses", {"input": LONG}, "input"),
], ids=["chat-prompt", "completions-prompt", "responses-input"])
def test_budget_errors_name_the_field_the_client_sent(server, path, body, param):
    r = httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert param in r.json()["error"]["message"]


@pytest.mark.parametrize("body,field", [
    ({"messages": [{"role": "user", "content": LONG}], "max_tokens": 5}, "messages"),
], ids=["messages"])
def test_messages_budget_errors_name_the_field(server, body, field):
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert field in r.json()["error"]["message"], r.text
