"""CPU fast path: OpenBLAS is active and float32 weights answer like the shipped 4-bit ones."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine import blas

PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
]


def test_blas_reports_itself():
    info = blas.active()
    assert info.name in ("openblas", "bundled", "accelerate") and info.reason
    if info.name == "openblas":
        assert info.path and info.threads >= 1


def test_openblas_is_used_when_present():
    """In a fresh interpreter, importing the engine loads OpenBLAS before mlx (Linux)."""
    code = "import engine, mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64))); print(engine.blas.active().name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        from ctypes.util import find_library
        import os
        present = find_library("openblas") or os.path.exists("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
        assert out.stdout.strip() == ("openblas" if present else "bundled")


@pytest.fixture(scope="module")
def runners(default_model_dir):
    from engine.memory import MemoryGate
    from engine.probe import probe
    from engine.text import TextRunner

    p = probe(default_model_dir)
    gate = MemoryGate()
    return TextRunner.load("m", p, "keep", gate), TextRunner.load("m", p, "float32", gate)


def greedy(runner, prompt: str, n: int = 16) -> str:
    from engine.text import ChatMessage, SamplingParams, TextDelta

    ids = runner.encode_chat([ChatMessage("user", prompt)])
    events = runner.generate(ids, n, SamplingParams(temperature=0.0), lambda: False)
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_float32_holds_no_quantized_layers(runners):
    import mlx.nn as nn

    keep, fast = runners
    assert keep.dtype == "keep" and fast.dtype == "float32"
    assert any(isinstance(m, nn.QuantizedLinear) for m in keep.model.modules())
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in fast.model.modules())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_greedy_text(runners, prompt):
    keep, fast = runners
    assert greedy(fast, prompt) == greedy(keep, prompt)


def test_logits_close(runners):
    import mlx.core as mx

    from engine.text import ChatMessage

    keep, fast = runners
    ids = mx.array([keep.encode_chat([ChatMessage("user", PROMPTS[0])])])
    a, b = keep.model(ids)[0, -1], fast.model(ids)[0, -1]
    diff = mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
    scale = mx.abs(a.astype(mx.float32)).max().item()
    assert diff / scale < 1e-2
