"""Prompt cache: the same greedy answer with and without a reused prefix; LRU bounds."""
from __future__ import annotations

import json

import pytest

from engine.generation.prompt_cache import PromptCache, common_prefix


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


@pytest.fixture(scope="module")
def runner(default_model_dir):
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine.generation.text import TextRunner

    return TextRunner.load("m", probe(default_model_dir), "float32", MemoryGate())


def answer(runner, messages):
    from engine.generation.text import ChatMessage, SamplingParams, TextDelta

    ids = runner.encode_chat([ChatMessage(r, c) for r, c in messages])
    return "".join(e.text for e in runner.generate(ids, 12, SamplingParams(temperature=0), lambda: False)
                   if isinstance(e, TextDelta))


def test_reuse_gives_the_same_answer(runner):
    turn1 = [("user", "Tell me about Paris in one sentence.")]
    runner.prompt_cache.clear()
    first = answer(runner, turn1)
    turn2 = turn1 + [("assistant", first), ("user", "And about Rome?")]
    hits = runner.prompt_cache.hits
    cached = answer(runner, turn2)
    assert runner.prompt_cache.hits == hits + 1
    runner.prompt_cache.clear()
    misses = runner.prompt_cache.misses
    fresh = answer(runner, turn2)
    assert runner.prompt_cache.misses == misses + 1
    assert cached == fresh


def test_bounds(runner):
    from mlx_lm.models.cache import make_prompt_cache
    import mlx.core as mx

    pc = PromptCache(max_entries=2, min_reuse=2)
    for i in range(3):
        cache = make_prompt_cache(runner.model)
        runner.model(mx.array([[1, 2, 3 + i]]), cache=cache)
        pc.put([1, 2, 3 + i], cache)
    assert len(pc._entries) == 2
    got, n = pc.take([1, 2, 5, 9])
    assert got is not None and n == 3 and len(pc._entries) == 1
    assert pc.take([7, 7, 7])[0] is None


def started(runner, messages, max_tokens=8):
    """(cached prompt tokens, prompt tokens, text) of one greedy generation."""
    from engine.generation.text import ChatMessage, SamplingParams, Started, TextDelta

    ids = runner.encode_chat([ChatMessage(r, c) for r, c in messages])
    events = list(runner.generate(ids, max_tokens, SamplingParams(temperature=0), lambda: False))
    start = next(e for e in events if isinstance(e, Started))
    return start.cached_tokens, len(ids), "".join(e.text for e in events if isinstance(e, TextDelta))


def test_interleaved_conversations_keep_their_own_history(runner):
    """Issue 34: agents share a system prompt; A1 B1 A2 B2. A conversation's next turn finds its
    own history, not just the shared prefix, and a copy handed to another conversation never
    changes what the entry holds (the answers equal a fresh computation's)."""
    system = [("system", "You are a careful assistant. Answer in one short sentence. " * 6)]
    a1 = system + [("user", "Tell me about Paris.")]
    b1 = system + [("user", "Tell me about Rome.")]
    runner.prompt_cache.clear()
    _, a1_len, a1_text = started(runner, a1)
    cached_b1, _, b1_text = started(runner, b1)
    assert cached_b1 > 40  # the shared system prompt
    a2 = a1 + [("assistant", a1_text), ("user", "And its river?")]
    b2 = b1 + [("assistant", b1_text), ("user", "And its river?")]
    cached_a2, _, a2_text = started(runner, a2)
    cached_b2, _, b2_text = started(runner, b2)
    assert cached_a2 >= a1_len and cached_b2 >= a1_len - 8, (cached_a2, cached_b2, a1_len)
    runner.prompt_cache.clear()
    assert started(runner, a2)[2] == a2_text and started(runner, b2)[2] == b2_text


def test_a_shared_prefix_is_copied_not_taken(runner):
    from mlx_lm.models.cache import make_prompt_cache
    import mlx.core as mx

    pc = PromptCache(min_reuse=2)
    cache = make_prompt_cache(runner.model)
    runner.model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    pc.put([1, 2, 3, 4, 5], cache)
    for _ in range(3):  # three requests on the same prefix: each gets it, the entry stays whole
        got, n = pc.take([1, 2, 3, 9, 9])
        assert n == 3 and got[0].offset == 3 and got is not cache
        runner.model(mx.array([[9, 9]]), cache=got)  # extending the copy leaves the entry alone
    assert len(pc._entries) == 1 and cache[0].offset == 5
    assert pc.hits == 3


def test_the_next_turn_takes_its_entry_over_even_when_the_client_rewrote_the_answer(runner):
    """An entry holds a prompt and the model's answer; the conversation's next turn holds the whole
    prompt but its own copy of the answer (a tool call in the client's words, a tool result): the
    entry is handed over, cut back to the prompt, not copied and left behind (where its stale
    answer would take memory until the byte bound threw out some conversation's history)."""
    from mlx_lm.models.cache import make_prompt_cache
    import mlx.core as mx

    pc = PromptCache(min_reuse=2)
    cache = make_prompt_cache(runner.model)
    runner.model(mx.array([[1, 2, 3, 4, 5, 6, 7]]), cache=cache)
    pc.put([1, 2, 3, 4, 5, 6, 7], cache, prompt_len=5)  # 6, 7: the model's answer
    again, n = pc.take([1, 2, 3, 4, 5])  # the same request again: the entry stays for others
    assert n == 4 and again is not cache and len(pc._entries) == 1
    got, n = pc.take([1, 2, 3, 4, 5, 8, 9, 10])  # the next turn, with the client's answer 8, 9
    assert n == 5 and got is cache and got[0].offset == 5 and len(pc._entries) == 0


def test_agents_with_tool_results_keep_every_turns_history(runner):
    """Three agents share a system prompt and take turns; every later turn carries an assistant
    message and a tool result written by the client. Each turn finds its own previous turn cached,
    with room for three entries only: one per conversation, none left behind with a stale answer."""
    system = [("system", "You are a careful coding agent. Use the tools. Keep answers short. " * 8)]
    history = {a: system + [("user", f"Task {a}: fix test {a}.")] for a in "ABC"}
    runner.prompt_cache.clear()
    saved, runner.prompt_cache.max_entries = runner.prompt_cache.max_entries, 3
    previous = {}
    try:
        for turn in range(3):
            for a in "ABC":
                cached, length, _ = started(runner, history[a], max_tokens=4)
                if turn:
                    assert cached >= previous[a], (a, turn, cached, previous[a])
                previous[a] = length
                history[a] = history[a] + [("assistant", f"I will read src/{a}{turn}.py first."),
                                           ("user", f"def f{turn}(x):\n    return x + {turn}\n")]
    finally:
        runner.prompt_cache.max_entries = saved


# --- on disk (--prompt-cache-dir) ---------------------------------------------------------------
LONG = [("system", "You are a coding agent with tools for files and shells. " * 8), ("user", "List the files.")]


def test_disk_cache_survives_a_new_cache_and_gives_the_same_answer(runner, tmp_path):
    from engine.generation.prompt_store import PromptStore

    runner.prompt_cache.clear()
    runner.prompt_cache.disk = PromptStore(tmp_path, "model-a", 1 << 30)
    try:
        _, prompt_len, first = started(runner, LONG)
        runner.prompt_cache.disk.flush()
        assert len(list(runner.prompt_cache.disk.folder.glob("*.safetensors"))) == 1
        # "A restart": memory empty, a new store over the same folder.
        runner.prompt_cache.disk.close()
        runner.prompt_cache.clear()
        runner.prompt_cache.disk = PromptStore(tmp_path, "model-a", 1 << 30)
        cached, _, again = started(runner, LONG)
        assert cached >= prompt_len - 1 and again == first
        # Another model's identity never reads these files.
        runner.prompt_cache.disk.close()
        runner.prompt_cache.clear()
        runner.prompt_cache.disk = PromptStore(tmp_path, "model-b", 1 << 30)
        assert started(runner, LONG)[0] == 0
    finally:
        runner.prompt_cache.disk.close()
        runner.prompt_cache.disk = None
        runner.prompt_cache.clear()


def test_unreadable_files_are_removed_not_fatal(tmp_path):
    from engine.generation.prompt_store import PromptStore

    store = PromptStore(tmp_path, "model-a", 1 << 30)
    store.close()
    (store.folder / "junk.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    (store.folder / "half.tmp").write_bytes(b"partial")
    store = PromptStore(tmp_path, "model-a", 1 << 30)
    store.close()
    assert not any(store.folder.iterdir())
    assert store.best([1, 2, 3]) == (None, 0)


def test_disk_bound_removes_least_recently_used(runner, tmp_path):
    from mlx_lm.models.cache import make_prompt_cache
    import mlx.core as mx

    from engine.generation.prompt_store import PromptStore

    store = PromptStore(tmp_path, "model-a", 1 << 30)
    sizes = []
    for first in (5, 6, 7):
        tokens = [first] + list(range(10, 50))
        cache = make_prompt_cache(runner.model)
        runner.model(mx.array([tokens]), cache=cache)
        store.save(tokens, cache)
        store.flush()
        sizes.append(sum(f.stat().st_size for f in store.folder.glob("*.safetensors")))
    store.max_bytes = sizes[0] * 2  # room for two
    store._bound()
    store.close()
    kept = sorted(json.loads(__import__("safetensors").safe_open(str(p), framework="numpy").metadata()["tokens"])[0]
                  for p in store.folder.glob("*.safetensors"))
    assert kept == [6, 7]


def test_server_restart_keeps_the_prompt_cache(default_model_dir, tmp_path):
    import httpx

    from conftest import MODEL
    from tests.process import Server

    messages = [{"role": r, "content": c} for r, c in LONG]
    usages = []
    for _ in range(2):
        s = Server(["--prompt-cache-dir", str(tmp_path), "--embedding-model", "none", "--audio-model", "none"])
        try:
            r = httpx.post(s.url + "/v1/chat/completions", timeout=120,
                           json={"model": MODEL, "messages": messages, "max_tokens": 2})
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"])
            import time

            deadline = time.monotonic() + 60  # the file is written by a thread of its own, after the answer
            while not list(tmp_path.rglob("*.safetensors")) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            s.stop()
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= usages[1]["prompt_tokens"] - 1


# --- --kv-bits: entries quantized instead of dropped when the bytes run out --------------------
def _kv(tokens: int, width: int = 64, layers: int = 2, seed: int = 0) -> list:
    """Plain KV caches over `tokens` positions of random keys and values."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    mx.random.seed(seed)
    cache = []
    for _ in range(layers):
        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, 2, tokens, width)), mx.random.normal((1, 2, tokens, width)))
        cache.append(c)
    return cache


def _exact_bytes(tokens: int, width: int = 64, layers: int = 2) -> int:
    return layers * 2 * (2 * tokens * width * 4)  # keys and values, 2 heads, float32


def test_kv_bits_quantizes_the_least_recently_used_entry_instead_of_dropping_it():
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    a, b = list(range(100)), list(range(1000, 1100))
    for bits in (8, 4):
        pc = PromptCache(min_reuse=2, max_bytes=int(1.5 * _exact_bytes(100)))
        pc.kv_bits = bits
        quantize, readings = pc._quantize, []

        def watched(entry):  # what /health would read while an entry is being quantized
            readings.append(pc.sizes()[1])
            return quantize(entry)

        pc._quantize = watched
        original = _kv(100, seed=1)
        keys = mx.array(original[0].keys[..., :100, :])
        pc.put(a, original)
        pc.put(b, _kv(100, seed=2))  # over the bound: a is quantized, not dropped
        entries, held, _, quantized = pc.sizes()
        assert (entries, quantized) == (2, 1) and held <= pc.max_bytes, (entries, quantized, held)
        assert held < _exact_bytes(100) * (1 + (9 if bits == 8 else 5) / 32 + 0.01)
        assert readings and max(readings) <= pc.max_bytes, readings  # room is made before b counts
        got, n = pc.take(a + [7, 7])  # a's next turn: handed back plain, close to what was put
        assert n == 100 and all(type(c) is KVCache and c.offset == 100 for c in got)
        error = float(mx.max(mx.abs(got[0].keys - keys)))
        assert 0 < error < (0.05 if bits == 8 else 0.8), error
        assert pc.sizes()[:1] == (1,)  # taken over, as an exact entry would be

    pc = PromptCache(min_reuse=2, max_bytes=int(1.5 * _exact_bytes(100)))  # without --kv-bits: dropped
    pc.put(a, _kv(100, seed=1))
    pc.put(b, _kv(100, seed=2))
    assert pc.sizes()[0] == 1 and pc.take(a + [7])[0] is None


def test_counted_per_token_an_entry_costs_what_its_arrays_take():
    """On ranks (token_bytes set) an entry counts its tokens times the whole model's KV bytes per
    token, the same number on every rank. For a shard that is the whole model the count must be
    the arrays' own bytes, exact and quantized alike (mx.quantize's packing, scales and biases)."""
    from engine.generation.prompt_cache import _compact, _nbytes, _quantized

    for bits, group in ((8, 64), (4, 64), (8, 32), (4, 128)):
        pc = PromptCache()
        pc.token_bytes = 2 * 2 * 2 * 128 * 4  # 2 layers, keys and values, 2 heads of 128, float32
        exact = _compact(_kv(96, width=128))  # as put() keeps it: exactly as long as it holds
        assert pc._cost(exact) == _nbytes(exact) == 96 * pc.token_bytes
        quantized = _quantized(exact, bits, group)
        assert pc._cost(quantized) == _nbytes(quantized), (bits, group)


def test_kv_bits_a_shared_prefix_of_a_quantized_entry_is_a_plain_copy():
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    pc = PromptCache(min_reuse=2, max_bytes=_exact_bytes(100) // 2)  # alone over the bound: kept quantized
    pc.kv_bits = 8
    pc.put(list(range(100)), _kv(100))
    assert pc.sizes()[3] == 1
    for _ in range(2):  # another conversation with the same first 60 tokens, twice: the entry stays
        got, n = pc.take(list(range(60)) + [5000, 5001])
        assert n == 60 and all(type(c) is KVCache and c.keys.shape[2] == 60 for c in got)
    assert all(type(c) is QuantizedKVCache and c.offset == 100 for c in next(iter(pc._entries.values())).cache)
    assert pc.hits == 2


def test_kv_bits_leaves_what_it_cannot_quantize():
    """Keys whose width is not whole groups are dropped as before; an entry still being read
    (offered to waiting requests, sharing the running cache) is never quantized."""
    from mlx_lm.models.cache import KVCache

    pc = PromptCache(min_reuse=2, max_bytes=int(1.5 * _exact_bytes(100, width=80)))
    pc.kv_bits = 8
    pc.put(list(range(100)), _kv(100, width=80))
    pc.put(list(range(1000, 1100)), _kv(100, width=80))
    assert pc.sizes()[0] == 1 and pc.sizes()[3] == 0

    pc = PromptCache(min_reuse=2, max_bytes=int(1.5 * _exact_bytes(100)))
    pc.kv_bits = 8
    pc.share(list(range(100)), _kv(100))
    pc.put(list(range(1000, 1100)), _kv(100))
    offered, kept = pc._entries.values()
    assert offered.offered and all(type(c) is KVCache for c in offered.cache) and pc.sizes()[3] == 1


def test_kv_bits_conversations_keep_their_history_and_answer_alike(runner):
    """Issue 34 §5 on the real model: with room for about one exact history, two conversations
    both keep theirs (the older one quantized to 8 bits); each next turn finds its own prompt
    cached and gives the answer it gives from a fresh computation."""
    from engine.models.weights import kv_bytes_per_token

    system = [("system", "You are a careful assistant. Answer in one short sentence. " * 6)]
    a1 = system + [("user", "Tell me about Paris.")]
    b1 = system + [("user", "Tell me about the moon and its phases.")]
    pc = runner.prompt_cache
    saved = pc.max_bytes, pc.kv_bits
    try:
        pc.clear()
        pc.kv_bits = 8
        _, a1_len, a1_text = started(runner, a1)
        pc.max_bytes = int(1.4 * (a1_len + 8) * kv_bytes_per_token(runner.config))
        _, b1_len, b1_text = started(runner, b1)
        assert pc.sizes()[3] >= 1 and pc.nbytes <= pc.max_bytes, pc.sizes()
        a2 = a1 + [("assistant", a1_text), ("user", "And its river?")]
        b2 = b1 + [("assistant", b1_text), ("user", "And the sun?")]
        cached_a2, _, a2_text = started(runner, a2)
        cached_b2, _, b2_text = started(runner, b2)
        assert cached_a2 >= a1_len and cached_b2 >= b1_len, (cached_a2, a1_len, cached_b2, b1_len)
        pc.clear()
        pc.kv_bits = None
        assert started(runner, a2)[2] == a2_text and started(runner, b2)[2] == b2_text
    finally:
        pc.clear()
        pc.max_bytes, pc.kv_bits = saved


def test_server_kv_bits_keeps_more_histories_and_says_so(default_model_dir):
    """`--kv-bits 8` through the API: with a bound that holds about one exact history, the older
    conversation is kept quantized (`/health` counts it), never over the bound, and its next turn
    reports its whole first prompt cached."""
    import httpx

    from conftest import MODEL
    from engine.models.probe import probe
    from engine.models.weights import kv_bytes_per_token
    from tests.process import Server

    per_token = kv_bytes_per_token(probe(default_model_dir).config)
    a1 = [{"role": r, "content": c} for r, c in LONG]
    b1 = [{"role": "system", "content": LONG[0][1]}, {"role": "user", "content": "Show the disk usage."}]
    s = Server(["--kv-bits", "8", "--prompt-cache-bytes", str(int(1.4 * 130 * per_token)),
                "--embedding-model", "none", "--audio-model", "none"])
    try:
        def chat(messages):
            r = httpx.post(s.url + "/v1/chat/completions", timeout=120,
                           json={"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()

        first = chat(a1)
        assert 100 <= first["usage"]["prompt_tokens"] <= 125, first["usage"]  # the bound assumes so
        chat(b1)
        cache = httpx.get(s.url + "/health").json()["prompt_cache"]
        assert cache["entries"] == 2 and cache["quantized"] >= 1 and cache["bytes"] <= 1.4 * 130 * per_token, cache
        a2 = a1 + [first["choices"][0]["message"], {"role": "user", "content": "And the hidden ones?"}]
        usage = chat(a2)["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1, usage
    finally:
        s.stop()
