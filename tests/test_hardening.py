"""Hardening on a real server: metrics, structured logs, odd input, many disconnects."""
from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, Server

MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def logged(default_model_dir):
    s = Server(["--log-json"])
    yield s
    s.stop()


def test_metrics_count_requests_and_tokens(logged):
    r = httpx.post(logged.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 3})
    assert r.status_code == 200
    httpx.post(logged.url + "/v1/chat/completions", json={"model": "nope", "messages": MSG})
    text = httpx.get(logged.url + "/metrics").text
    assert 'openmlx_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'openmlx_http_requests_total{route="/v1/chat/completions",status="404"}' in text
    assert f'openmlx_tokens_total{{kind="completion",model="{MODEL}"}} 3.0' in text
    assert "openmlx_time_to_first_token_seconds_bucket" in text and "openmlx_resident_models 1.0" in text
    assert "process_resident_memory_bytes" in text


def test_json_logs_carry_request_fields(logged):
    httpx.post(logged.url + "/v1/completions", headers={"X-Request-ID": "trace-42"},
               json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    time.sleep(0.2)
    lines = [json.loads(l) for l in logged.log().splitlines() if l.startswith("{")]
    done = [l for l in lines if l.get("request_id") == "trace-42"]
    assert done and done[-1]["completion_tokens"] == 2 and done[-1]["model"] == MODEL
    assert done[-1]["duration_s"] > 0 and done[-1]["finish_reason"] == "length"


ODD_BODIES = {
    "nested-array": b"[" * 10000 + b"]" * 10000,
    "nested-messages": b'{"model": "x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "nested-objects": b'{"a":' * 3000 + b"1" + b"}" * 3000,
    "invalid-utf8": b"\xff\xfe\x00\x00",
    "empty": b"",
    "null": b"null",
}


@pytest.mark.parametrize("body", list(ODD_BODIES.values()), ids=list(ODD_BODIES))
def test_odd_bodies_are_400(server, body):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("stop", ["\u0000", "🙂", "\u200b", "é", "\n\n", "Ω≈ç√"])
def test_odd_unicode_stop_strings(client, stop):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason in ("length", "stop") and stop not in (r.choices[0].message.content or "")


def test_many_disconnects_leave_the_server_healthy(server):
    """100 streams dropped at random points: nothing leaks into the queue, the next request works."""
    rng = random.Random(7)
    body = {"model": MODEL, "messages": MSG, "max_tokens": 300, "stream": True, "logit_bias": {"2": -100}}

    def one(n_lines: int):
        with httpx.Client(timeout=60) as h:
            with h.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
                for i, _ in enumerate(resp.iter_lines()):
                    if i >= n_lines:
                        break

    for batch in range(10):
        threads = [threading.Thread(target=one, args=(rng.randint(0, 12),)) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and httpx.get(server.url + "/health").json()["queued"]:
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["queued"] == 0
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200


def test_slow_reader_does_not_stall_others(server):
    """A client that stops reading its stream must not hold up another client's answer."""
    body = {"model": MODEL, "messages": MSG, "max_tokens": 400, "stream": True, "logit_bias": {"2": -100}}
    with httpx.Client(timeout=60) as slow:
        with slow.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            next(lines)  # then stop reading
            start = time.monotonic()
            r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                           json={"model": MODEL, "messages": MSG, "max_tokens": 8})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
            assert time.monotonic() - start < 30


@pytest.fixture(scope="module")
def faulty(default_model_dir):
    # max_tokens 10 fails half-way (tests/faulty_server.py)
    s = Server(["--request-timeout", "3"], entry=[sys.executable, str(Path(__file__).with_name("faulty_server.py"))])
    yield s
    s.stop()


def test_exception_in_generation_ends_the_stream_with_an_error_event(faulty):
    body = {"model": MODEL, "messages": MSG, "max_tokens": 10, "stream": True, "logit_bias": {"2": -100}}
    with httpx.stream("POST", faulty.url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [l[6:] for l in r.iter_lines() if l.startswith("data: ")]
    assert json.loads(events[-1])["error"]["type"] == "server_error"
    assert len(events) >= 3  # some text came first
    r = httpx.post(faulty.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    # The server keeps serving.
    ok = httpx.post(faulty.url + "/v1/chat/completions", timeout=60,
                    json={"model": MODEL, "messages": MSG, "max_tokens": 4})
    assert ok.status_code == 200
    assert "injected fault" in faulty.log()


def test_request_timeout(faulty):
    body = {"model": MODEL, "messages": MSG, "max_tokens": 2000, "logit_bias": {"2": -100}}
    r = httpx.post(faulty.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    with httpx.stream("POST", faulty.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        events = [l[6:] for l in s.iter_lines() if l.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "timeout"
    assert httpx.get(faulty.url + "/health").json()["queued"] == 0
    # Both cut-off generations are counted and logged, with the tokens they had read and written.
    import time

    def timed_out() -> float:
        metrics = httpx.get(faulty.url + "/metrics").text
        return sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("openmlx_generations_total") and 'finish_reason="timeout"' in line)

    deadline = time.monotonic() + 30
    while timed_out() < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert timed_out() >= 2, [l for l in faulty.log().splitlines() if 'finished' in l or 'imeout' in l]
    assert faulty.log().count("finished (timeout)") >= 2


def test_too_many_messages_is_400(server):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "a"}] * 2049})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_model_that_fails_to_load_leaves_the_server_serving(fixture_models, tmp_path):
    import shutil

    broken = tmp_path / "broken-tokenizer"
    shutil.copytree(fixture_models["tiny"], broken)
    (broken / "tokenizer.json").unlink()
    truncated = tmp_path / "truncated-weights"
    shutil.copytree(fixture_models["tiny"], truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    s = Server(["--model-dir", str(broken), "--model-dir", str(truncated)])
    try:
        for name, words in (("broken-tokenizer", "tokenizer"), ("truncated-weights", "truncated")):
            r = httpx.post(s.url + "/v1/chat/completions", json={"model": name, "messages": MSG, "max_tokens": 2})
            assert r.status_code == 501 and words in r.json()["error"]["message"]
        ok = httpx.post(s.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 2},
                        timeout=60)
        assert ok.status_code == 200
    finally:
        s.stop()


def test_json_logs_redact_query_strings(logged):
    httpx.get(logged.url + "/v1/models?api_key=sk-json-secret")
    time.sleep(0.2)
    assert "sk-json-secret" not in logged.log()
    lines = [json.loads(l) for l in logged.log().splitlines() if l.startswith("{")]
    assert any("/v1/models?[redacted]" in l["message"] for l in lines if l["logger"] == "uvicorn.access")
