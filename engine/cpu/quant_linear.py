"""`--cpu-dtype quantized`: a model's weight products over weights held as blocks, never widened
to float32 as a whole. Two kinds of blocks:

- a GGUF file's own (engine/cpu/file_blocks.py: each type in its own bit width, about the file's
  bytes), multiplied by kernels compiled at load with numba and llvmlite
  (engine/cpu/block_kernels.py): int8 input rows as llama.cpp multiplies that file, a prefill pass
  through dequantized tiles and sgemm. Measured on Qwen2.5-Coder-0.5B Q4_K_M here: a decode step's
  products 26 -> 18-21 ms against onnxruntime's, the blocks 0.65 -> 0.49 GB;
- onnxruntime's `MatMulNBits` blocks (engine/cpu/quant_blocks.py) for an MLX folder's affine
  groups, and for a GGUF file where numba isn't installed or `OPENMLX_QUANT_KERNEL=onnxruntime`.

Every projection of the llama layout (q/k/v/o, gate/up/down, the head) becomes a `QuantLinear`:
an MLX module whose call hands its input rows to its blocks' product and returns the result as an
MLX array. So every pass goes through the blockwise kernels: prefill, batched decode, speculation,
and the numpy one-token step (engine/cpu/decode.py), which calls `matvec` directly. The embedding
becomes a `QuantEmbedding` that dequantizes only the rows it looks up; a tied head multiplies
through its own product over the same blocks.

Where the blocks come from (an MLX folder's own quantization, or the GGUF file a store folder was
converted from): engine/cpu/quant_source.py.

onnxruntime is imported here only, and this module only where `--cpu-dtype quantized` asks for it.
Sessions: 2 intra-op threads, spinning off (with ~150 sessions spinning, a step took ~1 s instead
of 16 ms here); one session a product, not one a layer.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.cpu import block_kernels, file_blocks
from engine.cpu.file_blocks import FileBlocks
from engine.cpu.quant_blocks import Blocks, GGUFRows, Malformed, Unmapped, join
from engine.cpu.quant_source import Source, file_kernels, gguf_source, read_gguf, trim

log = logging.getLogger("openmlx.engine")

# onnxruntime's accuracy_level: 1 keeps the activation row in float32, 4 quantizes it to int8
# blockwise first. A model from a GGUF file is multiplied as llama.cpp multiplies that file (its
# Q4_0/Q4_K/Q5_0/Q6_K/Q8_0 kernels take 8-bit activations): level 4. An MLX folder's 4-bit blocks
# as MLX's own kernels do, with float32 activations (level 1: greedy text stays the float32 path's,
# whichever decode step runs; at level 4 the default model's answer flipped a near-tie, "add_numbers"
# for "add_two_numbers", through HTTP); its 8-bit blocks take level 4, as level 1 is a fallback path
# there. Measured here: one 49152 x 576 product, 4-bit 8.8 ms at level 1 and 3.0 ms at level 4, 8-bit
# 570 ms at level 1 and 9.4 ms at level 4; a decode step of Qwen2.5-Coder-1.5B Q4_K_M (quiet,
# 2026-12-07) 100-127 ms with its 4-bit blocks at level 1, 50-72 ms at level 4.
# OPENMLX_QUANT_ACCURACY sets one level for all (8-bit blocks never below 4).
ACCURACY: dict[int, int] = {4: 1, 8: 4}  # an MLX folder's blocks (bits -> level)
GGUF_ACCURACY: dict[int, int] = {4: 4, 8: 4}  # a GGUF file's
if os.environ.get("OPENMLX_QUANT_ACCURACY"):
    _level = int(os.environ["OPENMLX_QUANT_ACCURACY"])
    ACCURACY = GGUF_ACCURACY = {4: _level, 8: max(4, _level)}
THREADS = int(os.environ.get("OPENMLX_QUANT_THREADS", "2"))


def _initializer(name: str, array: np.ndarray) -> Any:
    """A graph initializer that names its bytes as external data: the bytes themselves reach
    onnxruntime from memory (`add_external_initializers`), never through the protobuf."""
    from onnx import TensorProto, helper

    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    t.dims.extend(array.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", f"memory-{name}"), ("offset", "0"), ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


_ARENA: list[bool] = []


def _shared_arena(ort: Any) -> None:
    """One CPU arena in onnxruntime's environment for every session (`session.use_env_allocators`):
    ~170 sessions each with an arena of its own held ~1 MB more apiece for a 5 MB product here
    (7.2 against 6.1 MB a session, measured), ~60 MB over the 0.5B."""
    if not _ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _ARENA.append(True)


def _session(blocks: Blocks, accuracy: Optional[int], levels: Optional[dict[int, int]] = None) -> Any:
    """One `MatMulNBits` session over `blocks`. The weights go in as external initializers from
    memory: with them inside the protobuf, onnxruntime kept ~2.2x the blocks' bytes per session
    (the model's copy, its initializer and the prepacked weights; 351 MB for a 157 MB 8-bit head,
    measured here), from memory ~1.3x (205 MB), and it holds no reference to our arrays afterwards
    (it copies or prepacks them while the session is built), so they can be freed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n, k = blocks.shape
    zeros = blocks.zeros.reshape(n, -1)
    if blocks.bits == 4:  # two 4-bit zero points a byte, each row's padded to whole bytes
        if zeros.shape[1] % 2:
            zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
        zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
    arrays = {"B": np.ascontiguousarray(blocks.packed), "S": np.ascontiguousarray(blocks.scales.reshape(-1)),
              "Z": np.ascontiguousarray(zeros).reshape(-1)}
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=blocks.bits, block_size=blocks.block,
                            accuracy_level=_level_of(blocks.bits, accuracy, levels))
    graph = helper.make_graph(
        [node], "product",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [_initializer(name, a) for name, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    _shared_arena(ort)
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _level_of(bits: int, accuracy: Optional[int], levels: Optional[dict[int, int]]) -> int:
    """The accuracy level a product of `bits`-bit blocks runs at: `accuracy` where given, else
    from `levels` (GGUF_ACCURACY for a GGUF file's blocks), else ACCURACY."""
    return accuracy if accuracy is not None else (levels or ACCURACY)[bits]


class QuantLinear(nn.Module):
    """y = x Wᵀ (+ bias) with W as MatMulNBits blocks in onnxruntime sessions: one session, or for
    a large matrix one per slice of rows (`blocks` an iterable of consecutive row slices), each
    slice's blocks freed once its session holds them, so a 151936-row head never exists whole
    outside onnxruntime while it is built."""

    def __init__(self, blocks: Blocks | FileBlocks | Iterable[Blocks], bias: Optional[np.ndarray],
                 accuracy: Optional[int] = None, levels: Optional[dict[int, int]] = None) -> None:
        super().__init__()
        self._parts: list[tuple[int, int, Any, Optional[np.ndarray]]] = []  # (first row, end, session, offsets)
        self._file: Optional[FileBlocks] = None  # or: a GGUF file's blocks, for the compiled kernels
        self._bias = None if bias is None else np.ascontiguousarray(bias, np.float32)
        if isinstance(blocks, FileBlocks):
            self._file, self.shape, self.held_bytes = blocks, blocks.shape, blocks.nbytes
            self._kernel = block_kernels.Product(blocks)
            self.bits, self.block, self.kind = blocks.bits, blocks.chunk, blocks.type_name
            self.rounds_activations = True  # int8 input rows, as llama.cpp's kernels take them
            return
        n, self.held_bytes, k = 0, 0, 0
        for part in [blocks] if isinstance(blocks, Blocks) else blocks:
            rows, k = part.shape
            self.bits, self.block = part.bits, part.block
            self._parts.append((n, n + rows, _session(part, accuracy, levels), part.offsets))  # offsets: (rows, k/block) or None
            n += rows
            self.held_bytes += part.nbytes
            del part  # the next slice is made only after this one's blocks are gone
        if not self._parts:
            raise Malformed("a matrix with no rows")
        self.shape = (n, k)
        self.kind = f"{self.bits}-bit/{self.block}"
        # accuracy level 4 rounds each input row to int8 blocks first (as llama.cpp does): a tiny
        # difference in the input can then move an output by a rounding step (engine/cpu/decode.py)
        self.rounds_activations = _level_of(self.bits, accuracy, levels) >= 4

    def _run(self, x: np.ndarray, part: tuple[int, int, Any, Optional[np.ndarray]]) -> np.ndarray:
        _, _, session, offsets = part
        y = session.run(None, {"x": x})[0]
        if offsets is not None:  # + Σ_b offset[n, b] · (the sum of x over block b)
            sums = x.reshape(x.shape[0], -1, self.block).sum(axis=-1)
            y += sums @ offsets.T
        return y

    def _product(self, x: np.ndarray) -> np.ndarray:
        if self._file is not None:
            return self._kernel(x)
        if len(self._parts) == 1 and x.shape[0] <= ROWS_A_RUN:
            return self._run(x, self._parts[0])
        y = np.empty((x.shape[0], self.shape[0]), np.float32)
        for at in range(0, x.shape[0], ROWS_A_RUN):
            rows = slice(at, at + ROWS_A_RUN)
            for part in self._parts:
                y[rows, part[0]:part[1]] = self._run(x[rows], part)
        return y

    def rows(self, x: np.ndarray) -> np.ndarray:
        """x (m, k) float32 -> (m, n), bias added."""
        y = self._product(x)
        if self._bias is not None:
            y += self._bias
        return y

    def matvec(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = W x (no bias: the numpy step adds its group's); x (k,), out (n,)."""
        out[:] = self._product(x.reshape(1, -1))[0]
        return out

    def __call__(self, x: mx.array) -> mx.array:
        lead = x.shape[:-1]
        rows = np.ascontiguousarray(np.asarray(x.astype(mx.float32)).reshape(-1, x.shape[-1]))
        return mx.array(self.rows(rows)).reshape(*lead, self.shape[0])

    def shared(self, x: mx.array, readers: int) -> mx.array:
        """`self(x)`, computed once for the `readers` `QuantRows` that read the same input in turn
        (mlx-lm's `q_proj(x), k_proj(x), v_proj(x)`): the input is kept with its product (the same
        array object, immutable and held here, so its id can't be reused, gets the same one) until
        the last reader has it: a prefill pass's gate/up product is ~10 MB a layer."""
        last = getattr(self, "_last", None)
        if last is None or last[0] is not x:
            last = [x, self(x), 0]
        last[2] += 1
        object.__setattr__(self, "_last", None if last[2] >= readers else last)  # not an MLX parameter
        return last[1]


class QuantRows(nn.Module):
    """One projection held as rows `start:end` of a `QuantLinear` it shares with the projections
    that read the same input (`join`ed at install: q/k/v, gate/up). A pass runs the shared product
    once; the numpy step (engine/cpu/decode.py) multiplies the shared matrix as one group."""

    def __init__(self, joined: QuantLinear, start: int, end: int, first: bool, readers: int) -> None:
        super().__init__()
        object.__setattr__(self, "joined", joined)  # outside MLX's module tree: counted and walked once, here
        self.start, self.end, self.readers = start, end, readers
        self.shape = (end - start, joined.shape[1])
        self.bits, self.block, self.kind = joined.bits, joined.block, joined.kind
        self.held_bytes = joined.held_bytes if first else 0  # the shared blocks, counted once

    def __call__(self, x: mx.array) -> mx.array:
        return self.joined.shared(x, self.readers)[..., self.start:self.end]

    @property
    def _bias(self) -> Optional[np.ndarray]:
        bias = self.joined._bias
        return None if bias is None else bias[self.start:self.end]

    def matvec(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """These rows of W x alone (the numpy step multiplies the joined matrix instead, once)."""
        out[:] = self.joined._product(x.reshape(1, -1))[0, self.start:self.end]
        return out


class QuantEmbedding(nn.Module):
    """An embedding table held as blocks, or in the GGUF file's own bytes where it isn't also the
    head: a lookup dequantizes only its rows; `as_linear` (a tied head) multiplies through a session
    over the same blocks."""

    def __init__(self, table: Blocks | FileBlocks | GGUFRows, tied: bool, accuracy: Optional[int] = None,
                 levels: Optional[dict[int, int]] = None) -> None:
        super().__init__()
        self._blocks = table  # what a lookup reads: anything with `shape` and `dequantize(rows)`
        self.shape = table.shape
        self.held_bytes = table.nbytes
        self._head = None
        if tied:
            if not isinstance(table, (Blocks, FileBlocks)):
                raise TypeError("a tied head needs the table as blocks")
            self._head = QuantLinear(table, None, accuracy, levels)
            if not isinstance(table, FileBlocks):  # FileBlocks: the head multiplies the table's own arrays
                self.held_bytes += self._head.held_bytes

    def __getitem__(self, token: int) -> np.ndarray:
        return self._blocks.dequantize(int(token))

    def __call__(self, ids: mx.array) -> mx.array:
        flat = np.asarray(ids).reshape(-1)
        return mx.array(self._blocks.dequantize(flat)).reshape(*ids.shape, self.shape[1])

    def as_linear(self, x: mx.array) -> mx.array:
        if self._head is None:
            raise RuntimeError("an untied embedding has no head")
        return self._head(x)


# rows handed to one run at most: onnxruntime's output comes from its arena, which keeps its largest
# block. A prefill pass (256 rows) runs whole; the head sees one row of it (LastRowOnly,
# engine/generation/last_rows.py), and a caller that wants every row's logits (prompt logprobs)
# gets them 256 rows at a time, pinning at most ~156 MB there.
ROWS_A_RUN = 256

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")  # the llama layout (engine/cpu/decode.py's)
_PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


# onnxruntime holds a session's blocks as ~1.2-1.35x their bytes (its prepacked weights, with a float
# sum a block for the int8 path, plus the scales and zero points it keeps): measured 1.21 on a
# 4864 x 896 8-bit product, 1.34 on 896 x 896, 1.3 on the 151936 x 896 head; our offsets stay in numpy.
SESSION_FACTOR = 1.3


def estimate_held(folder: Path, quantization: Optional[dict[str, Any]] = None, values: int = 0) -> Optional[int]:
    """Bytes the model will hold on this path, before loading it: each GGUF tensor in its own bit
    width where the compiled kernels take its type (engine/cpu/file_blocks.py), else as its blocks
    in onnxruntime (SESSION_FACTOR) and its offsets, an untied GGUF embedding in the file's own
    bytes, float tensors as float32. For an MLX-quantized folder (`quantization`: bits, group_size;
    `values`: its weight count), the same from its bits and group. None where neither applies or a
    type doesn't map (the load then says why)."""
    from engine.cpu.quant_blocks import _AS_BLOCKS, block_bytes

    path = gguf_source(folder)
    if path is None:
        if not quantization or not values:
            return None
        bits, group = int(quantization.get("bits", 4)), int(quantization.get("group_size", 64))
        return int(values * (block_bytes(bits, group) * SESSION_FACTOR + 4 / group))
    tensors = read_gguf(path).tensors
    names = {t.name for t in tensors}
    held = 0.0
    for t in tensors:
        if t.type_name in ("F32", "F16", "BF16"):
            held += 4 * t.values
        elif t.name == "token_embd.weight" and "output.weight" in names:
            held += t.rows * t.row_bytes  # looked up, never multiplied: the file's bytes
        elif file_kernels(t.type_name):
            held += t.values * file_blocks.bytes_per_value(t.type_name)
        elif t.type_name in _AS_BLOCKS:
            bits, block, offsets = _AS_BLOCKS[t.type_name]
            held += t.values * (block_bytes(bits, block) * SESSION_FACTOR + (4 / block if offsets else 0))
        else:
            return None
    return int(held)


def install(model: nn.Module, folder: Path) -> int:
    """Replace the model's projections, head and embedding by block-held modules, then cast what
    is left (norms, q/k norms) to float32. Returns the bytes the blocks hold. Raises Unmapped
    (the model keeps another path) or Malformed (the file is refused)."""
    source = Source(folder)
    # multiplied as the file's own runtime multiplies it: llama.cpp's int8 activations for a GGUF
    # file's blocks, MLX's float ones for an MLX folder's
    levels = GGUF_ACCURACY if source.from_gguf_file else ACCURACY
    backbone = getattr(model, "model", None)
    layers = getattr(backbone, "layers", None)
    if not layers:
        raise Unmapped("no model.layers")
    # map everything first, replace after: a model that can't be mapped whole is left as it was
    plan: list[tuple[Any, str, nn.Module]] = []
    for i, layer in enumerate(layers):
        for part, names in _PROJECTIONS:
            parent = getattr(layer, part, None)
            held: list[tuple[str, Blocks | FileBlocks, Optional[np.ndarray]]] = []
            for name in names:
                module = getattr(parent, name, None)
                if module is None:
                    raise Unmapped(f"layer {i} has no {part}.{name}")
                bias = np.asarray(module.bias.astype(mx.float32)) if "bias" in module else None
                held.append((name, source.blocks(f"model.layers.{i}.{part}.{name}", module), bias))
            for run in _shared_input_runs(held):
                plan += [(parent, name, module) for name, module in _products(run, levels)]
        trim()  # each layer's conversion temporaries, before the next layer's pile on (0.5B peak 1.26 -> 1.20 GB)
    embed = getattr(backbone, "embed_tokens", None)
    tied = "lm_head" not in model
    plan.append((backbone, "embed_tokens",
                 QuantEmbedding(source.table("model.embed_tokens", embed, tied), tied, levels=levels)))
    if not tied:
        head = model.lm_head
        if "bias" in head:
            raise Unmapped("an output head with a bias")
        plan.append((model, "lm_head", QuantLinear(source.parts("lm_head", head), None, levels=levels)))
    held = 0
    for parent, name, module in plan:
        setattr(parent, name, module)
        held += module.held_bytes
    products = [getattr(m, "joined", None) or getattr(m, "_head", None) or m for _, _, m in plan]
    files = [p._file for p in products if isinstance(p, QuantLinear) and p._file is not None]
    if files:
        block_kernels.compile_for(files)
    model.update(nn.utils.tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                                   model.parameters()))
    mx.eval(model.parameters())
    trim()
    return held


# Projections that read the same input; each run of one block format among them becomes one product
# (one onnxruntime run a token instead of three: 173 -> 101 runs a step on Qwen2.5-Coder-0.5B).
_SAME_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def _shared_input_runs(held: list[tuple[str, Blocks | FileBlocks, Optional[np.ndarray]]]
                       ) -> list[list[tuple[str, Blocks | FileBlocks, Optional[np.ndarray]]]]:
    """`held` (name, blocks, bias) in order, cut into runs of consecutive projections that read
    the same input and hold one block format; anything else is a run of one."""
    runs: list[list[tuple[str, Blocks | FileBlocks, Optional[np.ndarray]]]] = []
    for entry in held:
        last = runs[-1][-1] if runs else None
        if (last is not None and any({last[0], entry[0]} <= group for group in _SAME_INPUT)
                and last[1].stacks_with(entry[1])):
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def _products(run: list[tuple[str, Blocks | FileBlocks, Optional[np.ndarray]]],
              levels: Optional[dict[int, int]] = None) -> list[tuple[str, nn.Module]]:
    """A run's modules: a lone projection's own `QuantLinear`, or `QuantRows` of one joined."""
    if len(run) == 1:
        name, blocks, bias = run[0]
        return [(name, QuantLinear(blocks, bias, levels=levels))]
    biases = [b if b is not None else np.zeros(blocks.shape[0], np.float32) for _, blocks, b in run]
    bias = None if all(b is None for _, _, b in run) else np.concatenate(biases)
    parts = [blocks for _, blocks, _ in run]
    joined = QuantLinear(file_blocks.join(parts) if isinstance(parts[0], FileBlocks) else join(parts), bias,
                         levels=levels)
    out, at = [], 0
    for i, (name, blocks, _) in enumerate(run):
        out.append((name, QuantRows(joined, at, at + blocks.shape[0], first=i == 0, readers=len(run))))
        at += blocks.shape[0]
    return out


def describe(model: nn.Module) -> str:
    """Which block formats the model's products hold, e.g. '4-bit/32 x 96, 8-bit/16 x 12' (onnxruntime's
    blocks) or 'Q5_0 x 120, Q8_0 x 13' (a GGUF file's own, engine/cpu/file_blocks.py)."""
    from collections import Counter

    kinds: Counter[str] = Counter()
    for _, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantRows)):  # a joined product: each of its projections
            kinds[m.kind] += 1
    return ", ".join(f"{k} x {n}" for k, n in sorted(kinds.items()))


__all__ = ["QuantLinear", "QuantRows", "QuantEmbedding", "install", "describe", "Malformed", "Unmapped"]
