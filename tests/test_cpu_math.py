"""Attention and SwiGLU in numpy on the CPU fast path (engine/cpu/cpu_math.py): the same math as
MLX's own functions (random inputs, every mask form mlx-lm passes), the fallbacks, and on the
real default model the same greedy text with and without it, alone and in a left-padded batch."""
from __future__ import annotations

import types

import pytest

mx = pytest.importorskip("mlx.core")
import mlx.nn as nn  # noqa: E402

from engine.cpu import cpu_math  # noqa: E402


def rand(*shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


class Spy:
    """Stands in for MLX's function and counts the calls that fell back to it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def mlx_sdpa(q, k, v, cache, scale, mask, sinks=None):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)


@pytest.fixture
def sdpa():
    spy = Spy(mlx_sdpa)
    return cpu_math._attention(spy), spy


def close(a, b, tol=1e-5):
    return mx.abs(a - b).max().item() < tol


def test_causal_grouped_query_attention_matches_mlx(sdpa):
    """A chunk of 40 new rows over 100 cached keys (the queries sit at the end), 6 query heads
    sharing 2 key heads."""
    fn, spy = sdpa
    q, k, v = rand(1, 6, 40, 64, seed=1), rand(1, 2, 140, 64, seed=2), rand(1, 2, 140, 64, seed=3)
    got = fn(q, k, v, None, scale=0.125, mask="causal")
    assert spy.calls == 0 and got.shape == (1, 6, 40, 64)
    assert close(got, mlx_sdpa(q, k, v, None, 0.125, "causal"))
    assert close(fn(q, k, v, None, scale=0.125, mask=None), mlx_sdpa(q, k, v, None, 0.125, None))


def test_left_padded_batch_mask_matches_and_stays_finite(sdpa):
    """mlx-lm's batch mask (B, 1, L, S): the shorter prompt's padding rows see no key at all.
    Those rows must stay finite (NaN there would poison the next layer's keys), the rest match."""
    fn, spy = sdpa
    q, k, v = rand(2, 6, 64, 64, seed=4), rand(2, 2, 64, 64, seed=5), rand(2, 2, 64, 64, seed=6)
    pad = mx.array([0, 24])
    cols, rows = mx.arange(64), mx.arange(64)[:, None]
    mask = (cols[None] <= rows[None]) & (pad[:, None, None] <= cols[None])
    mask = mask[:, None]  # (2, 1, 64, 64), as BatchKVCache.make_mask returns
    got = fn(q, k, v, None, scale=0.125, mask=mask)
    assert spy.calls == 0
    assert not mx.isnan(got).any().item()
    want = mlx_sdpa(q, k, v, None, 0.125, mask)
    assert close(got[0], want[0]) and close(got[1, :, 24:], want[1, :, 24:])


def test_per_head_mask_matches(sdpa):
    fn, _ = sdpa
    q, k, v = rand(1, 6, 50, 64, seed=7), rand(1, 2, 50, 64, seed=8), rand(1, 2, 50, 64, seed=9)
    mask = mx.random.uniform(shape=(1, 6, 50, 50), key=mx.random.key(10)) > 0.3
    mask = mask | mx.eye(50, dtype=mx.bool_)  # every row sees something
    assert close(fn(q, k, v, None, scale=0.125, mask=mask), mlx_sdpa(q, k, v, None, 0.125, mask))


@pytest.mark.parametrize("case", ["small", "additive mask", "float16", "sinks", "quantized cache"])
def test_what_it_does_not_cover_goes_to_mlx(sdpa, case):
    fn, spy = sdpa
    q, k, v = rand(1, 6, 40, 64, seed=1), rand(1, 2, 140, 64, seed=2), rand(1, 2, 140, 64, seed=3)
    mask, cache, sinks = "causal", None, None
    if case == "small":  # one decode row over a short context: stays lazy in MLX
        q = q[:, :, :1]
    elif case == "additive mask":
        mask = mx.zeros((40, 140))
    elif case == "float16":
        q, k, v = (a.astype(mx.float16) for a in (q, k, v))
    elif case == "sinks":
        sinks = mx.zeros((6,))
    elif case == "quantized cache":
        cache = types.SimpleNamespace(bits=8, group_size=64)
        spy.fn = lambda *a, **kw: mx.zeros((1, 6, 40, 64))  # MLX's quantized path needs a real cache
    fn(q, k, v, cache, scale=0.125, mask=mask, sinks=sinks)
    assert spy.calls == 1


def test_disabled_means_mlx(sdpa):
    fn, spy = sdpa
    q, k, v = rand(1, 6, 40, 64, seed=1), rand(1, 2, 140, 64, seed=2), rand(1, 2, 140, 64, seed=3)
    with cpu_math.disabled():
        fn(q, k, v, None, scale=0.125, mask="causal")
    assert spy.calls == 1 and cpu_math.enabled()


def test_swiglu_matches_mlx():
    spy = Spy(lambda g, x: nn.silu(g) * x)
    fn = cpu_math._swiglu(spy)
    gate, x = rand(32, 1536, seed=11) * 4, rand(32, 1536, seed=12)
    assert close(fn(gate, x), nn.silu(gate) * x, 1e-5) and spy.calls == 0
    fn(gate[:1], x[:1])  # one decode row: stays in MLX
    assert spy.calls == 1


def test_install_rebinds_the_model_module_once(monkeypatch):
    from mlx_lm.models import activations, base, llama

    monkeypatch.setattr(llama, "scaled_dot_product_attention", base.scaled_dot_product_attention)
    monkeypatch.setattr(llama, "swiglu", activations.swiglu)
    model = llama.Model.__new__(llama.Model)
    assert cpu_math.install(model) == ["scaled_dot_product_attention", "swiglu"]
    wrapped = llama.swiglu
    assert wrapped is not activations.swiglu and wrapped.openmlx_original is activations.swiglu
    cpu_math.install(model)
    assert llama.swiglu is wrapped  # not wrapped twice

    class Elsewhere(nn.Module):
        pass

    assert cpu_math.install(Elsewhere()) == []  # a module with neither name: nothing to do

    def swiglu(x):  # a module's own function of the same name, another signature: left alone
        return x

    monkeypatch.setattr(llama, "swiglu", swiglu)
    assert cpu_math.install(model) == ["scaled_dot_product_attention"] and llama.swiglu is swiglu


# --- the real model -------------------------------------------------------------------------
@pytest.fixture
def numpy_calls(monkeypatch):
    """Counts the attention calls that took the numpy path (so a test can't pass by never
    taking it)."""
    spy = Spy(cpu_math.attention)
    monkeypatch.setattr(cpu_math, "attention", spy)
    return spy


@pytest.fixture(scope="module")
def runner(default_model_dir):
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine.generation.text import TextRunner

    r = TextRunner.load("m", probe(default_model_dir), "float32", MemoryGate())
    yield r
    r.close()


def long_prompt(runner):
    from bench.workload import FILLER
    from engine.request import ChatMessage

    text = "Summarise this text. " + " ".join(f"Day {i}: " + FILLER for i in range(12))
    return runner.encode_chat([ChatMessage("user", text)])


def greedy(runner, prompt, n=24):
    from engine.request import SamplingParams, TextDelta

    runner.prompt_cache.clear()
    events = runner.generate(prompt, n, SamplingParams(temperature=0.0), lambda: False)
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_real_model_same_greedy_text_and_close_logits(runner, numpy_calls):
    """A short chat and a ~500-token prompt (two 256-token passes, the second over cached keys):
    the same greedy answer as MLX's own attention and SwiGLU; logits within float rounding."""
    from engine.request import ChatMessage

    prompts = [runner.encode_chat([ChatMessage("user", "List the planets of the solar system in order.")]),
               long_prompt(runner)]
    assert len(prompts[1]) > 400
    for prompt in prompts:
        fast = greedy(runner, prompt)
        with cpu_math.disabled():
            plain = greedy(runner, prompt)
        assert fast == plain and len(fast) > 20
    assert numpy_calls.calls >= 60  # the long prompt's two passes through 30 layers, at least
    ids = mx.array(prompts[1])[None]
    a = runner.model(ids)[0, -1]
    with cpu_math.disabled():
        b = runner.model(ids)[0, -1]
    assert mx.abs(a - b).max().item() / mx.abs(b).max().item() < 1e-4


def test_real_model_left_padded_batch_gives_the_same_text(runner, numpy_calls):
    """Two prompts of different lengths decoded together through mlx-lm's BatchGenerator (left
    padding, 4-D boolean masks): each answer equals MLX's own math's."""
    from mlx_lm.generate import BatchGenerator

    from engine.request import ChatMessage

    prompts = [long_prompt(runner)[:300],
               runner.encode_chat([ChatMessage("user", "Name three colours and a fruit. " * 8)])]

    def batch() -> list[list[int]]:
        gen = BatchGenerator(runner.model, stop_tokens=[], prefill_step_size=256)
        uids = gen.insert(prompts, max_tokens=[12, 12])
        out: dict[int, list[int]] = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(r.token)
        gen.close()
        return [out[u] for u in uids]

    fast = batch()
    assert numpy_calls.calls >= 30
    with cpu_math.disabled():
        plain = batch()
    assert fast == plain and all(len(t) == 12 for t in fast)
