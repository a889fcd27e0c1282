"""Probe on the real default model and on broken folders; no weights are loaded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.models.probe import probe


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_default_model_probe(default_model_dir: Path):
    p = probe(default_model_dir)
    assert (p.type, p.architecture, p.runnable, p.context_length) == ("text", "llama", True, 8192)
    assert p.quantization["bits"] == 4 and p.size_bytes > 90_000_000


@pytest.fixture
def broken(tmp_path: Path, default_model_dir: Path):
    def make(name: str) -> Path:
        return copy_model(default_model_dir, tmp_path / name)
    return make


def test_missing_weights(broken):
    folder = broken("noweights")
    (folder / "model.safetensors").unlink()
    p = probe(folder)
    assert not p.runnable and "no weight files" in p.reason


def test_truncated_safetensors(broken):
    folder = broken("truncated")
    w = folder / "model.safetensors"
    with open(w, "r+b") as f:
        f.truncate(w.stat().st_size // 2)
    p = probe(folder)
    assert not p.runnable and "truncated" in p.reason


def test_bad_config(broken):
    folder = broken("badconfig")
    (folder / "config.json").write_text("{not json")
    p = probe(folder)
    assert not p.runnable and "config.json" in p.reason


def test_missing_config(tmp_path: Path):
    assert probe(tmp_path).reason == "config.json is missing"


def test_unknown_architecture(broken):
    folder = broken("unknownarch")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "definitely_not_a_model"
    (folder / "config.json").write_text(json.dumps(cfg))
    p = probe(folder)
    assert not p.runnable and "not supported" in p.reason and p.architecture == "definitely_not_a_model"


def test_missing_index_shard(broken):
    folder = broken("sharded")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    p = probe(folder)
    assert not p.runnable and "model-00002-of-00002.safetensors" in p.reason


def test_no_tokenizer(broken):
    folder = broken("notok")
    (folder / "tokenizer.json").unlink()
    p = probe(folder)
    assert not p.runnable and "tokenizer" in p.reason


def test_kind_detection_for_audio_and_vision(tmp_path: Path, default_model_dir: Path):
    audio = copy_model(default_model_dir, tmp_path / "audio")
    (audio / "config.json").write_text(json.dumps({"model_type": "whisper", "n_text_ctx": 448}))
    assert probe(audio).type == "audio"
    vision = copy_model(default_model_dir, tmp_path / "vision")
    cfg = json.loads((vision / "config.json").read_text())
    cfg["vision_config"] = {}
    (vision / "config.json").write_text(json.dumps(cfg))
    assert probe(vision).type == "vision"


def test_embedding_model_probe():
    from engine.config import openmlx_home
    from engine.models.default_model import ensure_default_embedding_model

    home = openmlx_home()
    p = probe(ensure_default_embedding_model(home / "models", home))
    assert (p.type, p.architecture, p.runnable, p.context_length, p.embedding_dim) == ("embedding", "bert", True, 256, 384)
