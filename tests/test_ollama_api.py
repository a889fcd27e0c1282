"""Ollama's native API (/api/*) through Ollama's own Python client, Copilot Chat's probe
sequence, the model manager (keep_alive, /api/ps, aliases) and bad input in Ollama's error
shape. One shared server on the default model; tool calling with a real model is slow."""
from __future__ import annotations

import json
import math

import httpx
import numpy as np
import ollama
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from conftest import MODEL, Server
from engine.errors import EngineError
from engine.models.default_model import DEFAULT_EMBEDDING_ID as EMBEDDING_MODEL
from handlers.asgi.middleware import ApiKeyMiddleware
from handlers.wire.ollama_protocol import ollama_name, parse_duration

SHORT = {"num_predict": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(default_model_dir):
    s = Server(["--max-queue", "16", "--keep-alive", "10m"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def _post(server: Server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=120, **kwargs)


def _running(server: Server) -> dict[str, dict]:
    return {m["name"]: m for m in httpx.get(server.url + "/api/ps", timeout=30).json()["models"]}


# --- units -----------------------------------------------------------------------------
@pytest.mark.parametrize("value,seconds", [("5m", 300), ("1h30m", 5400), ("300ms", 0.3), (90, 90), ("90", 90),
                                           (0, 0), ("0", 0), ("1.5h", 5400), (-1, math.inf), ("-1m", math.inf)])
def test_keep_alive_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m5", "", "1x", True, None, "nan"])
def test_keep_alive_that_is_not_a_duration_is_refused(value):
    with pytest.raises(EngineError) as e:
        parse_duration(value)
    assert e.value.status == 400


def test_an_expired_keep_alive_unloads_on_the_idle_hook():
    import time

    from engine.config import EngineConfig
    from engine.residency import Residency

    r = Residency(EngineConfig(), store=None, gate=None)  # type: ignore[arg-type]
    r.embedders["e"] = object()
    r.keep("e", 0.01)
    r.keep("not-loaded", 60)  # nothing to keep
    assert set(r.expires) == {"e"}
    time.sleep(0.05)
    r.idle()
    assert "e" not in r.embedders and not r.expires
    r.embedders["e"] = object()
    r.keep("e", math.inf)
    r.idle()
    assert "e" in r.embedders
    r.keep("e", 0)  # 0: unloaded now
    assert "e" not in r.embedders


def test_names_carry_ollamas_tag():
    assert ollama_name("SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct:latest"
    assert ollama_name("org/model") == "org/model:latest"
    assert ollama_name("llama3:8b") == "llama3:8b"


def test_delete_and_copy_need_the_key_when_keys_are_on():
    async def ok(_request):
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route(p, ok, methods=["GET", "POST", "DELETE"])
                              for p in ("/api/delete", "/api/copy", "/api/chat", "/api/version")])
    with TestClient(ApiKeyMiddleware(inner, keys=["sekret"])) as c:
        for method, path in (("DELETE", "/api/delete"), ("POST", "/api/copy"), ("POST", "/api/chat")):
            r = c.request(method, path, json={"model": "x"})
            assert r.status_code == 401 and set(r.json()) == {"error"}, (path, r.text)
            assert c.request(method, path, json={"model": "x"},
                             headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/api/version").status_code == 200  # apps probe it before they know of keys


# --- Copilot Chat's probe sequence --------------------------------------------------------
def test_copilot_chat_probe_sequence(server):
    """Copilot Chat's Ollama provider: /api/version >= 0.6.4, /api/tags, then /api/show per
    model for its capabilities and `<arch>.context_length`."""
    version = httpx.get(server.url + "/api/version", timeout=30).json()["version"]
    assert tuple(int(x) for x in version.split(".")) >= (0, 6, 4)
    names = [m["name"] for m in httpx.get(server.url + "/api/tags", timeout=30).json()["models"]]
    assert f"{MODEL}:latest" in names
    shown = _post(server, "/api/show", json={"model": f"{MODEL}:latest"}).json()
    assert "completion" in shown["capabilities"] and "embedding" not in shown["capabilities"]
    arch = shown["model_info"]["general.architecture"]
    assert arch == "llama"
    assert shown["model_info"][f"{arch}.context_length"] == 8192
    assert shown["model_info"][f"{arch}.embedding_length"] == 576
    assert "<|im_start|>" in shown["template"]


def test_head_root_is_ollamas_liveness_and_get_root_stays_the_chat_page(server):
    assert httpx.head(server.url + "/", timeout=30).status_code == 200
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


# --- the official client ------------------------------------------------------------------
def test_list_and_show(client):
    models = {m.model: m for m in client.list().models}
    assert f"{MODEL}:latest" in models and f"{EMBEDDING_MODEL}:latest" in models
    smol = models[f"{MODEL}:latest"]
    assert smol.size > 0 and smol.details.family == "llama" and smol.details.format == "safetensors"
    assert smol.details.parameter_size.endswith("M")
    shown = client.show(MODEL)
    assert "completion" in shown.capabilities
    embedder = client.show(EMBEDDING_MODEL)
    assert embedder.capabilities == ["embedding"]
    assert embedder.modelinfo["bert.embedding_length"] == 384


def test_chat(client):
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], options=SHORT)
    assert r.message.role == "assistant" and r.message.content
    assert r.done and r.done_reason == "length" and r.eval_count == 4
    assert r.prompt_eval_count > 5 and r.total_duration > 0 and r.eval_duration > 0


def test_chat_stream(client):
    chunks = list(client.chat(model=f"{MODEL}:latest", messages=[{"role": "user", "content": "Say hi"}],
                              options=SHORT, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert "".join(c.message.content for c in chunks)
    assert chunks[-1].eval_count == 4 and chunks[-1].done_reason == "length"


def test_chat_is_the_same_answer_as_chat_completions(server, client):
    """One generation path: greedy answers agree with /v1/chat/completions."""
    messages = [{"role": "user", "content": "Name a colour."}]
    ours = client.chat(model=MODEL, messages=messages, options={"num_predict": 6, "temperature": 0})
    openai = _post(server, "/v1/chat/completions", json={"model": f"{MODEL}:latest", "messages": messages,
                                                         "max_tokens": 6, "temperature": 0}).json()
    assert ours.message.content == openai["choices"][0]["message"]["content"]
    assert openai["model"] == f"{MODEL}:latest"  # the name /api/tags lists works on OpenAI's API too


def test_generate_plain_and_raw(client):
    r = client.generate(model=MODEL, prompt="The capital of France is", options=SHORT)
    assert r.response and r.done and r.eval_count == 4
    raw = client.generate(model=MODEL, prompt="The capital of France is", raw=True, options=SHORT)
    assert raw.response and raw.prompt_eval_count < r.prompt_eval_count  # no chat template around it
    chunks = list(client.generate(model=MODEL, prompt="1, 2, 3,", raw=True, options=SHORT, stream=True))
    assert chunks[-1].done and "".join(c.response for c in chunks)


def test_generate_format_schema(client):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
              "required": ["colour"]}
    r = client.generate(model=MODEL, prompt="Pick a colour.", format=schema,
                        options={"num_predict": 16, "temperature": 0})
    assert json.loads(r.response)["colour"] in ("red", "blue")
    chat = client.chat(model=MODEL, messages=[{"role": "user", "content": "Pick a colour."}], format=schema,
                       options={"num_predict": 16, "temperature": 0})
    assert json.loads(chat.message.content)["colour"] in ("red", "blue")


def test_embed_equals_v1_embeddings(server, client):
    texts = ["A cat sits on the mat.", "Paris is in France."]
    ours = client.embed(model=EMBEDDING_MODEL, input=texts)
    theirs = _post(server, "/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": texts}).json()
    assert np.allclose(np.array(ours.embeddings), np.array([d["embedding"] for d in theirs["data"]]), atol=1e-6)
    assert ours.prompt_eval_count == theirs["usage"]["prompt_tokens"]
    legacy = client.embeddings(model=EMBEDDING_MODEL, prompt=texts[0])
    assert np.allclose(legacy.embedding, ours.embeddings[0], atol=1e-6)


def test_ps_shows_loaded_models_with_expiry(client):
    client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1},
                keep_alive="1h")
    running = {m.model: m for m in client.ps().models}
    smol = running[f"{MODEL}:latest"]
    assert smol.size > 0 and smol.context_length == 8192
    from datetime import datetime, timedelta, timezone

    left = smol.expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=55) < left <= timedelta(hours=1)


def test_unknown_model_is_a_404(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "no-such-model" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.show("no-such-model:7b")
    assert e.value.status_code == 404


def test_copy_makes_an_alias_every_api_serves_and_delete_removes_it(server, client):
    client.copy(MODEL, "claude-sonnet-4")
    assert "claude-sonnet-4:latest" in [m.model for m in client.list().models]
    loaded = set(_running(server))
    r = _post(server, "/v1/messages", json={"model": "claude-sonnet-4", "max_tokens": 2,
                                            "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert client.generate(model="claude-sonnet-4:latest", prompt="hi", options={"num_predict": 1}).done
    assert set(_running(server)) == loaded  # the copy is the same model: nothing else was loaded
    client.delete("claude-sonnet-4")
    assert "claude-sonnet-4:latest" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as e:
        client.copy("no-such-model", "other")
    assert e.value.status_code == 404


# --- bad input: a clear 4xx in Ollama's shape ----------------------------------------------
def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


def test_malformed_json(server):
    _error(_post(server, "/api/chat", content=b'{"model": "x", "messages": [', headers={"Content-Type": "application/json"}), 400)


def test_unknown_role(server):
    msg = _error(_post(server, "/api/chat", json={"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}), 400)
    assert "role" in msg


def test_keep_alive_not_a_duration(server):
    msg = _error(_post(server, "/api/generate", json={"model": MODEL, "prompt": "hi", "keep_alive": "soon"}), 400)
    assert "keep_alive" in msg


def test_negative_num_predict(server):
    """-1 and -2 are Ollama's own "no limit" values; anything below is refused."""
    _error(_post(server, "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                            "options": {"num_predict": -5}}), 400)


def test_num_ctx_past_the_context_is_clamped_with_a_warning(server):
    r = _post(server, "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                         "stream": False, "options": {"num_predict": 1, "num_ctx": 1_000_000}})
    assert r.status_code == 200 and "clamped to 8192" in r.headers["x-openmlx-warning"]


def test_suffix_and_bad_format_and_images(server):
    _error(_post(server, "/api/generate", json={"model": MODEL, "prompt": "def f(", "suffix": "return 1"}), 400)
    # raw, and no prompt (found by the fuzzer: a 500 before)
    _error(_post(server, "/api/generate", json={"model": MODEL, "suffix": "x", "raw": True, "stream": False}), 400)
    _error(_post(server, "/api/generate", json={"model": MODEL, "prompt": "hi", "format": "yaml"}), 400)
    _error(_post(server, "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi",
                                                                          "images": ["not base64!"]}]}), 400)


def test_pull_without_allow_download(server):
    msg = _error(_post(server, "/api/pull", json={"model": "mlx-community/SmolLM2-135M-Instruct"}), 403)
    assert "--allow-download" in msg


def test_delete_refuses_the_default_model_and_unknown_ones(server):
    _error(httpx.request("DELETE", server.url + "/api/delete", json={"model": MODEL}, timeout=30), 400)
    _error(httpx.request("DELETE", server.url + "/api/delete", json={"model": "no-such-model"}, timeout=30), 404)


def test_unknown_api_route_is_ollama_shaped(server):
    _error(httpx.get(server.url + "/api/nothing", timeout=30), 404)


# --- keep_alive 0 unloads (last: the next request loads the model again) -----------------
def test_keep_alive_zero_unloads(server, client):
    client.embed(model=EMBEDDING_MODEL, input="hi", keep_alive=0)
    assert f"{EMBEDDING_MODEL}:latest" not in _running(server)
    client.generate(model=MODEL, prompt="hi", options={"num_predict": 1}, keep_alive=0)
    assert f"{MODEL}:latest" not in _running(server)
    # An empty request loads it again (Ollama's preload), with the keep_alive it names.
    loaded = client.generate(model=MODEL, keep_alive="2m")
    assert loaded.done_reason == "load" and f"{MODEL}:latest" in _running(server)
    assert client.generate(model=MODEL, keep_alive=0).done_reason == "unload"
    assert f"{MODEL}:latest" not in _running(server)
