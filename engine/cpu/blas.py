"""CPU fast path, part 1: make MLX's CPU backend use a current OpenBLAS.

The `mlx-cpu` wheel bundles a slow reference BLAS (1024^3 sgemm: ~364 ms); Debian's OpenBLAS does
it in ~6 ms. Loading OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is imported makes MLX's
`cblas_*` calls resolve to it. This module must therefore not import mlx, and `engine/__init__`
calls `activate()` before any other engine module can import mlx.

Which OpenBLAS: the faster one on this machine, measured. Debian 12's 0.3.21 has no kernels for
recent Xeons (AVX-512 with FP16), where the `cmeel-openblas` wheel (0.3.31, a dependency on Linux
x86-64, unprefixed `cblas_*` symbols) made one (128x576)x(576x1536) product 6.1 -> 1.1 ms
(../shared/CPU.md); on an AMD EPYC the two are even (docs/benchmarks.md). So when both load, each
times the products the models run (a prefill-shaped and a decode-shaped one) in a fresh
interpreter, once per machine and library set (cached in OPENMLX_HOME/blas.json), and the faster
is used. The wheel's library needs the system's `libgfortran.so.5` (which `apt-get install
libopenblas0-pthread` brings); where that is missing it can't load and the system OpenBLAS, then
MLX's bundled BLAS, are used instead.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np

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
    version: Optional[str] = None  # OpenBLAS's own version, e.g. "0.3.31"


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
    """Load the best OpenBLAS found globally; idempotent.

    `OPENMLX_BLAS=bundled` turns the fast path off, `OPENMLX_BLAS=system` skips the pip wheel,
    `OPENMLX_OPENBLAS=PATH` names the library. On macOS MLX uses Accelerate already.
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
    n = threads or default_threads()
    for path, source in _by_speed(_candidates(), n):
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        try:
            lib.openblas_set_num_threads(ctypes.c_int(n))
        except AttributeError:
            pass
        _active = BlasInfo("openblas", path, n, f"{source} loaded before mlx (the fastest found here)",
                           _loaded_version(lib))
        return _active
    _active = BlasInfo("bundled", None, None,
                       "no OpenBLAS could be loaded (pip's cmeel-openblas needs libgfortran.so.5: "
                       "apt-get install libopenblas0-pthread)")
    return _active


_TIMING = """
import ctypes, sys, time
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
import mlx.core as mx
a, w = mx.random.normal((64, 576)), mx.random.normal((1536, 576))  # a prefill-shaped product
v, big = mx.random.normal((1, 576)), mx.random.normal((16384, 576))  # a decode-shaped one
mx.eval(a, w, v, big)
def t(f, n=40):
    mx.eval(f()); s = time.perf_counter()
    for _ in range(n): mx.eval(f())
    return (time.perf_counter() - s) / n
print(t(lambda: a @ w.T) + t(lambda: v @ big.T))
"""


def home() -> str:
    return os.path.expanduser(os.environ.get("OPENMLX_HOME", "~/.cache/openmlx"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def _time_library(path: str, threads: int) -> Optional[float]:
    """Seconds for the two products with `path` as MLX's BLAS (a fresh interpreter: the first
    BLAS loaded is the one MLX binds to), or None if it can't load."""
    import subprocess

    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads)}
    try:
        out = subprocess.run([sys.executable, "-c", _TIMING, path], capture_output=True, text=True, timeout=120,
                             env=env)
        return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def _by_speed(candidates: list[tuple[str, str]], threads: int) -> list[tuple[str, str]]:
    """The candidates, fastest first, when more than one distinct library loads (timed once per
    machine and set of libraries; cached). With one, or when timing fails, as given."""
    import json

    distinct = list({os.path.realpath(p): (p, src) for p, src in candidates if os.path.exists(p)}.values())
    if len(distinct) < 2 or os.environ.get("OPENMLX_OPENBLAS"):
        return candidates
    key = [cpu_name(), threads, [[p, os.path.getsize(p)] for p, _ in distinct]]
    cache = os.path.join(home(), "blas.json")
    try:
        with open(cache) as f:
            saved = json.load(f)
        timings = saved["timings"] if saved.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError):
        timings = None
    if timings is None:
        timings = {p: _time_library(p, threads) for p, _ in distinct}
        try:  # written whole (servers may start side by side)
            os.makedirs(home(), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"key": key, "timings": timings}, f)
            os.replace(tmp, cache)
        except OSError:
            pass
    if any(timings.get(p) is None for p, _ in distinct):
        return candidates
    ranked = sorted(distinct, key=lambda c: timings[c[0]])
    return ranked + [c for c in candidates if c not in ranked]


def _version_of(path: str) -> tuple[int, ...]:
    """An OpenBLAS library's version from its file name (libopenblasp-r0.3.21.so), 0 if unknown."""
    match = re.search(r"r?(\d+)\.(\d+)\.(\d+)", os.path.basename(os.path.realpath(path)))
    return tuple(int(g) for g in match.groups()) if match else (0,)


def _wheel_library() -> Optional[tuple[str, tuple[int, ...]]]:
    """The cmeel-openblas wheel's library and version, if that package is installed."""
    try:
        from importlib import metadata

        dist = metadata.distribution("cmeel-openblas")
    except Exception:  # not installed (macOS, other CPUs) or unreadable metadata
        return None
    for f in dist.files or []:
        if str(f).endswith("lib/libopenblas.so.0"):
            version = tuple(int(x) for x in re.findall(r"\d+", dist.version)[:3])
            return str(dist.locate_file(f)), version
    return None


def _candidates() -> list[tuple[str, str]]:
    """(path, where it comes from): OPENMLX_OPENBLAS if set, else every OpenBLAS found, newest
    version first (the pip wheel or the system's); `_by_speed` then orders them by measurement."""
    if os.environ.get("OPENMLX_OPENBLAS"):
        return [(os.environ["OPENMLX_OPENBLAS"], "OPENMLX_OPENBLAS")]
    found: list[tuple[tuple[int, ...], str, str]] = []
    wheel = _wheel_library()
    if wheel is not None and os.environ.get("OPENMLX_BLAS", "").lower() != "system":
        found.append((wheel[1], wheel[0], "pip's cmeel-openblas"))
    system = [ctypes.util.find_library("openblas"), *_KNOWN_PATHS]
    # A bare name that no known folder holds is kept: the loader may still find it.
    for path in dict.fromkeys(n if os.path.isabs(n) else (_resolve(n) or n) for n in system if n):
        found.append((_version_of(path), path, "system OpenBLAS"))
    found.sort(key=lambda c: c[0], reverse=True)  # stable: the wheel first on a tie
    return [(path, source) for _, path, source in found]


def _resolve(name: str) -> Optional[str]:
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    return None


def _loaded_version(lib: ctypes.CDLL) -> Optional[str]:
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode(errors="replace")
    except (AttributeError, OSError):
        return None
    match = re.search(r"OpenBLAS (\d+\.\d+\.\d+)", config)
    return match.group(1) if match else None


def active() -> BlasInfo:
    """The BLAS in use (activating on first call)."""
    return activate()


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


class Products:
    """Matrix products on float32 numpy arrays: OpenBLAS's cblas through ctypes where MLX loaded
    OpenBLAS (the same library and thread pool MLX uses), numpy's own matmul elsewhere."""

    def __init__(self, path: Optional[str]) -> None:
        self.name = "numpy"
        self._gemv = self._gemm = None
        if path:
            try:
                lib = ctypes.CDLL(path)
                gemv, gemm = lib.cblas_sgemv, lib.cblas_sgemm
            except (OSError, AttributeError):
                return
            f, i, p = ctypes.c_float, ctypes.c_int, ctypes.c_void_p
            gemv.restype = gemm.restype = None
            gemv.argtypes = [i, i, i, i, f, p, i, p, i, f, p, i]
            gemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
            self._gemv, self._gemm, self.name = gemv, gemm, "cblas_sgemv"

    def gemv(self, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = w @ x; w (n, k) C-contiguous, x (k,), out (n,)."""
        if self._gemv is None:
            np.matmul(w, x, out=out)
            return out
        n, k = w.shape
        self._gemv(_ROW_MAJOR, _NO_TRANS, n, k, 1.0, w.ctypes.data, k, x.ctypes.data, 1, 0.0, out.ctypes.data, 1)
        return out

    def gemm(self, a: np.ndarray, b: np.ndarray, out: np.ndarray, transpose_b: bool, alpha: float = 1.0) -> None:
        """out = alpha * a @ (b.T if transpose_b else b); rows of each operand contiguous."""
        if self._gemm is None:
            np.matmul(a, b.T if transpose_b else b, out=out)
            if alpha != 1.0:
                out *= np.float32(alpha)
            return
        m, k = a.shape
        n = b.shape[0] if transpose_b else b.shape[1]
        self._gemm(_ROW_MAJOR, _NO_TRANS, _TRANS if transpose_b else _NO_TRANS, m, n, k, alpha,
                   a.ctypes.data, a.strides[0] // 4, b.ctypes.data, b.strides[0] // 4, 0.0,
                   out.ctypes.data, out.strides[0] // 4)


_products: list[Products] = []


def products() -> Products:
    """One `Products` over the BLAS MLX uses (its cblas where that is OpenBLAS)."""
    if not _products:
        info = active()
        _products.append(Products(info.path if info.name == "openblas" else None))
    return _products[0]
