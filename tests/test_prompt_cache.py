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
