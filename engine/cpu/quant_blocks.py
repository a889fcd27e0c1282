"""Quantized weights held as blocks in onnxruntime `MatMulNBits`'s layout (`--cpu-dtype quantized`).

`MatMulNBits` computes with w = scale · (q − zero_point) per block of `block` values along K, q
unsigned 4- or 8-bit, scales float, zero points uint8. The signed formats (Q4_0, Q5_0, Q8_0,
Q6_K) are a constant whole zero point (8, 16, 128, 32). The affine ones, w = d·q + m (GGUF Q4_1,
Q4_K's sub-blocks, MLX's affine groups), are zero point 0 and a float offset m a block, which the
product adds as (the sums of x over each block) · offsets: exact, for ~1 bit a weight more.

What maps, exactly (the file's bits or more; nothing is re-quantized to fewer bits):
- MLX affine folders (mlx-community's 4-/8-bit, and the GGUF Q4_0/Q4_1/Q8_0 files `mx.load`
  reads, engine/formats/gguf.py): 4-/8-bit blocks of the group size (32, 64, 128).
- GGUF Q4_0, Q4_1, Q4_K: 4-bit blocks of 32 (Q4_K: each 256-block's eight sub-blocks, their 6-bit
  scales and mins folded into float scales and zero points).
- GGUF Q8_0: 8-bit blocks of 32. Q5_0: 8-bit blocks of 32 (5-bit values carried in 8 bits, 1.25
  bytes a weight against the file's 0.69). Q6_K: 8-bit blocks of 16 (its sub-block size).
Anything else (Q5_K, Q2_K/Q3_K, IQ types, F16/BF16 matrices) is `Unmapped`, and the model keeps
the float32 path. A tensor whose bytes don't fit its type, or whose scales aren't finite, is
`Malformed`: refused at load, never handed to a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

QK_K = 256


class Unmapped(ValueError):
    """A weight type this path doesn't hold as blocks; the message says which."""


class Malformed(ValueError):
    """A tensor whose blocks are not valid for their type; the message names it."""


@dataclass(frozen=True)
class Blocks:
    """One weight matrix (n outputs x k inputs) as MatMulNBits blocks: `packed` uint8
    (n, k/block, block·bits/8), `scales` float32 and `zeros` uint8 (n, k/block), and where the
    format has a float offset a block, `offsets` float32 (n, k/block):
    w = scales·(q − zeros) + offsets."""

    packed: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    offsets: Optional[np.ndarray]
    bits: int
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * self.block

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.nbytes
        return self.packed.nbytes + self.scales.nbytes + self.zeros.nbytes + extra

    def values(self, rows: Any = slice(None)) -> np.ndarray:
        """The unsigned values q of `rows` (n', k/block, block) as uint8."""
        p = self.packed[rows]
        if self.bits == 8:
            return p
        q = np.empty(p.shape[:-1] + (self.block,), np.uint8)
        q[..., 0::2] = p & 0x0F
        q[..., 1::2] = p >> 4
        return q

    def stacks_with(self, other: Any) -> bool:
        """Whether `other` can be stacked under these rows as one product (`join`): the same bits,
        block and kind (with or without offsets), and the same input width."""
        return isinstance(other, Blocks) and ((self.bits, self.block, self.offsets is None, self.shape[1])
                                              == (other.bits, other.block, other.offsets is None, other.shape[1]))

    def dequantize(self, rows: Any = slice(None)) -> np.ndarray:
        """`rows` of the weight as float32 (n', k): for tests, and for an embedding's looked-up rows."""
        q = self.values(rows).astype(np.float32)
        w = (q - self.zeros[rows][..., None].astype(np.float32)) * self.scales[rows][..., None]
        if self.offsets is not None:
            w += self.offsets[rows][..., None]
        return w.reshape(w.shape[0], -1) if w.ndim == 3 else w.reshape(-1)


def join(parts: list[Blocks]) -> Blocks:
    """Matrices that stack (`Blocks.stacks_with`), stacked by rows: the products that read the
    same input (q/k/v, gate/up) as one."""
    first = parts[0]
    if not all(first.stacks_with(b) for b in parts):
        raise ValueError("blocks of different formats or widths can't be joined")
    offsets = None if first.offsets is None else np.concatenate([b.offsets for b in parts])
    return Blocks(np.concatenate([b.packed for b in parts]), np.concatenate([b.scales for b in parts]),
                  np.concatenate([b.zeros for b in parts]), offsets, first.bits, first.block)


def from_affine(q: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> Blocks:
    """Blocks for w = scale·q + bias; q (n, nb, block) unsigned, scale and bias (n, nb). Where
    every block's −bias/scale is a whole number (the signed formats: Q4_0's 8, Q8_0's 128 ...) it is
    the zero point; otherwise the zero point is 0 and the bias is kept as the block's offset.
    (onnxruntime's float zero points would be exact too, but its CPU kernel then falls back to a
    path ~150x slower here: 511 ms against 3 ms on a 49152 x 576 product.)"""
    q = np.ascontiguousarray(q, dtype=np.uint8)
    scale = np.asarray(scale, np.float32)
    bias = np.asarray(bias, np.float32)
    if not (np.isfinite(scale).all() and np.isfinite(bias).all()):
        raise Malformed("scales or offsets that aren't finite numbers")
    if bits == 4:
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    elif bits == 8:
        packed = q
    else:
        raise Unmapped(f"{bits}-bit blocks")
    nonzero = scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(nonzero, -bias / np.where(nonzero, scale, np.float32(1)), np.float32(0))
    whole = np.rint(zp)
    offsets: Optional[np.ndarray] = None
    if (nonzero | (bias == 0)).all() and (whole == zp).all() and whole.min() >= 0 and whole.max() < 2 ** bits:
        zeros = whole.astype(np.uint8)
    else:
        zeros = np.zeros(scale.shape, np.uint8)
        offsets = np.ascontiguousarray(bias)
    return Blocks(np.ascontiguousarray(packed), np.ascontiguousarray(scale), zeros, offsets, bits, q.shape[-1])


def from_mlx(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group: int) -> Blocks:
    """Blocks for an MLX affine-quantized matrix (packed uint32 weight, scales, biases)."""
    if bits not in (4, 8) or group not in (32, 64, 128):
        raise Unmapped(f"MLX {bits}-bit, group {group} (mapped: 4 and 8 bits, groups 32/64/128)")
    raw = np.ascontiguousarray(weight).view(np.uint8)
    n = raw.shape[0]
    if bits == 8:
        q = raw.reshape(n, -1, group)
    else:
        q = np.empty((n, raw.shape[1] * 2), np.uint8)
        q[:, 0::2] = raw & 0x0F
        q[:, 1::2] = raw >> 4
        q = q.reshape(n, -1, group)
    if q.shape[1] != scales.shape[-1] or scales.shape != biases.shape:
        raise Malformed(f"packed weight {weight.shape} doesn't match scales {scales.shape}")
    return from_affine(q, scales, biases, bits)


# ggml's block layouts: bytes of one block and values in it, per type name (read by `ggml_blocks`;
# engine/cpu/file_blocks.py holds all of them, Blocks the ones in _AS_BLOCKS)
GGML_LAYOUT = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q5_0": (22, 32), "Q8_0": (34, 32), "Q4_K": (144, 256),
               "Q5_K": (176, 256), "Q6_K": (210, 256)}
# what each type becomes as Blocks, per value: (bits, block, has a float offset a block); see the module docstring
_AS_BLOCKS = {"Q4_0": (4, 32, False), "Q4_1": (4, 32, True), "Q4_K": (4, 32, True), "Q8_0": (8, 32, False),
              "Q5_0": (8, 32, False), "Q6_K": (8, 16, False)}
MAPPED_GGUF = tuple(_AS_BLOCKS)


def block_bytes(bits: int, block: int) -> float:
    """Bytes a value as `Blocks` of `bits`/`block`: the values, a float scale and a zero point a
    block (a format's float offsets, where it has them, are counted apart: 4 bytes a block)."""
    return bits / 8 + (4 + 1) / block


def _nibbles(qs: np.ndarray, half: int) -> np.ndarray:
    """ggml's 4-bit layout: values [0, half) in the low nibbles of `half` bytes, [half, 2·half) high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(qs.shape[:-1] + (2 * half,))


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def ggml_blocks(name: str, type_name: str, data: Any, k: int) -> np.ndarray:
    """Rows of ggml blocks of `type_name` (`data`: uint8, one row a matrix row of `k` values) as
    (rows, blocks, block bytes); Malformed, naming tensor `name`, where the bytes aren't that."""
    size, per = GGML_LAYOUT[type_name]
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or k % per or data.shape[1] != k // per * size:
        raise Malformed(f"tensor {name}: {data.shape} bytes of {data.dtype} aren't rows of {k} {type_name} values "
                        f"({size} bytes a block of {per})")
    return data.reshape(data.shape[0], k // per, size)


def ggml_values(type_name: str, b: np.ndarray) -> np.ndarray:
    """The unsigned values of ggml blocks `b` (rows, blocks, block bytes) as uint8 (rows, chunks,
    chunk), a chunk being the values one scale covers: 32, Q6_K's 16. What a value is worth: the
    type's scales (`k_scales` for Q4_K/Q5_K), less its whole zero (Q4_0 8, Q5_0 16, Q8_0 128, Q6_K 32)."""
    n, nb = b.shape[:2]
    if type_name == "Q4_0":
        return _nibbles(b[..., 2:], 16)
    if type_name == "Q4_1":
        return _nibbles(b[..., 4:], 16)
    if type_name == "Q8_0":
        return (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    if type_name == "Q5_0":
        high = np.unpackbits(b[..., 2:6], axis=-1, bitorder="little")  # bit j: value j's fifth bit
        return _nibbles(b[..., 6:], 16) | (high << 4)
    if type_name in ("Q4_K", "Q5_K"):
        # 4 runs of 32 bytes: 32 values in the low nibbles, the next 32 in the high
        qs = b[..., 16:].reshape(n, nb, 4, 32) if type_name == "Q4_K" else b[..., 48:].reshape(n, nb, 4, 32)
        low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb, 8, 32)
        if type_name == "Q5_K":  # byte l of its 32 high-bit bytes: bit s is value l of chunk s's fifth bit
            high = (b[..., 16:48].reshape(n, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
            low = low | (high << 4)
        return low.reshape(n, nb * 8, 32)
    if type_name == "Q6_K":
        ql, qh = b[..., 0:128], b[..., 128:192]
        low = ql.reshape(n, nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        low = (low & 0x0F).reshape(n, nb, 2, 4, 32)  # [half, quarter, 32]
        high = qh.reshape(n, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        high = (high & 0x03).reshape(n, nb, 2, 4, 32)
        return (low | (high << 4)).reshape(n, nb * 16, 16)
    raise Unmapped(f"GGUF {type_name}")


def k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K blocks' scales: d and dmin float32 (rows, blocks), and each chunk's 6-bit scale and
    min as uint8 (rows, chunks): chunk c's values are worth d·sc[c]·q − dmin·mn[c]."""
    from gguf.quants import Q4_K

    n, nb = b.shape[:2]
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
    return (_f16(b[..., 0:2]), _f16(b[..., 2:4]), sc.reshape(n, nb * 8).astype(np.uint8),
            mn.reshape(n, nb * 8).astype(np.uint8))


_CHUNK_ROWS = 8192  # rows converted at a time: the unpacking's temporaries stay ~100 MB on a 151936-row head


class FileRows:
    """A GGUF tensor's rows read from the file a slice at a time (`pread`, not a memory map): the
    bytes of a converted chunk are freed with it, where a mapped file's touched pages stay in the
    process's RSS until the whole map goes (~0.49 GB, the whole file, at the end of a 0.5B's load)."""

    ndim = 2
    dtype = np.dtype(np.uint8)

    def __init__(self, path: str, offset: int, rows: int, row_bytes: int) -> None:
        self.path, self.offset = path, offset
        self.shape = (rows, row_bytes)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("FileRows reads contiguous rows only")
        count = max(0, stop - start)
        data = np.fromfile(self.path, np.uint8, count=count * self.shape[1], offset=self.offset + start * self.shape[1])
        if data.size != count * self.shape[1]:
            raise Malformed(f"the file ends inside the tensor ({data.size} of {count * self.shape[1]} bytes)")
        return data.reshape(count, self.shape[1])


def _rows(data: Any) -> Any:
    return data if isinstance(data, FileRows) else np.asarray(data)


def from_gguf(name: str, type_name: str, data: Any, k: int) -> Blocks:
    """Blocks for a GGUF tensor `name` of `type_name` whose rows (`data`: uint8 rows, or FileRows;
    one row a matrix row of `k` values) are ggml blocks. Raises Unmapped or Malformed. A large
    tensor is converted `_CHUNK_ROWS` rows at a time into the final arrays."""
    data = _rows(data)
    if data.ndim != 2 or data.shape[0] <= _CHUNK_ROWS:
        return _from_gguf(name, type_name, data[:] if isinstance(data, FileRows) else data, k)
    parts = [_from_gguf(name, type_name, data[:_CHUNK_ROWS], k)]
    first = parts[0]
    n = data.shape[0]
    packed = np.empty((n,) + first.packed.shape[1:], np.uint8)
    scales = np.empty((n,) + first.scales.shape[1:], np.float32)
    zeros = np.empty((n,) + first.zeros.shape[1:], np.uint8)
    offsets: Optional[np.ndarray] = None
    for at in range(0, n, _CHUNK_ROWS):
        part = first if at == 0 else _from_gguf(name, type_name, data[at:at + _CHUNK_ROWS], k)
        rows = slice(at, at + part.packed.shape[0])
        packed[rows], scales[rows], zeros[rows] = part.packed, part.scales, part.zeros
        if part.offsets is not None and offsets is None:  # from here on, offsets: earlier rows' zero points become them
            offsets = np.empty(scales.shape, np.float32)
            offsets[:at] = -scales[:at] * zeros[:at].astype(np.float32)
            zeros[:at] = 0
        if offsets is not None:
            if part.offsets is None:
                offsets[rows] = -part.scales * part.zeros.astype(np.float32)
                zeros[rows] = 0
            else:
                offsets[rows] = part.offsets
    return Blocks(packed, scales, zeros, offsets, first.bits, first.block)


@dataclass(frozen=True)
class GGUFRows:
    """An embedding table kept in the file's own bytes (e.g. Q5_0: 0.69 bytes a weight, against
    1.16 as 8-bit blocks): a lookup dequantizes only its rows, with llama.cpp's `gguf` package."""

    raw: np.ndarray  # (n, row bytes) uint8
    type_name: str
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.k

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def dequantize(self, rows: Any = slice(None)) -> np.ndarray:
        """`rows` as float32 (n', k), or (k,) for one row."""
        from gguf import GGMLQuantizationType, dequantize

        raw = self.raw[rows]
        w = dequantize(raw.reshape(-1, raw.shape[-1]), GGMLQuantizationType[self.type_name])
        return np.asarray(w, np.float32).reshape(raw.shape[:-1] + (self.k,))


def gguf_rows(name: str, type_name: str, data: Any, k: int) -> GGUFRows:
    """An embedding table as GGUFRows, checked as `from_gguf` checks a tensor (chunk by chunk,
    the blocks dropped): a malformed table is refused at load, not at its first lookup."""
    data = _rows(data)
    n = data.shape[0]
    raw = np.empty(data.shape, np.uint8)
    for at in range(0, n, _CHUNK_ROWS):
        chunk = data[at:at + _CHUNK_ROWS]
        _from_gguf(name, type_name, chunk, k)  # raises Unmapped or Malformed
        raw[at:at + chunk.shape[0]] = chunk
    return GGUFRows(raw, type_name, k)


def _from_gguf(name: str, type_name: str, data: np.ndarray, k: int) -> Blocks:
    if type_name not in _AS_BLOCKS:
        raise Unmapped(f"GGUF {type_name} (mapped: {', '.join(MAPPED_GGUF)})")
    b = ggml_blocks(name, type_name, data, k)
    q = ggml_values(type_name, b)
    try:
        if type_name in ("Q4_0", "Q8_0", "Q5_0"):
            d = _f16(b[..., 0:2])
            bits, zero = {"Q4_0": (4, 8), "Q8_0": (8, 128), "Q5_0": (8, 16)}[type_name]
            return from_affine(q, d, -zero * d, bits)
        if type_name == "Q4_1":
            return from_affine(q, _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4)
        if type_name == "Q4_K":
            d, dmin, sc, mn = k_scales(b)
            scale = np.repeat(d, 8, axis=1) * sc.astype(np.float32)
            bias = -(np.repeat(dmin, 8, axis=1) * mn.astype(np.float32))
            return from_affine(q, scale, bias, 4)
        if type_name == "Q6_K":
            sc = b[..., 192:208].view(np.int8).astype(np.float32)
            scale = (_f16(b[..., 208:210])[..., None] * sc).reshape(q.shape[:2])
            return from_affine(q, scale, -32 * scale, 8)
    except Malformed as e:
        raise Malformed(f"tensor {name} ({type_name}): {e}") from None
    raise AssertionError(type_name)
