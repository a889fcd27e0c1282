"""Rope scaling that llama.cpp's converter writes as tensors, read back into mlx-lm's
`rope_scaling` config.

- `rope_freqs` (Llama 3.1+): one factor per rotated dimension pair, computed from the model's
  llama3 rope scaling (factor, low/high frequency factors, original context). The file doesn't
  keep those four numbers, so they are recovered: the candidates whose factors, computed as
  llama.cpp's converter computes them, reproduce the tensor (the common values first; scaling the
  original context and both frequency factors together gives the same rope, so any match is
  exact). A tensor nothing reproduces is refused rather than guessed.
- `rope_factors_long` / `rope_factors_short` (Phi-3's long rope): the per-dimension factors
  themselves, which mlx-lm's config takes as they are.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Optional

import numpy as np

ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

# Llama 3.1-3.3 ship factor 8 (3.2's small models 32), low 1, high 4, original context 8192.
_FACTORS = (8.0, 16.0, 32.0, 4.0, 2.0, 64.0)
_LOW = (1.0, 2.0, 0.5)
_HIGH = (4.0, 8.0, 2.0)
_ORIGINAL = (8192, 4096, 2048, 16384, 32768, 131072)


def llama3_factors(base: float, dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """The factors llama.cpp's converter writes as `rope_freqs` for a llama3 rope scaling."""
    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _llama3(freqs: np.ndarray, base: float, dim: int) -> Optional[dict[str, Any]]:
    factors = sorted(set(_FACTORS) | {float(np.round(freqs.max(), 4))})
    for factor, low, high, original in itertools.product(factors, _LOW, _HIGH, _ORIGINAL):
        if high > low and np.allclose(llama3_factors(base, dim, factor, low, high, original), freqs, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original}
    return None


def rope_scaling(tensors: dict[str, np.ndarray], config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """mlx-lm's `rope_scaling` for the rope tensors of a file (`config`: the converted config, for
    the rope base and head size); None when there are none. ValueError for a `rope_freqs` no
    llama3 scaling reproduces."""
    if "rope_factors_long.weight" in tensors:
        long = tensors["rope_factors_long.weight"].tolist()
        return {"type": "longrope", "long_factor": long,
                "short_factor": tensors.get("rope_factors_short.weight", np.array(long)).tolist()}
    if "rope_freqs.weight" in tensors:
        dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        found = _llama3(np.asarray(tensors["rope_freqs.weight"], dtype=np.float32), config["rope_theta"], dim)
        if found is None:
            raise ValueError("its rope_freqs tensor is not a llama3 rope scaling openmlx recognizes")
        return found
    return None
