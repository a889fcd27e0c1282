"""Shared fixtures: the real default model, and live `openmlx serve` processes.

Servers run as subprocesses (real uvicorn, real MLX) so the tests see exactly what users see,
and MLX's worker thread never lives inside the pytest process.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from engine.config import openmlx_home
from engine.models.default_model import DEFAULT_MODEL_ID, ensure_default_model
from tests.process import Server

MODEL = DEFAULT_MODEL_ID


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run long fuzzing and soak tests")


def pytest_configure(config):
    if config.getoption("--run-slow"):
        os.environ.setdefault("OPENMLX_FUZZ_EXAMPLES", "500")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: use --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model in the store (converted once, fetched once if needed)."""
    home = openmlx_home()
    return ensure_default_model(home / "models", home)


@pytest.fixture(scope="session")
def server(default_model_dir: Path) -> Iterator[Server]:
    """One live server on the default model for the session."""
    s = Server(["--max-queue", "16"])
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def hf_tokenizer(default_model_dir: Path):
    """The model's own tokenizer (transformers, no MLX) for checking token counts."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def _write_tiny_llama(folder: Path, tokenizer_from: Path) -> Path:
    """A tiny random llama (2 layers, hidden 64) using the default model's tokenizer."""
    import json
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 49152,
              "max_position_embeddings": 2048, "tie_word_embeddings": True, "rope_theta": 10000.0,
              "eos_token_id": 2, "bos_token_id": 1}
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def fixture_models(tmp_path_factory, default_model_dir: Path) -> dict[str, Path]:
    """Model folders for engine tests: a tiny runnable llama, an unknown architecture, and a
    'huge' model whose weights file is sparse (large on paper, no disk or memory used)."""
    import json
    import struct

    root = tmp_path_factory.mktemp("models")
    tiny = _write_tiny_llama(root / "tiny-llama", default_model_dir)
    unknown = _write_tiny_llama(root / "mystery-arch", default_model_dir)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["model_type"] = "mystery_arch_9000"
    (unknown / "config.json").write_text(json.dumps(cfg))
    huge = _write_tiny_llama(root / "huge-llama", default_model_dir)
    size = 200 << 30  # 200 GiB on paper
    header = json.dumps({"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    with open(huge / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)
    return {"tiny": tiny, "unknown": unknown, "huge": huge}


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory, default_model_dir: Path) -> Path:
    """A tiny random Qwen2-VL folder (tests/tiny_vlm.py) that the real mlx-vlm pipeline runs."""
    from tests.tiny_vlm import write_tiny_qwen2_vl

    return write_tiny_qwen2_vl(tmp_path_factory.mktemp("vlm") / "tiny-vlm", default_model_dir)
