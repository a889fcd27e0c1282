"""Hostile input, round 4 (issue 42, items 2, 3 and 7): template output bombs, template and
tokenizer errors, and a rerank query past the judge's context.

Templates are planted as a model's chat template through the config file (what a Hub repo's
tokenizer_config or a GGUF's metadata hands the same code path); the tokenizer panic through a
model folder whose tokenizer.json has a malformed normalizer.
"""
from __future__ import annotations

import base64
import json
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import MODEL, Server

MSG = [{"role": "user", "content": "What is the capital of France?"}]

# Each builds (or would build) far more than any prompt: refused before the value exists.
BOMBS = {
    "multiply": "{{ 'x' * 100000000 }}",
    "multiply a variable": "{% set n = 100000000 %}{{ 'x' * n }}",
    "double by ~": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "double by +": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "ljust": "{{ 'x'.ljust(100000000) }}",
    "center filter": "{{ 'x' | center(100000000) }}",
    "str.format width": "{{ '{:>100000000}'.format(1) }}",
    "percent width": "{{ '%0100000000d' % 1 }}",
    "format filter": "{{ '%100000000s' | format(1) }}",
    "huge power": "{{ 10 ** (10 ** 9) }}",
    "squaring": "{% set ns = namespace(n=10**1000) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "join": "{{ (['x' * 500000] * 100000) | join }}",
    "print a long list": "{{ messages * 100000 }}",
    "string filter": "{{ (messages * 300000) | string | length }}",
    "tojson": "{{ (messages * 300000) | tojson | length }}",
    "tojson indent": "{{ messages | tojson(indent=100000000) }}",
    "output in a loop": "{% for i in range(100000) %}{{ 'y' * 10000 }}{% endfor %}",
    "lipsum": "{{ lipsum(1000000) }}",
    "replace": "{{ ('x' * 100000).replace('x', 'x' * 1000) }}",
    "replace filter": "{{ ('x' * 100000) | replace('x', 'x' * 1000) }}",
    "indent": "{{ ('x\\n' * 100000) | indent(10000) }}",
    "expandtabs": "{{ ('\\t' * 100000).expandtabs(100000) }}",
    "block set": "{% set x %}{% for i in range(100000) %}{{ 'z' * 1000 }}{% endfor %}{% endset %}{{ x | length }}",
    "macro": "{% macro m() %}{% for i in range(100000) %}{{ 'z' * 1000 }}{% endfor %}{% endmacro %}{{ m() | length }}",
}


@pytest.mark.parametrize("name", BOMBS)
def test_a_template_bomb_is_refused_before_it_builds(name):
    from transformers.utils import chat_template_utils

    from engine.generation.templates import TemplateTooLarge, render_bounded

    tracemalloc.start()
    start = time.monotonic()
    try:
        template = chat_template_utils._compile_jinja_template(BOMBS[name])  # what apply_chat_template compiles
        with pytest.raises(TemplateTooLarge):
            render_bounded(lambda: template.render(messages=[{"role": "user", "content": "x" * 1000}]),
                           max_chars=663_552)  # the default model's bound: (8,192 + 16) x 81
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 2 and peak < 64 << 20, (time.monotonic() - start, peak)


def test_real_templates_render_as_in_the_plain_sandbox(hf_tokenizer):
    """The bounded environment changes nothing for a real template: the default model's, and one
    using the operations it checks, render exactly as in Jinja's own sandbox."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from engine.generation.templates import BoundedEnvironment, render_bounded

    busy = ("{% set ns = namespace(s='') %}{% for m in messages %}{% set ns.s = ns.s + m.role ~ ':' %}{% endfor %}"
            "{{ ns.s }}{{ '%-6s|' % 'ab' }}{{ '{:>5}'.format('x') }}{{ ('ab' * 3).center(10) }}"
            "{{ messages | map(attribute='content') | join(', ') }}{{ 'a\\nb' | indent(2) }}"
            "{{ 'a b' | replace(' ', '_') }}{{ [1] * 3 + [2] }}{{ 2 ** 10 }}{{ 'x' | center(7) }}")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    for source in (hf_tokenizer.chat_template, busy):
        plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
        bounded = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
        expected = plain.render(messages=conversation, add_generation_prompt=True)
        assert render_bounded(lambda: bounded.render(messages=conversation, add_generation_prompt=True),
                              max_chars=100_000) == expected


def test_the_tokenizer_reads_no_further_than_asked(hf_tokenizer):
    from engine.generation.tokens import encode_prefix

    text = "The quick brown fox jumps over the lazy dog. " * 20_000  # ~200,000 tokens
    calls = []
    real = hf_tokenizer.encode

    class Counting:
        def encode(self, t: str, **kwargs):
            calls.append(len(t))
            return real(t, **kwargs)

        def get_vocab(self):
            return hf_tokenizer.get_vocab()

    ids, cut = encode_prefix(Counting(), text, 1000)
    assert cut and ids == real(text, add_special_tokens=False)[:1000]
    assert sum(calls) < 40_000, calls  # ~5,000 characters hold the 1,000 tokens; the text has 900,000
    short = "Hello there."
    assert encode_prefix(Counting(), short, 1000) == (real(short, add_special_tokens=False), False)


def _sample_peak_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            out.append(proc.memory_info().rss)
        except psutil.Error:
            return
        time.sleep(0.05)


def _panicking_folder(src: Path, dest: Path) -> Path:
    """The default model with a tokenizer.json whose sentencepiece normalizer map is garbage:
    it loads, and tokenizers panics (index out of bounds) on the first text it normalizes."""
    dest.mkdir()
    for f in src.iterdir():
        if f.name != "tokenizer.json":
            (dest / f.name).symlink_to(f)
    tok = json.loads((src / "tokenizer.json").read_text())
    charsmap = struct.pack("<I", 4) + b"\xff" * 4 + b"\x00" * 8
    tok["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()}
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    return dest


# One planted template answers each attack by the last message's text (one model to load, not
# five) and renders the model's own template otherwise.
ATTACKS = {
    "bomb": "{{ 'x' * 100000000 }}",
    "overflow": "{% for i in range(10**9) %}{% endfor %}",  # the sandbox's OverflowError
    "zero": "{{ 1 / 0 }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "refuses": "{{ raise_exception('This model has no system role.') }}",
}


def _hostile_template(own: str) -> str:
    branches = "".join(f"{{%- {'if' if i == 0 else 'elif'} messages[-1].content == '{name}' -%}}{source}"
                       for i, (name, source) in enumerate(ATTACKS.items()))
    return branches + "{%- else -%}" + own + "{%- endif -%}"


@pytest.fixture(scope="module")
def hostile(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("templates")
    own = json.loads((default_model_dir / "tokenizer_config.json").read_text())["chat_template"]
    (tmp / "hostile.jinja").write_text(_hostile_template(own))
    (tmp / "openmlx.yaml").write_text(
        f"models:\n  - source: {default_model_dir}\n    id: hostile\n    chat_template: {tmp / 'hostile.jinja'}\n"
        f"  - source: {_panicking_folder(default_model_dir, tmp / 'panicky')}\n")
    # the default model preloaded (the rerank judge), the planted ones loaded once each and kept
    s = Server(["--config", str(tmp / "openmlx.yaml"), "--model", MODEL, "--max-models", "3",
                "--embedding-model", "none", "--audio-model", "none", "--max-queue", "16"])
    yield s
    s.stop()


def _chat(server: Server, model: str, messages=MSG, timeout: float = 300) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json={"model": model, "messages": messages,
                                                                  "max_tokens": 2}, timeout=timeout)


def test_a_template_building_100_mb_is_refused_fast_and_small(hostile):
    # loaded first (by a chat its template renders as the model's own): what is timed is the template
    assert _chat(hostile, "hostile").status_code == 200
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=_sample_peak_rss, args=(hostile.proc.pid, stop, samples), daemon=True)
    sampler.start()
    start = time.monotonic()
    try:
        r = _chat(hostile, "hostile", [{"role": "user", "content": "bomb"}])
    finally:
        stop.set()
        sampler.join()
    elapsed = time.monotonic() - start
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "100,000,000 characters" in r.json()["error"]["message"]
    assert elapsed < 15 and max(samples) < 2.5 * 2**30, (elapsed, max(samples) / 2**20)
    assert _chat(hostile, "hostile").status_code == 200  # and the server serves on


@pytest.mark.parametrize("model,content,status,code", [
    ("hostile", "overflow", 501, "chat_template_error"),  # range(10**9): a 500 with a traceback before
    ("hostile", "zero", 501, "chat_template_error"),
    ("hostile", "doubling", 400, "context_length_exceeded"),
    ("hostile", "refuses", 400, None),  # the template's own raise_exception: the messages' fault
    ("panicky", "Hi", 501, "tokenizer_error"),  # tokenizers' Rust PanicException (a BaseException)
])
def test_template_and_tokenizer_errors_are_never_a_500(hostile, model, content, status, code):
    messages = [{"role": "user", "content": content}]
    r = _chat(hostile, model, messages)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and "Traceback" not in error["message"], error
    count = httpx.post(hostile.url + "/v1/messages/count_tokens", json={"model": model, "messages": messages},
                       timeout=300)
    assert count.status_code == status, count.text
    assert _chat(hostile, "hostile").status_code == 200


@pytest.mark.parametrize("words", [20_000, 1_000_000])  # past the context in tokens; in characters too
def test_a_prompt_past_the_context_is_refused_without_reading_it_all(hostile, words):
    start = time.monotonic()
    r = _chat(hostile, MODEL, [{"role": "user", "content": "hello " * words}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert time.monotonic() - start < 15


# --- rerank: a query past the judge's context ------------------------------------------------------
CJK_QUERY = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(20_000))  # ~60k tokens read whole


def _rerank(server: Server, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(server.url + "/v1/rerank", json={"model": MODEL, **body}, timeout=timeout)


def test_a_20000_character_query_is_cut_to_what_the_judge_reads(hostile):
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=_sample_peak_rss, args=(hostile.proc.pid, stop, samples), daemon=True)
    sampler.start()
    start = time.monotonic()
    try:
        r = _rerank(hostile, {"query": CJK_QUERY, "documents": ["Paris is the capital of France.", "Cats sleep."]})
    finally:
        stop.set()
        sampler.join()
    elapsed = time.monotonic() - start
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 2 and all(0 < x["relevance_score"] < 1 for x in body["results"])
    # each judging prompt: the query's first 512 tokens, the document, the prompt around them
    assert 2 * 512 < body["usage"]["total_tokens"] < 2 * (512 + 200), body["usage"]
    assert elapsed < 60 and max(samples) < 3 * 2**30, (elapsed, max(samples) / 2**20)
    assert _chat(hostile, MODEL).status_code == 200  # the server serves on


@pytest.mark.slow  # ~5,000 tokens of judging: seconds alone on 2 cores, minutes on a busy machine
def test_a_short_chat_keeps_its_turn_during_a_long_rerank(hostile):
    long_document = "The history of the city goes back many centuries. " * 200  # cut to 1,024 tokens
    done: dict[str, float] = {}

    def rerank() -> None:
        r = _rerank(hostile, {"query": CJK_QUERY, "documents": [long_document] * 4}, timeout=1200)
        assert r.status_code == 200, r.text
        done["rerank"] = time.monotonic()

    worker = threading.Thread(target=rerank)
    start = time.monotonic()
    worker.start()
    time.sleep(1.0)  # the rerank is reading its first document
    r = _chat(hostile, MODEL)
    done["chat"] = time.monotonic()
    worker.join()
    assert r.status_code == 200, r.text
    # the query's start once, then 4 x 1,024 document tokens, in passes: the chat is answered between
    # them, well before the end
    assert done["chat"] < done["rerank"] and done["chat"] - start < 0.6 * (done["rerank"] - start), \
        {k: v - start for k, v in done.items()}


def test_a_rerank_past_the_request_budget_is_refused_before_any_judging(hostile):
    start = time.monotonic()
    r = _rerank(hostile, {"query": CJK_QUERY, "documents": ["x " * 2000] * 60})  # ~60 x 1,600 tokens
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "batch_too_large" and error["param"] == "documents", error
    assert time.monotonic() - start < 30


def test_the_judge_cuts_the_document_first_and_keeps_half_for_the_query():
    from engine.media.rerank import JudgeQuery, _cut

    query = JudgeQuery(ids=list(range(512)), overhead=40, room=600, yes=[1], no=[2])
    assert _cut(query, list(range(50))) == (512, 50)  # both fit
    assert _cut(query, list(range(1024))) == (300, 300)  # the document is cut first, the query to half
    short = JudgeQuery(ids=list(range(20)), overhead=40, room=600, yes=[1], no=[2])
    assert _cut(short, list(range(1024))) == (20, 580)
