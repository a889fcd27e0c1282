"""Prompt cache: the same greedy answer with and without a reused prefix; LRU bounds."""
from __future__ import annotations

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
