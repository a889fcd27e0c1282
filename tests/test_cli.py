"""`openmlx list` and `openmlx show` on the real store."""
from __future__ import annotations

import json
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "handlers.cli", *args], capture_output=True, text=True, timeout=120)


def test_list_shows_default_model(default_model_dir):
    out = run("list")
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("SmolLM2-135M-Instruct"))
    assert "text" in line and "8192" in line and "MiB" in line
    data = json.loads(run("list", "--json").stdout)
    assert any(m["id"] == "SmolLM2-135M-Instruct" and m["type"] == "text" for m in data)
    assert any(m["id"] == "all-MiniLM-L6-v2" and m["type"] == "embedding" and m["context_length"] == 256
               for m in data)


def test_show_reports_probe_and_blas(default_model_dir, tmp_path):
    out = run("show", "SmolLM2-135M-Instruct")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["architecture"] == "llama" and info["runnable"] and info["blas"] in ("openblas", "bundled", "accelerate")
    # 30 layers x (keys + values) x 3 KV heads x 64 dims x 4 bytes: what a token holds in the prompt cache
    assert info["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4 and "prompt_cache_dir" not in info
    (tmp_path / "a1b2").mkdir()
    (tmp_path / "a1b2" / "x.safetensors").write_bytes(b"0" * 1000)
    shown = json.loads(run("show", "SmolLM2-135M-Instruct", "--prompt-cache-dir", str(tmp_path)).stdout)
    assert shown["prompt_cache_dir"] == {"path": str(tmp_path), "files": 1, "bytes": 1000}


def test_show_unknown_model_fails_clearly():
    out = run("show", "no-such-model")
    assert out.returncode == 1 and "does not exist" in out.stderr


def test_serve_with_bad_model_fails_clearly():
    out = run("serve", "--model", "no-such-model", "--port", "0")
    assert out.returncode != 0 and "no-such-model" in out.stderr
