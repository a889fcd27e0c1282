"""One table per GGUF architecture: how llama.cpp's tensor names and metadata keys map onto the
mlx-lm model of the same family. A family not listed here is refused with its name.

`permuted_qk`: llama.cpp's converter reorders the q/k rows of llama-family weights for its own
rope; MLX's traditional rope reads them in that order (`rope_traditional: true`). Qwen's
converters leave the rows alone, so their files use the standard rope.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

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
    # llama.cpp's converter stores zero-centred norms (gemma's `x * (1 + w)`) as `w + 1`; taken off again.
    norm_offset: float = 0.0
    # Fields the file doesn't carry, or carries under another name: f(get) -> config entries.
    extra: Callable[[Callable[..., Any]], dict[str, Any]] = lambda get: {}

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
        if get("rope.scaling.type") == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        config.update(self.extra(get))
        return config


def _gemma(big_layers: int, **fixed: Any) -> Callable[[Callable[..., Any]], dict[str, Any]]:
    """Gemma 2/3 fields llama.cpp derives rather than stores (llama-model.cpp): queries scaled by
    1/sqrt(head_dim), except on the 27B (`big_layers` blocks), which scales by 1/sqrt(hidden/heads);
    plus the family's `fixed` values."""
    def extra(get: Callable[..., Any]) -> dict[str, Any]:
        head_dim = int(get("attention.key_length", 256))
        scalar = int(get("embedding_length")) // int(get("attention.head_count")) \
            if int(get("block_count")) == big_layers else head_dim
        out = {"head_dim": head_dim, "query_pre_attn_scalar": scalar, **fixed}
        if get("attention.sliding_window") is not None:
            out["sliding_window"] = int(get("attention.sliding_window"))
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if get(key) is not None:
                out[key] = float(get(key))
        return out
    return extra


def _phi3(get: Callable[..., Any]) -> dict[str, Any]:
    """Phi-3's long-context rope: the original context it was trained at (the per-dimension
    factors are tensors in the file, read into the config by the converter)."""
    original = get("rope.scaling.original_context_length")
    return {"original_max_position_embeddings": int(original)} if original is not None else {}


GEMMA_LAYERS = {**COMMON_LAYERS, "ffn_norm": "pre_feedforward_layernorm",
                "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", permuted_qk=False),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", permuted_qk=False, head_dim_key=True,
                          layers={**COMMON_LAYERS, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}),
    # Gemma 2/3: four norms a block (the FFN's pre-norm is llama.cpp's ffn_norm), a tied head, scaled
    # embeddings (mlx-lm's model does that); Gemma 2 soft-caps attention and the logits, Gemma 3 has
    # q/k norms and sliding-window layers every five of six with a rope base of their own.
    "gemma2": Architecture("gemma2", "Gemma2ForCausalLM", permuted_qk=False, norm_offset=1.0,
                           extra=_gemma(46), layers=GEMMA_LAYERS),
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM", permuted_qk=False, norm_offset=1.0,
                           extra=_gemma(62, rope_local_base_freq=10000.0, sliding_window_pattern=6),
                           layers={**GEMMA_LAYERS, "attn_q_norm": "self_attn.q_norm",
                                   "attn_k_norm": "self_attn.k_norm"}),
    # Phi-3: q/k/v in one tensor and gate/up in one (ffn_up, gate first), as mlx-lm's phi3 holds them.
    "phi3": Architecture("phi3", "Phi3ForCausalLM", permuted_qk=False, extra=_phi3,
                         layers={**COMMON_LAYERS, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}),
}
