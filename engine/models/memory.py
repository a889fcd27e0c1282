"""Memory gates: refuse a load that would swap the machine to death, instead of trying it.

psutil reads available memory on Linux and macOS alike. The need is weights (at the dtype they
will be held in) plus KV-cache headroom for the context we allow.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, Optional

import psutil

from engine.models.policy import Action, Decision
from engine.models.probe import Probe

# Keep this much free for the OS, the server and the request in flight.
SAFETY_MARGIN = 512 << 20


def available_bytes() -> int:
    """Memory the OS can hand out now without swapping."""
    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def dequantized_bytes(probe: Probe) -> int:
    """Weight bytes once the weights are held as float32 (quantized ones expanded, half-precision
    ones doubled)."""
    if not probe.quantization:
        return probe.float32_bytes or probe.size_bytes
    bits = int(probe.quantization.get("bits", 4))
    # Packed weights carry scales and biases (~2 x 16 bit per group of 32-64): approximate
    # the expansion from the bits per weight.
    return int(probe.size_bytes * 32 / (bits + 1))


def decide_memory(model_id: str, need: MemoryEstimate, available: int) -> Decision:
    """BLOCK (507) a load that does not fit; WARN when it fits with under 20% to spare."""
    total = need.total + SAFETY_MARGIN
    if total > available:
        return Decision(Action.BLOCK,
                        f"Not enough memory to load '{model_id}': it needs about {need.total / 2**30:.2f} GiB "
                        f"(weights {need.weights / 2**30:.2f} GiB + KV cache {need.kv_cache / 2**30:.2f} GiB) "
                        f"plus {SAFETY_MARGIN / 2**30:.1f} GiB headroom, and {available / 2**30:.2f} GiB is "
                        "available.", 507, "insufficient_memory")
    if total > 0.8 * available:
        return Decision(Action.WARN, warnings=(
            f"memory is tight: '{model_id}' needs {total / 2**30:.2f} of {available / 2**30:.2f} GiB available.",))
    return Decision(Action.ALLOW)


class MemoryGate:
    """Compares an estimate with available memory; the reading can be injected for tests."""

    def __init__(self, read_available: Callable[[], int] = available_bytes,
                 override: Optional[int] = None) -> None:
        self._read = (lambda: override) if override is not None else read_available

    def available(self) -> int:
        return self._read()

    def fits(self, need: int) -> bool:
        return need + SAFETY_MARGIN <= self.available()

    def check(self, model_id: str, need: MemoryEstimate) -> tuple[str, ...]:
        """Raise InsufficientMemory (507) if `need` does not fit; return warnings if it is tight."""
        decision = decide_memory(model_id, need, self.available())
        decision.raise_if_blocked()
        return decision.warnings

    def wait_for_release(self, expected: int, timeout: float = 5.0) -> bool:
        """After an unload, wait (bounded) until about `expected` bytes are back."""
        start = self.available()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            gc.collect()
            if self.available() >= start + expected * 0.8:
                return True
            time.sleep(0.1)
        return False
