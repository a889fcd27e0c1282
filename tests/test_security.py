"""API keys and CORS: safe by default, opt-in by flag."""
from __future__ import annotations

import httpx
import pytest

from conftest import MODEL, Server


@pytest.fixture(scope="module")
def keyed(default_model_dir, tmp_path_factory):
    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text("# team keys\nsk-file-key\n")
    s = Server(["--api-key", "sk-flag-key", "--api-key-file", str(keyfile), "--cors-origin", "http://ok.example"],
               env={"OPENMLX_API_KEY": "sk-env-key"})
    yield s
    s.stop()


@pytest.mark.parametrize("headers,code", [
    ({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "Basic c2stZmxhZy1rZXk="}, 401),
    ({"Authorization": "Bearer sk-flag-key"}, 200), ({"Authorization": "Bearer sk-env-key"}, 200),
    ({"Authorization": "Bearer sk-file-key"}, 200)])
def test_keys(keyed, headers, code):
    r = httpx.get(keyed.url + "/v1/models", headers=headers)
    assert r.status_code == code
    if code == 401:
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["x-request-id"]


def test_health_and_docs_stay_open(keyed):
    assert httpx.get(keyed.url + "/health").status_code == 200
    assert httpx.get(keyed.url + "/openapi.json").status_code == 200


def test_openai_client_with_key(keyed):
    from openai import AuthenticationError, OpenAI

    ok = OpenAI(base_url=keyed.url + "/v1", api_key="sk-flag-key", max_retries=0)
    assert ok.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_keys_are_not_logged(keyed):
    httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer sk-flag-key"})
    assert "sk-flag-key" not in keyed.log() and "sk-env-key" not in keyed.log()


def test_cors_only_for_allowed_origin(keyed, server):
    pre = {"Origin": "http://ok.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(keyed.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ok.example"
    evil = httpx.options(keyed.url + "/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"})
    assert evil.headers.get("access-control-allow-origin") is None
    # The default server has CORS off: no browser page may drive it.
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_binds_loopback_by_default():
    from handlers.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


def test_keys_in_query_strings_are_not_logged(keyed):
    r = httpx.get(keyed.url + "/v1/models?api_key=sk-query-secret&x=1")
    assert r.status_code == 401
    import time

    time.sleep(0.2)
    assert "sk-query-secret" not in keyed.log() and "/v1/models?[redacted]" in keyed.log()
