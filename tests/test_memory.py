"""The memory gate with injected readings, and its effect end to end (507 / refusal at start)."""
from __future__ import annotations

import pytest

from engine.errors import InsufficientMemory
from engine.models.memory import SAFETY_MARGIN, MemoryEstimate, MemoryGate, available_bytes
import httpx

from conftest import MODEL, Server


def test_reads_real_memory():
    assert available_bytes() > 0


def test_gate_refuses_when_too_small():
    gate = MemoryGate(override=1 << 30)
    with pytest.raises(InsufficientMemory) as e:
        gate.check("m", MemoryEstimate(900 << 20, 200 << 20))
    assert e.value.status == 507 and e.value.code == "insufficient_memory" and "GiB" in e.value.message
    gate.check("m", MemoryEstimate(100 << 20, 100 << 20))  # fits


def test_fits_counts_margin():
    gate = MemoryGate(read_available=lambda: SAFETY_MARGIN + 100)
    assert gate.fits(100) and not gate.fits(101)


def test_server_refuses_to_start_without_memory(default_model_dir):
    s = Server(["--assume-available-memory", str(64 << 20)], wait=False)
    code = s.proc.wait(120)
    assert code != 0
    assert "Not enough memory to load 'SmolLM2-135M-Instruct'" in s.log()
    s.stop()


def test_auto_dtype_holds_the_weights_as_blocks_when_float32_does_not_fit(default_model_dir):
    # 1000 MiB: the 4-bit weights as blocks (~0.1 GB + KV headroom + margin) fit, the float32
    # expansion (~0.6 GB more) does not: auto takes the quantized path (issue 48), not MLX's slow
    # quantized kernels over the shipped weights.
    s = Server(["--assume-available-memory", str(1000 << 20), "--log-level", "info"])
    try:
        assert "weights held as quantized" in s.log()
        model = httpx.get(s.url + "/v1/models/" + MODEL, timeout=30).json()
        assert model["dtype"] == "quantized" and model["dtype_reason"].startswith("quantized: float32 weights")
        assert "would not fit in the 1.05 GB available; held as blocks" in model["dtype_reason"]
    finally:
        s.stop()


def test_the_dtype_choice_says_why(default_model_dir):
    """Issue 30: a model too big for float32 here keeps its quantization, and says so; `openmlx
    show` says what loading it now would choose, before anything is loaded."""
    import json
    import subprocess
    import sys

    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine.models.weights import KV_HEADROOM_TOKENS, choose_cpu_dtype, kv_bytes_per_token

    p = probe(default_model_dir)
    kv = kv_bytes_per_token(p.config)
    roomy = choose_cpu_dtype("auto", p, MemoryGate(override=8 << 30), kv)
    assert roomy.dtype == "float32" and roomy.reason.startswith("float32, the CPU fast path: float32 weights 0.")
    assert f"a {KV_HEADROOM_TOKENS}-token KV budget" in roomy.reason and "fit in the 8.59 GB available" in roomy.reason
    tight = choose_cpu_dtype("auto", p, MemoryGate(override=700 << 20), kv)
    assert tight.dtype == "keep" and "would not fit" in tight.reason
    assert choose_cpu_dtype("keep", p, MemoryGate(), kv).reason == "as shipped (4-bit): --cpu-dtype keep"
    shown = subprocess.run([sys.executable, "-m", "handlers.cli", "show", str(default_model_dir)],
                           capture_output=True, text=True, timeout=300)
    info = json.loads(shown.stdout)
    assert info["dtype"] == "float32" and "fit in the" in info["dtype_reason"]


def test_a_half_precision_folder_counts_double_as_float32(tmp_path):
    """Issue 30: a GGUF K-quant converts to a float16 folder (the 1.5B Qwen: 3.55 GB on disk); on the
    CPU fast path it is held as float32 (7.1 GB measured RSS), and the gate must count that."""
    import json

    import mlx.core as mx

    from engine.models.memory import dequantized_bytes
    from engine.models.probe import probe

    mx.save_safetensors(str(tmp_path / "model.safetensors"),
                        {"a": mx.zeros((64, 32), dtype=mx.float16), "b": mx.zeros((16,), dtype=mx.float32),
                         "ids": mx.zeros((8,), dtype=mx.int32)})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    p = probe(tmp_path)
    assert p.float32_bytes == 64 * 32 * 4 + 16 * 4 + 8 * 4
    assert dequantized_bytes(p) == p.float32_bytes > p.size_bytes  # the float16 matrix doubles
