"""Convert a llama-architecture GGUF file into an MLX model folder that mlx-lm loads.

MLX reads GGUF natively (`mx.load(..., return_metadata=True)`) and returns its Q4/Q8 blocks as
MLX-quantized tensors, so conversion is a rename plus config and tokenizer files. The facts this
relies on (name map, `rope_traditional`, tokenizer layout) are in shared/MODELS.md.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|scales|biases|bias)$")
_TOP = re.compile(r"^([a-z_]+)\.(weight|scales|biases|bias)$")


class GGUFConversionError(ValueError):
    """The GGUF file is not one we can convert (architecture, tensor names, metadata)."""


def mlx_tensor_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to mlx-lm's llama parameter name."""
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    m = _TOP.match(gguf_name)
    if m and m.group(1) in _TOP_MAP:
        return f"{_TOP_MAP[m.group(1)]}.{m.group(2)}"
    raise GGUFConversionError(f"unknown GGUF tensor name: {gguf_name}")


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


def _build_tokenizer(meta: dict[str, Any], out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFConversionError(
            f"only byte-level BPE (gpt2) GGUF tokenizers are supported, got {meta.get('tokenizer.ggml.model')!r}")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if hasattr(types, "tolist") else list(types or [])
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == 3]
    tokenizer.add_special_tokens(special)
    tokenizer.save(str(out / "tokenizer.json"))

    bos = tokens[int(_scalar(meta, "tokenizer.ggml.bos_token_id"))]
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
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token"))
        if "tokenizer.ggml.add_bos_token" in meta else False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length")),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": config["pad_token"]}, indent=2))


def convert_gguf(gguf_path: Path, out_dir: Path,
                 progress: Optional[Callable[[str], None]] = None) -> Path:
    """Convert `gguf_path` into an mlx-lm folder at `out_dir` (written atomically)."""
    import mlx.core as mx

    say = progress or (lambda _msg: None)
    say(f"reading {gguf_path.name}")
    weights, meta = mx.load(str(gguf_path), return_metadata=True)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFConversionError(f"only llama-architecture GGUF files are supported, got {arch!r}")

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    say("renaming tensors")
    renamed = {mlx_tensor_name(k): v for k, v in weights.items()}
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    n_heads = int(_scalar(meta, "llama.attention.head_count"))
    hidden = int(_scalar(meta, "llama.embedding_length"))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(meta, "llama.block_count")),
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv")),
        "rms_norm_eps": float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base")),
        "max_position_embeddings": int(_scalar(meta, "llama.context_length")),
        "vocab_size": n_vocab,
        "tie_word_embeddings": "lm_head.weight" not in renamed,
        # GGUF permutes q/k rows for llama.cpp's rope; MLX's traditional rope matches that order.
        "rope_traditional": True,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id")),
    }
    quant = _quantization(renamed, lambda module: config["intermediate_size"]
                          if module.endswith("down_proj") else hidden)
    if quant:
        config["quantization"] = quant
        config["quantization_config"] = quant
    say("writing weights")
    mx.save_safetensors(str(tmp / "model.safetensors"), renamed, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    say("building tokenizer")
    _build_tokenizer(meta, tmp)
    # The ChatML end-of-turn token is what the chat template emits; stop on it.
    tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
    vocab_ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    eos_ids = sorted({config["eos_token_id"], vocab_ids.get(tok_cfg["eos_token"], config["eos_token_id"])})
    config["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    say("done")
    return out_dir
