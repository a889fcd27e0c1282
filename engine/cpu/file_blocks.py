"""A GGUF file's quantized weights held in (about) the file's own bytes, for the compiled kernels
of engine/cpu/block_kernels.py.

onnxruntime's `MatMulNBits` takes 4- or 8-bit values with a float32 scale a block, so a Q5_0
weight (0.69 bytes in the file) costs it 1.16 bytes and a Q6_K one (0.82) 1.31: on
Qwen2.5-Coder-1.5B Q4_K_M, 1.57 GB read a token against the 0.98 GB llama.cpp reads, and decode is
bound by those reads. Here each type keeps its own bit width and its own scale layout:

    w = scale_c · (q − zero) − min_c        for the values q of chunk c (16 or 32 values)

- `q`: the low 4 bits of each value as nibbles (two values a byte, value 2j in byte j's low nibble,
  2j+1 in its high one), or the whole byte for 8-bit types.
- `high`: one uint32 a chunk for 5- and 6-bit types: bit j is value j's fifth bit; for 6-bit
  (chunks of 16), bit 16+j its sixth.
- `scale_c`: one float a chunk (`per` 1; float16 bits where the file's scale is a float16, so it
  is exact), or a K-quant's two levels: a float32 a super-block times the chunk's small integer
  (`sub`, `per` chunks a super-block).
- `min_c`: none (a whole `zero`: Q4_0 8, Q5_0 16, Q8_0 128, Q6_K 32), a float16 a chunk (Q4_1),
  or two levels as the scale (Q4_K/Q5_K: dmin · m).

Bytes a weight (file / here): Q4_0 0.5625 / 0.5625, Q5_0 0.6875 / 0.6875, Q8_0 1.0625 / 1.0625,
Q4_K 0.5625 / 0.59, Q5_K 0.6875 / 0.72, Q6_K 0.8203 / 0.82 (its 8-bit scales as int8 and a
float32 a super-block). Nothing is re-quantized: every weight is the file's value exactly.
Anything else (Q2_K/Q3_K, IQ types, Q5_1) raises `Unmapped`: the model keeps the onnxruntime blocks
or float32. Bytes that don't fit their type, or scales that aren't finite, raise `Malformed`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from engine.cpu.quant_blocks import (GGML_LAYOUT, FileRows, Malformed, Unmapped, _rows, ggml_blocks, ggml_values,
                                     k_scales)

MAPPED = tuple(GGML_LAYOUT)
_CHUNK_ROWS = 8192  # rows converted at a time: the temporaries stay small on a 151936-row head


@dataclass(frozen=True)
class FileBlocks:
    """One weight matrix (n outputs x k inputs) in its file's bit width; see the module docstring."""

    q: np.ndarray  # (n, chunks, chunk/2 or chunk) uint8
    high: Optional[np.ndarray]  # (n, chunks) uint32, 5- and 6-bit types
    scale: np.ndarray  # (n, chunks // per): float32, or float16 bits as uint16 (`half`)
    sub: Optional[np.ndarray]  # (n, chunks) uint8 or int8 where per > 1
    mins: Optional[np.ndarray]  # (n, chunks // per) float32 (two levels) or (n, chunks) float16 bits as uint16
    min_sub: Optional[np.ndarray]  # (n, chunks) uint8, the mins' second level
    zero: int
    bits: int
    chunk: int
    per: int
    half: bool
    type_name: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * self.chunk

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q, self.high, self.scale, self.sub, self.mins, self.min_sub)
                   if a is not None)

    def rows(self, rows: Any) -> "FileBlocks":
        """These rows alone (a slice: views; an index array: copies)."""
        return replace(self, **{f: None if a is None else a[rows] for f, a in _arrays(self).items()})

    def stacks_with(self, other: Any) -> bool:
        """Whether `other` can be stacked under these rows as one product: the same type and width."""
        return isinstance(other, FileBlocks) and (self.type_name, self.shape[1]) == (other.type_name, other.shape[1])

    def values(self) -> np.ndarray:
        """The unsigned values q (n, chunks, chunk) as uint8."""
        if self.bits == 8:
            return self.q
        q = np.empty(self.q.shape[:2] + (self.chunk,), np.uint8)
        q[..., 0::2] = self.q & 0x0F
        q[..., 1::2] = self.q >> 4
        if self.high is not None:
            j = np.arange(self.chunk, dtype=np.uint32)
            q |= (((self.high[..., None] >> j) & 1) << 4).astype(np.uint8)
            if self.bits == 6:
                q |= (((self.high[..., None] >> (j + 16)) & 1) << 5).astype(np.uint8)
        return q

    def scales(self) -> np.ndarray:
        """Each chunk's scale as float32 (n, chunks)."""
        s = self.scale.view(np.float16).astype(np.float32) if self.half else self.scale
        if self.per == 1:
            return s
        return np.repeat(s, self.per, axis=1) * self.sub.astype(np.float32)

    def chunk_mins(self) -> np.ndarray:
        """Each chunk's min_c as float32 (n, chunks), the whole zero folded in."""
        m = self.scales() * np.float32(self.zero)
        if self.mins is not None:
            if self.min_sub is not None:
                m += np.repeat(self.mins, self.per, axis=1) * self.min_sub.astype(np.float32)
            else:
                m += self.mins.view(np.float16).astype(np.float32)
        return m

    def dequantize(self, rows: Any = slice(None)) -> np.ndarray:
        """`rows` of the weight as float32 (n', k), or (k,) for one row."""
        one = isinstance(rows, (int, np.integer))
        part = self.rows(slice(int(rows), int(rows) + 1) if one else rows)
        w = part.values().astype(np.float32) * part.scales()[..., None] - part.chunk_mins()[..., None]
        w = w.reshape(w.shape[0], -1)
        return w[0] if one else w


def join(parts: list[FileBlocks]) -> FileBlocks:
    """Matrices of one type and width stacked by rows (q/k/v, gate/up as one product)."""
    first = parts[0]
    if not all(first.stacks_with(p) for p in parts):
        raise ValueError("blocks of different types or widths can't be joined")

    fields = [_arrays(p) for p in parts]
    return replace(first, **{f: None if a is None else np.concatenate([p[f] for p in fields])
                             for f, a in fields[0].items()})


def bytes_per_value(type_name: str) -> float:
    """Bytes a weight of `type_name` takes held here (the estimate before a load)."""
    return {"Q4_0": 18 / 32, "Q4_1": 20 / 32, "Q5_0": 22 / 32, "Q8_0": 34 / 32, "Q4_K": 0.5 + 2 / 32 + 8 / 256,
            "Q5_K": 0.625 + 2 / 32 + 8 / 256, "Q6_K": 0.75 + 1 / 16 + 4 / 256}[type_name]


def from_gguf(name: str, type_name: str, data: Any, k: int) -> FileBlocks:
    """FileBlocks for GGUF tensor `name` of `type_name`, whose rows (`data`: uint8 rows or FileRows,
    a row a matrix row of `k` values) are ggml blocks, converted `_CHUNK_ROWS` rows at a time."""
    data = _rows(data)
    if type_name not in GGML_LAYOUT:
        raise Unmapped(f"GGUF {type_name} (held in its own bytes: {', '.join(MAPPED)})")
    if data.ndim != 2 or data.shape[0] <= _CHUNK_ROWS:
        return _convert(name, type_name, data[:] if isinstance(data, FileRows) else data, k)
    first = _convert(name, type_name, data[:_CHUNK_ROWS], k)
    n = data.shape[0]
    whole = {field: None if a is None else np.empty((n,) + a.shape[1:], a.dtype)
             for field, a in _arrays(first).items()}
    for at in range(0, n, _CHUNK_ROWS):
        part = first if at == 0 else _convert(name, type_name, data[at:at + _CHUNK_ROWS], k)
        for field, a in _arrays(part).items():
            if a is not None:
                whole[field][at:at + a.shape[0]] = a
    return replace(first, **whole)


def _arrays(blocks: FileBlocks) -> dict[str, Optional[np.ndarray]]:
    return {f: getattr(blocks, f) for f in ("q", "high", "scale", "sub", "mins", "min_sub")}


def _f16_bits(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.uint16)[..., 0]


def _finite(name: str, *arrays: np.ndarray) -> None:
    for a in arrays:
        f = a.view(np.float16) if a.dtype == np.uint16 else a
        if not np.isfinite(f).all():
            raise Malformed(f"tensor {name}: scales or mins that aren't finite numbers")


def _pack(q: np.ndarray, bits: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Values (n, chunks, chunk) uint8 -> (nibbles or bytes, the high bits a chunk)."""
    if bits == 8:
        return np.ascontiguousarray(q), None
    low = (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)
    if bits == 4:
        return np.ascontiguousarray(low), None
    chunk = q.shape[-1]
    weights = (np.uint32(1) << np.arange(chunk, dtype=np.uint32))
    high = (((q >> 4) & 1).astype(np.uint32) * weights).sum(axis=-1, dtype=np.uint32)
    if bits == 6:
        high |= (((q >> 5) & 1).astype(np.uint32) * (weights << np.uint32(16))).sum(axis=-1, dtype=np.uint32)
    return np.ascontiguousarray(low), np.ascontiguousarray(high)


def _convert(name: str, type_name: str, data: Any, k: int) -> FileBlocks:
    b = ggml_blocks(name, type_name, data, k)
    q = ggml_values(type_name, b)
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q8_0"):
        d = _f16_bits(b[..., 0:2])
        bits, zero = {"Q4_0": (4, 8), "Q4_1": (4, 0), "Q5_0": (5, 16), "Q8_0": (8, 128)}[type_name]
        mins = (_f16_bits(b[..., 2:4]) ^ np.uint16(0x8000)) if type_name == "Q4_1" else None  # −m, float16 bits: exact
        _finite(name, d, *(() if mins is None else (mins,)))
        packed, high_bits = _pack(q, bits)
        return FileBlocks(packed, high_bits, np.ascontiguousarray(d), None, mins, None, zero, bits, 32, 1, True,
                          type_name)
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin, sc, mn = k_scales(b)
        _finite(name, d, dmin)
        packed, high_bits = _pack(q, 4 if type_name == "Q4_K" else 5)
        return FileBlocks(packed, high_bits, d, sc, dmin, mn, 0, 4 if type_name == "Q4_K" else 5, 32, 8, False,
                          type_name)
    # Q6_K: 16 chunks of 16 a block, an int8 scale each, one float16 d
    d = _f16_bits(b[..., 208:210]).view(np.float16).astype(np.float32)
    _finite(name, d)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).reshape(q.shape[:2])
    packed, high_bits = _pack(q, 6)
    return FileBlocks(packed, high_bits, d, sc, None, None, 32, 6, 16, 16, False, type_name)
