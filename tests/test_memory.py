"""The memory gate with injected readings, and its effect end to end (507 / refusal at start)."""
from __future__ import annotations

import pytest

from engine.errors import InsufficientMemory
from engine.models.memory import SAFETY_MARGIN, MemoryEstimate, MemoryGate, available_bytes
from conftest import Server


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


def test_auto_dtype_keeps_quantized_weights_when_float32_does_not_fit(default_model_dir):
    # 1000 MiB: the shipped 4-bit weights (~0.1 GB + KV headroom + margin) fit, the float32
    # expansion (~0.6 GB more) does not.
    s = Server(["--assume-available-memory", str(1000 << 20), "--log-level", "info"])
    try:
        assert "weights held as keep" in s.log()
    finally:
        s.stop()
