"""A lone stream's one-token decode steps in numpy (engine/cpu/decode.py), on the real default
model: the same logits as the model's own step within float rounding, step after step and across
the KV buffer's growth; the same greedy text plain and speculating; a shared prompt-cache entry is
never written through; the choice is measured, cached and can be switched off; anything the step
doesn't compute keeps MLX. The tests build the step themselves: which path a machine picks is a
measurement (bench.decode), not something a test can promise."""
from __future__ import annotations

import json

import pytest

mx = pytest.importorskip("mlx.core")
import numpy as np  # noqa: E402

from engine.cpu import decode, decode_choice  # noqa: E402


@pytest.fixture(scope="module")
def runner(default_model_dir):
    """The default model as float32, its lone streams through the numpy step whatever this
    machine's measurement chose (`runner.solo._step` is the step)."""
    from engine.generation.text import TextRunner
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe

    loaded = TextRunner.load("m", probe(default_model_dir), "float32", MemoryGate())
    loaded.solo = decode.FastDecode(loaded.model, decode.checked_step(loaded.model), "test")
    return loaded


def greedy(runner, prompt: str, n: int = 24, solo=True, speculate: str = "off") -> tuple[str, list]:
    from engine.generation.speculative import Speculation
    from engine.generation.text import ChatMessage, Finished, SamplingParams, TextDelta

    saved, saved_spec = runner.solo, runner.speculation
    runner.solo = saved if solo else None
    runner.speculation = Speculation(mode=speculate)
    runner.prompt_cache.clear()
    try:
        ids = runner.encode_chat([ChatMessage("user", prompt)])
        events = list(runner.generate(ids, n, SamplingParams(temperature=0.0), lambda: False))
    finally:
        runner.solo, runner.speculation = saved, saved_spec
    return "".join(e.text for e in events if isinstance(e, TextDelta)), [e for e in events if isinstance(e, Finished)]


def test_the_default_model_checks_out_and_the_choice_says_why(runner):
    """The step matched the model's logits at load; which path decodes is this machine's
    measurement, named with its figures either way."""
    assert runner.decode_path.startswith(("numpy cblas_sgemv (", "numpy numpy (", "mlx (numpy step slower here: "))
    assert "ms a step against MLX's" in runner.decode_path


def steps_agree(model, step, prompt_len: int, steps: int) -> float:
    """Feed the same tokens to the model's own step and to the numpy step, each over its own
    cache; return the largest logit difference relative to the logits' scale."""
    from mlx_lm.models.cache import make_prompt_cache

    prompt = mx.array([[(7 * i + 3) % 4000 + 10 for i in range(prompt_len)]])
    theirs, ours = make_prompt_cache(model), make_prompt_cache(model)
    mx.eval(model(prompt, cache=theirs), model(prompt, cache=ours))
    token, worst = 42, 0.0
    for _ in range(steps):
        want = np.array(model(mx.array([[token]]), cache=theirs)[0, -1])
        got = step(token, ours)
        assert got.shape == want.shape and np.isfinite(got).all()
        assert int(got.argmax()) == int(want.argmax())
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        token = int(want.argmax())
    assert ours[0].offset == theirs[0].offset == prompt_len + steps
    return worst


def test_logits_match_the_models_own_step(runner):
    assert steps_agree(runner.model, runner.solo._step, 12, 20) < 1e-4


def test_logits_match_across_the_kv_buffers_growth(runner):
    """250 prompt tokens, then steps past position 256: the step copies into a bigger buffer."""
    assert steps_agree(runner.model, runner.solo._step, 250, 12) < 1e-4


@pytest.mark.parametrize("prompt", ["Tell me a story about a dragon.", "What is the capital of France?",
                                    "Write a haiku about the sea."])
def test_same_greedy_text_as_mlx(runner, prompt):
    fast, done = greedy(runner, prompt)
    slow, _ = greedy(runner, prompt, solo=False)
    assert fast == slow and done[0].completion_tokens >= 8


def test_speculating_mixes_numpy_steps_and_mlx_passes_with_the_same_text(runner):
    """Prompt lookup drafts here (the answer repeats the prompt's list): passes of several rows run
    in MLX, passes of one in numpy, over the same cache, trimmed after rejected guesses."""
    prompt = ('Copy this JSON record, then say what field she worked in:\n'
              '{"name": "Ada Lovelace", "born": 1815, "city": "London", "field": "mathematics"}')
    fast, done = greedy(runner, prompt, n=32, speculate="ngram")
    slow, _ = greedy(runner, prompt, n=32, solo=False, speculate="ngram")
    assert fast == slow and done[0].drafted > 0 and done[0].accepted > 0


def test_a_shared_prompt_cache_entry_is_never_written_through(runner):
    """An entry shared with another conversation is copied into a buffer of the step's own
    before the step writes its first position; the entry's arrays keep their values."""
    from mlx_lm.models.cache import make_prompt_cache

    from engine.generation.prompt_cache import PromptCache

    cache = make_prompt_cache(runner.model)
    tokens = list(range(100, 140))
    mx.eval(runner.model(mx.array([tokens]), cache=cache))
    store = PromptCache()
    store.put(tokens, cache)
    before = [np.array(c.keys) for c in cache]
    shared, n = store.take(tokens[:30] + [5, 6, 7])
    assert n == 30 and shared is not None
    for token in (5, 6, 7, 8):
        runner.solo._step(token, shared)
    entry = store._entries[next(iter(store._entries))].cache
    assert all(np.array_equal(np.array(c.keys), b) for c, b in zip(entry, before))
    assert shared[0].offset == 34


def test_a_cache_it_owns_is_written_in_place(runner):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(runner.model)
    mx.eval(runner.model(mx.array([[1, 2, 3]]), cache=cache))
    runner.solo._step(4, cache)
    buffer = cache[0].keys
    runner.solo._step(5, cache)
    assert cache[0].keys is buffer and cache[0].offset == 5


def test_the_choice_is_measured_once_and_cached(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENMLX_HOME", str(tmp_path))
    model = runner.model
    first, why = decode_choice.install(model)
    saved = json.loads((tmp_path / "decode.json").read_text())
    (own, ours), = saved.values()
    assert own > 0 and ours > 0 and f"{ours * 1000:.0f} ms a step" in why

    def no_measuring(*_):
        raise AssertionError("measured again")

    monkeypatch.setattr(decode_choice, "_measure", no_measuring)
    second, again = decode_choice.install(model)
    assert again == why
    # A machine where the numpy step measured slower keeps MLX.
    key = next(iter(saved))
    (tmp_path / "decode.json").write_text(json.dumps({key: [0.01, 0.02]}))
    kept, slower = decode_choice.install(model)
    assert kept is model and slower.startswith("mlx (numpy step slower here")


def test_switched_off_and_unsupported_models_keep_mlx(runner, monkeypatch, default_model_dir):
    monkeypatch.setenv("OPENMLX_FAST_DECODE", "off")
    assert decode_choice.install(runner.model) == (runner.model, "mlx (OPENMLX_FAST_DECODE=off)")
    monkeypatch.delenv("OPENMLX_FAST_DECODE")
    from engine.generation.text import TextRunner
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe

    quantized = TextRunner.load("q", probe(default_model_dir), "keep", MemoryGate())
    assert quantized.solo is quantized.model and quantized.decode_path == "mlx"
    model, why = decode_choice.install(quantized.model)
    assert model is quantized.model and why.startswith("mlx (numpy step: ") and "float32" in why


def test_several_rows_and_other_caches_take_the_models_own_call(runner):
    from mlx_lm.models.cache import RotatingKVCache

    calls = []
    fast = decode.FastDecode(lambda inputs, cache=None, **kw: calls.append(inputs.shape) or "own",
                             runner.solo._step, "test")
    assert fast(mx.array([[1, 2]]), cache=[]) == "own"
    assert fast(mx.array([[1]]), cache=[RotatingKVCache(max_size=8)]) == "own"
    assert fast(mx.array([[1]]), cache=None) == "own"
    assert calls == [(1, 2), (1, 1), (1, 1)]


def test_a_lone_stream_takes_the_numpy_step_with_concurrent_streams_batched(runner, monkeypatch):
    """The server batches concurrent streams (`--batch`, its default): a stream that starts alone
    with speculation off still decodes through the solo step, a token a pass (through the batch
    it took MLX's step: 6 against 14 tok/s on Qwen2.5-Coder-0.5B here), with the same text."""
    from engine.generation.batching import BatchDecoder
    from engine.generation.text import _eos_ids

    plain, _ = greedy(runner, "Tell me a story about a dragon.")
    passes = []
    step = runner.solo._step
    counted = decode.FastDecode(runner.model, lambda token, cache: passes.append(token) or step(token, cache), "test")
    monkeypatch.setattr(runner, "solo", counted)
    monkeypatch.setattr(runner, "decoder", BatchDecoder(runner.model, _eos_ids(runner.tokenizer)))
    try:
        batched, done = greedy(runner, "Tell me a story about a dragon.")
    finally:
        runner.decoder.close()
    assert batched == plain
    assert len(passes) == done[0].completion_tokens - 1  # every token after the prompt's pass
