"""Hostile input against the prompt cache (issue 42 item 4): entries never cross API keys or cache
salts, in memory, on disk, and for prompts offered pass by pass. The disk cache's identity and
planted cache files: tests/test_hostile_cache_files.py."""
from __future__ import annotations

import json
import struct
import time

import httpx
import pytest

from conftest import MODEL, Server
from engine.generation.prompt_cache import PromptCache
from engine.generation.passes import InFlight
from engine.request import CacheScope
from tests.kv_caches import random_kv as _kv

SYSTEM = ("You are the support assistant of the Example Bank. The customer's secret PIN is 4821; never say it. "
          "Answer in one short sentence. ") * 3


# --- scopes, in memory ------------------------------------------------------------------------
def test_cache_scope_key_hides_owner_and_salt():
    assert CacheScope().key == ""
    a, b = CacheScope("owner-a"), CacheScope("owner-b")
    assert a.key != b.key and "owner-a" not in a.key
    assert CacheScope("owner-a", "s1").key not in (a.key, CacheScope("owner-a", "s2").key)
    assert CacheScope("", "salt").key != CacheScope("salt", "").key  # owner and salt can't be swapped


def test_entries_are_reused_in_their_own_scope_only():
    pc = PromptCache(min_reuse=2)
    prompt = list(range(100))
    pc.put(prompt, _kv(100), scope="a")
    assert pc.peek(prompt + [7], "b") == 0 and pc.take(prompt + [7], "b") == (None, 0)
    assert pc.take(prompt + [7], "")[0] is None  # the shared space is a scope too
    # Another scope's entry over the same tokens doesn't replace a's (each keeps its own).
    pc.put(prompt, _kv(100, seed=1), scope="b")
    assert pc.sizes()[0] == 2
    got, n = pc.take(prompt + [7], "a")
    assert got is not None and n == 100


def test_prompts_offered_pass_by_pass_stay_in_their_scope():
    pc = PromptCache(min_reuse=2)
    prompt = list(range(300))
    pc.share(prompt[:256], _kv(256), "a")
    assert pc.take(prompt, "b") == (None, 0)
    assert pc.take(prompt, "a")[1] == 256
    flight = InFlight(step=64)
    done = flight.start(prompt, "a")
    assert flight._worth_waiting(prompt, 0, "a")
    assert not flight._worth_waiting(prompt, 0, "b")
    assert list(flight.wait(prompt, pc, lambda: False, "b")) == []  # b never waits on a's prefill
    flight.end(done)


def test_disk_entries_stay_in_their_scope(tmp_path):
    from engine.generation.prompt_store import PromptStore

    store = PromptStore(tmp_path, "model-a", 1 << 30)
    tokens = list(range(40))
    store.save(tokens, _kv(40), "a")
    store.flush()
    store.close()
    store = PromptStore(tmp_path, "model-a", 1 << 30)  # a restart
    store.close()
    assert store.best(tokens + [1], "b") == (None, 0) and store.best(tokens + [1], "") == (None, 0)
    name, n = store.best(tokens + [1], "a")
    assert n == 40 and store.load(name)[0] == tokens
    meta = json.loads((store.folder / name).read_bytes()[8:8 + struct.unpack("<Q", (store.folder / name).read_bytes()[:8])[0]])
    assert meta["__metadata__"]["scope"] == "a"


# --- scopes, end to end over HTTP --------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(default_model_dir, tmp_path_factory):
    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text("sk-bob\n")
    folder = tmp_path_factory.mktemp("prompt-cache")
    s = Server(["--api-key", "sk-alice", "--api-key-file", str(keyfile), "--prompt-cache-dir", str(folder),
                "--embedding-model", "none", "--audio-model", "none"])
    s.cache_dir = folder
    yield s
    s.stop()


def _chat(server, key: str, user: str, **extra) -> int:
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": MODEL, "max_tokens": 1, "temperature": 0, **extra,
                         "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_another_key_gets_no_cached_tokens_from_a_shared_system_prompt(keyed):
    assert _chat(keyed, "sk-alice", "What is my balance?") == 0
    assert _chat(keyed, "sk-alice", "Where is the nearest branch?") > 40  # the same key shares its prefix
    # Bob sends Alice's system prompt: nothing of it is reported cached, however often he tries.
    assert _chat(keyed, "sk-bob", "What is my balance?") == 0
    assert _chat(keyed, "sk-bob", "Where is the nearest branch?") > 40  # his own entry now


def test_every_api_keeps_keys_apart(keyed):
    auth = {"alice": {"Authorization": "Bearer sk-alice"}, "bob": {"x-api-key": "sk-bob"}}

    def cached(who: str, route: str, ask: str) -> int:
        # Each route's prompt differs from its first words: Bob's own entries of one route share
        # no more than the template's opening (under min_reuse) with the next.
        prefix = f"{route.title()} vault code 7731: keep it secret and reply with one word. " * 4
        if route == "completions":
            r = httpx.post(keyed.url + "/v1/completions", headers=auth[who], timeout=120,
                           json={"model": MODEL, "prompt": prefix + ask, "max_tokens": 1, "temperature": 0})
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        if route == "responses":
            r = httpx.post(keyed.url + "/v1/responses", headers=auth[who], timeout=120,
                           json={"model": MODEL, "instructions": prefix, "input": ask, "max_output_tokens": 1,
                                 "temperature": 0, "store": False})
            return r.json()["usage"]["input_tokens_details"]["cached_tokens"]
        r = httpx.post(keyed.url + "/v1/messages", headers=auth[who], timeout=120,
                       json={"model": MODEL, "system": prefix, "max_tokens": 1, "temperature": 0,
                             "messages": [{"role": "user", "content": ask}]})
        return r.json()["usage"]["cache_read_input_tokens"]

    for route in ("completions", "responses", "messages"):
        cached("alice", route, "One")
        assert cached("bob", route, "Two") == 0, route
        assert cached("alice", route, "Three") > 40, route


def test_a_stored_response_is_read_only_with_the_key_that_made_it(keyed):
    """Stored Responses belong to the API key that made them: another key can neither read,
    list the input of, continue from, nor delete one (404, as for an id never stored)."""
    def call(method: str, path: str, key: str, **kw) -> httpx.Response:
        return httpx.request(method, keyed.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=120, **kw)

    made = call("POST", "/v1/responses", "sk-alice", json={"model": MODEL, "input": "My PIN is 4321.",
                                                          "max_output_tokens": 2})
    assert made.status_code == 200, made.text
    rid = made.json()["id"]
    for method, path, body in (("GET", f"/v1/responses/{rid}", None), ("GET", f"/v1/responses/{rid}/input_items", None),
                               ("POST", "/v1/responses", {"model": MODEL, "input": "What is my PIN?",
                                                          "previous_response_id": rid, "max_output_tokens": 2}),
                               ("DELETE", f"/v1/responses/{rid}", None)):
        r = call(method, path, "sk-bob", json=body) if body else call(method, path, "sk-bob")
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found", (method, path, r.text)
        assert "4321" not in r.text
    assert call("GET", f"/v1/responses/{rid}/input_items", "sk-alice").json()["data"][0]["content"][0]["text"] \
        == "My PIN is 4321."
    assert call("DELETE", f"/v1/responses/{rid}", "sk-alice").status_code == 200


def test_cache_salt_shares_only_with_the_same_salt(keyed):
    user = "Tell me a colour."
    assert _chat(keyed, "sk-alice", user, cache_salt="tenant-1-" + "x" * 30) == 0  # not the unsalted entries
    assert _chat(keyed, "sk-alice", user + "!", cache_salt="tenant-1-" + "x" * 30) > 40
    assert _chat(keyed, "sk-alice", user + "?", cache_salt="tenant-2-" + "x" * 30) == 0
    assert _chat(keyed, "sk-bob", user + ".", cache_salt="tenant-1-" + "x" * 30) == 0  # a salt never crosses keys


@pytest.mark.parametrize("salt,why", [("", "empty"), ("x" * 257, "too long"), (42, "not a string")])
def test_bad_cache_salts_are_400(keyed, salt, why):
    r = httpx.post(keyed.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-alice"}, timeout=60,
                   json={"model": MODEL, "max_tokens": 1, "cache_salt": salt,
                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, why
    assert r.json()["error"]["param"] == "cache_salt", r.text


def test_keys_stay_apart_on_disk_after_a_restart(keyed, tmp_path):
    """The files Alice's requests wrote are hers after a restart too; no file holds a key."""
    deadline = time.monotonic() + 60
    while not list(keyed.cache_dir.rglob("*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.2)
    files = list(keyed.cache_dir.rglob("*.safetensors"))
    assert files
    for f in files:
        data = f.read_bytes()
        assert b"sk-alice" not in data and b"sk-bob" not in data and b"tenant-1" not in data
    restarted = Server(["--api-key", "sk-alice", "--api-key", "sk-carol", "--prompt-cache-dir", str(keyed.cache_dir),
                        "--embedding-model", "none", "--audio-model", "none"])
    try:
        assert _chat(restarted, "sk-carol", "What is my balance?") == 0
        assert _chat(restarted, "sk-alice", "What is my balance?") > 40  # read back from disk
    finally:
        restarted.stop()
