"""Engine behaviour end to end on real processes: policy statuses, switching, queue limits,
prompt cache, SIGTERM during a stream."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from conftest import MODEL, Server

MSG = [{"role": "user", "content": "What is the capital of France?"}]
ENDLESS = {"model": MODEL, "messages": MSG, "max_tokens": 2000, "stream": True, "logit_bias": {"2": -100}}


@pytest.fixture(scope="module")
def multi(fixture_models):
    s = Server(["--model-dir", str(fixture_models["tiny"]), "--model-dir", str(fixture_models["unknown"]),
                "--model-dir", str(fixture_models["huge"])])
    yield s
    s.stop()


def chat(server, model, **extra):
    return httpx.post(server.url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": MSG, "max_tokens": 3, **extra})


def test_unknown_architecture_is_501_and_not_listed(multi):
    r = chat(multi, "mystery-arch")
    assert r.status_code == 501 and r.json()["error"]["code"] == "unsupported_model"
    assert "mystery_arch_9000" in r.json()["error"]["message"]
    ids = [m["id"] for m in httpx.get(multi.url + "/v1/models").json()["data"]]
    assert "mystery-arch" not in ids and "tiny-llama" in ids


def test_not_enough_memory_is_507(multi):
    r = chat(multi, "huge-llama")
    assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_memory"
    # A load Ollama's /api/chat asks for goes through the same gate (Ollama's error shape there).
    r = httpx.post(multi.url + "/api/chat", timeout=120, json={"model": "huge-llama", "messages": MSG, "stream": False})
    assert r.status_code == 507 and isinstance(r.json()["error"], str) and "GiB" in r.json()["error"], r.text
    # The refusals left the running model alone.
    assert chat(multi, MODEL).status_code == 200


def test_switching_models_between_requests(multi):
    assert chat(multi, "tiny-llama").status_code == 200
    assert httpx.get(multi.url + "/health").json()["model"] == "tiny-llama"
    models = httpx.get(multi.url + "/v1/models").json()["data"]
    assert models[0]["id"] == "tiny-llama" and models[0]["loaded"]
    r = chat(multi, MODEL, temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("The capital")
    assert httpx.get(multi.url + "/health").json()["model"] == MODEL


def test_switch_waits_for_running_stream(multi):
    """A request for another model waits for a safe point; the running stream is not broken."""
    with httpx.Client(timeout=120) as h:
        with h.stream("POST", multi.url + "/v1/chat/completions", json={**ENDLESS, "max_tokens": 40}) as resp:
            lines = resp.iter_lines()
            next(lines)
            result = {}
            t = threading.Thread(target=lambda: result.setdefault("r", chat(multi, "tiny-llama")))
            t.start()
            rest = [l for l in lines if l.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            finish = [json.loads(l[6:])["choices"][0]["finish_reason"] for l in rest[:-1]
                      if json.loads(l[6:])["choices"]]
            assert finish[-1] == "length"
            t.join(60)
    assert result["r"].status_code == 200


def test_policy_warning_header_when_fast_path_skipped(default_model_dir):
    s = Server(["--assume-available-memory", str(1000 << 20)])
    try:
        r = chat(s, MODEL)
        assert r.status_code == 200 and "fast path" in r.headers["x-openmlx-warning"]
    finally:
        s.stop()


def test_queue_full_is_429_with_retry_after(default_model_dir):
    s = Server(["--max-queue", "1"])
    try:
        with httpx.Client(timeout=60) as h:
            with h.stream("POST", s.url + "/v1/chat/completions", json=ENDLESS) as resp:
                lines = resp.iter_lines()  # keep it: a dropped iterator closes the stream
                next(lines)
                r = h.post(s.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 2})
                assert r.status_code == 429 and r.headers["retry-after"]
                assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        s.stop()


def test_prompt_cache_reuses_the_conversation(server):
    def health():
        return httpx.get(server.url + "/health").json()["prompt_cache_hits"]

    turn1 = [{"role": "user", "content": "My name is Ada. Remember it. " * 10}]
    r1 = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                    json={"model": MODEL, "messages": turn1, "max_tokens": 8, "temperature": 0}).json()
    before = health()
    turn2 = turn1 + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "What is my name?"}]
    r2 = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                    json={"model": MODEL, "messages": turn2, "max_tokens": 8, "temperature": 0})
    assert r2.status_code == 200 and health() == before + 1
    assert r2.json()["usage"]["prompt_tokens"] > r1["usage"]["prompt_tokens"]  # usage counts the whole prompt


def test_sigterm_during_stream(default_model_dir):
    s = Server([])
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", s.url + "/v1/chat/completions", json=ENDLESS) as resp:
            lines = resp.iter_lines()
            next(lines)
            started = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            rest = [l for l in lines if l.startswith("data: ")]
    events = [json.loads(l[6:]) for l in rest if l != "data: [DONE]"]
    assert "error" in events[-1] and events[-1]["error"]["code"] == "shutting_down"
    assert "SIGTERM" in events[-1]["error"]["message"]
    code = s.proc.wait(10)
    assert time.monotonic() - started < 10
    # uvicorn re-raises the signal it caught once it has shut down, so the process ends by it.
    assert code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in s.log()
    s.stop()
