"""CPU fast path: OpenBLAS is active and float32 weights answer like the shipped 4-bit ones."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine.cpu import blas

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
    code = "import engine, mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64))); print(engine.cpu.blas.active().name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        from ctypes.util import find_library
        import os
        present = find_library("openblas") or os.path.exists("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
        assert out.stdout.strip() == ("openblas" if present else "bundled")


def test_the_faster_openblas_is_chosen(tmp_path):
    """Where both pip's cmeel-openblas and the system's OpenBLAS load, each is timed once (in a
    fresh interpreter) and the faster is used; the timing is kept for the next start.
    OPENMLX_BLAS=system skips the wheel."""
    import json
    import os

    code = ("import engine, mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64))); "
            "b = engine.cpu.blas.active(); print(b.name, b.version, b.path)")
    env = {**os.environ, "OPENMLX_HOME": str(tmp_path)}
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert chosen.returncode == 0, chosen.stderr
    cache = tmp_path / "blas.json"
    if not cache.exists():
        pytest.skip("fewer than two OpenBLAS libraries load on this machine: nothing to choose")
    timings = json.loads(cache.read_text())["timings"]
    assert all(t is not None and t > 0 for t in timings.values()), timings
    name, version, path = chosen.stdout.split()
    assert name == "openblas" and path == min(timings, key=timings.get)
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert again.stdout == chosen.stdout  # the kept timing decides the next start the same way
    system = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**env, "OPENMLX_BLAS": "system"})
    assert "cmeel" not in system.stdout


@pytest.fixture(scope="module")
def runners(default_model_dir):
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine.generation.text import TextRunner

    p = probe(default_model_dir)
    gate = MemoryGate()
    return TextRunner.load("m", p, "keep", gate), TextRunner.load("m", p, "float32", gate)


def greedy(runner, prompt: str, n: int = 16) -> str:
    from engine.generation.text import ChatMessage, SamplingParams, TextDelta

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

    from engine.generation.text import ChatMessage

    keep, fast = runners
    ids = mx.array([keep.encode_chat([ChatMessage("user", PROMPTS[0])])])
    a, b = keep.model(ids)[0, -1], fast.model(ids)[0, -1]
    diff = mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
    scale = mx.abs(a.astype(mx.float32)).max().item()
    assert diff / scale < 1e-2


_ANSWERS = """
import json, sys
import engine
import mlx.core as mx
from engine.models.memory import MemoryGate
from engine.models.probe import probe
from engine.generation.text import ChatMessage, SamplingParams, TextDelta, TextRunner

runner = TextRunner.load("m", probe(sys.argv[1]), "float32", MemoryGate())
out = {"blas": engine.cpu.blas.active().path, "texts": [], "logits": []}
for prompt in json.loads(sys.argv[2]):
    ids = runner.encode_chat([ChatMessage("user", prompt)])
    events = runner.generate(ids, 16, SamplingParams(temperature=0.0), lambda: False)
    out["texts"].append("".join(e.text for e in events if isinstance(e, TextDelta)))
    out["logits"].append(runner.model(mx.array(ids)[None])[0, -1].astype(mx.float32).tolist()[:2000])
print(json.dumps(out))
"""


def test_every_openblas_gives_the_same_answers(default_model_dir):
    """The BLAS changes speed, not answers: same greedy text, logits within tolerance, with pip's
    cmeel-openblas and with the system's (each in its own interpreter)."""
    import json
    import os

    import numpy as np

    wheel = blas._wheel_library()
    if wheel is None:
        pytest.skip("pip's cmeel-openblas is not installed here")
    runs = []
    for env in ({"OPENMLX_OPENBLAS": wheel[0]}, {"OPENMLX_BLAS": "system"}):
        out = subprocess.run([sys.executable, "-c", _ANSWERS, str(default_model_dir), json.dumps(PROMPTS[:3])],
                             capture_output=True, text=True, timeout=300, env={**os.environ, **env})
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if runs[0]["blas"] == runs[1]["blas"]:
        pytest.skip("only one OpenBLAS on this machine")
    assert runs[0]["texts"] == runs[1]["texts"]
    for a, b in zip(runs[0]["logits"], runs[1]["logits"]):
        assert np.allclose(a, b, atol=2e-2), float(np.max(np.abs(np.array(a) - np.array(b))))
