"""bench/shaped_gguf.py: the random Q4_0 model the 7B-shaped bench serves, written tiny here: it
reads back with llama.cpp's reader at the shapes and types of a qwen2 model, its blocks are what
llama.cpp's dequantizer and the quantized path's block reader both read, and its values are small."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, dequantize

from bench.shaped_gguf import SHAPES, q4_0_rows, tensors, write_shaped
from engine.cpu.quant_blocks import FileRows, Malformed, from_gguf

SHAPE = dataclasses.replace(SHAPES["tiny"], vocab=1000)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("shaped") / "tiny.gguf"
    return out, write_shaped(out, SHAPE, tokenizer_from=None, seed=1)


def test_reads_back_as_qwen2_with_q4_0_matrices_and_f32_vectors(written: tuple[Path, int]) -> None:
    path, size = written
    reader = GGUFReader(str(path))
    assert str(reader.fields["general.architecture"].contents()) == "qwen2"
    assert int(reader.fields["qwen2.block_count"].contents()) == SHAPE.layers
    assert int(reader.fields["qwen2.attention.head_count_kv"].contents()) == SHAPE.kv_heads
    assert float(reader.fields["qwen2.rope.freq_base"].contents()) == SHAPE.rope_base
    got = {t.name: t for t in reader.tensors}
    plan = tensors(SHAPE)
    assert list(got) == [t.name for t in plan]
    assert size == sum(int(t.n_bytes) for t in reader.tensors)
    kv = SHAPE.kv_heads * SHAPE.head_dim
    assert [int(d) for d in got["blk.1.attn_k.weight"].shape] == [SHAPE.hidden, kv]  # GGUF: innermost first
    assert [int(d) for d in got["blk.0.ffn_down.weight"].shape] == [SHAPE.ffn, SHAPE.hidden]
    assert [int(d) for d in got["output.weight"].shape] == [SHAPE.hidden, SHAPE.vocab]
    for t in reader.tensors:
        two_d = len(t.shape) == 2
        assert t.tensor_type == (GGMLQuantizationType.Q4_0 if two_d else GGMLQuantizationType.F32), t.name
    assert np.all(got["output_norm.weight"].data == 1.0)
    bias = np.asarray(got["blk.0.attn_q.bias"].data)
    assert np.all(np.isfinite(bias)) and 0 < np.abs(bias).max() < 0.1


def test_blocks_are_what_llama_cpp_and_the_quantized_path_read(written: tuple[Path, int]) -> None:
    path, _ = written
    reader = GGUFReader(str(path))
    for t in reader.tensors:
        if t.tensor_type != GGMLQuantizationType.Q4_0:
            continue
        rows = np.asarray(t.data)
        k = int(t.shape[0])
        # the quantized path reads it from the file a slice at a time, as a server does
        blocks = from_gguf(t.name, "Q4_0", FileRows(str(path), int(t.data_offset), rows.shape[0], rows.shape[1]), k)
        assert blocks.shape == (int(t.shape[1]), k) and blocks.bits == 4 and blocks.block == 32
        assert np.all(np.isfinite(blocks.scales)) and 0.004 < blocks.scales.min() and blocks.scales.max() < 0.016
        ours = blocks.dequantize(slice(0, 8))
        theirs = np.asarray(dequantize(rows[:8], GGMLQuantizationType.Q4_0), np.float32).reshape(ours.shape)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, err_msg=t.name)
        assert np.abs(theirs).max() <= 8 * 0.016


def test_q4_0_rows_are_seeded_and_a_truncated_row_is_refused() -> None:
    a = q4_0_rows(np.random.default_rng(3), 4, 64)
    assert a.shape == (4, 36) and np.array_equal(a, q4_0_rows(np.random.default_rng(3), 4, 64))
    with pytest.raises(Malformed):
        from_gguf("w", "Q4_0", a[:, :-1], 64)


def test_the_bench_counts_what_a_decode_step_reads_and_its_share_of_the_ceiling(written: tuple[Path, int]) -> None:
    from bench.quant_cpu import file_bytes, markdown

    path, size = written
    sizes = file_bytes(path)
    embd = SHAPE.vocab * SHAPE.hidden // 32 * 18
    assert sizes.tensors == size and sizes.per_token == size - embd  # one row of the table is read, not all
    assert sizes.matrix_values == sum(t.rows * t.cols for t in tensors(SHAPE) if t.quantized)
    run = {"decode_tps": 1e9 / sizes.per_token * 5, "prefill_tps": 9.0, "prompt_tokens": 12, "peak_rss_gb": 1.0,
           "peak_anon_gb": 0.8, "ready_s": 3.0, "load": [1.0, 1.0]}  # 5 GB/s read, against a 20 GB/s ceiling
    table = markdown("tiny", {"quantized": [run]}, [{"one_gbs": 12.0, "two_gbs": 20.0}], sizes)
    assert "| 5.0 (25%) |" in table and "two at once 20.0 GB/s" in table and "| 1.00 (0.80) |" in table
