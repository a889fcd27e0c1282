"""Evaluation-grade completions (issue 20): token-id prompts, batches, echo with prompt logprobs,
max_tokens 0, n and best_of, on a real server; prompt scores checked against a direct mlx-lm
forward pass."""
from __future__ import annotations

import json
import math
import threading
import time

import httpx
import pytest

from conftest import MODEL, Server
from contract import schemas

# Items the 135M model gets right with confidence: (context, right continuation, wrong ones).
CHOICES = [
    ("The capital of France is", " Paris", [" London", " banana", " Tokyo"]),
    ("One, two, three, four,", " five", [" seven", " dog", " blue"]),
    ("Monday, Tuesday, Wednesday,", " Thursday", [" Sunday", " apple", " March"]),
    ("The opposite of hot is", " cold", [" car", " seven", " green"]),
]


@pytest.fixture(scope="module")
def keep(default_model_dir):
    """Weights as shipped, so a direct mlx-lm pass over the same files computes the same numbers."""
    s = Server(["--cpu-dtype", "keep", "--max-batch-tokens", "20000"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def direct(default_model_dir):
    """mlx-lm on the same folder: one forward pass, log-softmax, gather."""
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(default_model_dir))

    def prompt_logprobs(ids: list[int]) -> list[float]:
        logits = model(mx.array(ids)[None])[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return [float(logp[i, ids[i + 1]].item()) for i in range(len(ids) - 1)]

    return tokenizer, prompt_logprobs


def complete(server: Server, **body) -> dict:
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_four_prompt_forms_agree(keep, direct):
    tokenizer, _ = direct
    text = "The capital of France is"
    ids = tokenizer.encode(text)
    greedy = {"max_tokens": 4, "temperature": 0}
    one = complete(keep, prompt=text, **greedy)["choices"][0]["text"]
    assert complete(keep, prompt=[text], **greedy)["choices"][0]["text"] == one
    assert complete(keep, prompt=ids, **greedy)["choices"][0]["text"] == one
    batch = complete(keep, prompt=[ids, tokenizer.encode("One, two,")], **greedy)
    assert [c["index"] for c in batch["choices"]] == [0, 1] and batch["choices"][0]["text"] == one
    assert batch["usage"]["prompt_tokens"] == len(ids) + len(tokenizer.encode("One, two,"))


@pytest.mark.parametrize("prompt", [[49152], [[1, 2], [-1]], [[5, 10**9]]], ids=["vocab-end", "negative", "huge"])
def test_token_ids_outside_the_vocabulary_are_400(keep, prompt):
    r = httpx.post(keep.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_prompt_logprobs_match_mlx_lm(keep, direct):
    tokenizer, prompt_logprobs = direct
    for context, right, _ in CHOICES[:2]:
        ids = tokenizer.encode(context + right)
        out = complete(keep, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
        lp = out["choices"][0]["logprobs"]
        assert out["choices"][0]["text"] == tokenizer.decode(ids) and out["usage"]["completion_tokens"] == 0
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["tokens"]) == len(ids)
        expected = prompt_logprobs(ids)
        assert all(math.isclose(a, b, abs_tol=2e-3) for a, b in zip(lp["token_logprobs"][1:], expected)), \
            (lp["token_logprobs"][1:], expected)
        # The top alternative is at least as likely as the token that was there.
        assert all(max(t.values()) >= v - 1e-6 for t, v in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))


def test_loglikelihood_ranks_the_right_answer_first(keep, direct):
    """What lm-evaluation-harness does for multiple choice: score context + continuation, sum
    the continuation's token logprobs, pick the highest."""
    tokenizer, _ = direct
    for context, right, wrong in CHOICES:
        n_context = len(tokenizer.encode(context))
        prompts = [tokenizer.encode(context + c) for c in [right, *wrong]]
        out = complete(keep, prompt=prompts, max_tokens=0, echo=True, logprobs=0, temperature=0)
        sums = [sum(c["logprobs"]["token_logprobs"][n_context:]) for c in out["choices"]]
        assert sums.index(max(sums)) == 0, (context, sums)


def test_echo_puts_the_prompt_first_with_offsets(keep):
    out = complete(keep, prompt="Once upon a time", max_tokens=5, echo=True, logprobs=2, temperature=0)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith("Once upon a time") and len(choice["text"]) > len("Once upon a time")
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert out["usage"]["completion_tokens"] == 5 and len(lp["tokens"]) == out["usage"]["prompt_tokens"] + 5
    plain = complete(keep, prompt="Once upon a time", max_tokens=5, temperature=0)["choices"][0]["text"]
    assert choice["text"] == "Once upon a time" + plain  # echo changes nothing about the answer


def test_echo_stream_equals_non_stream(keep):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "echo": True, "logprobs": 1,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", keep.url + "/v1/completions", json=body, timeout=120) as r:
        chunks = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    whole = complete(keep, **{k: v for k, v in body.items() if k not in ("stream", "model")})
    assert text == whole["choices"][0]["text"]
    streamed = [v for c in chunks if c["choices"][0]["logprobs"] for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == whole["choices"][0]["logprobs"]["token_logprobs"]


def test_max_tokens_zero_needs_echo(keep):
    r = httpx.post(keep.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(keep.url + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 0,
                                                             "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_prompt_too_long_names_prompt(keep):
    r = httpx.post(keep.url + "/v1/completions", json={"model": MODEL, "prompt": [5] * 9000, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_n_choices_are_seeded_and_summed(keep):
    body = {"prompt": "My favourite animal is", "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 7}
    first, again = complete(keep, **body), complete(keep, **body)
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in again["choices"]]  # a seed reproduces every choice
    assert len(set(texts)) > 1  # and the choices are independent samples
    single = complete(keep, prompt=body["prompt"], max_tokens=6, temperature=1.0, seed=7)
    assert single["choices"][0]["text"] == texts[0]  # choice 0 is what n=1 gives
    assert 3 <= first["usage"]["completion_tokens"] <= 18  # summed over the choices
    assert first["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]  # the prompt counts once


def test_best_of_returns_the_most_likely(keep):
    out = complete(keep, prompt="The capital of France is", max_tokens=3, n=1, best_of=4, temperature=1.0,
                   seed=3, logprobs=0)
    assert len(out["choices"]) == 1 and out["choices"][0]["index"] == 0
    assert out["usage"]["completion_tokens"] > 3  # every candidate's tokens are counted
    candidates = complete(keep, prompt="The capital of France is", max_tokens=3, n=4, temperature=1.0, seed=3,
                          logprobs=0)["choices"]
    best = max(candidates, key=lambda c: sum(c["logprobs"]["token_logprobs"]))
    assert out["choices"][0]["text"] == best["text"]
    r = httpx.post(keep.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 3, "best_of": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    r = httpx.post(keep.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "best_of": 2, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_streamed_choices_interleave_by_index(keep):
    body = {"model": MODEL, "prompt": ["Hello", "Goodbye"], "max_tokens": 4, "n": 2, "temperature": 0.7, "seed": 1,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", keep.url + "/v1/completions", json=body, timeout=120) as r:
        chunks = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: {")]
    indexes = [c["choices"][0]["index"] for c in chunks if c["choices"]]
    assert set(indexes) == {0, 1, 2, 3}
    finishes = {c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]}
    assert finishes == {0, 1, 2, 3}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16
    whole = complete(keep, **{k: v for k, v in body.items() if k not in ("stream", "stream_options", "model")})
    for choice in whole["choices"]:
        streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"])
        assert streamed == choice["text"]


def test_chat_n(keep):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name an animal."}], "max_tokens": 5,
            "n": 2, "seed": 5, "temperature": 1.0}
    r = httpx.post(keep.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    single = httpx.post(keep.url + "/v1/chat/completions", json={**body, "n": 1}, timeout=120).json()
    assert single["choices"][0]["message"]["content"] == r["choices"][0]["message"]["content"]
    with httpx.stream("POST", keep.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as s:
        chunks = [json.loads(l[6:]) for l in s.iter_lines() if l.startswith("data: {")]
    for choice in r["choices"]:
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"][0]["index"] == choice["index"])
        assert text == choice["message"]["content"]
    assert not schemas.openai("CreateChatCompletionResponse", r)


def test_batch_limit_names_the_flag(keep):
    r = httpx.post(keep.url + "/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": ["hello"] * 64, "max_tokens": 100, "best_of": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "batch_too_large"
    assert "--max-batch-tokens" in r.json()["error"]["message"]
    r = httpx.post(keep.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "n": 16})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_a_big_batch_does_not_stall_a_chat(server):
    """64 prompts run a few at a time on the shared worker: a chat sent meanwhile is answered
    before the batch is done."""
    finished: dict[str, float] = {}

    def batch():
        complete(server, prompt=[f"Story number {i}:" for i in range(64)], max_tokens=8, temperature=0)
        finished["batch"] = time.monotonic()

    t = threading.Thread(target=batch)
    t.start()
    time.sleep(1.0)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    finished["chat"] = time.monotonic()
    t.join(300)
    assert r.status_code == 200 and finished["chat"] < finished["batch"]


_NULL_FIRST = {"properties": {"choices": {"items": {"properties": {"logprobs": {"anyOf": [
    {"type": "null"}, {"properties": {"token_logprobs": {"items": {"type": ["number", "null"]}},
                                      "top_logprobs": {"items": {"type": ["object", "null"]}}}}]}}}}}}


def test_responses_validate_against_openai(keep):
    """Ours and OpenAI's schemas. OpenAI's document types token_logprobs as numbers, yet its API
    (and vLLM) send null for an echoed prompt's first token: only that null is let through."""
    bodies = [complete(keep, prompt=["Hi", "Yo"], max_tokens=2, n=2, echo=True, logprobs=2, seed=1),
              complete(keep, prompt=[[1, 2, 3]], max_tokens=0, echo=True, logprobs=0)]
    for body in bodies:
        assert schemas.ours("CreateCompletionResponse", body) == [], body
        problems = [p for p in schemas.openai("CreateCompletionResponse", body, overrides=_NULL_FIRST)
                    if "logprobs" not in p]
        assert problems == [], body
        nulls = [v for c in body["choices"] for v in c["logprobs"]["token_logprobs"] if v is None]
        assert len(nulls) == len(body["choices"])  # one per choice: the first prompt token


def test_openai_client_echo_logprobs_n(keep):
    from openai import OpenAI

    client = OpenAI(base_url=keep.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.completions.create(model=MODEL, prompt=["The capital of France is", "Hello"], echo=True,
                                  logprobs=5, n=2, max_tokens=3, temperature=0.5, seed=2)
    assert len(r.choices) == 4 and r.choices[0].text.startswith("The capital of France is")
    assert r.choices[2].text.startswith("Hello") and r.choices[0].logprobs.token_logprobs[0] is None
    assert len(r.choices[0].logprobs.top_logprobs[1]) == 5
    stream = client.completions.create(model=MODEL, prompt=["The capital of France is"], echo=True, logprobs=5,
                                       n=2, max_tokens=3, stream=True, temperature=0.5, seed=2)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts[0] == r.choices[0].text and texts[1] == r.choices[1].text
