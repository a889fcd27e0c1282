"""Loading a text model's weights: the memory gate and the CPU dtype policy (float32 through
BLAS on the CPU, as shipped on a GPU). Shared by the runners and the draft model."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from engine.cpu import cpu_math, decode_choice
from engine.models.memory import MemoryEstimate, MemoryGate, dequantized_bytes
from engine.models.probe import Probe

log = logging.getLogger("openmlx.engine")

CPU_DTYPES = ("auto", "keep", "float32", "float16", "quantized")
# KV-cache headroom reserved at load time (tokens); the gate checks weights + this much cache.
KV_HEADROOM_TOKENS = 4096


def on_gpu() -> bool:
    """True when MLX computes on Metal or CUDA, where quantized kernels are the fast path."""
    return mx.default_device() == mx.gpu


def kv_bytes_per_token(config: dict, itemsize: int = 4) -> int:
    """Keys and values of one token over every layer, at `itemsize` bytes a value (float32 on CPU)."""
    cfg = config.get("text_config", config)
    layers = int(cfg.get("num_hidden_layers", 0) or 0)
    heads = int(cfg.get("num_attention_heads", 1) or 1)
    kv_heads = int(cfg.get("num_key_value_heads", heads) or heads)
    head_dim = int(cfg.get("head_dim") or (int(cfg.get("hidden_size", 0) or 0) // heads))
    return 2 * layers * kv_heads * head_dim * itemsize


@dataclass(frozen=True)
class DtypeChoice:
    """Which dtype a model's weights are held in ("keep" = as shipped), and why."""

    dtype: str
    reason: str


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# `auto` holds a model shipped quantized as blocks from this many bytes of float32 weights: a decode
# step reads every weight, and at this size reading blocks wins. Measured here (quiet, 2 cores,
# numpy step both ways): Qwen2.5-Coder-0.5B Q4_K_M, 1.98 GB at float32, 28 against 59 ms a token
# and prefill as fast (docs/benchmarks.md); SmolLM2-135M (0.54 GB) 24 against 16 ms: float32 wins.
QUANTIZED_ABOVE = 1 << 30


def choose_cpu_dtype(requested: str, probe: Probe, gate: MemoryGate, kv_bytes: int) -> DtypeChoice:
    """The load-time CPU policy: which dtype to hold weights in, and why.

    On CPU MLX multiplies fast only in float32 (its quantized/half matmuls are 5-50x slower), so
    `auto` holds a model shipped quantized (MLX bits, or a GGUF file's blocks) of QUANTIZED_ABOVE or
    more float32 bytes as blocks (`quantized`, engine/cpu/quant_linear.py) where
    that path maps it and the blocks fit: faster there. Otherwise it expands to float32 when the
    expanded weights and a KV budget of KV_HEADROOM_TOKENS fit in the memory available now (the
    faster path for a small model); else blocks where they fit; else the weights stay as shipped.
    Never on a GPU.
    """
    if requested not in CPU_DTYPES:
        raise ValueError(f"cpu dtype must be one of {CPU_DTYPES}")
    bits = (probe.quantization or {}).get("bits")
    shipped = f"as shipped ({bits}-bit)" if bits else "as shipped"
    if on_gpu():
        return DtypeChoice("keep", f"{shipped}: on a GPU the quantized kernels are the fast path")
    if requested == "quantized":
        return DtypeChoice("quantized", f"quantized: --cpu-dtype quantized ({_BLOCKS})")
    if requested != "auto":
        return DtypeChoice(requested, f"{shipped if requested == 'keep' else requested}: --cpu-dtype {requested}")
    weights, kv = dequantized_bytes(probe), KV_HEADROOM_TOKENS * kv_bytes
    sizes = f"float32 weights {_gb(weights)} + a {KV_HEADROOM_TOKENS}-token KV budget {_gb(kv)}"
    if weights >= QUANTIZED_ABOVE:
        blocks = _quantized_fit(probe)
        if blocks is not None and gate.fits(MemoryEstimate(blocks, kv).total):
            return DtypeChoice("quantized", f"quantized: shipped as blocks and {_gb(weights)} at float32, a size "
                                            f"at which blocks decode faster ({_BLOCKS})")
    if gate.fits(MemoryEstimate(weights, kv).total):
        return DtypeChoice("float32", f"float32, the CPU fast path: {sizes} fit in the {_gb(gate.available())} "
                                      "available")
    blocks = _quantized_fit(probe)
    if blocks is not None and gate.fits(MemoryEstimate(blocks, kv).total):
        return DtypeChoice("quantized", f"quantized: {sizes} would not fit in the {_gb(gate.available())} available; "
                                        f"held as blocks ({_BLOCKS}) it needs {_gb(blocks)} + the KV budget")
    return DtypeChoice("keep", f"{shipped}: {sizes} would not fit in the {_gb(gate.available())} available "
                               "(quantized matmuls are several times slower on the CPU)")


# how `quantized` holds and multiplies blocks (engine/cpu/quant_linear.py), for the reasons given
_BLOCKS = ("weights held as blocks: a GGUF file's in their own bit widths through compiled kernels, "
           "an MLX folder's through onnxruntime MatMulNBits")


def _quantized_fit(probe: Probe) -> Optional[int]:
    """The bytes `--cpu-dtype quantized` would hold for this model, or None where that path can't
    take it (onnxruntime not installed, another architecture, block types it doesn't map)."""
    import importlib.util

    from engine.cpu import quant_linear

    if probe.architecture not in quant_linear.ARCHITECTURES or importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        return quant_linear.estimate_held(probe.path, probe.quantization, dequantized_bytes(probe) // 4)
    except (OSError, ValueError):
        return None


def quantized_bytes(probe: Probe) -> int:
    """What `--cpu-dtype quantized` will hold: its blocks as held (a GGUF file's in about the file's
    bytes, an MLX folder's as onnxruntime holds them), counted from
    the GGUF source's tensor types or the MLX folder's bits (engine/cpu/quant_linear.py
    `estimate_held`), not the converted folder's bytes on disk (2.6x the held bytes for
    Qwen2.5-Coder-0.5B Q4_K_M, whose store folder is float16). The bytes on disk where it can't tell."""
    from engine.cpu import quant_linear

    try:
        held = quant_linear.estimate_held(probe.path, probe.quantization, dequantized_bytes(probe) // 4)
    except (OSError, ValueError):
        held = None
    return held if held is not None else probe.size_bytes


def _cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    model.update(nn.utils.tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                                   model.parameters()))


@dataclass(frozen=True)
class Loaded:
    """A model's weights in memory and what the gate counted for them."""

    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    dtype: str  # keep | float32 | float16
    dtype_reason: str
    need: MemoryEstimate
    warnings: tuple[str, ...]
    solo: Any  # what a lone stream's passes call: the model, or its one-token numpy step (engine/cpu/decode.py)
    decode: str  # which path decodes a lone stream, and why


def load_gated(label: str, probe: Probe, cpu_dtype: str, gate: MemoryGate) -> Loaded:
    """Choose the CPU dtype, check memory (weights as they will be held + KV headroom), then
    load with mlx-lm; `label` names the model in warnings and the log."""
    kv_bytes = kv_bytes_per_token(probe.config)
    choice = choose_cpu_dtype(cpu_dtype, probe, gate, kv_bytes)
    dtype = choice.dtype
    weights = probe.size_bytes if dtype == "keep" else quantized_bytes(probe) if dtype == "quantized" \
        else dequantized_bytes(probe)
    if dtype == "float16":
        weights //= 2
    need = MemoryEstimate(weights, KV_HEADROOM_TOKENS * kv_bytes)
    warnings = list(gate.check(label, need))
    if cpu_dtype == "auto" and dtype == "keep" and not on_gpu() and probe.quantized:
        warnings.append("the CPU fast path (float32 weights) was skipped: not enough memory; "
                        "generation is several times slower")
    reason = choice.reason
    if dtype == "quantized":
        model, tokenizer, held, why = _load_quantized(probe)
        if held:
            reason = f"{reason}: {why}"
            if cpu_dtype == "auto":
                warnings.append("the CPU fast path (float32 weights) was skipped: not enough memory; "
                                "the weights are held as quantized blocks instead")
        else:  # not mappable: the float32 path, and why
            dtype, reason = "float32", f"float32: --cpu-dtype quantized doesn't cover this model ({why})"
            warnings.append(reason)
            if probe.quantized:
                from mlx_lm.utils import dequantize_model
                model = dequantize_model(model)
            _cast_floats(model, mx.float32)
            mx.eval(model.parameters())
    else:
        model, tokenizer = _load_weights(probe, dtype)
    if on_gpu() and dtype == "keep" and not probe.quantized and probe.config.get("gguf_bits"):
        quantize_as_the_file(model, probe.config["gguf_bits"])
    keep_whole_windows(model)
    solo, decode_path = model, "mlx"
    if dtype in ("float32", "quantized") and not on_gpu():
        cpu_math.install(model)
        solo, decode_path = decode_choice.install(model)
    log.info("loaded %s (%s, weights held as %s)", label, probe.architecture, dtype)
    for w in warnings:
        log.warning("%s: %s", label, w)
    return Loaded(model, tokenizer, dtype, reason, need, tuple(warnings), solo, decode_path)


def quantize_as_the_file(model: nn.Module, bits: dict[str, int], group_size: int = 64) -> None:
    """Quantize a model converted from a quantized GGUF back to the file's level (`bits`: MLX
    widths for "blocks" and for the embeddings and head by name, from engine/formats/gguf.py): on a
    GPU MLX's quantized kernels are the fast path, and the float16 a K-quant file converts to would
    hold 3-4x the file's bytes. A layer whose width the group size doesn't divide stays as it is."""
    def level(path: str, module: nn.Module) -> Any:
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        part = path if path in ("model.embed_tokens", "lm_head") else "blocks"
        return {"group_size": group_size, "bits": bits[part]} if part in bits else False

    nn.quantize(model, group_size, bits.get("blocks", 4), class_predicate=level)
    mx.eval(model.parameters())


# Models whose sliding-window layers take their window from the attention mask when given a plain
# cache (mlx-lm builds the windowed mask from the cache's offset), so every layer can keep a plain
# KVCache. Listed by hand: a model that relies on its RotatingKVCache to drop old positions would
# attend past its window.
WINDOW_BY_MASK = ("gemma3_text", "gpt_oss")


def keep_whole_windows(model: Any) -> bool:
    """Give a WINDOW_BY_MASK model plain caches on every layer, as llama.cpp keeps a full-size
    sliding-window cache: a rotated window can't be cut back to a shorter prefix, so past the
    window the prompt cache, speculation and the disk store would have nothing to reuse. Costs
    the window layers' memory beyond the window. True where it applied."""
    from mlx_lm.models.cache import KVCache

    if getattr(model, "model_type", None) not in WINDOW_BY_MASK or not hasattr(model, "make_cache"):
        return False
    layers = len(model.layers)
    model.make_cache = lambda: [KVCache() for _ in range(layers)]
    return True


def _load_quantized(probe: Probe) -> tuple[nn.Module, Any, int, str]:
    """(model, tokenizer, bytes the blocks hold, what they are) for `--cpu-dtype quantized`; held 0
    and the reason where the model can't be held as blocks (the model then as mlx-lm loaded it,
    not yet evaluated). A malformed GGUF tensor is refused (InvalidRequest)."""
    from mlx_lm import load as lm_load

    from engine.cpu import quant_linear
    from engine.errors import InvalidRequest

    # lazy: the projections a GGUF source replaces are never read from the converted folder
    model, tokenizer = lm_load(str(probe.path), lazy=True)
    if getattr(model, "model_type", None) not in quant_linear.ARCHITECTURES:
        return model, tokenizer, 0, f"architecture {getattr(model, 'model_type', None)!r} isn't one of " \
                                    f"{quant_linear.ARCHITECTURES}"
    try:
        held = quant_linear.install(model, probe.path)
    except quant_linear.Malformed as e:
        raise InvalidRequest(f"{probe.path.name}: malformed quantized weights: {e}", code="malformed_weights") from None
    except quant_linear.Unmapped as e:
        return model, tokenizer, 0, str(e)
    return model, tokenizer, held, f"{held / 1e9:.2f} GB of blocks ({quant_linear.describe(model)})"


def _load_weights(probe: Probe, dtype: str) -> tuple[nn.Module, Any]:
    """mlx-lm's model and tokenizer, the weights held as `dtype` (keep | float32 | float16)."""
    from mlx_lm import load as lm_load
    from mlx_lm.utils import dequantize_model

    model, tokenizer = lm_load(str(probe.path))
    if dtype != "keep":
        if probe.quantized:
            model = dequantize_model(model)
        _cast_floats(model, mx.float32 if dtype == "float32" else mx.float16)
        mx.eval(model.parameters())
    return model, tokenizer
