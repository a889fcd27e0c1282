"""What a model folder says about itself beyond the probe, for APIs that describe models in
detail (Ollama's /api/show and /api/tags): its chat template, generation defaults, parameter
count and what it can do. Read from the folder's small files only (no weights, no MLX)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from engine.generation.reasoning import template_thinks
from engine.models.probe import Probe


@dataclass(frozen=True)
class ModelCard:
    """A model described for clients."""

    family: Optional[str]  # config.json's model_type (llama, qwen2 ...), Ollama's "architecture"
    parameter_count: Optional[int]
    quantization: str  # Q4, Q8 (MLX quantized) or the stored dtype: F32, F16, BF16
    template: str  # the chat template ("" for models without one)
    defaults: dict[str, Any]  # generation_config.json's sampling defaults
    capabilities: tuple[str, ...]  # Ollama's names: completion, tools, thinking, vision, embedding
    embedding_length: Optional[int]  # the hidden size


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def chat_template(folder: Path) -> str:
    """The chat template as transformers finds it: chat_template.jinja, chat_template.json, or
    tokenizer_config.json's `chat_template` (a string, or named templates: the default one)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text()
        except (OSError, UnicodeDecodeError):
            return ""
    value = _json(folder / "chat_template.json").get("chat_template") or \
        _json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), "")
    return value if isinstance(value, str) else ""


def _parameter_count(p: Probe, text_cfg: dict[str, Any]) -> Optional[int]:
    """From the weight headers when unquantized (float32 bytes / 4), else from the file size and
    the quantization's bits (weights dominate the size)."""
    if p.float32_bytes:
        return p.float32_bytes // 4
    bits = (p.quantization or {}).get("bits")
    if isinstance(bits, int) and bits > 0 and p.size_bytes:
        return p.size_bytes * 8 // (bits + 1)  # + a bit a weight for group scales and biases (group size 64)
    dtype = str(text_cfg.get("torch_dtype") or "").lower()
    width = 4 if "32" in dtype else 2
    return p.size_bytes // width if p.size_bytes else None


def card(p: Probe, template_override: Optional[str] = None) -> ModelCard:
    """The card of a probed model folder."""
    config = p.config or {}
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    template = template_override if template_override is not None else chat_template(p.path)
    bits = (p.quantization or {}).get("bits")
    dtype = str(text_cfg.get("torch_dtype") or config.get("torch_dtype") or "").lower()
    quant = f"Q{bits}" if bits else {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype, "unknown")
    if p.type == "embedding":
        caps: tuple[str, ...] = ("embedding",)
    elif p.type in ("text", "vision"):
        caps = ("completion",) + (("tools",) if "tools" in template else ()) \
            + (("thinking",) if template_thinks(template) else ()) + (("vision",) if p.type == "vision" else ())
    else:
        caps = ()
    generation = _json(p.path / "generation_config.json")
    defaults = {k: generation[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                if isinstance(generation.get(k), (int, float))}
    hidden = text_cfg.get("hidden_size") or text_cfg.get("d_model")
    return ModelCard(p.architecture, _parameter_count(p, text_cfg), quant, template, defaults, caps,
                     hidden if isinstance(hidden, int) else None)


def size_label(count: Optional[int]) -> str:
    """Ollama's parameter_size: 135M, 494M, 1.5B, 7B."""
    if not count:
        return "unknown"
    if count >= 10**9:
        return f"{count / 10**9:.1f}B".replace(".0B", "B")
    return f"{round(count / 10**6)}M"
