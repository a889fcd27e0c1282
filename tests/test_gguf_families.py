"""GGUF families with no small real file on the registries (gemma2, phi3; shared/MODELS.md): a tiny
random model of each is written in llama.cpp's layout with llama.cpp's own writer (`gguf`):
its tensor names, its metadata keys, Gemma's zero-centred norms stored as `w + 1`, Phi-3's fused
q/k/v and gate/up tensors and long-rope factor tensors, as convert_hf_to_gguf.py writes them. The
file is converted back and must give the original model's logits. This checks the family tables
(engine/formats/gguf_archs.py, gguf_rope.py) against that layout; the checks against llama.cpp
itself, on real files, are in tests/test_real_models.py (qwen2, gemma3, and the default model's
llama). Llama 3.1+ (a llama3 rope scaling kept as a `rope_freqs` tensor) is here too."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.formats.gguf import convert_gguf

VOCAB = 300
# llama.cpp's names (gguf-py's tensor table) for each mlx-lm module, written out here rather than
# read from engine/formats/gguf_archs.py, so a wrong table can't cancel itself out.
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GEMMA2 = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
          "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
LLAMA = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
PHI3 = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

FAMILIES = {
    # Llama 3.1+: the llama3 rope scaling written as a rope_freqs tensor (and q/k rows permuted).
    "llama": ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
               "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": VOCAB,
               "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
              {"rope.dimension_count": 16}, LLAMA, 0.0),
    "gemma2": ({"model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6,
                "vocab_size": VOCAB, "rope_theta": 10000.0, "attn_logit_softcapping": 20.0,
                "final_logit_softcapping": 5.0, "query_pre_attn_scalar": 32},
               {"attention.key_length": 32, "attention.value_length": 32, "attention.sliding_window": 4096,
                "attn_logit_softcapping": 20.0, "final_logit_softcapping": 5.0},
               GEMMA2, 1.0),
    "phi3": ({"model_type": "phi3", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": VOCAB,
              "rope_theta": 10000.0, "max_position_embeddings": 131072, "original_max_position_embeddings": 2048,
              "rope_scaling": {"type": "longrope", "long_factor": [1.0 + i / 4 for i in range(8)],
                               "short_factor": [1.0 + i / 16 for i in range(8)]}},
             {"rope.dimension_count": 16, "rope.scaling.original_context_length": 2048},
             PHI3, 0.0),
}


def _write(path: Path, arch_name: str, config: dict, extra_meta: dict, names: dict[str, str], norm_shift: float,
           params: dict[str, np.ndarray], quantize=None) -> None:
    """The model as convert_hf_to_gguf.py writes it: llama.cpp's names, its metadata keys, norms
    shifted by `norm_shift` (Gemma's `w + 1`), Phi-3's long-rope factors as tensors; `quantize`
    (parameter name -> GGML type) quantizes the matrices with llama.cpp's own block formats."""
    import gguf.quants

    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    w = gguf.GGUFWriter(str(path), arch_name)
    w.add_uint32(f"{arch_name}.block_count", config["num_hidden_layers"])
    w.add_uint32(f"{arch_name}.embedding_length", config["hidden_size"])
    w.add_uint32(f"{arch_name}.feed_forward_length", config["intermediate_size"])
    w.add_uint32(f"{arch_name}.attention.head_count", config["num_attention_heads"])
    w.add_uint32(f"{arch_name}.attention.head_count_kv", config["num_key_value_heads"])
    w.add_uint32(f"{arch_name}.context_length", config.get("max_position_embeddings", 8192))
    w.add_float32(f"{arch_name}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    w.add_float32(f"{arch_name}.rope.freq_base", config["rope_theta"])
    for key, value in extra_meta.items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch_name}.{key}", value)
    alphabet = sorted(set(ByteLevel.alphabet()))
    tokens = alphabet + [alphabet[0] + alphabet[1]] + [f"<t{i}>" for i in range(VOCAB - len(alphabet) - 1)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([f"{alphabet[0]} {alphabet[1]}"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_eot_token_id(7)  # the end of a chat turn (Gemma's <end_of_turn>, Phi-3's <|end|>)
    for name, value in params.items():
        module, leaf = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            _, _, block, inner = module.split(".", 3)
            gguf_name = f"blk.{block}.{names[inner]}.{leaf}"
        else:
            gguf_name = f"{TOP[module]}.{leaf}"
        if gguf_name.endswith("norm.weight"):
            value = value + norm_shift
        if arch_name == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if "attn_q" in gguf_name else "num_key_value_heads"]
            value = _permute(value, heads)
        value = value.astype(np.float32)
        if quantize is not None and value.ndim == 2:
            kind = quantize(name)
            w.add_tensor(gguf_name, gguf.quants.quantize(value, kind), raw_dtype=kind)
        else:
            w.add_tensor(gguf_name, value)
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":  # convert_hf_to_gguf.py's LlamaModel: one factor per pair
        dim = config["hidden_size"] // config["num_attention_heads"]
        w.add_tensor("rope_freqs.weight", _llama3_factors(config["rope_theta"], dim, scaling))
    if scaling.get("type") == "longrope":
        w.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order for its rope (LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(base: float, dim: int, s: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for a llama3 rope scaling, written out here."""
    import math

    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
                (s["high_freq_factor"] - s["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize("arch_name", sorted(FAMILIES))
def test_a_family_written_as_llama_cpp_does_converts_back_to_the_same_logits(arch_name, tmp_path):
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load

    config, extra_meta, names, norm_shift = FAMILIES[arch_name]
    family = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = family.Model(family.ModelArgs.from_dict(config))
    rng = np.random.default_rng(0)
    # Values float16 holds exactly (the store keeps 2-D weights as float16), norms away from 1.
    params = {k: (rng.standard_normal(v.shape) * 0.2).astype(np.float16).astype(np.float32)
              for k, v in tree_flatten(model.parameters())}
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in params.items()]))
    path = tmp_path / f"tiny-{arch_name}.gguf"
    _write(path, arch_name, config, extra_meta, names, norm_shift, params)

    folder = convert_gguf(path, tmp_path / "converted")
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == [1, 7]  # stops on both
    converted, _ = load(str(folder))
    converted.set_dtype(mx.float32)
    if arch_name == "llama":
        assert json.loads((folder / "config.json").read_text())["rope_scaling"] == config["rope_scaling"]
    ids = mx.array([[5, 17, 250, 3, 99, 42, 7, 128]])
    expected, got = model(ids), converted(ids)
    assert got.shape == expected.shape
    assert np.allclose(np.array(got), np.array(expected), atol=2e-4, rtol=2e-4), \
        float(np.abs(np.array(got) - np.array(expected)).max())


def test_a_large_conversion_is_written_in_shards_and_loads_the_same(tmp_path, monkeypatch):
    """Weights are written a shard at a time (a 7B's 15 GB of float16 never held at once): with
    one tensor a shard here, the folder holds many model-*.safetensors and the logits are unchanged."""
    from engine.formats import gguf as gguf_format

    monkeypatch.setattr(gguf_format, "SHARD_BYTES", 1)
    test_a_family_written_as_llama_cpp_does_converts_back_to_the_same_logits("gemma2", tmp_path)
    folder = tmp_path / "converted"
    assert len(list(folder.glob("model-*.safetensors"))) > 5 and not (folder / "model.safetensors").exists()


def test_a_quantized_file_is_quantized_back_to_its_level_on_a_gpu(tmp_path, monkeypatch):
    """On a GPU a model converted from a quantized GGUF is held at the file's level (Q8_0 here, the
    embeddings Q4_0: 8 and 4 bits), not as the float16 the store keeps; its answers stay close."""
    import gguf.quants
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from engine.models import weights
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe

    config, extra_meta, names, norm_shift = FAMILIES["phi3"]
    from mlx_lm.models import phi3

    model = phi3.Model(phi3.ModelArgs.from_dict(config))
    rng = np.random.default_rng(1)
    params = {k: (rng.standard_normal(v.shape) * 0.2).astype(np.float32) for k, v in tree_flatten(model.parameters())}
    path = tmp_path / "tiny-q8.gguf"
    kinds = {"model.embed_tokens.weight": gguf.GGMLQuantizationType.Q4_0}
    _write(path, "phi3", config, extra_meta, names, norm_shift, params,
           quantize=lambda name: kinds.get(name, gguf.GGMLQuantizationType.Q8_0))
    folder = convert_gguf(path, tmp_path / "converted")
    assert json.loads((folder / "config.json").read_text())["gguf_bits"] == {"blocks": 8, "model.embed_tokens": 4,
                                                                           "lm_head": 8}

    def held(on_gpu: bool):
        monkeypatch.setattr(weights, "on_gpu", lambda: on_gpu)
        return weights.load_gated("tiny", probe(folder), "keep", MemoryGate()).model

    plain, requantized = held(False), held(True)
    assert isinstance(plain.model.layers[0].mlp.down_proj, nn.Linear)
    assert requantized.model.layers[0].mlp.down_proj.bits == 8
    assert requantized.model.embed_tokens.bits == 4
    ids = mx.array([[5, 17, 250, 3]])
    a, b = np.array(plain(ids).astype(mx.float32)), np.array(requantized(ids).astype(mx.float32))
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
