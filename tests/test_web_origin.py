"""Hostile input, round 5 (issue 50, items 1 and 2): a web page the user visits.

DNS rebinding: a page rebinds its own name to 127.0.0.1 and is then same-origin to the server, so
every request carries `Host: evil.example:PORT`. Cross-site forms: a `<form>` or a `no-cors` fetch
posts `multipart/form-data` (an audio upload) with no preflight, `Origin: http://evil.example`.
Both got 200 with full bodies before; now both are 403 before any route.
"""
from __future__ import annotations

import io
import wave

import httpx
import pytest

from conftest import MODEL, Server
from handlers.asgi.security import host_policy

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def web(default_model_dir):
    s = Server(["--allowed-hosts", "lan.example", "--cors-origin", "http://allowed.example",
                "--embedding-model", "none", "--audio-model", "none", "--max-queue", "16"])
    yield s
    s.stop()


def silence_wav(seconds: float = 0.5) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * int(16000 * seconds))
    return out.getvalue()


# Every kind of route: the page, the spec and docs, health and metrics, model listing, each API
# that does work (JSON, multipart, stored responses), a CORS preflight.
ROUTES = [
    ("GET", "/", {}), ("GET", "/health", {}), ("GET", "/metrics", {}), ("GET", "/v1/models", {}),
    ("GET", f"/v1/models/{MODEL}", {}), ("GET", "/openapi.json", {}), ("GET", "/docs/", {}),
    ("POST", "/v1/chat/completions", {"json": CHAT}),
    ("POST", "/v1/completions", {"json": {"model": MODEL, "prompt": "Hi", "max_tokens": 2}}),
    ("POST", "/v1/responses", {"json": {"model": MODEL, "input": "Hi", "max_output_tokens": 16}}),
    ("POST", "/v1/messages", {"json": {"model": MODEL, "max_tokens": 2, "messages": CHAT["messages"]}}),
    ("POST", "/v1/rerank", {"json": {"model": MODEL, "query": "a", "documents": ["b"]}}),
    ("POST", "/v1/audio/transcriptions", {"files": {"file": ("a.wav", silence_wav(), "audio/wav")},
                                          "data": {"model": "whisper-tiny.en"}}),
    ("GET", "/v1/responses/resp_x", {}), ("DELETE", "/v1/responses/resp_x", {}),
    ("OPTIONS", "/v1/chat/completions", {"headers": {"Access-Control-Request-Method": "POST"}}),
]


def _send(server: Server, method: str, path: str, host: str | None = None, origin: str | None = None,
          **kwargs) -> httpx.Response:
    headers = dict(kwargs.pop("headers", {}))
    if host is not None:
        headers["Host"] = host
    if origin is not None:
        headers["Origin"] = origin
    return httpx.request(method, server.url + path, headers=headers, timeout=120, **kwargs)


def _refused(r: httpx.Response, code: str) -> None:
    assert r.status_code == 403, (r.status_code, r.text[:300])
    body = r.json()
    if body.get("type") == "error":  # Anthropic's shape, on /v1/messages
        assert body["error"]["type"] == "permission_error"
    else:
        assert body["error"]["code"] == code and body["error"]["type"] == "permission_error"
    assert r.headers.get("x-request-id")
    # nothing of the server's state: no model name, no answer
    assert MODEL not in r.text and "choices" not in r.text and "SmolLM" not in r.text


@pytest.mark.parametrize("method,path,kwargs", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_a_rebound_host_is_refused_on_every_route(web, method, path, kwargs):
    r = _send(web, method, path, host=f"evil.example:{web.port}", **kwargs)
    _refused(r, "host_not_allowed")


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "localhost", "127.0.0.1", "[::1]:{port}",
                                  "LOCALHOST:{port}", "lan.example:{port}", "lan.example"])
def test_loopback_names_and_allowed_hosts_are_served(web, host):
    host = host.format(port=web.port)
    for path in ("/", "/health", "/v1/models"):
        r = _send(web, "GET", path, host=host)
        assert r.status_code == 200, (host, path, r.text[:300])


@pytest.mark.parametrize("host", ["evil.example", "lan.example.evil.example:{port}", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "10.0.0.5:{port}"])
def test_other_names_are_refused(web, host):
    _refused(_send(web, "GET", "/v1/models", host=host.format(port=web.port)), "host_not_allowed")


@pytest.mark.parametrize("method,path,kwargs", [r for r in ROUTES if r[0] in ("POST", "DELETE")],
                         ids=[f"{m} {p}" for m, p, _ in ROUTES if m in ("POST", "DELETE")])
def test_a_foreign_origin_cannot_make_the_server_work(web, method, path, kwargs):
    _refused(_send(web, method, path, origin=EVIL, **kwargs), "origin_not_allowed")


@pytest.mark.parametrize("origin", ["null", "http://localhost:1", "https://127.0.0.1:{port}0", "http://127.0.0.1",
                                    "file://", "chrome-extension://abc"])
def test_other_origins_are_foreign_too(web, origin):
    _refused(_send(web, "POST", "/v1/chat/completions", origin=origin.format(port=web.port), json=CHAT),
             "origin_not_allowed")


def test_the_multipart_upload_is_refused_cross_site_and_served_otherwise(web):
    files = {"file": ("a.wav", silence_wav(), "audio/wav")}
    # a cross-site <form> post: multipart, no preflight
    _refused(_send(web, "POST", "/v1/audio/transcriptions", origin=EVIL, files=files,
                   data={"model": "whisper-tiny.en"}), "origin_not_allowed")
    # from the server's own page it reaches the route, which looks the model up (a model that isn't
    # there: loading Whisper would cost the suite half a minute)
    own = _send(web, "POST", "/v1/audio/transcriptions", origin=f"http://127.0.0.1:{web.port}", files=files,
                data={"model": "no-such-whisper"})
    assert own.status_code == 404 and own.json()["error"]["code"] == "model_not_found", own.text[:300]


def test_the_servers_own_origin_still_chats(web):
    for host, origin in [(f"127.0.0.1:{web.port}", f"http://127.0.0.1:{web.port}"),
                         (f"localhost:{web.port}", f"http://localhost:{web.port}"),
                         (f"lan.example:{web.port}", f"http://lan.example:{web.port}")]:
        r = _send(web, "POST", "/v1/chat/completions", host=host, origin=origin, json=CHAT)
        assert r.status_code == 200 and r.json()["choices"], (host, r.text[:300])
    # a page of a --cors-origin may post too; a GET from anywhere reads nothing it could not anyway
    assert _send(web, "POST", "/v1/chat/completions", origin="http://allowed.example", json=CHAT).status_code == 200
    assert _send(web, "GET", "/v1/models", origin=EVIL).status_code == 200


def test_an_api_key_header_does_not_replace_the_checks(web):
    headers = {"Authorization": "Bearer sk-anything"}
    _refused(_send(web, "POST", "/v1/chat/completions", host=f"evil.example:{web.port}", headers=headers, json=CHAT),
             "host_not_allowed")
    _refused(_send(web, "POST", "/v1/chat/completions", origin=EVIL, headers=headers, json=CHAT), "origin_not_allowed")


def test_the_policy_by_bind_address():
    loopback = host_policy("127.0.0.1", [], [])
    assert loopback.host_allowed("localhost") and loopback.host_allowed("::1") and loopback.host_allowed("127.0.0.2")
    assert not loopback.host_allowed("evil.example") and not loopback.host_allowed("192.168.1.5")
    # listening on every interface: every name, as Ollama does, unless --allowed-hosts narrows it
    assert host_policy("0.0.0.0", [], []).host_allowed("mybox.lan")
    assert host_policy("::", [], []).host_allowed("mybox.lan")
    narrowed = host_policy("0.0.0.0", ["mybox.lan"], [])
    assert narrowed.host_allowed("mybox.lan") and narrowed.host_allowed("localhost")
    assert not narrowed.host_allowed("evil.example")
    assert host_policy("127.0.0.1", ["*"], []).host_allowed("anything.example")
    suffix = host_policy("127.0.0.1", [".example.com", "b.lan:8000"], [])
    assert suffix.host_allowed("a.example.com") and suffix.host_allowed("example.com") and suffix.host_allowed("b.lan")
    assert not suffix.host_allowed("badexample.com")
    # the origin check is on whatever the bind address
    anywhere = host_policy("0.0.0.0", [], [])
    assert not anywhere.origin_allowed(EVIL, "mybox.lan:8000")
    assert anywhere.origin_allowed("http://mybox.lan:8000", "mybox.lan:8000")
    assert anywhere.origin_allowed("https://mybox.lan", "mybox.lan")  # a TLS proxy handing on its Host
    # a reverse proxy that rewrites Host to 127.0.0.1: the public name, listed, is the server's own
    proxied = host_policy("127.0.0.1", ["chat.example.org"], [])
    assert proxied.origin_allowed("https://chat.example.org", "127.0.0.1:8000")
    assert host_policy("127.0.0.1", [], ["*"]).origin_allowed(EVIL, "127.0.0.1:8000")
