"""Token logprobs on chat and completions, stream and not, on the real model."""
from __future__ import annotations

import math

import httpx
import pytest

from conftest import MODEL

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_logprobs_non_stream(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert r.choices[0].finish_reason == "length" and len(content) == 6 == r.usage.completion_tokens
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the most likely
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1.0001
        assert bytes(e.bytes).decode() == e.token


def test_chat_logprobs_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, messages=MSG, max_tokens=6, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]
    assert all(e.top_logprobs == [] for e in streamed)


def test_no_logprobs_unless_asked(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
    assert r.choices[0].logprobs is None


def test_eos_token_is_not_listed(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=30, temperature=0, logprobs=True)
    assert r.choices[0].finish_reason == "stop"
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens - 1  # the end-of-turn token is not text


def test_completions_logprobs(server):
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 4 and "".join(lp["tokens"]) == r["choices"][0]["text"]
    assert all(len(t) == 2 for t in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    assert lp["text_offset"] == sorted(lp["text_offset"])
