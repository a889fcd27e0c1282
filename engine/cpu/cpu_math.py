"""CPU fast path, part 3: attention and SwiGLU where the exponentials are vectorized.

MLX's CPU backend has no x86 SIMD path for transcendentals: `exp` costs ~15 ns an element here,
against ~0.6 ns in numpy (AVX2/AVX-512 loops). A long prompt's time goes mostly to the
exponentials of attention's softmax (heads x rows x context per layer) and SwiGLU's sigmoid
(../shared/CPU.md). So on the CPU fast path (float32 weights), passes large enough to be worth a
synchronisation run those two functions in numpy: the products through BLAS, the softmax and the
sigmoid through numpy's vectorized loops. Small passes (a decode step) stay lazy in MLX, so the
decode pipeline keeps overlapping. The result is the same math in float32: greedy text equal,
logits within float rounding (tests/test_cpu_math.py).

mlx-lm's model modules call `scaled_dot_product_attention` and `swiglu` by their module-level
names, so `install` rebinds those names in the loaded model's module (once; the replacements fall
back to MLX's own functions for anything they don't cover: quantized KV caches, attention sinks,
other dtypes, a GPU, small passes).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

log = logging.getLogger("openmlx.engine")

# Below these sizes a pass stays in MLX: the synchronisation (and losing the overlap of the next
# step's graph building) costs more than the scalar math it saves (docs/benchmarks.md, "Against
# llama.cpp after attention and SwiGLU moved to numpy").
MIN_SCORES = 16_384  # query heads x rows x keys of one attention call
MIN_ACTIVATIONS = 16_384  # rows x intermediate size of one SwiGLU
_MASKED = np.float32(np.finfo(np.float32).min)

_off = False  # set by `disabled()`; OPENMLX_CPU_MATH=off keeps `install` from rebinding anything


def enabled() -> bool:
    """False inside `disabled()` (tests and the bench compare against MLX's own path)."""
    return not _off


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run MLX's own attention and SwiGLU, in every thread, for the duration."""
    global _off
    before, _off = _off, True
    try:
        yield
    finally:
        _off = before


def _applies(*arrays: mx.array) -> bool:
    return enabled() and mx.default_device() == mx.cpu and all(a.dtype == mx.float32 for a in arrays)


def _causal(rows: int, keys: int) -> np.ndarray:
    """Which keys each of the last `rows` queries may see (queries sit at the end of the keys)."""
    return np.arange(keys)[None, :] <= np.arange(keys - rows, keys)[:, None]


def _visible(mask: Any, batch: int, kv_heads: int, repeats: int, rows: int, keys: int) -> Optional[np.ndarray]:
    """The mask as booleans broadcastable to scores shaped (B, kv heads, repeats, rows, keys);
    None when there is no mask. Raises ValueError for a form this module doesn't handle."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(mask)
        return _causal(rows, keys)
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise ValueError("additive mask")
    if m.ndim == 2:
        return m
    if m.ndim == 4 and m.shape[1] == 1:
        return m[:, :, None]
    if m.ndim == 4 and m.shape[1] == kv_heads * repeats:
        return m.reshape(m.shape[0], kv_heads, repeats, m.shape[2], m.shape[3])
    raise ValueError(f"mask shape {m.shape}")


def softmax_rows(scores: np.ndarray, visible: Optional[np.ndarray], grouped: tuple[int, ...]) -> None:
    """Masked softmax over the last axis, in place, in float32 numpy.

    Masked scores are *replaced* by float32's minimum (as MLX does), so a fully masked row (left
    padding in a batch) stays finite instead of turning the next layer's keys into NaN. `grouped`
    is the scores' shape with grouped-query heads split out (B, kv heads, repeats, rows, keys),
    the shape `visible` broadcasts against."""
    if visible is not None:
        np.copyto(scores.reshape(grouped), _MASKED, where=~visible)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
              visible: Optional[np.ndarray]) -> mx.array:
    """softmax(q kᵀ · scale, masked) v; q (B, Hq, L, D), k/v (B, Hkv, S, D).

    The two products stay in MLX (its BLAS; a second BLAS thread pool in numpy would fight
    MLX's for the same cores), only the softmax runs in numpy, in place on the evaluated scores
    through a view (MLX documents numpy views of its arrays as shared memory). Grouped-query
    heads share their key head through a reshape, not a copy of the keys."""
    batch, q_heads, rows, dim = queries.shape
    kv_heads, n_keys = keys.shape[1], keys.shape[2]
    repeats = q_heads // kv_heads
    q = (queries * scale).reshape(batch, kv_heads, repeats * rows, dim)
    scores = q @ keys.swapaxes(-1, -2)
    mx.eval(scores)
    softmax_rows(np.array(scores, copy=False), visible, (batch, kv_heads, repeats, rows, n_keys))
    return (scores @ values).reshape(batch, q_heads, rows, dim)


def _attention(original: Callable[..., mx.array]) -> Callable[..., mx.array]:
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if (sinks is not None or hasattr(cache, "bits") or not _applies(queries, keys, values)
                or queries.ndim != 4 or queries.shape[1] % keys.shape[1]
                or queries.shape[1] * queries.shape[2] * keys.shape[2] < MIN_SCORES):
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        batch, q_heads, rows, _ = queries.shape
        kv_heads, n_keys = keys.shape[1], keys.shape[2]
        try:
            visible = _visible(mask, batch, kv_heads, q_heads // kv_heads, rows, n_keys)
        except ValueError:
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        return attention(queries, keys, values, scale, visible)

    scaled_dot_product_attention.openmlx_original = original  # type: ignore[attr-defined]
    return scaled_dot_product_attention


def swiglu_numpy(gate: np.ndarray, x: np.ndarray) -> np.ndarray:
    """silu(gate) * x = gate / (1 + exp(-gate)) * x, in one float32 buffer."""
    out = np.negative(gate)
    np.exp(out, out=out)
    out += np.float32(1)
    np.divide(gate, out, out=out)
    out *= x
    return out


def _swiglu(original: Callable[..., mx.array]) -> Callable[..., mx.array]:
    def swiglu(gate, x):
        if gate.shape != x.shape or gate.size < MIN_ACTIVATIONS or not _applies(gate, x):
            return original(gate, x)
        mx.eval(gate, x)
        return mx.array(swiglu_numpy(np.asarray(gate), np.asarray(x)))

    swiglu.openmlx_original = original  # type: ignore[attr-defined]
    return swiglu


_lock = threading.Lock()


def _replacements() -> dict[str, tuple[Callable[..., mx.array], Callable[..., Callable[..., mx.array]]]]:
    """Name -> (mlx-lm's own function, its wrapper maker). Only mlx-lm's shared functions are
    rebound: a module's own function of the same name may mean something else."""
    from mlx_lm.models import activations, base

    return {"scaled_dot_product_attention": (base.scaled_dot_product_attention, _attention),
            "swiglu": (activations.swiglu, _swiglu)}


def install(model: nn.Module) -> list[str]:
    """Route the model's attention and SwiGLU through the numpy versions (CPU, float32 only).

    Returns the names rebound in the model's module (empty when it uses neither of mlx-lm's
    shared functions, e.g. an architecture that computes attention itself)."""
    module = sys.modules.get(type(model).__module__)
    done: list[str] = []
    if module is None or os.environ.get("OPENMLX_CPU_MATH", "").lower() == "off":
        return done
    with _lock:
        for name, (shared, wrap) in _replacements().items():
            current = getattr(module, name, None)
            if current is shared:
                setattr(module, name, wrap(current))
            elif getattr(current, "openmlx_original", None) is not shared:
                continue  # absent, or the module's own function
            done.append(name)
    if done:
        log.info("CPU math: %s of %s run vectorized in numpy", ", ".join(done), module.__name__)
    return done
