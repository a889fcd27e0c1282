"""A long prompt is read in passes with the other streams running between them (chunked
prefill, engine/scheduler.py): a short chat sent while a long prompt is being read gets its first
token before the long prompt's, for a plain chat and for a scored completion (`echo`, `n`)."""
from __future__ import annotations

import json
import threading
import time

import httpx

from conftest import MODEL

# ~3,000 tokens: a dozen passes, so the short chat's margin is seconds, not a fraction of a pass
# (with ~1,000 tokens and a 1 s head start SmolLM2 had read most of it before the short chat came).
LONG = " ".join(f"Line {i}: the harbour lights were counted again and the ledger was closed." for i in range(180))
# ~1,000 tokens scored with `echo` and `n: 2` already take ~4 s: measured margin 2 s.
SCORED = " ".join(f"Line {i}: the harbour lights were counted again and the ledger was closed." for i in range(60))


def timed_stream(url: str, path: str, body: dict, marks: dict, name: str) -> None:
    """POST a streamed request; note when its first content arrived and when it ended."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {") and name not in marks:
                chunk = json.loads(line[6:])
                choice = (chunk.get("choices") or [{}])[0]
                if choice.get("delta", {}).get("content") or choice.get("text"):
                    marks[name] = time.monotonic()
    marks[name + " end"] = time.monotonic()


def race(server, path: str, long_body: dict) -> dict:
    marks: dict = {}
    long = threading.Thread(target=timed_stream, args=(server.url, path, long_body, marks, "long"))
    long.start()
    time.sleep(0.5)  # the long prompt's passes are under way
    short = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    timed_stream(server.url, "/v1/chat/completions", short, marks, "short")
    long.join()
    return marks


def test_a_short_chat_is_answered_while_a_long_prompt_is_read(server):
    marks = race(server, "/v1/chat/completions",
                 {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 2, "temperature": 0})
    assert marks["short end"] < marks["long"]


def test_a_short_chat_is_answered_while_a_long_prompt_is_scored(server):
    """`echo` with `logprobs` scores every prompt token in one shared pass for the `n` choices."""
    marks = race(server, "/v1/completions", {"model": MODEL, "prompt": SCORED, "max_tokens": 1, "n": 2, "echo": True,
                                             "logprobs": 1, "temperature": 0})
    assert marks["short end"] < marks["long"]


def test_requests_starting_together_on_one_long_prefix_read_it_once(server):
    """Issue 34: agents that start at once on the same long system prompt. The others wait for
    the first one's passes over the shared part (yielding to the worker meanwhile) and start from
    them, instead of reading the same ~1,500 tokens again."""
    system = "You are a coding agent. " + " ".join(f"Rule {i}: keep the change small and test it." for i in range(110))
    results: dict = {}

    def ask(name: str, question: str) -> None:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
            "model": MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]})
        assert r.status_code == 200, r.text
        results[name] = r.json()["usage"]

    first = threading.Thread(target=ask, args=("first", "List the files."))
    first.start()
    time.sleep(0.5)  # the first one's passes are under way, the shared part not all read yet
    third = threading.Thread(target=ask, args=("third", "Fix the parser."))
    third.start()
    ask("second", "Run the tests.")
    first.join()
    third.join()
    shared = results["first"]["prompt_tokens"] - 12
    assert results["first"]["prompt_tokens"] > 1200
    # What the first one's whole passes covered of the shared part (a pass is 256 tokens); every
    # waiter gets it (one of them taking the offered entry over left the next with nothing).
    for name in ("second", "third"):
        assert results[name]["prompt_tokens_details"]["cached_tokens"] >= shared // 256 * 256 - 256, results
