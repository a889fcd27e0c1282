"""Real responses from a live server, validated against our spec and OpenAI's official schemas.

Every JSON body and every streamed chunk is checked; the checks themselves are shown to reject a
response with a renamed field, so they cannot pass vacuously.
"""
from __future__ import annotations

import copy
import json

import httpx
import pytest

from conftest import MODEL
from contract import schemas

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def sse_chunks(resp: httpx.Response) -> list[dict]:
    chunks = []
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunks.append(json.loads(line[6:]))
    return chunks


@pytest.fixture(scope="module")
def samples(server) -> dict[str, list]:
    """One of each response kind the server produces."""
    u = server.url
    out: dict[str, list] = {}
    with httpx.Client(timeout=120) as h:
        out["chat"] = [h.post(f"{u}/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 12}).json(),
                       h.post(f"{u}/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 2}).json(),
                       h.post(f"{u}/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 4,
                                                                "logprobs": True, "top_logprobs": 2}).json()]
        with h.stream("POST", f"{u}/v1/chat/completions", json={
                "model": MODEL, "messages": MSG, "max_tokens": 6, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            out["chat_chunks"] = sse_chunks(r)
        with h.stream("POST", f"{u}/v1/chat/completions", json={
                "model": MODEL, "messages": MSG, "max_tokens": 3, "stream": True}) as r:
            out["chat_chunks"] += sse_chunks(r)
        with h.stream("POST", f"{u}/v1/chat/completions", json={
                "model": MODEL, "messages": MSG, "max_tokens": 3, "stream": True, "logprobs": True,
                "top_logprobs": 1}) as r:
            out["chat_chunks"] += sse_chunks(r)
        out["completion"] = [h.post(f"{u}/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3}).json(),
                             h.post(f"{u}/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3,
                                                                 "logprobs": 2}).json(),
                             h.post(f"{u}/v1/completions", json={"model": MODEL, "prompt": [[9906, 1384], [1, 2, 3]],
                                                                 "max_tokens": 2, "n": 2, "best_of": 3}).json()]
        # echo with logprobs: the prompt's first token has a null logprob (see _ECHO below)
        out["completion_echo"] = [h.post(f"{u}/v1/completions", json={
            "model": MODEL, "prompt": ["Hello", "Hi"], "max_tokens": 2, "n": 2, "echo": True, "logprobs": 2}).json(),
            h.post(f"{u}/v1/completions", json={"model": MODEL, "prompt": [[1, 2, 3]], "max_tokens": 0, "echo": True,
                                               "logprobs": 0}).json()]
        out["chat"].append(h.post(f"{u}/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 3,
                                                                     "n": 3}).json())
        with h.stream("POST", f"{u}/v1/completions", json={
                "model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            out["completion_chunks"] = sse_chunks(r)
        with h.stream("POST", f"{u}/v1/completions", json={
                "model": MODEL, "prompt": ["Hello", "Hi"], "max_tokens": 3, "n": 2, "stream": True}) as r:
            out["completion_chunks"] += sse_chunks(r)
        with h.stream("POST", f"{u}/v1/chat/completions", json={
                "model": MODEL, "messages": MSG, "max_tokens": 3, "stream": True, "n": 2}) as r:
            out["chat_chunks"] += sse_chunks(r)
        out["models"] = [h.get(f"{u}/v1/models").json()]
        out["model"] = [h.get(f"{u}/v1/models/{MODEL}").json()]
        out["errors"] = [h.post(f"{u}/v1/chat/completions", json={"model": "nope", "messages": MSG}).json(),
                         h.post(f"{u}/v1/chat/completions", json={"model": MODEL}).json(),
                         h.post(f"{u}/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"}).json(),
                         h.get(f"{u}/v1/models/nope").json(), h.get(f"{u}/nowhere").json()]
        out["health"] = [h.get(f"{u}/health").json()]
        out["embeddings"] = [h.post(f"{u}/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ["a", "b"]}).json()]
        # OpenAI's document types `embedding` as numbers only, though its API answers base64 as
        # a string: that form is checked against our spec alone.
        out["embeddings_base64"] = [h.post(f"{u}/v1/embeddings", json={
            "model": "all-MiniLM-L6-v2", "input": "a", "encoding_format": "base64"}).json()]
    assert all(out.values())
    return out


# (sample kind, our component, OpenAI's component)
PAIRS = [
    ("chat", "CreateChatCompletionResponse", "CreateChatCompletionResponse"),
    ("chat_chunks", "CreateChatCompletionStreamResponse", "CreateChatCompletionStreamResponse"),
    ("completion", "CreateCompletionResponse", "CreateCompletionResponse"),
    ("completion_chunks", "CreateCompletionResponse", "CreateCompletionResponse"),
    ("completion_echo", "CreateCompletionResponse", "CreateCompletionResponse"),
    ("models", "ListModelsResponse", "ListModelsResponse"),
    ("model", "Model", "Model"),
    ("errors", "ErrorResponse", "ErrorResponse"),
    ("health", "Health", None),
    ("embeddings", "CreateEmbeddingResponse", "CreateEmbeddingResponse"),
    ("embeddings_base64", "CreateEmbeddingResponse", None),
]

# OpenAI's document types a completion choice's finish_reason as a non-null enum, yet its API
# streams `null` until the last chunk (and so do we); only for streamed completion chunks we
# allow that one null.
_COMPLETION_CHUNK = {"properties": {"choices": {"items": {"properties": {"finish_reason": {
    "enum": ["stop", "length", "content_filter", None]}}}}}}


# OpenAI's document types token_logprobs as numbers, yet its API (and vLLM) send null for an
# echoed prompt's first token: only for echo samples, that one null per choice is let through.
_ECHO = {"properties": {"choices": {"items": {"properties": {"logprobs": {"anyOf": [
    {"type": "null"}, {"properties": {"token_logprobs": {"items": {"type": ["number", "null"]}},
                                      "top_logprobs": {"items": {"type": ["object", "null"]}}}}]}}}}}}


@pytest.mark.parametrize("kind,ours,theirs", PAIRS, ids=[p[0] for p in PAIRS])
def test_responses_conform(samples, kind, ours, theirs):
    for body in samples[kind]:
        assert schemas.ours(ours, body) == [], body
        if theirs:
            kw, allowed = {}, ""
            if kind == "completion_chunks":
                kw["overrides"], allowed = _COMPLETION_CHUNK, "finish_reason"
            if kind == "completion_echo":
                kw["overrides"], allowed = _ECHO, "logprobs"
                nulls = [v for c in body["choices"] for v in c["logprobs"]["token_logprobs"] if v is None]
                assert len(nulls) == len(body["choices"]), body
            # The overridden validator still validates everything else against OpenAI's schema.
            problems = schemas.openai(theirs, body) if not kw else [
                p for p in schemas.openai(theirs, body, **kw) if allowed not in p]
            assert problems == [], body


def test_stream_shapes(samples):
    chunks = samples["chat_chunks"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert any(c["choices"] == [] and c["usage"]["total_tokens"] > 0 for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in samples["completion_chunks"] if c["choices"]][-1] == "length"


def test_validators_catch_a_renamed_field(samples):
    """Breaking one response field must fail both checks (the checks are not vacuous)."""
    body = copy.deepcopy(samples["chat"][0])
    body["choices"][0]["finish"] = body["choices"][0].pop("finish_reason")
    assert schemas.ours("CreateChatCompletionResponse", body)
    assert schemas.openai("CreateChatCompletionResponse", body)
    chunk = copy.deepcopy(samples["chat_chunks"][1])
    chunk["object"] = "chat.completion"
    assert schemas.ours("CreateChatCompletionStreamResponse", chunk)
    assert schemas.openai("CreateChatCompletionStreamResponse", chunk)


def test_fold_nullable():
    folded = schemas.fold_nullable({"type": "string", "nullable": True, "enum": ["a"]})
    assert folded == {"anyOf": [{"type": "string", "enum": ["a", None]}, {"type": "null"}]}
