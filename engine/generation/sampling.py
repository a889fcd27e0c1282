"""Sampling for one request: the sampler (greedy, or top-k/top-p with the request's own random
key) and OpenAI's presence/frequency penalties as an mlx-lm logits processor."""
from __future__ import annotations

import os
from typing import Callable, Optional

import mlx.core as mx


def penalty_processor(presence: float, frequency: float, vocab: int) -> Callable[[mx.array, mx.array], mx.array]:
    """OpenAI's presence/frequency penalties over the tokens generated so far (not the prompt)."""
    state = {"prompt_len": None, "counts": mx.zeros((vocab,), dtype=mx.float32), "seen": 0}

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if state["prompt_len"] is None:
            state["prompt_len"] = tokens.size
            state["seen"] = tokens.size
        new = tokens[state["seen"]:]
        if new.size:
            state["counts"] = state["counts"].at[new].add(1.0)
            state["seen"] = tokens.size
        counts = state["counts"][: logits.shape[-1]]
        return logits - counts * frequency - (counts > 0).astype(logits.dtype) * presence

    return process


def make_sampler(temperature: float, top_p: float, seed: Optional[int], top_k: int = 0) -> Callable[[mx.array], mx.array]:
    """Greedy at temperature 0; else top-p + categorical with a per-request random key.

    A key of its own (not MLX's global RNG) keeps `seed` deterministic while other requests'
    streams are decoded in between.
    """
    from mlx_lm.sample_utils import apply_top_k, apply_top_p

    if temperature == 0:
        def greedy(logprobs: mx.array) -> mx.array:
            return mx.argmax(logprobs, axis=-1)

        greedy.greedy = True  # type: ignore[attr-defined]  # speculation reads all positions at once
        return greedy
    # OpenAI accepts any integer seed; MLX keys take an unsigned 64-bit one.
    seed = seed % 2**64 if seed is not None else int.from_bytes(os.urandom(8), "little")
    state = {"key": mx.random.key(seed)}

    def sample(logprobs: mx.array) -> mx.array:
        state["key"], sub = mx.random.split(state["key"])
        if top_k > 0:
            logprobs = apply_top_k(logprobs, min(top_k, logprobs.shape[-1]))
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1 / temperature), key=sub)

    return sample
