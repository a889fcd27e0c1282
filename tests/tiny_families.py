"""Tiny random-weight models of the 2026 architectures (shared/MODELS.md "The 2026 families"): no
registry holds their weights, so tests build them in seconds. mlx-lm's own model class with a
small configuration, random weights through `mx.save_safetensors` (already in mlx-lm's layout, so
`sanitize` leaves them as they are), config.json, and the default model's tokenizer and ChatML
template. They load and run through mlx-lm exactly as the real models do (the same layer kinds and
cache kinds: a hybrid's recurrent `ArraysCache` layers beside its attention layers, an MoE's
router and experts); their text is noise, deterministic for a seed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

_VOCAB = 49152  # the default model's tokenizer (SmolLM2)
_EOS, _BOS = 2, 1
_COMMON = {"vocab_size": _VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
           "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
           "tie_word_embeddings": True, "eos_token_id": _EOS, "bos_token_id": _BOS}

CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen3.5/3.6: gated-delta-net (linear attention, recurrent state) layers, every 2nd full attention
    "qwen3_5": {**_COMMON, "model_type": "qwen3_5", "num_hidden_layers": 4, "full_attention_interval": 2,
                "head_dim": 16, "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
                "rope_parameters": {"type": "default", "mrope_section": [1, 1, 0], "rope_theta": 10000,
                                    "partial_rotary_factor": 0.25}},
    # Nemotron-H: Mamba-2 layers, attention and MLP blocks by pattern
    "nemotron_h": {**_COMMON, "model_type": "nemotron_h", "num_hidden_layers": 4, "hybrid_override_pattern": "M*M-",
                   "attention_bias": False, "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_proj_bias": False,
                   "ssm_state_size": 16, "conv_kernel": 4, "n_groups": 1, "mlp_bias": False,
                   "layer_norm_epsilon": 1e-5, "use_bias": False, "use_conv_bias": True, "head_dim": 16},
    "qwen3_moe": {**_COMMON, "model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 4,
                  "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "moe_intermediate_size": 32, "head_dim": 16, "rope_theta": 10000.0, "norm_topk_prob": True},
    "gpt_oss": {**_COMMON, "model_type": "gpt_oss", "num_hidden_layers": 2, "num_local_experts": 4,
                "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 8, "rope_theta": 10000,
                "layer_types": ["sliding_attention", "full_attention"], "intermediate_size": 64},
    "glm4_moe": {**_COMMON, "model_type": "glm4_moe", "num_hidden_layers": 2, "moe_intermediate_size": 32,
                 "norm_topk_prob": True, "n_group": 1, "head_dim": 16, "topk_group": 1, "n_shared_experts": 1,
                 "n_routed_experts": 4, "routed_scaling_factor": 1.0, "num_experts_per_tok": 2,
                 "first_k_dense_replace": 1, "rope_theta": 10000.0, "rope_scaling": None, "use_qk_norm": True,
                 "attention_bias": False, "partial_rotary_factor": 0.5},
}


def write_tiny(folder: Path, model_type: str, tokenizer_from: Path, seed: int = 0) -> Path:
    """Write a runnable model folder of `model_type` (a key of CONFIGS); returns it."""
    import importlib

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    folder.mkdir(parents=True, exist_ok=True)
    config = CONFIGS[model_type]
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = module.Model(module.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if value.ndim >= 2 and "conv1d" not in name:  # ~N(0, (2/sqrt(fan_in))^2): random, not washed out
            weights[name] = mx.array(rng.normal(0, 2 / np.sqrt(value.shape[-1]), value.shape).astype(np.float32))
        else:  # norms, biases, gates, convolutions and the SSM's decay parameters as the class starts them
            weights[name] = value.astype(mx.float32)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder
