"""Where `--cpu-dtype quantized` finds a model's blocks (engine/cpu/quant_linear.py installs them):
an MLX affine-quantized module's own (mlx-community folders, and GGUF Q4_0/Q4_1/Q8_0 files, which
`mx.load` reads as such), else the original GGUF file a store folder was converted from
(`.openmlx-gguf.json`): its tensor table read once per file version, its tensors a slice at a time
(`FileRows`), never memory-mapped whole.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.cpu import block_kernels, file_blocks
from engine.cpu.file_blocks import FileBlocks
from engine.cpu.quant_blocks import Blocks, FileRows, GGUFRows, Unmapped, from_gguf, from_mlx, gguf_rows

# "file": a GGUF file's blocks held in the file's own bit widths and multiplied by the compiled
# kernels of engine/cpu/block_kernels.py where numba is there and the type maps; "onnxruntime":
# always as MatMulNBits blocks (the path before; for comparison, `bench/quant_cpu.py`).
KERNEL = os.environ.get("OPENMLX_QUANT_KERNEL", "file")


def file_kernels(type_name: str) -> bool:
    """Whether a GGUF tensor of `type_name` is held as FileBlocks (else as MatMulNBits blocks)."""
    return KERNEL != "onnxruntime" and type_name in file_blocks.MAPPED and block_kernels.available()


def gguf_source(folder: Path) -> Optional[Path]:
    """The GGUF file a store folder was converted from, while it is still the same file."""
    try:
        from engine.formats.gguf import SOURCE_MARK

        stamp = json.loads((folder / SOURCE_MARK).read_text())
        source = Path(stamp["source"])
        if source.stat().st_size == stamp.get("size"):
            return source
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


@dataclass(frozen=True)
class _Tensor:
    """One GGUF tensor's place in its file: what `FileRows` needs, and what the estimate counts."""

    name: str
    type_name: str
    k: int  # values a row
    rows: int
    row_bytes: int
    offset: int

    @property
    def values(self) -> int:
        return self.k * self.rows


@dataclass(frozen=True)
class _GGUFFile:
    architecture: str
    tensors: tuple[_Tensor, ...]


@functools.lru_cache(maxsize=2)
def _gguf_file(path: str, size: int, mtime_ns: int) -> _GGUFFile:
    """The file's architecture and tensor table, read once per file version: gguf's reader parses
    every metadata field (a 151936-token vocabulary: ~10 s and ~1.5 M small objects here), and the
    gate's estimate and the load both need the table. The reader itself isn't kept."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[-1]).decode() if field else ""
    tensors = []
    for t in reader.tensors:
        rows, row_bytes = t.data.shape if t.data.ndim == 2 else (1, int(t.n_bytes))
        tensors.append(_Tensor(t.name, t.tensor_type.name, int(t.shape[0]), int(rows), int(row_bytes),
                               int(t.data_offset)))
    return _GGUFFile(arch, tuple(tensors))


def read_gguf(path: Path) -> _GGUFFile:
    stat = path.stat()
    return _gguf_file(str(path), stat.st_size, stat.st_mtime_ns)


class Source:
    """Where a module's blocks come from: its own MLX affine quantization, else the GGUF file."""

    def __init__(self, folder: Path) -> None:
        self.gguf: dict[str, _Tensor] = {}
        path = gguf_source(folder)
        self.from_gguf_file = path is not None  # its blocks were read from a GGUF file, here or by MLX's loader
        if path is None:
            return
        from engine.formats.gguf import mlx_tensor_name
        from engine.formats.gguf_archs import ARCHITECTURES

        file = read_gguf(path)
        arch = ARCHITECTURES.get(file.architecture)
        if arch is None:
            return
        self.path = str(path)
        for t in file.tensors:
            try:
                self.gguf[mlx_tensor_name(t.name, arch.layers).removesuffix(".weight")] = t
            except ValueError:
                continue

    def _file_rows(self, tensor: _Tensor) -> FileRows:
        return FileRows(self.path, tensor.offset, tensor.rows, tensor.row_bytes)

    def table(self, path: str, module: Any, tied: bool) -> Blocks | FileBlocks | GGUFRows:
        """An embedding's table: the file's own bytes where it comes from a GGUF file and isn't
        also the head, else blocks."""
        tensor = self.gguf.get(path)
        if tied or tensor is None or isinstance(module, nn.QuantizedEmbedding):
            return self.blocks(path, module)
        return gguf_rows(tensor.name, tensor.type_name, self._file_rows(tensor), tensor.k)

    def blocks(self, path: str, module: Any) -> Blocks | FileBlocks:
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            if getattr(module, "mode", "affine") != "affine":
                raise Unmapped(f"{path}: MLX {module.mode} quantization")
            return from_mlx(np.asarray(module.weight), np.asarray(module.scales.astype(mx.float32)),
                            np.asarray(module.biases.astype(mx.float32)), module.bits, module.group_size)
        tensor = self.gguf.get(path)
        if tensor is None:
            raise Unmapped(f"{path}: {type(module).__name__} with no quantized blocks (not MLX-quantized, "
                           "no GGUF source file)")
        if file_kernels(tensor.type_name):
            return file_blocks.from_gguf(tensor.name, tensor.type_name, self._file_rows(tensor), tensor.k)
        return from_gguf(tensor.name, tensor.type_name, self._file_rows(tensor), tensor.k)

    def parts(self, path: str, module: Any) -> Blocks | FileBlocks | Iterator[Blocks]:
        """A product's blocks: a large GGUF matrix (the head) as consecutive slices of PART_ROWS
        rows, each read from the file only when the one before is held by its session (as
        FileBlocks, whole: those are converted into their final arrays a chunk at a time)."""
        tensor = self.gguf.get(path)
        if tensor is None or isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) \
                or file_kernels(tensor.type_name):
            return self.blocks(path, module)
        whole = self._file_rows(tensor)
        if whole.shape[0] <= PART_ROWS:
            return self.blocks(path, module)

        def slices() -> Iterator[Blocks]:
            rows, row_bytes = whole.shape
            for at in range(0, rows, PART_ROWS):
                part = FileRows(whole.path, whole.offset + at * row_bytes, min(PART_ROWS, rows - at), row_bytes)
                yield from_gguf(f"{tensor.name}[{at}:]", tensor.type_name, part, tensor.k)
                trim()
        return slices()


# rows of one session over a large GGUF matrix: a Q8_0 slice of Qwen's 151936 x 896 head is ~37 MB of
# blocks while it is built (the whole head: 157 MB, on top of onnxruntime's ~205 MB copy); five calls
# a token instead of one cost ~0.1 ms.
PART_ROWS = 32768


def trim() -> None:
    """Hand back to the system the heap the graphs' build left free (each session's protobuf and
    serialized copy): measured 285 -> 206 MB held for a 150 MB head here."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
