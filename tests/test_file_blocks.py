"""A GGUF file's blocks held in their own bit widths (engine/cpu/file_blocks.py) and the compiled
kernels over them (engine/cpu/block_kernels.py): every type holds the file's exact values in
about the file's bytes; a row product is the int8-rounded input row times those values (as
llama.cpp computes it), with VNNI and with plain IR, for one row, a few rows and many rows."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("numba")

from engine.cpu import block_ir  # noqa: E402
from engine.cpu import block_kernels as bk  # noqa: E402
from engine.cpu import file_blocks as fb  # noqa: E402
from engine.cpu.quant_blocks import Malformed, Unmapped  # noqa: E402
from tests.test_quant_cpu import _random_blocks  # noqa: E402

def _int8_rows(x: np.ndarray) -> np.ndarray:
    """x as llama.cpp's Q8_0 rounds it (int8 blocks of 32, scale amax/127), back in float64."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    q = np.rint(blocks * np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0))
    return (q * d).astype(np.float64).reshape(x.shape)


@pytest.mark.parametrize("type_name", fb.MAPPED)
def test_each_type_holds_the_files_values_in_about_its_bytes(type_name):
    k, n = 512, 6
    data = _random_blocks(type_name, n, k)
    blocks = fb.from_gguf("t", type_name, data, k)
    want = gguf.dequantize(data, gguf.GGMLQuantizationType[type_name]).reshape(n, k)
    assert np.array_equal(blocks.dequantize(), want)
    assert blocks.dequantize(4).tolist() == want[4].tolist()  # one row, as an embedding looks it up
    assert blocks.nbytes == pytest.approx(fb.bytes_per_value(type_name) * n * k)
    assert blocks.nbytes <= 1.06 * data.nbytes  # K-quants: their 6-bit scales as bytes


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_0", "Q6_K"])
def test_a_large_tensor_converts_a_chunk_of_rows_at_a_time_to_the_same_values(type_name, monkeypatch):
    data = _random_blocks(type_name, 10, 256, seed=5)
    whole = fb.from_gguf("t", type_name, data, 256)
    monkeypatch.setattr(fb, "_CHUNK_ROWS", 3)
    assert np.array_equal(fb.from_gguf("t", type_name, data, 256).dequantize(), whole.dequantize())


def _recompile() -> None:
    for cached in (block_ir.intrinsics, bk._rows_kernel, bk._dequantize_kernel):
        cached.cache_clear()


@pytest.mark.parametrize("plain_ir", [False, True], ids=["vnni-if-there", "plain-ir"])
@pytest.mark.parametrize("type_name", fb.MAPPED)
def test_the_product_is_the_int8_rounded_rows_times_the_files_values(type_name, plain_ir, monkeypatch):
    if plain_ir:
        monkeypatch.setattr(block_ir, "vnni_name", lambda lanes: "")
        _recompile()
    try:
        # k: for one-level types, whole fours of chunks (taken 4 at a time) and 3 chunks (a step at
        # a time, the last alone); K-quants, 3 super-blocks
        widths = (384, 96) if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q8_0") else (768,)
        for k, m in [(k, m) for k in widths for m in (1, 3, bk.FEW_ROWS + 4)]:
            data = _random_blocks(type_name, 70, k, seed=7)
            blocks = fb.from_gguf("t", type_name, data, k)
            w = blocks.dequantize().astype(np.float64)
            rng = np.random.default_rng(1)
            x = rng.standard_normal((m, k)).astype(np.float32)
            got = bk.product(blocks, x)
            assert got.shape == (m, 70) and got.dtype == np.float32
            if m <= bk.FEW_ROWS:  # the row kernel: int8 input rows
                want = _int8_rows(x) @ w.T
            else:  # dequantized tiles and sgemm: the float rows
                want = x.astype(np.float64) @ w.T
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (k, m, np.abs(got - want).max())
    finally:
        if plain_ir:
            _recompile()


def test_rows_stack_into_one_product_and_a_row_slice_is_those_rows():
    a = fb.from_gguf("a", "Q5_0", _random_blocks("Q5_0", 5, 64, seed=1), 64)
    b = fb.from_gguf("b", "Q5_0", _random_blocks("Q5_0", 3, 64, seed=2), 64)
    joined = fb.join([a, b])
    assert joined.shape == (8, 64)
    assert np.array_equal(joined.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]))
    assert np.array_equal(joined.rows(slice(5, 8)).dequantize(), b.dequantize())
    other = fb.from_gguf("c", "Q8_0", _random_blocks("Q8_0", 2, 64), 64)
    assert not a.stacks_with(other)
    with pytest.raises(ValueError):
        fb.join([a, other])


@pytest.mark.parametrize("bad", ["short row", "not a block multiple", "nan scale", "inf min"])
def test_malformed_blocks_are_refused_with_the_tensor_named(bad):
    type_name = "Q4_K" if bad == "inf min" else "Q5_0"
    k = 256 if type_name == "Q4_K" else 64
    data = _random_blocks(type_name, 2, k)
    if bad == "short row":
        data = data[:, :-1]
    elif bad == "not a block multiple":
        k += 16
    elif bad == "nan scale":
        data[0, 0:2] = np.array([np.nan], np.float16).view(np.uint8)
    else:
        data[1, 2:4] = np.array([np.inf], np.float16).view(np.uint8)
    with pytest.raises(Malformed, match="tensor w"):
        fb.from_gguf("w", type_name, data, k)


def test_a_type_held_no_other_way_says_which_types_are():
    with pytest.raises(Unmapped, match="Q2_K.*Q6_K"):
        fb.from_gguf("t", "Q2_K", np.zeros((1, 84), np.uint8), 256)


def test_a_tied_embedding_looks_up_and_multiplies_the_same_blocks_counted_once():
    mx = pytest.importorskip("mlx.core")
    from engine.cpu.quant_linear import QuantEmbedding

    blocks = fb.from_gguf("token_embd", "Q8_0", _random_blocks("Q8_0", 40, 64, seed=4), 64)
    embed = QuantEmbedding(blocks, tied=True)
    assert embed.held_bytes == blocks.nbytes  # the head reads the table's own arrays
    w = blocks.dequantize()
    assert np.array_equal(np.array(embed(mx.array([[3, 39]])))[0], w[[3, 39]])
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    got = np.array(embed.as_linear(mx.array(x)))
    want = _int8_rows(x) @ w.T.astype(np.float64)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
