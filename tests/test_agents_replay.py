"""Coding agents as shipped (issue 43): Claude Code's and Codex's real request bodies
(tests/data/agents/, recorded in a loopback-only namespace) replayed as sent, and what those
clients need from the server: system role messages, the billing tag out of the prompt, the
budget clamped to the context, keep-alives, Codex's namespace / custom / hosted tools, abandoned
requests counted. The rules that need no server (the budget, think tags split out with thinking
off, tool types, metrics routes) and the recordings themselves: tests/test_agents_rules.py.

The bodies are 9-21k tokens: they run on a tiny llama with a 32k context (tests/agent_models.py),
which reads them in seconds where a real 32k model needs minutes on two cores. The fast tests
replay them trimmed (every field kept, long texts and most tools cut); the bodies whole, as sent,
run with --run-slow.
"""
from __future__ import annotations

import json
import time

import httpx
import pytest

from contract import schemas
from tests.agent_models import BIG, SMALL, agent_config, claude_body, codex_body, recorded
from tests.process import Server

KEEPALIVE_S = 0.05  # the server's keep-alive interval here (5 s by default): shorter than a warm tiny model's read of PREFILL
EVENT_KEEPALIVE_S = 0.1  # silence before a keep-alive carries an event of the API (60 s by default)


# --- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def agents_config(tmp_path_factory, default_model_dir):
    return agent_config(tmp_path_factory.mktemp("agent-models"), default_model_dir)


@pytest.fixture(scope="module")
def agents(agents_config):
    s = Server(["--config", str(agents_config), "--max-models", "2", "--log-json"],
               env={"OPENMLX_KEEPALIVE_S": str(KEEPALIVE_S), "OPENMLX_EVENT_KEEPALIVE_S": str(EVENT_KEEPALIVE_S)})
    yield s
    s.stop()


def _named_events(text: str) -> list[tuple[str, dict]]:
    out, name = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out


def _stream(server, path: str, body: dict, headers: dict | None = None) -> tuple[httpx.Response, str]:
    with httpx.stream("POST", server.url + path, json=body, headers=headers or {}, timeout=600) as r:
        return r, "".join(r.iter_text())


def _message_end(events: list[tuple[str, dict]]) -> dict:
    """The stream ended properly: message_start first, message_stop last; the message_delta."""
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-1] == "message_stop", names
    return next(d for n, d in events if n == "message_delta")


def test_claude_code_body_streams_to_its_end(agents):
    path, headers, body = claude_body("claude_code_hello")
    r, text = _stream(agents, path, body, headers)
    assert r.status_code == 200, text
    delta = _message_end(_named_events(text))
    assert delta["delta"]["stop_reason"] == "end_turn"
    for name, data in _named_events(text):
        if name != "ping":
            assert schemas.event_errors(schemas.anthropic_spec_path(), "MessageStreamEvent", data) == [], data


def test_billing_block_stays_out_of_the_prompt_and_the_cache_hits(agents):
    """Two runs differing only in the billing tag and the task: the second reads >= 70 % of its
    prompt from the cache (the tag, shown to the model, would make it miss from the first token)."""
    usage = []
    for name in ("claude_code_hello", "claude_code_add"):
        path, headers, body = claude_body(name)
        r, text = _stream(agents, path, body, headers)
        assert r.status_code == 200, text
        usage.append(_message_end(_named_events(text))["usage"])
    second = usage[1]
    whole = second["input_tokens"] + second["cache_read_input_tokens"]
    assert second["cache_read_input_tokens"] / whole >= 0.7, usage
    _, _, body = claude_body("claude_code_hello")
    count = {k: body[k] for k in ("model", "messages", "system", "tools")}
    without = dict(count, system=count["system"][1:])
    n = [httpx.post(agents.url + "/v1/messages/count_tokens", json=b, timeout=60).json()["input_tokens"]
         for b in (count, without)]
    assert n[0] == n[1]  # the tag is not in the prompt


def test_system_role_messages(agents):
    base = {"model": BIG, "messages": [{"role": "user", "content": "Hi"}]}
    with_system = {**base, "messages": base["messages"] + [
        {"role": "system", "content": [{"type": "text", "text": "The user works on Linux."}]}]}
    n = [httpx.post(agents.url + "/v1/messages/count_tokens", json=b, timeout=60).json()["input_tokens"]
         for b in (base, with_system)]
    assert n[1] > n[0]  # in the prompt
    bad = {**with_system, "max_tokens": 4}
    bad["messages"][1]["content"] = [{"type": "image", "source": {"type": "url", "url": "http://x/a.png"}}]
    r = httpx.post(agents.url + "/v1/messages", json=bad, timeout=60)
    assert r.status_code == 400 and "text blocks only" in r.json()["error"]["message"], r.text
    only_system = {"model": BIG, "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}
    r = httpx.post(agents.url + "/v1/messages", json=only_system, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_claude_code_tool_use_comes_back_in_its_shape(agents):
    path, headers, body = claude_body("claude_code_hello")
    body["tool_choice"] = {"type": "tool", "name": "Bash"}
    r, text = _stream(agents, path, body, headers)
    assert r.status_code == 200, text
    events = _named_events(text)
    assert _message_end(events)["delta"]["stop_reason"] == "tool_use"
    start = next(d for n, d in events if n == "content_block_start" and d["content_block"]["type"] == "tool_use")
    assert start["content_block"]["name"] == "Bash" and start["content_block"]["id"].startswith("toolu_")
    partial = "".join(d["delta"]["partial_json"] for n, d in events
                      if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    schema = next(t for t in body["tools"] if t["name"] == "Bash")["input_schema"]
    assert set(schema["required"]) <= set(json.loads(partial))


def test_codex_body_streams_to_its_end(agents):
    path, headers, body = codex_body()
    r, text = _stream(agents, path, body, headers)
    assert r.status_code == 200, text
    assert "web_search" in r.headers["x-openmlx-warning"]
    events = _named_events(text)
    assert events[0][0] == "response.created" and events[-1][0] == "response.completed", [n for n, _ in events]
    for _, data in events:
        assert schemas.event_errors(schemas.openai_spec_path(), "ResponseStreamEvent", data) == [], data
    tools = events[-1][1]["response"]["tools"]
    assert [t["type"] for t in tools] == ["function", "namespace"]  # web_search was not offered


@pytest.mark.parametrize("name", ["opencode_hello", "aider_hello"])
def test_chat_completions_agents_bodies_stream_to_their_end(agents, name):
    """opencode's (10 tools, max_tokens 32000, include_usage) and aider's (no tools, no
    max_tokens) first requests, whole and as sent: 200, every chunk valid, a finish, [DONE]."""
    rec = recorded(name)
    body = {**rec["body"], "model": BIG}
    r, text = _stream(agents, rec["path"], body, {k: v for k, v in rec["headers"].items() if k != "accept"})
    assert r.status_code == 200, text
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    chunks = [json.loads(d) for d in data[:-1]]
    for c in chunks:
        assert schemas.openai("CreateChatCompletionStreamResponse", c) == [], c
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    assert finishes and finishes[-1] in ("stop", "length", "tool_calls"), finishes
    if body.get("stream_options", {}).get("include_usage"):
        assert chunks[-1]["usage"]["prompt_tokens"] > 1000 and chunks[-1]["choices"] == []


def test_codex_namespaced_call_and_its_follow_up(agents):
    path, headers, body = codex_body()
    body.update(stream=False, tool_choice={"type": "function", "namespace": "multi_agent_v1", "name": "spawn_agent"})
    r = httpx.post(agents.url + path, json=body, headers=headers, timeout=600)
    assert r.status_code == 200, r.text
    call = r.json()["output"][-1]
    assert (call["type"], call["namespace"], call["name"]) == ("function_call", "multi_agent_v1", "spawn_agent")
    assert isinstance(json.loads(call["arguments"]), dict)
    assert schemas.openai("Response", r.json()) == []
    body.update(tool_choice="auto", input=body["input"] + [
        {k: call[k] for k in ("type", "call_id", "namespace", "name", "arguments")},
        {"type": "function_call_output", "call_id": call["call_id"], "output": "agent spawned"}])
    r = httpx.post(agents.url + path, json=body, headers=headers, timeout=600)
    assert r.status_code == 200, r.text


def test_custom_tool_call_and_its_follow_up(agents):
    patch = {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch.",
             "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch\nbegin_patch: \"*** Begin Patch\""}}
    body = {"model": BIG, "input": "Create hello.py", "tools": [patch],
            "tool_choice": {"type": "custom", "name": "apply_patch"}, "stream": True}
    r, text = _stream(agents, "/v1/responses", body)
    assert r.status_code == 200, text
    events = _named_events(text)
    done = next(d for n, d in events if n == "response.output_item.done")["item"]
    assert done["type"] == "custom_tool_call" and done["name"] == "apply_patch" and isinstance(done["input"], str)
    assert "response.custom_tool_call_input.done" in [n for n, _ in events]
    follow = {"model": BIG, "max_output_tokens": 4, "tools": [patch], "input": [
        {"role": "user", "content": "Create hello.py"},
        {"type": "custom_tool_call", "call_id": done["call_id"], "name": "apply_patch", "input": done["input"]},
        {"type": "custom_tool_call_output", "call_id": done["call_id"], "output": "Done"}]}
    r = httpx.post(agents.url + "/v1/responses", json=follow, timeout=120)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("tool", [
    {"type": "web_search", "external_web_access": True}, {"type": "web_search_preview"},
    {"type": "file_search", "vector_store_ids": ["vs_1"]},
    {"type": "computer_use_preview", "display_width": 800, "display_height": 600, "environment": "linux"},
    {"type": "image_generation"}, {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "mcp", "server_label": "x", "server_url": "http://127.0.0.1:1"}, {"type": "local_shell"},
    {"type": "shell"}, {"type": "apply_patch"}, {"type": "tool_search"}], ids=lambda t: t["type"])
def test_hosted_tools_are_left_out_with_a_warning(agents, tool):
    r = httpx.post(agents.url + "/v1/responses", timeout=60, json={
        "model": BIG, "input": "Hi", "max_output_tokens": 4, "tools": [tool]})
    assert r.status_code == 200, r.text
    assert tool["type"] in r.headers["x-openmlx-warning"] and r.json()["tools"] == []


def test_anthropic_tool_types_are_left_out_with_a_warning(agents):
    tools = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
             {"type": "bash_20250124", "name": "bash"},
             {"name": "Read", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]
    body = {"model": BIG, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}], "tools": tools}
    r = httpx.post(agents.url + "/v1/messages", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert "web_search_20250305, bash_20250124" in r.headers["x-openmlx-warning"]
    body["tools"] = [{"name": "Read"}]  # a client tool without its input_schema
    r = httpx.post(agents.url + "/v1/messages", json=body, timeout=60)
    assert r.status_code == 400 and "input_schema" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path,body,param", [
    ("/v1/responses", {"input": "Hi", "tools": [{"type": "namespace", "name": "ns", "description": "d", "tools": []}]},
     "tools.0.tools"),
    ("/v1/responses", {"input": "Hi", "tools": [{"type": "web_search", "bogus": 1}]}, "tools.0.bogus"),
    ("/v1/responses", {"input": "Hi", "tools": [{"type": "function"}]}, "tools.0.name"),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -1}, "max_tokens"),
], ids=["namespace-without-tools", "hosted-unknown-field", "function-without-name", "responses-max-0",
        "chat-max-0", "chat-max-negative"])
def test_bad_tools_and_budgets_are_400(agents, path, body, param):
    r = httpx.post(agents.url + path, json={"model": BIG, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("max_tokens", [0, -1])
def test_messages_max_tokens_below_one_is_400(agents, max_tokens):
    r = httpx.post(agents.url + "/v1/messages", timeout=60,
                   json={"model": BIG, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 400 and r.json()["type"] == "error", r.text


LONG = "word " * 400  # past talker-256's 256-token context


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 5}),
    ("/v1/responses", {"input": LONG, "max_output_tokens": 5}),
    ("/v1/messages", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 5}),
], ids=["chat", "responses", "messages"])
def test_a_prompt_alone_over_the_context_is_400(agents, path, body):
    r = httpx.post(agents.url + path, json={"model": SMALL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.get("code") == "context_length_exceeded" or "context" in error["message"]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32000}),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 32000}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32000}),
], ids=["chat", "responses", "messages"])
def test_max_tokens_over_the_room_left_is_clamped(agents, path, body):
    r = httpx.post(agents.url + path, json={"model": SMALL, **body}, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    if path == "/v1/chat/completions":
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["total_tokens"] == 256
    elif path == "/v1/responses":
        assert out["status"] == "incomplete" and out["usage"]["total_tokens"] == 256
    else:
        assert out["stop_reason"] == "max_tokens"
        usage = out["usage"]
        assert usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["output_tokens"] == 256


PREFILL = "Read this slowly. " + "The quick brown fox jumps over the lazy dog. " * 400  # ~4k tokens


def _gaps(server, path: str, body: dict) -> tuple[list[float], str]:
    """Seconds between the stream's chunks, from the request to its end, and the whole text."""
    gaps, text, last = [], "", time.monotonic()
    with httpx.stream("POST", server.url + path, json=body, timeout=600) as r:
        assert r.status_code == 200
        for piece in r.iter_text():
            now = time.monotonic()
            gaps.append(now - last)
            last, text = now, text + piece
    return gaps, text


@pytest.mark.parametrize("path,body,keepalive", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "PROMPT"}], "max_tokens": 2}, ": keep-alive"),
    ("/v1/responses", {"input": "PROMPT", "max_output_tokens": 2}, ": keep-alive"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "PROMPT"}], "max_tokens": 2}, "event: ping"),
], ids=["chat", "responses", "messages"])
def test_a_stream_keeps_alive_while_the_prompt_is_read(agents, path, body, keepalive):
    """Bytes keep coming while a long prompt is read (here every 0.05 s; 5 s by default)."""
    fresh = json.loads(json.dumps(body).replace("PROMPT", str(time.time()) + PREFILL))  # no cache hit
    gaps, text = _gaps(agents, path, {"model": BIG, "stream": True, **fresh})
    assert keepalive in text, text[:500]
    assert max(gaps) < 10, gaps


def _event_times(server, path: str, body: dict) -> list[tuple[float, str, dict]]:
    """(seconds since the request, name, data) of each event of a stream."""
    out, name, t0 = [], None, time.monotonic()
    with httpx.stream("POST", server.url + path, json=body, timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((time.monotonic() - t0, name, json.loads(line[6:])))
    return out


@pytest.mark.parametrize("tools", [False, True], ids=["text", "tools"])
def test_messages_keep_alive_with_events_a_watchdog_counts(agents, tools):
    """Claude Code's stream watchdog drops `ping` before it looks and hangs up after 300 s with no
    other event: while a long prompt is read, after EVENT_KEEPALIVE_S with only pings an empty
    text_delta goes out (in a text block opened for it when the answer may be calls only), and
    the stream stays a valid Anthropic stream that the SDK reads to the same message."""
    import anthropic

    prompt = str(time.time()) + PREFILL * 2  # ~8k tokens: longer to read than 4 x EVENT_KEEPALIVE_S
    body = {"model": BIG, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    if tools:
        body["tools"] = [{"name": "Write", "description": "Write a file",
                          "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]
    events = _event_times(agents, "/v1/messages", body)
    for _, name, data in events:
        if name != "ping":  # not in Anthropic's MessageStreamEvent union
            assert schemas.event_errors(schemas.anthropic_spec_path(), "MessageStreamEvent", data) == [], data
    content = [(t, n, d) for t, n, d in events if n != "ping"]
    first_token = next(t for t, n, d in content if n == "message_delta")
    assert first_token > 4 * EVENT_KEEPALIVE_S, "the prompt was read too fast to test anything"
    gaps = [b[0] - a[0] for a, b in zip(content, content[1:])]
    assert max(gaps) < first_token / 2, (gaps, [n for _, n, _ in content])  # pings alone: the whole read
    empty = [d for _, n, d in content if n == "content_block_delta" and d["delta"] == {"type": "text_delta", "text": ""}]
    assert len(empty) >= 2
    starts = [d["content_block"]["type"] for _, n, d in content if n == "content_block_start"]
    assert starts[0] == "text"  # one text block, the answer's text (if any) in it
    names = [n for _, n, _ in content]
    assert names.count("content_block_start") == names.count("content_block_stop")
    an = anthropic.Anthropic(base_url=agents.url, api_key="x", max_retries=0)
    with an.messages.stream(**{k: v for k, v in body.items() if k != "stream"}) as s:
        final = s.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens") and final.content[0].type == "text"


def test_responses_keep_alive_with_events_an_idle_timeout_counts(agents):
    """Codex's idle timeout counts SSE events and never sees comment lines: after
    EVENT_KEEPALIVE_S with only comments, `response.in_progress` goes out again (OpenAI's own
    event, the response so far), and the SDK reads the stream to the same end."""
    import openai

    prompt = str(time.time()) + PREFILL * 2
    body = {"model": BIG, "max_output_tokens": 8, "stream": True, "input": prompt}
    events = _event_times(agents, "/v1/responses", body)
    for _, name, data in events:
        assert schemas.event_errors(schemas.openai_spec_path(), "ResponseStreamEvent", data) == [], data
    names = [n for _, n, _ in events]
    first_output = next(t for t, n, _ in events if n not in ("response.created", "response.in_progress"))
    assert first_output > 4 * EVENT_KEEPALIVE_S, ("the prompt was read too fast to test anything", [(round(t, 2), n) for t, n, _ in events])
    gaps = [b[0] - a[0] for a, b in zip(events, events[1:])]
    assert max(gaps) < first_output / 2, (gaps, names)  # comments alone: the whole read
    assert names.count("response.in_progress") >= 3 and names[-1] == "response.completed", names
    assert [d["sequence_number"] for _, _, d in events] == list(range(len(events)))
    oa = openai.OpenAI(base_url=agents.url + "/v1", api_key="x", max_retries=0)
    streamed = list(oa.responses.create(**{**body, "input": prompt + "b"}))
    assert streamed[-1].type == "response.completed"


def test_sdk_parsers_skip_keep_alives(agents):
    """The official SDKs read these streams, keep-alives included, as ordinary streams."""
    import anthropic
    import openai

    prompt = str(time.time()) + PREFILL
    oa = openai.OpenAI(base_url=agents.url + "/v1", api_key="x", max_retries=0)
    chunks = list(oa.chat.completions.create(model=BIG, messages=[{"role": "user", "content": prompt + "a"}],
                                             max_tokens=2, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    events = list(oa.responses.create(model=BIG, input=prompt + "b", max_output_tokens=2, stream=True))
    assert events[-1].type == "response.completed"
    an = anthropic.Anthropic(base_url=agents.url, api_key="x", max_retries=0)
    with an.messages.stream(model=BIG, max_tokens=2, messages=[{"role": "user", "content": prompt + "c"}]) as s:
        final = s.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens")


def _metric(server, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_abandoned_requests_are_counted_and_logged(agents):
    before = _metric(agents, "openmlx_tokens_total", model=BIG, kind="prompt")
    body = {"model": BIG, "stream": True, "max_tokens": 2,
            "messages": [{"role": "user", "content": str(time.time()) + " abandoned " + PREFILL}]}
    with httpx.stream("POST", agents.url + "/v1/messages", json=body, timeout=60) as r:
        for piece in r.iter_text():
            if "ping" in piece:
                break  # the client hangs up while the prompt is read
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _metric(agents, "openmlx_generations_total", model=BIG,
                                                  finish_reason="cancelled") < 1:
        time.sleep(0.5)
    assert _metric(agents, "openmlx_generations_total", model=BIG, finish_reason="cancelled") >= 1
    assert _metric(agents, "openmlx_tokens_total", model=BIG, kind="prompt") > before
    lines = [json.loads(line) for line in agents.log().splitlines() if line.startswith("{")]
    assert any(line.get("cancelled") is True and line.get("finish_reason") == "cancelled" for line in lines)
    text = httpx.get(agents.url + "/metrics", timeout=30).text
    assert 'route="/v1/messages"' in text and 'route="/v1/responses"' in text


# --- the bodies whole, as sent ------------------------------------------------------------------
@pytest.mark.slow
def test_whole_bodies_as_sent(agents):
    """Claude Code's two runs (21k tokens each) and Codex's body (9k), untouched but the model:
    each streams to its end; the second Claude Code run reads >= 70 % of its prompt from the cache."""
    usage = []
    for name in ("claude_code_hello", "claude_code_add"):
        path, headers, body = claude_body(name, trimmed=False)
        r, text = _stream(agents, path, body, headers)
        assert r.status_code == 200, text
        usage.append(_message_end(_named_events(text))["usage"])
    second = usage[1]
    assert second["input_tokens"] + second["cache_read_input_tokens"] > 16000
    assert second["cache_read_input_tokens"] / (second["input_tokens"] + second["cache_read_input_tokens"]) >= 0.7
    path, headers, body = codex_body(trimmed=False)
    r, text = _stream(agents, path, body, headers)
    assert r.status_code == 200 and _named_events(text)[-1][0] == "response.completed", text[-500:]
