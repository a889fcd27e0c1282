"""End to end: the official openai client against a live server on the real default model."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_non_stream_answers_with_real_usage(client, hf_tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    prompt_ids = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
    assert r.usage.prompt_tokens == len(prompt_ids)
    # Generated tokens: the answer's tokens plus the end-of-turn token that stopped it.
    answer_ids = hf_tokenizer.encode(choice.message.content, add_special_tokens=False)
    assert r.usage.completion_tokens == len(answer_ids) + 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_finish_reason_length(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10,
                                       max_completion_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
    assert r.choices[0].finish_reason == "length"


def test_chat_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3,
                                                 temperature=0, stream=True))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_tokens(client, stream):
    # Greedy answer is "The capital of France is Paris."; "s Par" spans the tokens " is" and " Paris".
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0, stop=["s Par", "zzz"])
    if stream:
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                  if c.choices]
        assert not any("Par" in p for p in pieces)
        text = "".join(pieces)
    else:
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content
    assert text == "The capital of France i"


def test_seed_makes_sampling_repeatable(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
                  temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    assert a == b
    others = {client.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should not all give the same sample"


@pytest.mark.parametrize("seed", [-3777, 0, 2**63, 2**70])
def test_any_integer_seed_is_accepted(client, seed):
    # Regression (found by schemathesis): a negative seed was a 500.
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0.7, seed=seed)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_text_parts_developer_role_and_history(client):
    r = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=[
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]},
    ])
    assert r.choices[0].message.content


def test_penalties_and_logit_bias_change_output(client):
    base = dict(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**base).choices[0].message.content
    # Ban the first token of the greedy answer ("The").
    banned = client.chat.completions.create(logit_bias={"504": -100}, **base).choices[0].message.content
    penalised = client.chat.completions.create(frequency_penalty=2.0, presence_penalty=2.0,
                                               **{**base, "max_tokens": 20}).choices[0].message.content
    assert banned != plain
    assert penalised  # applied without error; repetition is discouraged


def test_completions_non_stream_and_stream(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    streamed = list(client.completions.create(model=MODEL, prompt=["The capital of France is"], max_tokens=4,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    assert streamed[-1].usage.completion_tokens == 4


def test_health_answers_while_generating(server):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 200, "stream": True, "logit_bias": {"2": -100}}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            next(lines)
            health = h.get(server.url + "/health")
            assert health.status_code == 200 and health.json()["queued"] >= 1
            assert health.json()["blas"] in ("openblas", "bundled", "accelerate")


def test_disconnect_stops_generation(server):
    # logit_bias bans <|im_end|> (id 2) so the model would talk for all 2000 tokens.
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2000, "stream": True, "logit_bias": {"2": -100}}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            got = 0
            for line in resp.iter_lines():
                got += line.startswith("data:")
                if got >= 4:
                    break
        # Closed mid-stream: the worker must drop the request within a few tokens.
        import time
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and h.get(server.url + "/health").json()["queued"]:
            time.sleep(0.05)
        assert h.get(server.url + "/health").json()["queued"] == 0
        # And the server still answers.
        r = h.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 2})
        assert r.status_code == 200


def test_request_id_is_echoed_or_made(server):
    r = httpx.get(server.url + "/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = httpx.get(server.url + "/v1/models").headers["x-request-id"]
    assert made and made != "abc-123"
    err = httpx.post(server.url + "/v1/chat/completions", content=b"{")
    assert err.headers["x-request-id"]


def test_models_list_and_retrieve(client, server):
    models = client.models.list().data
    assert models[0].id == MODEL
    assert models[0].model_extra["type"] == "text" and models[0].model_extra["context_length"] == 8192
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_spec_and_docs_are_served(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]
    docs = httpx.get(server.url + "/docs/")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_completion_keeps_the_leading_space(client):
    # "The capital of France is" continues with " Paris": the space is part of the completion.
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=2, temperature=0)
    assert r.choices[0].text.startswith(" ")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=2, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_next_turn_reports_cached_prompt_tokens(client):
    """The prompt cache shows in usage (prompt_tokens_details.cached_tokens), not only in speed."""
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    turns = QUESTION + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "And of Germany?"}]
    second = client.chat.completions.create(model=MODEL, messages=turns, max_tokens=5, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.total_tokens - 1
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_a_repeated_completion_prompt_reports_its_cached_tokens(client):
    """/v1/completions reports what the prompt cache held too (it reported 0 whatever was reused),
    in the response and in a stream's usage chunk."""
    prompt = "Write a list of fruits: apples, pears, plums, cherries, grapes, melons, lemons,"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_concurrent_requests_all_start_from_a_cached_prefix(server):
    """Issue 34: requests arriving together that share a cached prefix (an agent's system prompt)
    all reuse it; none finds it taken by another."""
    from concurrent.futures import ThreadPoolExecutor

    system = {"role": "system", "content": "You are a coding agent. Follow the rules. " * 30}
    warm = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [system, {"role": "user", "content": "Hi"}], "max_tokens": 1})
    assert warm.status_code == 200, warm.text

    def ask(i: int) -> dict:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": [system, {"role": "user", "content": f"Task number {i}: list files."}],
            "max_tokens": 2})
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    with ThreadPoolExecutor(3) as pool:
        usages = list(pool.map(ask, range(3)))
    shared = warm.json()["usage"]["prompt_tokens"] - 8
    assert all(u["prompt_tokens_details"]["cached_tokens"] >= shared for u in usages), usages
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["prompt_cache"]["entries"] >= 1 and health["prompt_cache"]["bytes"] > 0, health
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    cached = [line for line in metrics.splitlines() if line.startswith("openmlx_tokens_total{") and 'kind="cached"' in line]
    assert cached and float(cached[0].rsplit(" ", 1)[1]) >= 3 * shared, cached
    assert 'openmlx_prompt_cache_bytes{where="memory"}' in metrics
    from bench.soak import mlx_memory

    mlx = mlx_memory(server.url)
    # The model's weights alone are more than 100 MB of MLX arrays; the peak is never below now.
    assert set(mlx) == {"active", "peak", "cache"} and 100e6 < mlx["active"] <= mlx["peak"], mlx
