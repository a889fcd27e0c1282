"""Logits for a pass's last rows only (engine/generation/last_rows.py): found and checked on the real model,
refused where the model's call is not backbone -> head."""
from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")

from engine.generation.last_rows import split_head  # noqa: E402


def tiny_llama(tied: bool):
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97,
                           tie_word_embeddings=tied)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_split_gives_the_model_s_last_rows(tied):
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_llama(tied)
    split = split_head(model)
    assert split is not None
    ids = mx.array([[5, 9, 2, 7, 11, 3, 8]])
    a, b = make_prompt_cache(model), make_prompt_cache(model)
    want = model(ids, cache=a)[:, -3:]
    got = split(ids, b, 3)
    assert got.shape == want.shape and mx.allclose(got, want, atol=1e-5).item()
    assert a[0].offset == b[0].offset == 7  # the cache took every row


def test_a_model_that_scales_its_logits_is_refused():
    model = tiny_llama(True)

    class Scaled(type(model)):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return 2.0 * super().__call__(inputs, cache, input_embeddings)

    model.__class__ = Scaled
    assert split_head(model) is None


def test_the_default_model_splits(default_model_dir):
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine.generation.text import TextRunner

    runner = TextRunner.load("m", probe(default_model_dir), "float32", MemoryGate())
    try:
        assert runner.last_rows is not None
    finally:
        runner.close()
