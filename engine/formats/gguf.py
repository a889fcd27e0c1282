"""Convert a GGUF file (llama.cpp's format) into an MLX model folder that mlx-lm loads.

Two readers. A llama file whose blocks MLX reads itself (Q4_0, Q4_1, Q8_0, F16, F32: the embedded
default model) goes through `mx.load`, which returns the blocks as MLX-quantized tensors, so
conversion is a rename plus config and tokenizer files. Every other tensor type (K-quants, IQ,
BF16, ...) and family is read with llama.cpp's own reader (the `gguf` package), dequantized and
kept as float16 (the CPU policy widens it to float32 at load where memory allows). The
per-family tables are engine/formats/gguf_archs.py; the facts behind them are in shared/MODELS.md.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from engine.formats.gguf_archs import ARCHITECTURES, COMMON_LAYERS, TOP_LEVEL
from engine.formats.gguf_rope import ROPE_TENSORS, rope_scaling

_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|scales|biases|bias)$")
_TOP = re.compile(r"^([a-z_]+)\.(weight|scales|biases|bias)$")

# The stamp a store folder converted from a GGUF file carries (engine/models/gguf_import.py writes
# it: the file's path, size, mtime and sha256); --cpu-dtype quantized reads the blocks from that file.
SOURCE_MARK = ".openmlx-gguf.json"


class GGUFConversionError(ValueError):
    """The GGUF file is not one we can convert (architecture, tensor names, metadata)."""


def mlx_tensor_name(gguf_name: str, layers: dict[str, str] = COMMON_LAYERS) -> str:
    """Map a GGUF tensor name to mlx-lm's parameter name (`layers`: the family's block table)."""
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in layers:
        return f"model.layers.{m.group(1)}.{layers[m.group(2)]}.{m.group(3)}"
    m = _TOP.match(gguf_name)
    if m and m.group(1) in TOP_LEVEL:
        return f"{TOP_LEVEL[m.group(1)]}.{m.group(2)}"
    raise GGUFConversionError(f"unknown GGUF tensor name: {gguf_name}")


def _plain(value: Any) -> Any:
    """A metadata value as Python (mx.load gives arrays, llama.cpp's reader lists and numpy)."""
    return value.tolist() if hasattr(value, "tolist") else value


def _scalar(meta: dict[str, Any], key: str) -> Any:
    value = meta[key]
    return value.item() if hasattr(value, "item") else value


def _quantization(weights: dict[str, Any], in_features: Callable[[str], int]) -> Optional[dict[str, Any]]:
    """Infer MLX quantization (bits, group size) per module from packed weight shapes.

    Packed uint32 columns * 32 = in_features * bits, and scales columns = in_features / group.
    """
    per_module: dict[str, dict[str, int]] = {}
    for name, w in weights.items():
        module = name[: -len(".weight")]
        if not name.endswith(".weight") or module + ".scales" not in weights:
            continue
        n_in = in_features(module)
        bits, group = (w.shape[-1] * 32) // n_in, n_in // weights[module + ".scales"].shape[-1]
        per_module[module] = {"group_size": group, "bits": bits}
    if not per_module:
        return None
    values = list(per_module.values())
    common = max(values, key=values.count)
    quant: dict[str, Any] = dict(common)
    quant.update({m: q for m, q in per_module.items() if q != common})
    return quant


# The tokenizer kinds transformers rebuilds from GGUF metadata: byte-level BPE (`gpt2`, with the
# pre-tokenizer split `tokenizer.ggml.pre` names) and SentencePiece (`llama`; Gemma's and Phi-3's
# variants chosen by architecture).
_TOKENIZER_KINDS = ("gpt2", "llama")


def _check_tokenizer(meta: dict[str, Any]) -> None:
    if meta.get("tokenizer.ggml.model") not in _TOKENIZER_KINDS:
        raise GGUFConversionError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported "
                                  f"(openmlx reads {', '.join(_TOKENIZER_KINDS)})")


def _build_tokenizer(meta: dict[str, Any], out: Path) -> None:
    """tokenizer.json and its config from the file's metadata. The vocabulary, merges (recovered
    from the scores or the token order where a SentencePiece file has none), split pattern and
    special tokens are transformers' GGUF reading of them, which tokenizes as llama.cpp does."""
    from tokenizers import processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                        convert_gguf_tokenizer)

    _check_tokenizer(meta)
    fields = {name: _plain(meta[f"tokenizer.{key}"]) for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
              if f"tokenizer.{key}" in meta}
    backend, _ = convert_gguf_tokenizer(str(meta.get("general.architecture")), fields)
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file doesn't say otherwise.
    add_bos = bool(_scalar(meta, "tokenizer.ggml.add_bos_token")) if "tokenizer.ggml.add_bos_token" in meta \
        else meta.get("tokenizer.ggml.model") == "llama"
    if add_bos and "tokenizer.ggml.bos_token_id" in meta:
        # A plain prompt starts with BOS as llama.cpp's does; a chat template writes its own and
        # is encoded without special tokens.
        bos_id = int(_scalar(meta, "tokenizer.ggml.bos_token_id"))
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos_id]} $A", pair=f"{tokens[bos_id]} $A $B", special_tokens=[(tokens[bos_id], bos_id)])
    backend.save(str(out / "tokenizer.json"))

    bos = tokens[int(_scalar(meta, "tokenizer.ggml.bos_token_id"))] if "tokenizer.ggml.bos_token_id" in meta \
        else None
    eos = tokens[int(_scalar(meta, "tokenizer.ggml.eos_token_id"))]
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:  # ChatML models end a turn on <|im_end|>
        bos, eos = "<|im_start|>", "<|im_end|>"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": tokens[int(_scalar(meta, "tokenizer.ggml.padding_token_id"))]
        if "tokenizer.ggml.padding_token_id" in meta else eos,
        "unk_token": tokens[int(_scalar(meta, "tokenizer.ggml.unknown_token_id"))]
        if "tokenizer.ggml.unknown_token_id" in meta else None,
        "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, f"{meta.get('general.architecture', 'llama')}.context_length")),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": config["pad_token"]}, indent=2))


@dataclass(frozen=True)
class GGUFPlan:
    """What converting a GGUF file will cost, from its header alone (checked before anything is
    written): `converted_bytes` on disk, `peak_bytes` of memory while converting."""

    file_bytes: int
    tensor_bytes: int  # the tensors' declared data, all inside the file and none overlapping
    converted_bytes: int
    peak_bytes: int
    mlx_blocks: bool  # every tensor is one MLX keeps as it is (Q4_0, Q4_1, Q8_0, F16, F32), else float16


# A dequantized conversion writes its weights in shards of about this many bytes (mlx-lm loads
# every model*.safetensors), so a 7B's 15 GB of float16 never sit in memory at once.
SHARD_BYTES = 1 << 30

# Tensor types MLX's own GGUF loader reads, kept as MLX blocks (bits per weight; 0: float, as is).
_MLX_READS = {"F32": 0, "F16": 0, "Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


def plan_conversion(reader: Any, file_bytes: int) -> GGUFPlan:
    """The conversion's cost, after checking that the file can hold what its header declares:
    every tensor's data lies inside the data section, no two tensors share bytes, and the
    declared shapes agree with the element counts. Anything else is a GGUFConversionError,
    raised before a byte is converted (one 4.5 MiB block named by 600 tensors would otherwise
    dequantize into gigabytes)."""
    spans = []
    for t in reader.tensors:
        elements = 1
        for d in t.shape:
            elements *= int(d)
        if elements != int(t.n_elements) or elements < 0:
            raise GGUFConversionError(f"GGUF tensor {t.name} declares {elements} elements as "
                                      f"{int(t.n_elements)}: the header is corrupt")
        start, size = int(t.data_offset), int(t.n_bytes)
        if start < int(reader.data_offset) or start + size > file_bytes or size < 0:
            raise GGUFConversionError(f"GGUF tensor {t.name} points outside the file's data (bytes {start}.."
                                      f"{start + size} of a {file_bytes}-byte file): the file is damaged or crafted")
        spans.append((start, size, t.name))
    spans.sort()
    for (a_start, a_size, a_name), (b_start, _, b_name) in zip(spans, spans[1:]):
        if b_start < a_start + a_size:
            raise GGUFConversionError(f"GGUF tensors {a_name} and {b_name} overlap (the same bytes read as two "
                                      "tensors): the file is crafted; refusing to convert it")
    declared = sum(size for _, size, _ in spans)
    room = file_bytes - int(reader.data_offset)
    if declared > room:
        raise GGUFConversionError(f"GGUF tensors declare {declared} bytes of data and the file holds {room}: "
                                  "they can't all be in it")
    mlx_blocks = read_metadata(reader).get("general.architecture") == "llama" and \
        all(t.tensor_type.name in _MLX_READS for t in reader.tensors)
    converted, largest = 0, 0
    for t in reader.tensors:
        n = int(t.n_elements)
        largest = max(largest, n)
        if mlx_blocks:
            bits = _MLX_READS[t.tensor_type.name]
            # packed weights plus a float16 scale and bias per group of 32
            converted += int(t.n_bytes) if not bits else n * bits // 8 + n // 32 * 4
        else:  # float16 matrices, float32 norms and biases (and float32 kept as is where MLX reads it)
            converted += n * (4 if len(t.shape) < 2 or t.tensor_type.name == "F32" else 2)
    # Besides what is kept: the tensor in flight (float32 from the dequantizer, a shifted copy,
    # the float16 copy and MLX's own). A dequantized conversion keeps at most a shard and the
    # largest tensor in memory (_convert_dequantized writes shards as it goes).
    kept = converted if mlx_blocks else min(converted, SHARD_BYTES + 4 * largest)
    peak = kept + (0 if mlx_blocks else 12 * largest)
    return GGUFPlan(file_bytes, declared, converted, peak, mlx_blocks)


def convert_gguf(gguf_path: Path, out_dir: Path,
                 progress: Optional[Callable[[str], None]] = None,
                 check: Optional[Callable[[GGUFPlan], None]] = None) -> Path:
    """Convert `gguf_path` into an mlx-lm folder at `out_dir` (written atomically). The file's
    layout is checked first (plan_conversion); `check` sees the conversion's cost before anything
    is written and may refuse it by raising. On any failure, MemoryError included, nothing is left
    behind but what `out_dir` held before."""
    import mlx.core as mx
    from gguf import GGUFReader

    say = progress or (lambda _msg: None)
    say(f"reading {gguf_path.name}")
    reader = GGUFReader(str(gguf_path))  # memory-mapped: the header, not the weights, is read here
    plan = plan_conversion(reader, gguf_path.stat().st_size)
    if check is not None:
        check(plan)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    try:
        if read_metadata(reader).get("general.architecture") == "llama":
            try:
                weights, meta = mx.load(str(gguf_path), return_metadata=True)
            except (RuntimeError, ValueError):  # a tensor type MLX doesn't read (K-quants, IQ, BF16, ...)
                pass
            else:
                return _convert_mlx_blocks(weights, meta, tmp, out_dir, say)
        return _convert_dequantized(reader, tmp, out_dir, say)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_mlx_blocks(weights: dict[str, Any], meta: dict[str, Any], tmp: Path, out_dir: Path,
                        say: Callable[[str], None]) -> Path:
    """A llama file MLX read itself: its blocks stay MLX-quantized."""
    import mlx.core as mx
    import numpy as np

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    say("renaming tensors")
    rope = {k: np.array(weights.pop(k)) for k in ROPE_TENSORS if k in weights}
    renamed = {mlx_tensor_name(k): v for k, v in weights.items()}
    config = ARCHITECTURES["llama"].config(meta, "llama")
    _add_rope_scaling(config, rope)
    hidden = config["hidden_size"]
    config.update({"vocab_size": len(meta["tokenizer.ggml.tokens"]),
                   "tie_word_embeddings": "lm_head.weight" not in renamed,
                   "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id")),
                   "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id"))})
    quant = _quantization(renamed, lambda module: config["intermediate_size"]
                          if module.endswith("down_proj") else hidden)
    if quant:
        config["quantization"] = quant
        config["quantization_config"] = quant
    say("writing weights")
    mx.save_safetensors(str(tmp / "model.safetensors"), renamed, metadata={"format": "mlx"})
    return _finish(tmp, out_dir, config, meta, say)


def _add_rope_scaling(config: dict[str, Any], tensors: dict[str, Any]) -> None:
    try:
        scaling = rope_scaling(tensors, config)
    except ValueError as e:
        raise GGUFConversionError(str(e)) from None
    if scaling is not None:
        config["rope_scaling"] = scaling


def _finish(tmp: Path, out_dir: Path, config: dict[str, Any], meta: dict[str, Any],
            say: Callable[[str], None]) -> Path:
    """Tokenizer files and config.json beside the weights in `tmp`, then `tmp` becomes `out_dir`."""
    say("building tokenizer")
    _build_tokenizer(meta, tmp)
    # The end-of-turn token is what a chat template ends an answer with (ChatML's <|im_end|>, the
    # file's eot_token_id: Gemma's <end_of_turn>, Phi-3's <|end|>); stop on it as on end-of-text.
    tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
    vocab_ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = sorted({config["eos_token_id"], vocab_ids.get(tok_cfg["eos_token"], config["eos_token_id"]),
                      *([int(_plain(eot))] if eot is not None else [])})
    config["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    say("done")
    return out_dir


# The bit widths MLX quantizes to.
_MLX_BITS = (2, 3, 4, 5, 6, 8)
_LEVEL = re.compile(r"^I?Q(\d)")  # Q4_K, Q5_0, IQ4_XS, ...: the level is the digit


def _file_bits(reader: Any) -> dict[str, int]:
    """The file's quantization level in MLX bits: "blocks" (the transformer blocks' matrices, what
    Q4_K_M names: the nearest MLX width to their mean level), and the embeddings and head by their
    mlx-lm names (llama.cpp's mixes keep those wider); a part held as floats is left out."""
    sums: dict[str, list[int]] = {}  # part -> [level x weights, weights]
    for tensor in reader.tensors:
        level = _LEVEL.match(tensor.tensor_type.name)
        if len(tensor.shape) < 2 or not level:
            continue
        part = "blocks" if tensor.name.startswith("blk.") else TOP_LEVEL.get(tensor.name.split(".")[0], "blocks")
        total = sums.setdefault(part, [0, 0])
        total[0] += int(level.group(1)) * int(tensor.n_elements)
        total[1] += int(tensor.n_elements)
    return {part: min(_MLX_BITS, key=lambda b: abs(b - total / count)) for part, (total, count) in sums.items()}


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key-value field of a GGUFReader as plain Python values (strings, numbers, lists)."""
    meta: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue  # the header's own fields
        meta[name] = f.contents()
    return meta


def _convert_dequantized(reader: Any, tmp: Path, out_dir: Path, say: Callable[[str], None]) -> Path:
    """Any tensor type and any family in gguf_archs, from llama.cpp's reader (a GGUFReader):
    dequantized, held as float16 (1-D tensors, norms and biases, as float32)."""
    import mlx.core as mx
    import numpy as np
    from gguf.quants import dequantize

    meta = read_metadata(reader)
    arch_name = str(meta.get("general.architecture"))
    arch = ARCHITECTURES.get(arch_name)
    if arch is None:
        raise GGUFConversionError(f"GGUF architecture {arch_name!r} is not supported (openmlx converts "
                                  f"{', '.join(sorted(ARCHITECTURES))})")
    _check_tokenizer(meta)  # before the long dequantizing pass, not after it
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights: dict[str, Any] = {}  # the shard being filled
    names: set[str] = set()
    shards: list[Path] = []
    held = 0

    def flush() -> None:
        nonlocal held
        shards.append(tmp / f"model-{len(shards) + 1:05d}.safetensors")
        mx.save_safetensors(str(shards[-1]), weights, metadata={"format": "mlx"})
        weights.clear()
        held = 0

    total, last = len(reader.tensors), -1
    rope: dict[str, Any] = {}  # rope scaling the file keeps as tensors (engine/formats/gguf_rope.py)
    for i, tensor in enumerate(reader.tensors):
        name = tensor.name if tensor.name in ROPE_TENSORS else mlx_tensor_name(tensor.name, arch.layers)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if name in ROPE_TENSORS:
            rope[name] = values
            continue
        if arch.norm_offset and name.endswith("norm.weight"):
            values = values - arch.norm_offset
        weights[name] = mx.array(values if values.ndim == 1 else values.astype(np.float16))
        names.add(name)
        held += weights[name].nbytes
        del values
        if held >= SHARD_BYTES:
            flush()
        done = (i + 1) * 10 // total
        if done != last:
            last = done
            say(f"dequantizing tensors {done * 10}%")
    config = arch.config(meta, arch_name)
    bits = _file_bits(reader)
    if bits:  # the file's level, for a GPU to quantize back to (engine/models/weights.py)
        config["gguf_bits"] = bits
    _add_rope_scaling(config, rope)
    config["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    config["tie_word_embeddings"] = "lm_head.weight" not in names
    eos = meta.get("tokenizer.ggml.eos_token_id")
    config["eos_token_id"] = int(eos) if eos is not None else None
    if meta.get("tokenizer.ggml.bos_token_id") is not None:
        config["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    say("writing weights")
    if shards:
        if weights:
            flush()
    else:  # a model that fits one shard keeps one file, model.safetensors
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    weights.clear()
    return _finish(tmp, out_dir, config, meta, say)
