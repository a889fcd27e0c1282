"""One table per GGUF architecture: how llama.cpp's tensor names and metadata keys map onto the
mlx-lm model of the same family. A family not listed here is refused with its name.

`permuted_qk`: llama.cpp's converter reorders the q/k rows of llama-family weights for its own
rope; MLX's traditional rope reads them in that order (`rope_traditional: true`). Qwen's
converters leave the rows alone, so their files use the standard rope.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# llama.cpp block tensor -> mlx-lm module, shared by every family here.
COMMON_LAYERS = {
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
TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class Architecture:
    """How one GGUF `general.architecture` becomes an mlx-lm config and parameter names."""

    model_type: str
    hf_class: str
    permuted_qk: bool
    layers: dict[str, str] = field(default_factory=lambda: dict(COMMON_LAYERS))
    head_dim_key: bool = False  # config carries head_dim (from attention.key_length)

    def config(self, meta: dict[str, Any], prefix: str) -> dict[str, Any]:
        """mlx-lm's config.json fields from the file's metadata (`prefix` = the architecture name)."""
        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{prefix}.{key}", default)
            return value.item() if hasattr(value, "item") else value

        heads = int(get("attention.head_count"))
        config: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": [self.hf_class],
            "hidden_size": int(get("embedding_length")),
            "num_hidden_layers": int(get("block_count")),
            "intermediate_size": int(get("feed_forward_length")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(get("attention.head_count_kv", heads)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(get("context_length", 4096)),
            "rope_traditional": self.permuted_qk,
        }
        if self.head_dim_key and get("attention.key_length") is not None:
            config["head_dim"] = int(get("attention.key_length"))
        return config


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", permuted_qk=False),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", permuted_qk=False, head_dim_key=True,
                          layers={**COMMON_LAYERS, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}),
}

# The pre-tokenizer regexes llama.cpp names in `tokenizer.ggml.pre` (as in the models' own
# tokenizer.json); a name not listed uses GPT-2's, as SmolLM2's files do.
PRE_TOKENIZERS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
