"""Hostile input, round 3 (issue 35): an audio polyglot, abandoned requests, slow bodies, one
client's connections, pipelining, strict tools on the event loop, fail-open keys, config bombs,
odd logit_bias keys, deep schemas and IPv6 forms that carry a private IPv4 address.

Each test names the attack it replays; every one failed before its fix.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import MODEL, Server
from tests.process import free_port

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def rss_mb(server: Server) -> float:
    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


# --- 1. the audio polyglot -------------------------------------------------------------------
def polyglot(tmp: Path) -> bytes:
    """An ID3 tag, then a FLAC stream declaring 1 Hz (2,000 samples: 2,000 s) whose PADDING block
    carries silent MP3 frames: a header reader sees ~1 s of MP3, miniaudio decodes the FLAC."""
    subprocess.run(["sox", "-n", "-r", "1", "-c", "1", "-b", "16", str(tmp / "one.flac"), "synth", "2000", "sine",
                    "0.3"], check=True, capture_output=True)
    subprocess.run(["sox", "-n", "-r", "8000", "-c", "1", str(tmp / "silent.mp3"), "trim", "0", "0.3"], check=True,
                   capture_output=True)
    flac, mp3 = (tmp / "one.flac").read_bytes(), (tmp / "silent.mp3").read_bytes() * 3
    pos, blocks = 4, []
    while True:
        head, size = flac[pos], int.from_bytes(flac[pos + 1:pos + 4], "big")
        blocks.append((head & 0x7F, flac[pos + 4:pos + 4 + size]))
        pos += 4 + size
        if head & 0x80:
            break
    blocks = [b for b in blocks if b[0] == 0] + [(1, mp3)]  # STREAMINFO, then PADDING holding the MP3
    out = b"fLaC"
    for i, (kind, body) in enumerate(blocks):
        out += bytes([kind | (0x80 if i == len(blocks) - 1 else 0)]) + len(body).to_bytes(3, "big") + body
    return b"ID3\x03\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10 + out + flac[pos:]


needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox makes the polyglot")


@needs_sox
def test_polyglot_is_bounded_by_what_the_decoder_yields(tmp_path):
    import miniaudio

    from engine.errors import InvalidRequest
    from engine.media.audio import check_audio_header, decode_audio

    data = polyglot(tmp_path)
    assert len(data) < 6000
    assert miniaudio.mp3_get_info(data).num_frames / 8000 < 2  # what the header check reads
    assert check_audio_header(data) < 2
    with pytest.raises(InvalidRequest) as e:
        decode_audio(data)
    assert e.value.code == "invalid_audio" and e.value.param == "file"


@needs_sox
def test_polyglot_upload_costs_little_and_is_refused(server, tmp_path):
    data = polyglot(tmp_path)
    before = rss_mb(server)
    r = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("a.mp3", data, "audio/mpeg")},
                   data={"model": "whisper-tiny.en"}, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_audio" and r.headers["x-request-id"]
    assert rss_mb(server) - before < 300


# --- a server with small connection limits ------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(default_model_dir):
    s = Server(["--max-queue", "2", "--header-timeout", "1", "--body-timeout", "2", "--max-connections", "64",
                "--max-connections-per-client", "12", "--embedding-model", "none", "--audio-model", "none"])
    yield s
    s.stop()


def _chat_request(body: dict, path: str = "/v1/chat/completions") -> bytes:
    raw = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw


def _read_response(reader) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length, from a buffered reader (sock.makefile("rb"):
    two pipelined answers may arrive in one segment)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline()
        if not line:
            return head
        head += line
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head + reader.read(length)


def test_abandoned_non_streamed_requests_free_the_queue(guarded):
    """Requests whose clients hang up after 0.3 s are cancelled; they don't hold the queue (2)."""
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 400, "temperature": 1.0, "seed": 1, "logit_bias": {"2": -100}}
    for _ in range(3):
        socks = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", guarded.port))
            s.sendall(_chat_request(long))
            socks.append(s)
        time.sleep(0.3)
        for s in socks:
            s.close()
    # Held, the two admitted ones would decode 400 tokens each (tens of seconds here); cancelled,
    # the queue frees once the worker sees it (within a token or a prefill pass).
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(guarded.url + "/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": MSG, "max_tokens": 2})
        if r.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text


def test_a_slow_body_is_cut_with_408(guarded):
    s = socket.create_connection(("127.0.0.1", guarded.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{")
    start = time.monotonic()
    s.settimeout(0.5)
    answer = b""
    while time.monotonic() - start < 10:
        try:
            s.sendall(b" ")
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        except socket.timeout:
            continue
        except OSError:
            break
    s.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer and b"x-request-id" in answer
    assert time.monotonic() - start < 6


def test_one_client_cannot_take_every_connection(guarded):
    held = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(12)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", guarded.port))
        extra.settimeout(5)
        answer = extra.recv(65536).decode()
        extra.close()
        assert answer.startswith("HTTP/1.1 503") and "too_many_connections" in answer
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200
    assert "per-client connection cap reached" in guarded.log()


def test_a_pipelined_request_is_answered(guarded):
    """Two requests in one write: a quick one, then one that runs longer than --header-timeout (1 s).
    The second's head arrived with the first: it is answered, not closed as a slow head."""
    slow = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 30, "temperature": 1.0, "seed": 3,
            "logit_bias": {"2": -100, "0": -100}}
    s = socket.create_connection(("127.0.0.1", guarded.port))
    s.settimeout(60)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + _chat_request(slow, "/v1/completions"))
    reader = s.makefile("rb")
    first = _read_response(reader)
    second = _read_response(reader)
    reader.close()
    s.close()
    assert first.startswith(b"HTTP/1.1 200"), first[:300]
    assert second.startswith(b"HTTP/1.1 200"), second[:300]
    assert json.loads(second.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] == 30


# --- strict tools are compiled off the event loop ------------------------------------------
def test_health_answers_while_strict_tools_compile(guarded):
    tools = [{"type": "function", "function": {"name": f"t{k}", "strict": True, "parameters": {
        "type": "object", "properties": {f"p{k}_{i}": {"type": "string"} for i in range(3000)}}}} for k in range(8)]
    body = {"model": MODEL, "messages": MSG, "max_tokens": 1, "tools": tools}
    done: dict[str, float] = {}

    def post() -> None:
        start = time.monotonic()
        httpx.post(guarded.url + "/v1/chat/completions", json=body, timeout=120)
        done["took"] = time.monotonic() - start

    t = threading.Thread(target=post)
    t.start()
    time.sleep(0.5)
    worst = 0.0
    while t.is_alive():
        start = time.monotonic()
        assert httpx.get(guarded.url + "/health", timeout=30).status_code == 200
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.1)
    t.join()
    assert done["took"] > 1.0  # the compile took long enough for a frozen loop to show
    assert worst < 1.0, worst


# --- odd inputs: 400s naming the field --------------------------------------------------------
@pytest.mark.parametrize("bias, why", [({"²": 5}, "a superscript digit"), ({"253": 60, "0253": 60}, "one token twice"),
                                       ({"1" * 40: 1}, "a 40-digit id")])
def test_odd_logit_bias_keys_are_400(server, bias, why):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": MSG, "max_tokens": 1, "logit_bias": bias})
    assert r.status_code == 400, (why, r.text)
    assert r.json()["error"]["param"] == "logit_bias"


def _deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 1,
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _deep(100)}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 1, "tools": [
        {"type": "function", "function": {"name": "f", "strict": True, "parameters": _deep(100)}}]},
     "tools.0.function.parameters"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 16,
                       "text": {"format": {"type": "json_schema", "name": "x", "schema": _deep(100)}}},
     "text.format.schema"),
    ("/v1/messages", {"messages": MSG, "max_tokens": 1,
                      "output_config": {"format": {"type": "json_schema", "schema": _deep(100)}}},
     "output_config.format.schema"),
])
def test_schemas_nested_too_deep_are_400(server, path, body, param):
    r = httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if path == "/v1/messages":  # Anthropic's error shape has no param: the message names the field
        assert error["type"] == "invalid_request_error" and param in error["message"], error
    else:
        assert error["param"] == param, error


@pytest.mark.parametrize("address", ["::127.0.0.1", "::10.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",
                                     "64:ff9b:1::a00:1", "2002:7f00:1::", "2002:a00:1::1", "::ffff:0:7f00:1"])
def test_ipv6_forms_carrying_a_private_ipv4_are_refused(address):
    from handlers.conversation.images import address_allowed

    assert not address_allowed(ipaddress.ip_address(address))


def test_ipv6_forms_carrying_a_public_ipv4_are_judged_by_it():
    from handlers.conversation.images import address_allowed

    assert address_allowed(ipaddress.ip_address("64:ff9b::808:808"))
    assert address_allowed(ipaddress.ip_address("2606:4700:4700::1111"))


# --- start-up: keys that fail open, config bombs, limits that disable themselves ------------
def _serve(args: list[str], tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("OPENMLX_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "handlers.cli", "serve", "--port", str(free_port()),
                           "--embedding-model", "none", "--audio-model", "none", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("how", ["empty file", "comments only", "empty flag", "config list of ''"])
def test_asking_for_keys_and_giving_none_refuses_to_start(tmp_path, how):
    keys, cfg = tmp_path / "keys", tmp_path / "openmlx.yaml"
    keys.write_text({"empty file": "", "comments only": "# one day\n\n   \n"}.get(how, ""))
    cfg.write_text("api-key: ['']\n")
    args = {"empty file": ["--api-key-file", str(keys)], "comments only": ["--api-key-file", str(keys)],
            "empty flag": ["--api-key", ""], "config list of ''": ["--config", str(cfg)]}[how]
    r = _serve(args, tmp_path)
    assert r.returncode != 0
    assert "none is non-empty" in r.stderr, r.stderr[-2000:]


def test_a_key_in_the_wrong_shape_is_not_echoed(tmp_path):
    cfg = tmp_path / "openmlx.yaml"
    cfg.write_text("api-key: sk-very-secret-value\n")
    r = _serve(["--config", str(cfg)], tmp_path)
    assert r.returncode != 0 and "api-key" in r.stderr
    assert "sk-very-secret-value" not in r.stderr + r.stdout


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    cfg = tmp_path / "openmlx.yaml"
    cfg.write_text("\n".join(lines) + "\nmodels: *i\n")
    start = time.monotonic()
    r = _serve(["--config", str(cfg)], tmp_path)
    assert r.returncode != 0 and "aliases" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("flag, value", [("--max-queue", "0"), ("--max-queue", "-1"), ("--request-timeout", "nan"),
                                         ("--request-timeout", "inf"), ("--request-timeout", "-1"), ("--header-timeout", "0"),
                                         ("--max-body-bytes", "-5"), ("--body-timeout", "nan"), ("--port", "70000"),
                                         ("--kv-bits", "3"), ("--kv-bits", "16"), ("--kv-group-size", "48")])
def test_limits_that_would_disable_themselves_are_refused(tmp_path, flag, value):
    r = _serve([flag, value], tmp_path)
    assert r.returncode == 2 and flag in r.stderr, r.stderr[-1000:]


@pytest.mark.parametrize("argv, timeout", [([], 600.0), (["--request-timeout", "0"], None),
                                           (["--request-timeout", "86400"], 86400.0)])
def test_request_timeout_zero_means_no_limit(argv, timeout):
    """0 turns the deadline off, as the README says (a coding agent's first prompt can take longer
    than the default to read on a CPU); a negative one is still refused (above)."""
    from handlers.cli import build_parser
    from handlers.commands.settings import engine_config

    args = build_parser().parse_args(["serve", *argv])
    assert engine_config(args).request_timeout_s == timeout


@pytest.mark.parametrize("line", ["request-timeout: .nan", "max-queue: 0", "header-timeout: -1"])
def test_config_limits_that_would_disable_themselves_are_refused(tmp_path, line):
    cfg = tmp_path / "openmlx.yaml"
    cfg.write_text(line + "\n")
    r = _serve(["--config", str(cfg)], tmp_path)
    assert r.returncode != 0 and line.split(":")[0] in r.stderr, r.stderr[-1000:]


# --- 2. a chat template that never finishes ----------------------------------------------------
def test_a_looping_chat_template_is_abandoned_and_the_worker_serves_on(default_model_dir, tmp_path):
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    cfg = tmp_path / "openmlx.yaml"
    cfg.write_text(f"models:\n  - source: {default_model_dir}\n    id: loopy\n    chat_template: '{loop}'\n"
                   f"  - source: {default_model_dir}\n    id: plain\n")
    s = Server(["--config", str(cfg), "--embedding-model", "none", "--audio-model", "none"])
    try:
        start = time.monotonic()
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "loopy", "messages": MSG, "max_tokens": 2},
                       timeout=120)
        assert r.status_code == 501, r.text
        assert r.json()["error"]["code"] == "chat_template_timeout" and time.monotonic() - start < 30
        ok = httpx.post(s.url + "/v1/chat/completions", json={"model": "plain", "messages": MSG, "max_tokens": 2},
                        timeout=120)
        assert ok.status_code == 200, ok.text
    finally:
        s.stop()


def test_render_bounded_leaves_the_thread_untraced():
    import sys as _sys

    from engine.generation.templates import TemplateTooSlow, render_bounded

    before = _sys.gettrace()
    assert render_bounded(lambda: 41 + 1) == 42
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string("{% for i in range(10**9) %}{{ i }}{% endfor %}")
    with pytest.raises(TemplateTooSlow):
        render_bounded(template.render, budget_s=0.2)
    assert _sys.gettrace() is before


# --- 17. --request-timeout bounds a request, not each of its streams -------------------------
def test_request_timeout_bounds_all_choices_of_a_request(default_model_dir):
    s = Server(["--request-timeout", "2", "--embedding-model", "none", "--audio-model", "none"])
    try:
        start = time.monotonic()
        r = httpx.post(s.url + "/v1/completions", timeout=300, json={
            "model": MODEL, "prompt": ["Once upon a time"] * 16, "n": 16, "max_tokens": 2, "temperature": 1.0, "seed": 5,
            "logit_bias": {"2": -100, "0": -100}})
        took = time.monotonic() - start
        # 256 choices, 8 at a time, each well inside 2 s alone: together far past it.
        assert r.status_code == 504, (r.status_code, took)
        assert r.json()["error"]["code"] == "timeout" and took < 15
    finally:
        s.stop()



# --- memory after a burst of streams goes back to the system -------------------------------------
def test_memory_of_a_burst_of_streams_is_released_when_idle(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story " * 60}], "max_tokens": 32,
            "stream": True}

    def one() -> None:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300) as r:
            for _ in r.iter_lines():
                pass

    time.sleep(1.5)  # idle: earlier tests' memory is already handed back
    before = rss_mb(server)
    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    peak = before
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mb(server))
        time.sleep(0.2)
    time.sleep(3)
    after = rss_mb(server)
    assert peak - before > 300, (before, peak)  # the burst did take memory (else there is nothing to see)
    assert after - before < (peak - before) / 2, (before, peak, after)
