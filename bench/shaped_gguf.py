"""A GGUF file shaped like a real model, random weights in llama.cpp's Q4_0 layout: for speed and
memory only (its text is garbage), so a 7B-class model can be benched without downloading one.

`python -m bench.shaped_gguf --shape 7b [OUT.gguf]` writes qwen2 shaped like Qwen2.5-7B-Instruct
(hidden 3584, 28 layers, FFN 18944, 28 heads / 4 KV heads of 128, rope base 1e6, q/k/v biases,
an untied head, vocab 151936): every 2-D weight Q4_0 (18-byte blocks of 32 values: a float16
scale, then 16 bytes of nibbles; random nibbles, scales ~0.01 so activations stay finite), norms
and biases F32; ~4.3 GB. `--shape tiny` (hidden 256, 2 layers) is for tests. The tokenizer and
chat template (`tokenizer.*` metadata) are copied from the real Qwen2.5-Coder-0.5B GGUF the tests
assemble (same vocabulary), so llama.cpp and openmlx both load and tokenize it. Tensors are
generated one at a time from a seeded RNG and streamed to the file (gguf.GGUFWriter), never
held all at once. Default OUT: `openmlx_home()/test-assets/shaped-<shape>/shaped-<shape>-q4_0.gguf`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

Q4_0_BYTES, Q4_0_VALUES = 18, 32
_CHUNK_ROWS = 4096  # rows generated at a time: ~30 MB of a 151936 x 3584 head


@dataclass(frozen=True)
class Shape:
    """A qwen2 model's dimensions."""

    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 151936
    rope_base: float = 1e6
    rms_eps: float = 1e-6
    context: int = 32768


SHAPES = {
    "7b": Shape(hidden=3584, layers=28, ffn=18944, heads=28, kv_heads=4, head_dim=128),  # Qwen2.5-7B-Instruct
    "tiny": Shape(hidden=256, layers=2, ffn=512, heads=4, kv_heads=2, head_dim=64),
}


@dataclass(frozen=True)
class Tensor:
    """One tensor to write: `rows` x `cols` values (rows = 1 for a vector), Q4_0 where `quantized`."""

    name: str
    rows: int
    cols: int
    quantized: bool
    fill: float = 0.0  # a vector's constant value (norms: 1); 0: small random values (biases)

    @property
    def nbytes(self) -> int:
        if self.quantized:
            return self.rows * self.cols // Q4_0_VALUES * Q4_0_BYTES
        return self.rows * self.cols * 4


def tensors(shape: Shape) -> list[Tensor]:
    """The tensors of a qwen2 model of `shape`, in llama.cpp's names and order."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    out = [Tensor("token_embd.weight", shape.vocab, h, True)]
    for i in range(shape.layers):
        b = f"blk.{i}."
        out += [Tensor(b + "attn_norm.weight", 1, h, False, 1.0),
                Tensor(b + "attn_q.weight", q, h, True), Tensor(b + "attn_q.bias", 1, q, False),
                Tensor(b + "attn_k.weight", kv, h, True), Tensor(b + "attn_k.bias", 1, kv, False),
                Tensor(b + "attn_v.weight", kv, h, True), Tensor(b + "attn_v.bias", 1, kv, False),
                Tensor(b + "attn_output.weight", h, q, True),
                Tensor(b + "ffn_norm.weight", 1, h, False, 1.0),
                Tensor(b + "ffn_gate.weight", shape.ffn, h, True), Tensor(b + "ffn_up.weight", shape.ffn, h, True),
                Tensor(b + "ffn_down.weight", h, shape.ffn, True)]
    out += [Tensor("output_norm.weight", 1, h, False, 1.0), Tensor("output.weight", shape.vocab, h, True)]
    return out


def q4_0_rows(rng: np.random.Generator, rows: int, cols: int, scale: float = 0.01) -> np.ndarray:
    """`rows` random rows of `cols` values as Q4_0 bytes (rows, cols/32·18): per block a float16
    scale d (positive, ~`scale`) then 16 bytes of random nibbles q; llama.cpp reads d·(q − 8)."""
    nb = cols // Q4_0_VALUES
    out = np.empty((rows, nb, Q4_0_BYTES), np.uint8)
    d = (scale * (0.5 + rng.random((rows, nb), np.float32))).astype(np.float16)
    out[..., :2] = d.view(np.uint8).reshape(rows, nb, 2)
    out[..., 2:] = rng.integers(0, 256, (rows, nb, 16), np.uint8)
    return out.reshape(rows, nb * Q4_0_BYTES)


def _data(t: Tensor, rng: np.random.Generator) -> Iterator[np.ndarray]:
    if not t.quantized:
        yield (np.full(t.cols, t.fill, np.float32) if t.fill else
               (0.01 * rng.standard_normal(t.cols)).astype(np.float32))  # biases: small, random
        return
    for at in range(0, t.rows, _CHUNK_ROWS):
        yield q4_0_rows(rng, min(_CHUNK_ROWS, t.rows - at), t.cols)


def tokenizer_fields(source: Path) -> list[tuple[str, object, object, object]]:
    """(key, value, value type, array item type) of every `tokenizer.*` field of GGUF `source`."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    return out


def default_tokenizer_source() -> Path:
    from engine.config import openmlx_home

    return openmlx_home() / "test-assets" / "qwen2.5-coder-0.5b" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def default_out(shape_name: str) -> Path:
    from engine.config import openmlx_home

    return openmlx_home() / "test-assets" / f"shaped-{shape_name}" / f"shaped-{shape_name}-q4_0.gguf"


def write_shaped(out: Path, shape: Shape, tokenizer_from: Optional[Path], seed: int = 0,
                 name: str = "shaped") -> int:
    """Write a qwen2 GGUF of `shape` with random Q4_0 weights to `out` (through a `.partial` file,
    renamed when complete); the `tokenizer.*` metadata from GGUF `tokenizer_from` (None: none,
    for tests that only read the tensors back). Returns the tensors' bytes."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    arch = "qwen2"
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_freq_base(shape.rope_base)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    if tokenizer_from is not None:
        for key, value, vtype, sub in tokenizer_fields(tokenizer_from):
            if key == "tokenizer.ggml.tokens" and len(value) != shape.vocab:  # type: ignore[arg-type]
                raise ValueError(f"{tokenizer_from.name} has {len(value)} tokens "  # type: ignore[arg-type]
                                 f"and the shape's vocabulary is {shape.vocab}")
            w.add_key_value(key, value, vtype, sub)
    plan = tensors(shape)
    for t in plan:
        if t.quantized:
            w.add_tensor_info(t.name, (t.rows, t.cols // Q4_0_VALUES * Q4_0_BYTES), np.dtype(np.uint8), t.nbytes,
                              raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor_info(t.name, (t.cols,), np.dtype(np.float32), t.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    rng = np.random.default_rng(seed)
    for t in plan:
        # GGUFWriter.write_tensor_data takes a whole tensor; written here in row chunks instead
        # (the same alignment and padding), so the 7B's largest tensor is never held at once.
        w.write_padding(fout, fout.tell())
        for chunk in _data(t, rng):
            chunk.tofile(fout)
        w.write_padding(fout, t.nbytes)
    w.close()
    tmp.replace(out)
    return sum(t.nbytes for t in plan)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.shaped_gguf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", default=None, help="the GGUF file to write")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="GGUF whose tokenizer.* metadata is copied (default: the Qwen2.5-Coder-0.5B test asset)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out or default_out(args.shape)
    source = args.tokenizer_from or default_tokenizer_source()
    if not source.is_file():
        print(f"shaped_gguf: {source} is missing (the tests assemble it; or pass --tokenizer-from)", file=sys.stderr)
        return 2
    size = write_shaped(out, SHAPES[args.shape], source, args.seed, name=f"shaped-{args.shape}-q4_0")
    print(f"{out}: {size / 1e9:.2f} GB of tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
