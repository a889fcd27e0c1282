"""GGUF models in Ollama's and LM Studio's stores (issue 30 §2): listed by `openmlx list`, served
by their names (converted into openmlx's store once; the user's file is only read).

The stores are laid out as the tools write them, in a temporary home, holding the default
model's own GGUF file (a hard link or copy of it)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine.config import openmlx_home
from engine.models.default_model import find_gguf
from engine.models.external import find, lmstudio_models, ollama_models
from tests.process import Server


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, default_model_dir):
    gguf = find_gguf(openmlx_home(), lambda _m: None)
    root = tmp_path_factory.mktemp("stores")
    ollama = root / "ollama" / "models"
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    _place(gguf, ollama / "blobs" / f"sha256-{digest}")
    manifest = {"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 1},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": gguf.stat().st_size}]}
    path = ollama / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest))
    broken = ollama / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")  # skipped, never fatal
    missing = ollama / "manifests" / "registry.ollama.ai" / "library" / "gone" / "latest"
    missing.parent.mkdir(parents=True)
    missing.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                               "digest": "sha256:" + "1" * 64}]}))  # blob not there
    lmstudio = root / "lmstudio" / "models"
    _place(gguf, lmstudio / "HuggingFaceTB" / "SmolLM2-135M-Instruct-GGUF" / "smollm2-135m-instruct-q4_1.gguf")
    return {"OLLAMA_MODELS": str(ollama), "LMSTUDIO_MODELS": str(lmstudio)}


def test_discovery(stores, monkeypatch):
    for k, v in stores.items():
        monkeypatch.setenv(k, v)
    assert [m.spec for m in ollama_models()] == ["ollama:smollm2:135m"]
    assert [m.spec for m in lmstudio_models()] == [
        "lmstudio:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1.gguf"]
    assert find("ollama:smollm2:135m").store_name == "ollama-smollm2--135m"
    assert find("ollama:gone") is None and find("ollama:smollm2") is None  # no `latest` tag


def test_list_shows_them(stores, tmp_path):
    env = {**os.environ, **stores, "OPENMLX_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "handlers.cli", "list", "--json"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    ids = {m["id"]: m for m in json.loads(r.stdout)}
    assert ids["ollama:smollm2:135m"]["type"] == "gguf" and ids["ollama:smollm2:135m"]["size_bytes"] > 1 << 20
    assert any(i.startswith("lmstudio:HuggingFaceTB/") for i in ids)


@pytest.mark.parametrize("spec,served", [
    ("ollama:smollm2:135m", "ollama-smollm2--135m"),
    ("lmstudio:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1.gguf",
     "lmstudio-HuggingFaceTB--SmolLM2-135M-Instruct-GGUF--smollm2-135m-instruct-q4_1")])
def test_served_by_name(stores, tmp_path, spec, served):
    before = {p: p.stat().st_mtime_ns for p in map(Path, stores.values())}
    s = Server(["--model", spec, "--embedding-model", "none", "--audio-model", "none"],
               env={**os.environ, **stores, "OPENMLX_HOME": str(tmp_path)}, wait=False)
    try:
        s.wait_ready(timeout=600)
        ids = [m["id"] for m in httpx.get(s.url + "/v1/models", timeout=30).json()["data"]]
        assert served in ids
        r = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
            "model": served, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"], r.text
    finally:
        s.stop()
    assert (tmp_path / "models" / served / "config.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in map(Path, stores.values())} == before  # only read


def test_an_unknown_name_is_one_clear_line(stores, tmp_path):
    env = {**os.environ, **stores, "OPENMLX_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "handlers.cli", "serve", "--model", "ollama:nothing:here", "--port", "0"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "ollama:nothing:here" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_config_file_source_can_be_a_gguf_file(stores, tmp_path):
    """`models: [{source: FILE.gguf, id: ..., preload: true}]`: converted at start, served under its id."""
    gguf = find_gguf(openmlx_home(), lambda _m: None)
    config = tmp_path / "openmlx.yaml"
    config.write_text(json.dumps({"models": [{"source": str(gguf), "id": "smol-from-gguf", "preload": True,
                                              "temperature": 0}]}))
    s = Server(["--config", str(config), "--embedding-model", "none", "--audio-model", "none"],
               env={**os.environ, "OPENMLX_HOME": str(tmp_path / "home")}, wait=False)
    try:
        s.wait_ready(timeout=600)
        r = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
            "model": "smol-from-gguf", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"], r.text
    finally:
        s.stop()
