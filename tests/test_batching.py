"""Batched decoding (--batch on, the default): concurrent streams decode together through mlx-lm's
BatchGenerator and give the same answers as the one-at-a-time path (--batch off)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import MODEL, Server

REQUESTS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24},
    {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 16, "logprobs": True,
     "top_logprobs": 2},
    {"messages": [{"role": "user", "content": "Count from one to ten."}], "max_tokens": 30, "stop": ["five"]},
    {"messages": [{"role": "user", "content": "Give me a city as JSON."}], "max_tokens": 40,
     "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {
         "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
         "additionalProperties": False}}}},
]


@pytest.fixture(scope="module")
def batch_server(default_model_dir):
    s = Server(["--batch", "on"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def unbatched(default_model_dir):
    s = Server(["--batch", "off"])
    yield s
    s.stop()


def _ask(url: str, body: dict, stream: bool = False) -> dict:
    payload = {"model": MODEL, "temperature": 0, **body}
    if not stream:
        return httpx.post(url + "/v1/chat/completions", json=payload, timeout=300).json()
    text = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json={**payload, "stream": True}, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    text += chunk["choices"][0]["delta"].get("content") or ""
    return {"text": text}


def test_concurrent_streams_match_one_at_a_time(unbatched, batch_server):
    expected = [_ask(unbatched.url, b) for b in REQUESTS]
    assert httpx.get(unbatched.url + "/health").json()["batch_peak"] is None
    with ThreadPoolExecutor(len(REQUESTS) * 2) as pool:
        plain = list(pool.map(lambda b: _ask(batch_server.url, b), REQUESTS))
    for want, got in zip(expected, plain):
        assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
        assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
        assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
    json.loads(plain[3]["choices"][0]["message"]["content"])  # the grammar held inside the batch
    tokens = [t["token"] for t in plain[1]["choices"][0]["logprobs"]["content"]]
    assert "".join(tokens) == plain[1]["choices"][0]["message"]["content"]
    assert httpx.get(batch_server.url + "/health").json()["batch_peak"] >= 2  # they really shared steps


def test_streams_and_cancellation_in_a_batch(batch_server):
    with ThreadPoolExecutor(4) as pool:
        streamed = list(pool.map(lambda b: _ask(batch_server.url, b, stream=True), REQUESTS[:3]))
    plain = [_ask(batch_server.url, b) for b in REQUESTS[:3]]
    assert [s["text"] for s in streamed] == [p["choices"][0]["message"]["content"] for p in plain]
    # A client that leaves mid-stream takes its sequence out; the others and the next request go on.
    with httpx.stream("POST", batch_server.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": REQUESTS[0]["messages"], "max_tokens": 200,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    again = _ask(batch_server.url, REQUESTS[0])
    assert again["choices"][0]["message"]["content"] == plain[0]["choices"][0]["message"]["content"]
    assert httpx.get(batch_server.url + "/health").json()["queued"] == 0


def test_prompt_cache_works_with_batching(batch_server):
    first = _ask(batch_server.url, REQUESTS[0])
    turns = REQUESTS[0]["messages"] + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                                       {"role": "user", "content": "And of Germany?"}]
    second = _ask(batch_server.url, {"messages": turns, "max_tokens": 10})
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["total_tokens"] - 1
