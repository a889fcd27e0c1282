"""CPU fast path, part 4: a one-token decode step at the BLAS's gemv speed.

A decode step of a float32 model reads every weight once; on this CPU it is bound by memory
reads. MLX sends a one-row product through `sgemm` (all of SmolLM2's 211 products: ~48 ms, about
10 GB/s here) where OpenBLAS's `sgemv` reads the same matrices in ~27 ms, and MLX's several
hundred small ops between them (norms, rope, attention over the cache) cost another ~35 ms in
dispatch. So a step of one token, one sequence, runs here in numpy instead, over zero-copy views
of the model's own weights: the weight products through `cblas_sgemv` of the OpenBLAS MLX already
loaded (engine/cpu/blas.py; one thread pool for the big products), attention over the cache and
the small math through numpy (its matmul measured as fast as per-head cblas calls here, at 200
and 2,000 positions). Rope is not re-implemented: it is linear per position, so one call of the
model's own rope module on an identity matrix gives the rotation for every variant (scaled,
partial, traditional), applied as the pairs it rotates.

The step reads and writes mlx-lm's own `KVCache` objects, so everything else (prefill, batched
decode, speculation's multi-row passes, the prompt cache) works on the same caches. It writes
the new position into the cache's buffer in place, which MLX arrays don't otherwise allow, so it
only writes into a buffer it allocated itself and that no one else has replaced: a cache it
didn't allocate (or that MLX copied since) is first copied into a buffer of its own.

Which path decodes is measured (engine/cpu/decode_choice.py): the numpy step is used only where it
checked out against the model's own step at load (logits within float rounding, `checked_step`)
and was faster on this machine.
Projections held as blocks (`--cpu-dtype quantized`, engine/cpu/quant_linear.py) run through
their own `matvec` instead of sgemv; the rest of the step is the same.
Architectures: the llama layout (llama, mistral, qwen2, qwen3's q/k norms); anything else, an
MLX-quantized or half-precision weight, a rotating or quantized cache, more than one row keeps MLX.
`OPENMLX_FAST_DECODE=off` turns it off.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.cpu import blas

log = logging.getLogger("openmlx.engine")

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_KV_STEP = 256  # grow the cache's buffer in mlx-lm's steps


def _view(a: mx.array) -> np.ndarray:
    mx.eval(a)
    return np.asarray(a)


def _quantized(module: Any) -> bool:
    """A projection held as blocks (`--cpu-dtype quantized`, engine/cpu/quant_linear.py)."""
    return hasattr(module, "matvec") and hasattr(module, "shape")


def _matvec(products: "blas.Products", w: Any, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    return w.matvec(x, out) if _quantized(w) else products.gemv(w, x, out)


def _linear(module: Any) -> Optional[tuple[Any, Optional[np.ndarray]]]:
    """A float32 nn.Linear's weight and bias as numpy views (a block-held projection itself and
    its bias), or None for anything else."""
    if _quantized(module):
        bias = getattr(module, "_bias", None)
        return module, bias
    if type(module) is not nn.Linear or module.weight.dtype != mx.float32:
        return None
    bias = _view(module.bias) if "bias" in module else None
    return _view(module.weight), bias


def _norm(module: Any) -> Optional[tuple[np.ndarray, float]]:
    if type(module) is not nn.RMSNorm or module.weight.dtype != mx.float32:
        return None
    return _view(module.weight), float(module.eps)


def _rms_norm(x: np.ndarray, norm: tuple[np.ndarray, float]) -> np.ndarray:
    weight, eps = norm
    if x.ndim == 1:
        scale = np.float32(1.0) / np.sqrt(np.dot(x, x) / np.float32(x.shape[0]) + np.float32(eps))
    else:
        scale = np.float32(1.0) / np.sqrt(np.einsum("ij,ij->i", x, x)[:, None] / np.float32(x.shape[-1])
                                          + np.float32(eps))
    return x * scale * weight


def fuse(model: nn.Module) -> int:
    """Hold each layer's q/k/v weights, and its gate/up weights, in one buffer each, the modules
    keeping views of it: one gemv reads each group (measured: 211 products 32 -> 26 ms here), at no
    extra memory, and MLX's own passes read the same values. Returns the groups fused."""
    done = 0
    for layer in getattr(getattr(model, "model", None), "layers", None) or []:
        groups = [(getattr(layer, "self_attn", None), ("q_proj", "k_proj", "v_proj")),
                  (getattr(layer, "mlp", None), ("gate_proj", "up_proj"))]
        for parent, names in groups:
            mods = [getattr(parent, n, None) for n in names]
            if any(type(m) is not nn.Linear or m.weight.dtype != mx.float32 for m in mods):
                continue
            if len({m.weight.shape[1] for m in mods}) != 1:
                continue
            fused = mx.concatenate([m.weight for m in mods])
            mx.eval(fused)
            start = 0
            for m in mods:
                rows = m.weight.shape[0]
                m.weight = fused[start:start + rows]
                start += rows
            mx.eval([m.weight for m in mods])
            done += 1
    return done


def _group(parts: list[tuple[np.ndarray, Optional[np.ndarray]]]) -> Optional[tuple[np.ndarray, Optional[np.ndarray]]]:
    """The weights of `parts` as one matrix where they lie back to back in one buffer (`fuse`),
    with their biases joined; None where they don't."""
    first = parts[0][0]
    if not all(isinstance(w, np.ndarray) for w, _ in parts):
        return None
    at = first.ctypes.data
    for w, _ in parts:
        if not w.flags.c_contiguous or w.ctypes.data != at or w.shape[1] != first.shape[1]:
            return None
        at += w.nbytes
    rows = sum(w.shape[0] for w, _ in parts)
    joined = np.lib.stride_tricks.as_strided(first, shape=(rows, first.shape[1]), strides=first.strides,
                                             writeable=False)
    biases = [b for _, b in parts]
    if all(b is None for b in biases):
        return joined, None
    if any(b is None for b in biases):
        return None
    return joined, np.concatenate(biases)


def _whole_products(parts: list[tuple[Any, Optional[np.ndarray]]]) -> list[tuple[Any, Optional[np.ndarray]]]:
    """Block-held projections that are consecutive rows of one product (`QuantRows` of a joined
    `QuantLinear`, engine/cpu/quant_linear.py), covering it in order, as that product: one run."""
    out: list[tuple[Any, Optional[np.ndarray]]] = []
    i = 0
    while i < len(parts):
        joined = getattr(parts[i][0], "joined", None)
        j, at = i, 0
        while j < len(parts) and joined is not None and getattr(parts[j][0], "joined", None) is joined \
                and parts[j][0].start == at:
            at, j = parts[j][0].end, j + 1
        if joined is not None and at == joined.shape[0]:
            out.append((joined, joined._bias))
            i = j
        else:
            out.append(parts[i])
            i += 1
    return out


@dataclass
class _Group:
    """Products that read the same input: one gemv where their weights are one buffer (`fuse`),
    one each into slices of the output otherwise; the biases joined."""

    weights: list[np.ndarray]
    bias: Optional[np.ndarray]
    rows: int

    @classmethod
    def of(cls, parts: list[tuple[np.ndarray, Optional[np.ndarray]]]) -> "_Group":
        parts = _whole_products(parts)
        joined = _group(parts)
        if joined is not None:
            return cls([joined[0]], joined[1], joined[0].shape[0])
        biases = [b if b is not None else np.zeros(w.shape[0], np.float32) for w, b in parts]
        bias = None if all(b is None for _, b in parts) else np.concatenate(biases)
        return cls([w for w, _ in parts], bias, sum(w.shape[0] for w, _ in parts))

    def __call__(self, products: "blas.Products", x: np.ndarray) -> np.ndarray:
        out = np.empty(self.rows, np.float32)
        at = 0
        for w in self.weights:
            _matvec(products, w, x, out[at:at + w.shape[0]])
            at += w.shape[0]
        if self.bias is not None:
            out += self.bias
        return out


@dataclass
class _Layer:
    qkv: _Group
    o: _Group
    gate_up: _Group
    down: _Group
    attn_norm: tuple[np.ndarray, float]
    mlp_norm: tuple[np.ndarray, float]
    q_norm: Optional[tuple[np.ndarray, float]]
    k_norm: Optional[tuple[np.ndarray, float]]
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    rope: int  # index into OneTokenStep.ropes


class Unsupported(Exception):
    """The model isn't one the numpy step computes; the message says why."""


def _layers(model: nn.Module) -> tuple[list[_Layer], list[Any]]:
    backbone = getattr(model, "model", None)
    layers = getattr(backbone, "layers", None)
    if not layers:
        raise Unsupported("no model.layers")
    ropes: list[Any] = []
    out = []
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            raise Unsupported("a layer without self_attn and mlp")
        parts = [_linear(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        parts += [_linear(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(p is None for p in parts):
            raise Unsupported("a projection that isn't a float32 Linear (quantized, half, or fused)")
        norms = [_norm(getattr(layer, n, None)) for n in ("input_layernorm", "post_attention_layernorm")]
        if any(n is None for n in norms):
            raise Unsupported("a layer norm that isn't a float32 RMSNorm")
        q_norm = _norm(attn.q_norm) if "q_norm" in attn else None
        k_norm = _norm(attn.k_norm) if "k_norm" in attn else None
        if ("q_norm" in attn and q_norm is None) or ("k_norm" in attn and k_norm is None):
            raise Unsupported("q/k norms that aren't float32 RMSNorms")
        heads, kv_heads = int(attn.n_heads), int(attn.n_kv_heads)
        head_dim = parts[0][0].shape[0] // heads
        if parts[4][0].shape != parts[5][0].shape:
            raise Unsupported("gate and up projections of different shapes")
        rope = getattr(attn, "rope", None)
        if rope is None:
            raise Unsupported("no rope module")
        index = next((i for i, r in enumerate(ropes) if _same_rope(r, rope, head_dim)), None)
        if index is None:
            ropes.append(rope)
            index = len(ropes) - 1
        out.append(_Layer(_Group.of(parts[:3]), _Group.of(parts[3:4]), _Group.of(parts[4:6]), _Group.of(parts[6:]),
                          norms[0], norms[1], q_norm, k_norm, heads, kv_heads, head_dim, float(attn.scale), index))
    return out, ropes


def _rotation(rope: Any, head_dim: int, position: int) -> np.ndarray:
    """Rᵀ for rope at `position`: rope is linear per position, so rotating the identity's rows
    (each a head at the same position) gives it, whatever the variant."""
    eye = mx.eye(head_dim, dtype=mx.float32).reshape(1, head_dim, 1, head_dim)
    return np.array(rope(eye, offset=position)[0, :, 0, :])


def _partners(rot: np.ndarray) -> Optional[np.ndarray]:
    """For each output dimension j, the one input dimension besides j that rope mixes into it
    (itself where none), or None where the rotation isn't made of such pairs."""
    d = rot.shape[0]
    off = rot.copy()
    np.fill_diagonal(off, 0.0)
    partner = np.abs(off).argmax(axis=0)
    partner = np.where(np.abs(off[partner, np.arange(d)]) > 0, partner, np.arange(d))
    off[partner, np.arange(d)] = 0.0
    return partner if np.abs(off).max() <= 1e-6 else None


def _same_rope(a: Any, b: Any, head_dim: int) -> bool:
    return a is b or all(np.allclose(_rotation(a, head_dim, p), _rotation(b, head_dim, p)) for p in (1, 777))


class OneTokenStep:
    """The model's forward pass for one token of one sequence, in numpy over its own weights."""

    def __init__(self, model: nn.Module, products: blas.Products) -> None:
        if getattr(model, "model_type", None) not in ARCHITECTURES:
            raise Unsupported(f"architecture {getattr(model, 'model_type', None)!r} (supported: {ARCHITECTURES})")
        backbone = model.model
        embed = getattr(backbone, "embed_tokens", None)
        quantized = _quantized(getattr(embed, "_head", None)) or hasattr(embed, "_blocks")
        if not quantized and (type(embed) is not nn.Embedding or embed.weight.dtype != mx.float32):
            raise Unsupported("the embedding isn't a float32 Embedding")
        self.layers, self.ropes = _layers(model)
        self.partners = [_partners(_rotation(r, self.layers[0].head_dim, 777)) for r in self.ropes]
        final = _norm(getattr(backbone, "norm", None))
        if final is None:
            raise Unsupported("the final norm isn't a float32 RMSNorm")
        self.final_norm = final
        self.embed = embed if quantized else _view(embed.weight)
        if "lm_head" in model:
            head = _linear(model.lm_head)
            if head is None or head[1] is not None:
                raise Unsupported("the output head isn't a float32 Linear")
            self.head = head[0]
        else:
            self.head = embed._head if quantized else self.embed
        self.blas = products
        self._owned: "weakref.WeakKeyDictionary[Any, tuple[int, int]]" = weakref.WeakKeyDictionary()
        self._logits = np.empty(self.head.shape[0], np.float32)

    def _kv(self, cache: Any, layer: _Layer) -> tuple[np.ndarray, np.ndarray]:
        """The cache's buffers as writable views with room for one more position, copied into a
        buffer of our own first unless the cache already holds one we allocated."""
        offset = cache.offset
        keys = _view(cache.keys) if cache.keys is not None else None
        values = _view(cache.values) if cache.values is not None else None
        owned = self._owned.get(cache)
        if (keys is not None and owned == (keys.ctypes.data, values.ctypes.data)
                and offset < keys.shape[2] and keys.flags.c_contiguous and values.flags.c_contiguous):
            return keys, values
        room = (offset // _KV_STEP + 1) * _KV_STEP
        new_k = mx.zeros((1, layer.kv_heads, room, layer.head_dim), mx.float32)
        new_v = mx.zeros((1, layer.kv_heads, room, layer.head_dim), mx.float32)
        nk, nv = _view(new_k), _view(new_v)
        if offset:
            nk[:, :, :offset] = keys[:, :, :offset]
            nv[:, :, :offset] = values[:, :, :offset]
        cache.keys, cache.values = new_k, new_v
        self._owned[cache] = (nk.ctypes.data, nv.ctypes.data)
        return nk, nv

    def __call__(self, token: int, cache: list[Any]) -> np.ndarray:
        """The logits after `token`; the cache takes its keys and values (one more position)."""
        position = cache[0].offset
        rotations = [_rotation(r, self.layers[0].head_dim, position) for r in self.ropes]
        x = np.array(self.embed[token], np.float32)
        for layer, c in zip(self.layers, cache):
            d = layer.head_dim
            qkv = layer.qkv(self.blas, _rms_norm(x, layer.attn_norm))
            nq, nk = layer.heads * d, layer.kv_heads * d
            q, k = qkv[:nq].reshape(layer.heads, d), qkv[nq:nq + nk].reshape(layer.kv_heads, d)
            if layer.q_norm is not None:
                q = _rms_norm(q, layer.q_norm)
            if layer.k_norm is not None:
                k = _rms_norm(k, layer.k_norm)
            rot = rotations[layer.rope]
            q, k = self._rotate(q, rot, layer.rope), self._rotate(k, rot, layer.rope)
            keys, values = self._kv(c, layer)
            keys[0, :, position] = k
            values[0, :, position] = qkv[nq + nk:].reshape(layer.kv_heads, d)
            c.offset = position + 1
            attended = self._attend(q, keys[0, :, :position + 1], values[0, :, :position + 1], layer)
            x = x + layer.o(self.blas, attended)
            gate_up = layer.gate_up(self.blas, _rms_norm(x, layer.mlp_norm))
            gate, up = gate_up[:gate_up.shape[0] // 2], gate_up[gate_up.shape[0] // 2:]
            x = x + layer.down(self.blas, gate / (np.float32(1) + np.exp(-gate)) * up)
        h = _rms_norm(x, self.final_norm)
        return _matvec(self.blas, self.head, h, self._logits).copy()

    def _rotate(self, x: np.ndarray, rot: np.ndarray, rope: int) -> np.ndarray:
        """x Rᵀ: where rope pairs each dimension with at most one other (every variant mlx-lm has),
        two elementwise products over a gather instead of a product with the whole matrix."""
        partner = self.partners[rope]
        if partner is None:
            out = np.empty_like(x)
            self.blas.gemm(np.ascontiguousarray(x), rot, out, transpose_b=False)
            return out
        columns = np.arange(rot.shape[0])
        return x * rot.diagonal() + x[:, partner] * rot[partner, columns]

    def _attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, layer: _Layer) -> np.ndarray:
        """softmax(q kᵀ · scale) v for one query position; q (heads, d), keys/values (kv heads, n, d)."""
        groups = layer.heads // layer.kv_heads
        qg = q.reshape(layer.kv_heads, groups, layer.head_dim)
        scores = np.matmul(qg * np.float32(layer.scale), keys.swapaxes(-1, -2))
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        return np.matmul(scores, values).reshape(-1)


def _plain(cache: Any) -> bool:
    from mlx_lm.models.cache import KVCache

    return isinstance(cache, list) and bool(cache) and all(type(c) is KVCache for c in cache)


class FastDecode:
    """The model, but a pass of one token over a plain KV cache runs the numpy step. Everything
    else (prefill, several rows, other caches) is the model's own call. Attributes are the model's."""

    def __init__(self, model: nn.Module, step: OneTokenStep, reason: str) -> None:
        self._model, self._step, self.reason = model, step, reason

    def __call__(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        if kwargs or inputs.shape != (1, 1) or not _plain(cache):
            return self._model(inputs, cache=cache, **kwargs)
        logits = self._step(int(inputs.item()), cache)
        return mx.array(logits).reshape(1, 1, -1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _check(model: nn.Module, step: OneTokenStep) -> None:
    """The numpy step's logits against the model's own, two steps after a short prefill: within
    float rounding, or where block-held products round their input rows to int8 (8-bit blocks,
    engine/cpu/quant_linear.py), the same best token and within 5% of the largest logit. There
    the two paths' float rounding (~1e-7) flips some int8 roundings, and 24 layers carry that to
    the logits: 0.22-0.24 of 16.9 on Qwen2.5-Coder-0.5B Q4_K_M (measured), as llama.cpp's own
    8-bit rounding differs from both; a wrong step (rope, a bias, the cache) is off by whole units."""
    from mlx_lm.models.cache import make_prompt_cache

    rounded = any(getattr(w, "rounds_activations", False) for w in _projections(step))
    prompt = mx.array([[1, 2, 3, 4, 5, 6, 7]]) % step.embed.shape[0]
    theirs, ours = make_prompt_cache(model), make_prompt_cache(model)
    mx.eval(model(prompt, cache=theirs), model(prompt, cache=ours))
    for token in (11, 12):
        want = np.array(model(mx.array([[token]]), cache=theirs)[0, -1])
        got = step(token, ours)
        scale = max(1.0, float(np.abs(want).max()))
        if rounded:
            close = int(got.argmax()) == int(want.argmax()) and float(np.abs(got - want).max()) <= 0.05 * scale
        else:
            close = np.allclose(got, want, rtol=1e-3, atol=1e-3 * scale)
        if not close:
            raise Unsupported(f"its logits differ from the model's own (max {float(np.abs(got - want).max()):.3g})")


def _projections(step: OneTokenStep) -> list[Any]:
    """Every weight the step multiplies by: each layer's groups' and the head."""
    weights = [step.head]
    for layer in step.layers:
        for group in (layer.qkv, layer.o, layer.gate_up, layer.down):
            weights += group.weights
    return weights


def checked_step(model: nn.Module) -> OneTokenStep:
    """The model's numpy step (its q/k/v and gate/up weights fused first), checked against the
    model's own step; raises Unsupported saying why where it can't be had."""
    fuse(model)
    step = OneTokenStep(model, blas.products())
    _check(model, step)
    return step
