"""CPU fast path, part 1: make MLX's CPU backend use a system OpenBLAS.

The `mlx-cpu` wheel bundles a slow reference BLAS (1024^3 sgemm: ~364 ms); Debian's OpenBLAS does
it in ~6 ms. Loading OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is imported makes MLX's
`cblas_*` calls resolve to it. This module must therefore not import mlx, and `engine/__init__`
calls `activate()` before any other engine module can import mlx.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from typing import Optional

# Debian/Ubuntu (libopenblas0-pthread / -openmp / -serial) and common other layouts.
_KNOWN_PATHS = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's CPU backend uses, for /health and `openmlx show`."""

    name: str  # "openblas", "bundled" or "accelerate"
    path: Optional[str]
    threads: Optional[int]
    reason: str


_active: Optional[BlasInfo] = None


def default_threads() -> int:
    """Threads for BLAS: OPENMLX_THREADS if set, else the cores this process may use."""
    env = os.environ.get("OPENMLX_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def activate(threads: Optional[int] = None) -> BlasInfo:
    """Load a system OpenBLAS globally if one is present; idempotent.

    `OPENMLX_BLAS=bundled` turns the fast path off. On macOS MLX uses Accelerate already.
    """
    global _active
    if _active is not None:
        return _active
    if sys.platform == "darwin":
        _active = BlasInfo("accelerate", None, None, "macOS: MLX links Accelerate")
        return _active
    if os.environ.get("OPENMLX_BLAS", "").lower() in ("bundled", "off", "0", "no"):
        _active = BlasInfo("bundled", None, None, "disabled by OPENMLX_BLAS")
        return _active
    if "mlx.core" in sys.modules:
        _active = BlasInfo("bundled", None, None, "mlx was imported before openmlx could load OpenBLAS")
        return _active
    candidates = [os.environ["OPENMLX_OPENBLAS"]] if os.environ.get("OPENMLX_OPENBLAS") else []
    found = ctypes.util.find_library("openblas")
    if found:
        candidates.append(found)
    candidates.extend(_KNOWN_PATHS)
    n = threads or default_threads()
    for path in candidates:
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        try:
            lib.openblas_set_num_threads(ctypes.c_int(n))
        except AttributeError:
            pass
        _active = BlasInfo("openblas", path, n, "system OpenBLAS loaded before mlx")
        return _active
    _active = BlasInfo("bundled", None, None,
                       "no system OpenBLAS found (apt-get install libopenblas0-pthread)")
    return _active


def active() -> BlasInfo:
    """The BLAS in use (activating on first call)."""
    return activate()
