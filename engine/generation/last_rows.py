"""Logits for the last rows of a forward pass only.

A pass that carries prompt tokens along (engine/generation/speculative.py: a short prompt tail rides with
the first pass) needs logits for its last rows only, but mlx-lm's models apply the output head to
every row: ~0.5 ms a row for SmolLM2's 49k-token vocabulary on this CPU, more than the rest of a
row's pass. Most mlx-lm models are `backbone -> head` (`model.model`, then `lm_head` or the tied
embedding's `as_linear`); `split_head` finds that split and checks it once, numerically, against
the model's own call. Where it doesn't hold (a model that scales or soft-caps its logits, another
layout) it returns None and callers take every row's logits as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class SplitHead:
    """A model as its backbone and its output head."""

    backbone: nn.Module
    head: Callable[[mx.array], mx.array]

    def __call__(self, inputs: mx.array, cache: list[Any], rows: int) -> mx.array:
        """The logits of the last `rows` positions of `inputs` (1, n); the cache takes all n."""
        hidden = self.backbone(inputs, cache=cache)
        return self.head(hidden[:, -rows:])


def split_head(model: nn.Module) -> Optional[SplitHead]:
    """The model's backbone/head split, or None where this model isn't that shape."""
    backbone = getattr(model, "model", None)
    if not isinstance(backbone, nn.Module):
        return None
    head = getattr(model, "lm_head", None)
    if head is None:
        embed = getattr(backbone, "embed_tokens", None)
        head = getattr(embed, "as_linear", None)
    if not callable(head):
        return None
    ids = mx.array([[1, 2, 3, 4, 5]])
    try:
        want = model(ids)
        got = head(backbone(ids, cache=None))
    except Exception:  # another call signature: not this shape
        return None
    if got.shape != want.shape or not mx.allclose(got, want, rtol=1e-4, atol=1e-4).item():
        return None
    return SplitHead(backbone, head)


@dataclass(frozen=True)
class LastRowOnly:
    """A model for callers that read only the last position's logits: mlx-lm's generate_step and
    BatchGenerator take `logits[:, -1, :]` of every call and drop their prefill passes' logits, a
    prompt's whole passes (engine/generation/passes.py) read none. A pass of several rows goes backbone -> head on
    its last row; one row, or a call with other arguments, goes to `model`. For `--cpu-dtype
    quantized`, whose head runs eagerly in onnxruntime: over a 256-row pass it cost a 151936 x 256
    product (~30 % of the pass's multiplies) and ~310 MB of logits nobody read: a server's peak RSS
    on a 1,000-token prompt 1.54 -> 1.24 GB (Qwen2.5-Coder-0.5B). MLX's own head is lazy: never
    computed for those rows."""

    split: SplitHead
    model: Any

    def __call__(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        if kwargs or inputs.ndim != 2 or inputs.shape[1] == 1:
            return self.model(inputs, cache=cache, **kwargs)
        return self.split(inputs, cache, 1)

    def __getattr__(self, name: str) -> Any:  # the model's own attributes (layers, make_cache ...)
        return getattr(self.model, name)
