"""`--cpu-dtype quantized` (engine/cpu/quant_blocks.py, engine/cpu/quant_linear.py): each block
type maps exactly (dequantized against llama.cpp's own `gguf` reader, and MLX's `mx.dequantize`);
a malformed tensor is refused; onnxruntime's product matches the dequantized weights; the default
model greedy-decodes the same text as the float32 path, in process and through HTTP."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("onnxruntime")
gguf = pytest.importorskip("gguf")

from engine.cpu import quant_blocks as qb  # noqa: E402

# bytes of one block, and where its float16 scale fields lie
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def _random_blocks(type_name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes in the layout of `type_name`, its float16 scales set to small finite values."""
    size, per = qb._GGUF[type_name]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, k // per, size), dtype=np.uint8)
    for at in _F16_FIELDS[type_name]:
        d = (rng.random((rows, k // per)) * 0.02 + 0.001).astype(np.float16)
        data[..., at:at + 2] = d.view(np.uint8).reshape(rows, k // per, 2)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("type_name", qb.MAPPED_GGUF)
def test_each_gguf_block_type_dequantizes_as_llama_cpp_does(type_name):
    k = 512
    data = _random_blocks(type_name, 6, k)
    blocks = qb.from_gguf("t", type_name, data, k)
    want = gguf.dequantize(data, gguf.GGMLQuantizationType[type_name]).reshape(6, k)
    got = blocks.dequantize()
    assert np.allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max()), np.abs(got - want).max()
    assert blocks.bits == (4 if type_name in ("Q4_0", "Q4_1", "Q4_K") else 8)
    assert blocks.dequantize(3).tolist() == got[3].tolist()  # one row, as an embedding looks it up


@pytest.mark.parametrize("type_name", ["Q4_K", "Q8_0"])
def test_a_large_tensor_converts_in_chunks_to_the_same_blocks(type_name, monkeypatch):
    data = _random_blocks(type_name, 10, 256, seed=5)
    whole = qb.from_gguf("t", type_name, data, 256)
    monkeypatch.setattr(qb, "_CHUNK_ROWS", 3)
    chunked = qb.from_gguf("t", type_name, data, 256)
    assert np.array_equal(chunked.dequantize(), whole.dequantize())


def test_unmapped_types_say_so():
    with pytest.raises(qb.Unmapped, match="Q5_K"):
        qb.from_gguf("t", "Q5_K", np.zeros((1, 176), np.uint8), 256)


@pytest.mark.parametrize("bad", ["short row", "not a block multiple", "nan scale", "inf scale"])
def test_malformed_blocks_are_refused_with_the_tensor_named(bad):
    k = 64
    data = _random_blocks("Q4_0", 2, k)
    if bad == "short row":
        data = data[:, :-1]
    elif bad == "not a block multiple":
        k = 60
    else:
        data = data.copy()
        data[0, 0:2] = np.array([np.nan if bad == "nan scale" else np.inf], np.float16).view(np.uint8)
    with pytest.raises(qb.Malformed, match="blk.0.attn_q.weight"):
        qb.from_gguf("blk.0.attn_q.weight", "Q4_0", data, k)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32), (8, 64)])
def test_mlx_affine_groups_map_exactly(bits, group):
    w = mx.random.normal((48, 256), key=mx.random.key(bits * group))
    packed, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    want = np.array(mx.dequantize(packed, scales, biases, group_size=group, bits=bits))
    blocks = qb.from_mlx(np.array(packed), np.array(scales), np.array(biases), bits, group)
    assert np.allclose(blocks.dequantize(), want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("type_name", ["Q4_K", "Q4_1", "Q8_0", "Q6_K"])
def test_the_product_is_the_dequantized_weights_product(type_name):
    """onnxruntime's MatMulNBits (with the offsets' correction for affine blocks) against x Wᵀ on
    the dequantized weights: 4-bit keeps float32 activations (float rounding), 8-bit quantizes the
    row to int8 (~1 % here, as llama.cpp's own dot products do)."""
    from engine.cpu.quant_linear import QuantLinear

    k, n = 512, 96
    blocks = qb.from_gguf("t", type_name, _random_blocks(type_name, n, k, seed=3), k)
    bias = np.linspace(-1, 1, n, dtype=np.float32)
    module = QuantLinear(blocks, bias)
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    want = x @ blocks.dequantize().T + bias
    got = module.rows(x)
    tolerance = 1e-4 if blocks.bits == 4 else 2e-2
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()
    out = np.empty(n, np.float32)
    scale = np.abs(got).max()
    assert np.abs(module.matvec(x[2], out) + bias - got[2]).max() <= tolerance * scale  # one row: another tiling
    y = module(mx.array(x.reshape(1, 5, k)))
    assert y.shape == (1, 5, n) and np.abs(np.array(y)[0] - got).max() <= 1e-6 * scale


def test_onnxruntime_is_not_imported_by_a_default_start():
    import subprocess
    import sys

    code = "import sys, engine.models.weights, engine.runners; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


PROMPT = "Write a python function that adds two numbers."


def _greedy(runner, n: int = 24) -> str:
    from engine.generation.text import ChatMessage, SamplingParams, TextDelta

    ids = runner.encode_chat([ChatMessage("user", PROMPT)])
    events = runner.generate(ids, n, SamplingParams(temperature=0.0), lambda: False)
    return "".join(e.text for e in events if isinstance(e, TextDelta))


@pytest.fixture(scope="module")
def float32_text(default_model_dir) -> str:
    """The float32 path's greedy text (MLX's own decode step: the numpy step is its equal within
    float rounding, tests/test_fast_decode.py, and skipping the timing saves the load ~10 s)."""
    from engine.generation.text import TextRunner
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe

    with pytest.MonkeyPatch.context() as m:
        m.setenv("OPENMLX_FAST_DECODE", "off")
        return _greedy(TextRunner.load("m", probe(default_model_dir), "float32", MemoryGate()))


def test_the_default_model_decodes_the_float32_text_held_as_blocks(default_model_dir, float32_text):
    from engine.cpu.quant_linear import QuantEmbedding, QuantLinear
    from engine.generation.text import TextRunner
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe

    runner = TextRunner.load("m", probe(default_model_dir), "quantized", MemoryGate())
    assert runner.dtype == "quantized" and "4-bit/32 x 210" in runner.dtype_reason
    layer = runner.model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, QuantLinear) and isinstance(runner.model.model.embed_tokens, QuantEmbedding)
    # nothing float32 the size of a weight matrix is left in MLX: only norms
    assert max(p.size for _, p in __import__("mlx.utils").utils.tree_flatten(runner.model.parameters())) <= 576
    assert _greedy(runner) == float32_text


def test_http_with_the_quantized_path(default_model_dir, float32_text):
    from tests.process import Server

    s = Server(["--cpu-dtype", "quantized"])
    try:
        models = httpx.get(s.url + "/v1/models", timeout=30).json()["data"]
        assert models[0]["dtype"] == "quantized" and "MatMulNBits" in models[0]["dtype_reason"]
        r = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
            "model": models[0]["id"], "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0, "max_tokens": 24})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == float32_text
    finally:
        s.stop()


@pytest.mark.parametrize("failure", ["malformed", "unmapped"])
def test_the_loader_refuses_malformed_blocks_and_falls_back_on_unmapped_ones(default_model_dir, monkeypatch, failure):
    """The load's plumbing (the detection itself is tested per type above): a malformed tensor
    is a clear 400-class refusal naming the file; a type the path doesn't map keeps float32 and
    says why."""
    from engine.errors import InvalidRequest
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine.models.weights import load_gated

    def broken(*args, **kwargs):
        raise (qb.Malformed("tensor blk.0.attn_q.weight (Q4_0): bad") if failure == "malformed"
               else qb.Unmapped("GGUF IQ4_NL"))

    monkeypatch.setattr("engine.cpu.quant_linear.from_mlx", broken)
    monkeypatch.setenv("OPENMLX_FAST_DECODE", "off")
    if failure == "malformed":
        with pytest.raises(InvalidRequest, match="malformed quantized weights: tensor blk.0.attn_q.weight"):
            load_gated("m", probe(default_model_dir), "quantized", MemoryGate())
    else:
        loaded = load_gated("m", probe(default_model_dir), "quantized", MemoryGate())
        assert loaded.dtype == "float32" and loaded.model.model.layers[0].mlp.down_proj.weight.dtype == mx.float32
        assert "doesn't cover this model (GGUF IQ4_NL)" in loaded.dtype_reason and loaded.warnings
