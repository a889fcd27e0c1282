"""Tiny random models that shard over 2 ranks (shared/DISTRIBUTED.md): 4 layers (or `layers`), hidden 64,
4 heads / 2 kv heads, the default model's tokenizer, weights split over two safetensors files
with an index (pipeline loading needs it), scaled so that every layer matters."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def write_tiny_sharded(folder: Path, model_type: str, tokenizer_from: Path, seed: int = 0, layers: int = 4) -> Path:
    import importlib

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": layers, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 49152,
              "max_position_embeddings": 2048, "tie_word_embeddings": True, "rope_theta": 10000.0,
              "eos_token_id": 2, "bos_token_id": 1}
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = module.Model(module.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if value.ndim >= 2:  # ~N(0, (2/sqrt(fan_in))^2): random but not washed out
            weights[name] = mx.array(rng.normal(0, 2 / np.sqrt(value.shape[-1]), value.shape).astype(np.float32))
        else:
            weights[name] = value
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in halves.items():
        mx.save_safetensors(str(folder / file), {k: weights[k] for k in keys})
        weight_map.update({k: file for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder
