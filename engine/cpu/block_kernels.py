"""Products with weights held in their GGUF file's own bit widths (engine/cpu/file_blocks.py),
compiled at load with numba and llvmlite (wheels; no compiler).

A decode row is multiplied as llama.cpp multiplies it: the input row rounded to int8 a block of 32
(a float scale each), each chunk's integer dot product of its unsigned values with those int8s
(`vpdpbusd` through LLVM's intrinsic on a CPU with AVX-512 VNNI, plain IR elsewhere, which LLVM
lowers to `vpmaddwd`), times the chunk's scale and the input block's, less the chunk's min times
the input block's sum:

    y_r = Σ_c scale_c·xd_c·Σ_j q_j·xq_j − Σ_c min_c·xd_c·Σ_j xq_j

The loop over one row's chunks is LLVM IR (engine/cpu/block_ir.py): numba's own loops widened
every integer to 64 bits and ran 3-4x slower. A row's scales, mins and input factors are taken as
vectors a K-quant super-block (or 4 chunks) at a time, and the products go into two accumulators.
Rows are split between `THREADS` threads (numba's `prange`, libgomp here). Up to FEW_ROWS input
rows (speculation's guesses, a batch's decode) read each weight row once for all of them. More
(a prefill pass) dequantize the product's weights to float32 (the same IR unpacking, in Python
threads) and multiply through the sgemm MLX's own float32 passes use. FEW_ROWS = 16 is a choice,
not a measured crossover.

The kernels compile at load (`compile_for`, ~1-2 s per block type and kind of pass; not cached
across processes); `available()` says whether numba and llvmlite import.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, Optional

import numpy as np

from engine.cpu.block_ir import Layout, intrinsics, layout
from engine.cpu.file_blocks import FileBlocks

THREADS = int(os.environ.get("OPENMLX_QUANT_THREADS", "2"))
FEW_ROWS = 16  # more rows than this: dequantized tiles and sgemm (see the module docstring)
_TILE_ROWS = 16384  # weight rows dequantized at a time for a many-row pass: every matrix of a 7B but its head at once
# (one switch between numba's threads and OpenBLAS's a product: each pool spins a while after its work, and
# 512-row tiles alternating the two ran a 256-row product ~3x slower here)

_lock = threading.Lock()  # one product at a time: numba's thread pool is shared by the process


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether numba and llvmlite import (and the kernels can be compiled)."""
    try:
        import llvmlite  # noqa: F401
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _numba() -> Any:
    import numba

    numba.set_num_threads(max(1, min(THREADS, numba.config.NUMBA_NUM_THREADS)))
    return numba


@functools.lru_cache(maxsize=None)
def _rows_kernel(spec: Layout) -> Callable[..., Any]:
    """y (m, n) = x (m rows, int8 blocks) · Wᵀ for one block layout, weight rows split across threads."""
    nb = _numba()
    row = intrinsics(spec)[0]
    chunk = spec.chunk

    @nb.njit(parallel=True, boundscheck=False, nogil=True)
    def product(q, high, scale, sub, mins, min_sub, xq, xd, xsum, out):
        n, chunks = q.shape[0], xq.shape[1] // chunk
        m_rows = xq.shape[0]
        tiles = (n + 31) // 32
        for t in nb.prange(tiles):
            for r in range(t * 32, min(n, t * 32 + 32)):
                for i in range(m_rows):
                    out[i, r] = row(q.ctypes.data + r * q.strides[0], high.ctypes.data + r * high.strides[0],
                                    scale.ctypes.data + r * scale.strides[0], sub.ctypes.data + r * sub.strides[0],
                                    mins.ctypes.data + r * mins.strides[0],
                                    min_sub.ctypes.data + r * min_sub.strides[0],
                                    xq.ctypes.data + i * xq.strides[0], xd.ctypes.data + i * xd.strides[0],
                                    xsum.ctypes.data + i * xsum.strides[0], chunks)
    return product


@functools.lru_cache(maxsize=None)
def _dequantize_kernel(spec: Layout) -> Callable[..., Any]:
    """Rows [start, start + out rows) of W as float32 into `out`, on the calling thread (the GIL
    released: `Product.dequantize_rows` runs one a thread)."""
    nb = _numba()
    dequantize_row = intrinsics(spec)[1]
    chunk = spec.chunk

    @nb.njit(boundscheck=False, nogil=True)
    def dequantize(q, high, scale, sub, mins, min_sub, start, out):
        rows, chunks = out.shape[0], out.shape[1] // chunk
        for i in range(rows):
            r = start + i
            dequantize_row(q.ctypes.data + r * q.strides[0], high.ctypes.data + r * high.strides[0],
                           scale.ctypes.data + r * scale.strides[0], sub.ctypes.data + r * sub.strides[0],
                           mins.ctypes.data + r * mins.strides[0], min_sub.ctypes.data + r * min_sub.strides[0],
                           out.ctypes.data + i * out.strides[0], chunks)
    return dequantize


@functools.lru_cache(maxsize=None)
def _quantize_kernel() -> Callable[..., Any]:
    """Input rows (m, k) float32 -> int8 blocks of 32 (llama.cpp's Q8_0 rounding), and for chunks
    of `chunk` values each chunk's input scale and its scaled sum."""
    nb = _numba()

    @nb.njit(boundscheck=False, nogil=True)
    def quantize(x, chunk, xq, xd, xsum):
        m, k = x.shape
        for i in range(m):
            for b in range(k // 32):
                amax = np.float32(0.0)
                for j in range(32):
                    amax = max(amax, abs(x[i, b * 32 + j]))
                d = amax / np.float32(127.0)
                inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
                for j in range(32):
                    xq[i, b * 32 + j] = np.int8(np.rint(x[i, b * 32 + j] * inv))
                for part in range(32 // chunk):
                    c = b * (32 // chunk) + part
                    total = 0
                    for j in range(chunk):
                        total += xq[i, c * chunk + j]
                    xd[i, c] = d
                    xsum[i, c] = d * np.float32(total)
    return quantize


_PLACEHOLDER = np.zeros((1, 1), np.uint8)


def _fields(w: FileBlocks) -> tuple[np.ndarray, ...]:
    """The kernels' weight arguments, as byte-typed 2-D arrays (one signature for every layout;
    a field the layout lacks is a 1x1 placeholder the kernel never reads)."""
    def as_bytes(a: Any) -> np.ndarray:
        return _PLACEHOLDER if a is None else a.reshape(a.shape[0], -1).view(np.uint8)
    return (w.q.reshape(w.q.shape[0], -1), as_bytes(w.high), as_bytes(w.scale), as_bytes(w.sub),
            as_bytes(w.mins), as_bytes(w.min_sub))


class Product:
    """x Wᵀ for one matrix, its kernels and their arguments looked up once (a decode step makes
    ~100 of these calls)."""

    def __init__(self, w: FileBlocks) -> None:
        self.w, self.layout, self.fields = w, layout(w), _fields(w)
        self._rows: Optional[Callable[..., Any]] = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (m, k) float32 -> (m, n) float32."""
        x = np.ascontiguousarray(x, np.float32)
        m, k = x.shape
        if m > FEW_ROWS:
            return self._many_rows(x)
        if self._rows is None:
            self._rows = _rows_kernel(self.layout)
        chunks = k // self.layout.chunk
        xq = np.empty((m, k), np.int8)
        xd = np.empty((m, chunks), np.float32)
        xsum = np.empty((m, chunks), np.float32)
        out = np.empty((m, self.w.shape[0]), np.float32)
        with _lock:
            _quantize_kernel()(x, self.layout.chunk, xq, xd, xsum)
            self._rows(*self.fields, xq, xd, xsum, out)
        return out

    def dequantize_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of W as float32, split between `THREADS` Python threads. Not numba's
        pool: libgomp's threads spin ~300k rounds after their work, and OpenBLAS's sgemm that
        follows then ran on one core (a 256-row product 16 -> 24 ms here); with fewer rounds
        (GOMP_SPINCOUNT) a decode step's products found the pool asleep instead (0.5B decode 37 -> 29
        tok/s)."""
        out = np.empty((stop - start, self.w.shape[1]), np.float32)
        kernel = _dequantize_kernel(self.layout)
        parts = np.linspace(0, stop - start, THREADS + 1).astype(int)
        jobs = [(int(a), int(b)) for a, b in zip(parts[:-1], parts[1:]) if b > a]
        if len(jobs) == 1:
            kernel(*self.fields, start, out)
            return out
        list(_pool().map(lambda job: kernel(*self.fields, start + job[0], out[job[0]:job[1]]), jobs))
        return out

    def _many_rows(self, x: np.ndarray) -> np.ndarray:
        """x Wᵀ, W dequantized `_TILE_ROWS` rows at a time, each tile's product by the sgemm MLX's
        own float32 passes use (its OpenBLAS through cblas: numpy's bundled one ran ~2x slower here)."""
        from engine.cpu import blas

        n = self.w.shape[0]
        out = np.empty((x.shape[0], n), np.float32)
        gemm = blas.products().gemm
        for at in range(0, n, _TILE_ROWS):
            stop = min(n, at + _TILE_ROWS)
            gemm(x, self.dequantize_rows(at, stop), out[:, at:stop], transpose_b=True)
        return out


def product(w: FileBlocks, x: np.ndarray) -> np.ndarray:
    """x (m, k) float32 -> x Wᵀ (m, n) float32."""
    return Product(w)(x)


def compile_for(matrices: list[FileBlocks]) -> int:
    """Compile the kernels these matrices' layouts need (a few seconds each, at load rather than
    in a first request) by running each once on two of its rows. Returns the layouts compiled."""
    done: set[Layout] = set()
    for w in matrices:
        if layout(w) in done:
            continue
        done.add(layout(w))
        rows = w.rows(slice(0, 2))
        for m in (1, FEW_ROWS + 1):  # the row kernel and the dequantizing one
            product(rows, np.zeros((m, w.shape[1]), np.float32))
    return len(done)


@functools.lru_cache(maxsize=1)
def _pool() -> Any:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(THREADS, thread_name_prefix="openmlx-dequantize")
