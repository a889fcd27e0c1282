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
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2),
               "Q6_K": (208,)}


def _random_blocks(type_name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes in the layout of `type_name`, its float16 scales set to small finite values
    (also tests/test_file_blocks.py's)."""
    size, per = qb.GGML_LAYOUT[type_name]
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
    the dequantized weights: the row is quantized to int8 first (~1 % here, as llama.cpp's own dot
    products do); with OPENMLX_QUANT_ACCURACY=1 a 4-bit product keeps float32 activations (float
    rounding)."""
    from engine.cpu.quant_linear import QuantLinear

    k, n = 512, 96
    blocks = qb.from_gguf("t", type_name, _random_blocks(type_name, n, k, seed=3), k)
    bias = np.linspace(-1, 1, n, dtype=np.float32)
    module = QuantLinear(blocks, bias)
    exact = QuantLinear(blocks, bias, accuracy=1) if blocks.bits == 4 else None
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    want = x @ blocks.dequantize().T + bias
    got = module.rows(x)
    tolerance = 2e-2
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()
    if exact is not None:
        assert np.abs(exact.rows(x) - want).max() <= 1e-4 * np.abs(want).max()
    out = np.empty(n, np.float32)
    scale = np.abs(got).max()
    assert np.abs(module.matvec(x[2], out) + bias - got[2]).max() <= tolerance * scale  # one row: another tiling
    y = module(mx.array(x.reshape(1, 5, k)))
    assert y.shape == (1, 5, n) and np.abs(np.array(y)[0] - got).max() <= 1e-6 * scale


@pytest.mark.parametrize("kind", ["onnxruntime", "file"])
def test_projections_that_read_one_input_share_one_product(monkeypatch, kind):
    """q/k/v (and gate/up) of one block format become rows of one product: the same outputs as
    each alone, one run for the three calls of a pass on the same input, and the numpy step
    multiplies the joined matrix once. A projection of another format stays alone. Both kinds of
    blocks: onnxruntime's, and a GGUF file's own (engine/cpu/file_blocks.py)."""
    from engine.cpu import blas, decode, file_blocks
    from engine.cpu.quant_linear import QuantLinear, QuantRows, _products, _shared_input_runs

    if kind == "file":
        pytest.importorskip("numba")
    convert = qb.from_gguf if kind == "onnxruntime" else file_blocks.from_gguf
    k = 256
    held = [(name, convert(name, t, _random_blocks(t, n, k, seed=i), k),
             np.linspace(-1, 1, n, dtype=np.float32) if name != "v_proj" else None)
            for i, (name, t, n) in enumerate([("q_proj", "Q8_0", 64), ("k_proj", "Q8_0", 32), ("v_proj", "Q8_0", 32),
                                              ("o_proj", "Q8_0", 64)])]
    mixed = held[:2] + [("v_proj", convert("v", "Q4_K", _random_blocks("Q4_K", 32, k, seed=9), k), None)]
    assert [len(r) for r in _shared_input_runs(held)] == [3, 1]  # o_proj reads another input
    assert [len(r) for r in _shared_input_runs(mixed)] == [2, 1]  # another format: its own product
    modules = dict(_products(_shared_input_runs(held)[0]))
    assert all(isinstance(m, QuantRows) for m in modules.values())
    runs = []
    real = QuantLinear.rows
    monkeypatch.setattr(QuantLinear, "rows", lambda self, x: runs.append(x.shape) or real(self, x))
    x = np.random.default_rng(2).standard_normal((1, 3, k)).astype(np.float32)
    xs = mx.array(x)
    outputs = [np.array(modules[n](xs)) for n in ("q_proj", "k_proj", "v_proj")]
    assert len(runs) == 1
    assert modules["q_proj"].joined._last is None  # the product isn't held once the last reader has it
    for (name, blocks, bias), got in zip(held, outputs):
        want = np.array(QuantLinear(blocks, bias)(xs))
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
    group = decode._Group.of([decode._linear(modules[n]) for n in ("q_proj", "k_proj", "v_proj")])
    assert len(group.weights) == 1 and group.weights[0] is modules["q_proj"].joined
    out = group(blas.Products(None), x[0, 0])
    assert np.abs(out - np.concatenate(outputs, axis=-1)[0, 0]).max() <= 2e-2 * np.abs(out).max()


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
    assert not layer.mlp.down_proj.rounds_activations  # an MLX folder's 4-bit blocks: float32 activations, as MLX
    # nothing float32 the size of a weight matrix is left in MLX: only norms
    assert max(p.size for _, p in __import__("mlx.utils").utils.tree_flatten(runner.model.parameters())) <= 576
    head, rows = runner.model.model.embed_tokens._head, []
    real = QuantLinear.rows

    def counted(self, x):
        if self is head:
            rows.append(x.shape[0])
        return real(self, x)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(QuantLinear, "rows", counted)
        assert _greedy(runner) == float32_text
    # the prompt's rows go through the backbone only: the eager head multiplies the last row of a pass
    assert rows and max(rows) == 1, rows


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

    monkeypatch.setattr("engine.cpu.quant_source.from_mlx", broken)
    monkeypatch.setenv("OPENMLX_FAST_DECODE", "off")
    if failure == "malformed":
        with pytest.raises(InvalidRequest, match="malformed quantized weights: tensor blk.0.attn_q.weight"):
            load_gated("m", probe(default_model_dir), "quantized", MemoryGate())
    else:
        loaded = load_gated("m", probe(default_model_dir), "quantized", MemoryGate())
        assert loaded.dtype == "float32" and loaded.model.model.layers[0].mlp.down_proj.weight.dtype == mx.float32
        assert "doesn't cover this model (GGUF IQ4_NL)" in loaded.dtype_reason and loaded.warnings


def test_a_session_keeps_no_reference_to_the_blocks_it_was_built_from():
    """The weights reach onnxruntime as external initializers from memory; once the session is
    built our arrays are freed (that is the memory saved), so it must not read them afterwards:
    freed and overwritten, the product stays the same."""
    from engine.cpu.quant_linear import QuantLinear

    k, n = 512, 4096  # large enough that numpy's arrays are their own mappings, unmapped when freed
    blocks = qb.from_gguf("t", "Q8_0", _random_blocks("Q8_0", n, k, seed=7), k)
    x = np.random.default_rng(2).standard_normal((3, k)).astype(np.float32)
    module = QuantLinear(blocks, None)
    want = module.rows(x)
    del blocks
    litter = [np.full(n * k, 0x7F, np.uint8) for _ in range(4)]  # reuse whatever was freed
    assert np.array_equal(module.rows(x), want) and litter


def test_file_rows_read_a_tensor_a_slice_at_a_time_and_a_short_file_is_refused(tmp_path):
    data = _random_blocks("Q5_0", 40, 256, seed=4)
    path = tmp_path / "t.bin"
    path.write_bytes(b"head" + data.tobytes())
    rows = qb.FileRows(str(path), 4, 40, data.shape[1])
    assert np.array_equal(rows[10:25], data[10:25]) and np.array_equal(rows[:], data)
    whole = qb.from_gguf("t", "Q5_0", data, 256)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(qb, "_CHUNK_ROWS", 16)
        assert np.array_equal(qb.from_gguf("t", "Q5_0", rows, 256).dequantize(), whole.dequantize())
    short = qb.FileRows(str(path), 4, 41, data.shape[1])
    with pytest.raises(qb.Malformed, match="the file ends inside the tensor"):
        qb.from_gguf("t", "Q5_0", short, 256)


def test_an_embedding_kept_in_the_files_bytes_looks_up_llama_cpps_rows():
    data = _random_blocks("Q5_0", 20, 128, seed=9)
    table = qb.gguf_rows("token_embd.weight", "Q5_0", data, 128)
    want = gguf.dequantize(data, gguf.GGMLQuantizationType.Q5_0).reshape(20, 128)
    assert table.nbytes == data.nbytes and table.shape == (20, 128)
    assert np.array_equal(table.dequantize(7), want[7]) and np.array_equal(table.dequantize(np.array([3, 19])), want[[3, 19]])
    bad = data.copy()
    bad[5, 0:2] = np.array([np.nan], np.float16).view(np.uint8)
    with pytest.raises(qb.Malformed, match="token_embd.weight"):
        qb.gguf_rows("token_embd.weight", "Q5_0", bad, 128)


@pytest.fixture(scope="module")
def tiny_gguf_folder(tmp_path_factory):
    """A tiny llama written by llama.cpp's own writer (Q5_0 matrices, a Q8_0 head), imported into a
    store (float16 there, marked with its source file)."""
    import gguf.quants
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from engine.models.gguf_import import import_gguf
    from tests.test_gguf_families import FAMILIES, _write

    tmp = tmp_path_factory.mktemp("tiny-gguf")
    config, extra_meta, names, norm_shift = FAMILIES["llama"]
    model = llama.Model(llama.ModelArgs.from_dict(config))
    rng = np.random.default_rng(3)
    params = {k: (rng.standard_normal(v.shape) * 0.2).astype(np.float32) for k, v in tree_flatten(model.parameters())}
    path = tmp / "tiny-q5.gguf"
    T = gguf.GGMLQuantizationType
    _write(path, "llama", config, extra_meta, names, norm_shift, params,
           quantize=lambda name: T.Q8_0 if name == "lm_head.weight" else T.Q5_0)
    return import_gguf(path, tmp / "models", say=lambda _m: None)


@pytest.mark.parametrize("kernel", ["file", "onnxruntime"])
def test_a_gguf_model_is_held_from_its_file_and_the_gate_counts_the_blocks(tiny_gguf_folder, monkeypatch, kernel):
    """The quantized path reads the tiny model's blocks from its GGUF file (in the file's own bit
    widths for the compiled kernels; as onnxruntime blocks, the head in row slices), the embedding
    in the file's own bytes, and gives the float32 path's logits; the memory gate counts the blocks
    as held, not the float16 folder."""
    from engine.cpu import quant_linear
    from engine.cpu.file_blocks import FileBlocks
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine.models.weights import load_gated

    folder = tiny_gguf_folder
    monkeypatch.setenv("OPENMLX_FAST_DECODE", "off")
    monkeypatch.setattr("engine.cpu.quant_source.KERNEL", kernel)
    monkeypatch.setattr("engine.cpu.quant_source.PART_ROWS", 128)  # onnxruntime: the 300-row head in 3 slices
    plain = load_gated("tiny", probe(folder), "float32", MemoryGate())
    held = load_gated("tiny", probe(folder), "quantized", MemoryGate())
    assert held.dtype == "quantized", held.dtype_reason
    head = held.model.lm_head
    assert head.shape == (300, 64)
    if kernel == "file":
        assert isinstance(head._file, FileBlocks) and head.kind == "Q8_0" and not head._parts
        assert quant_linear.describe(held.model).startswith("Q5_0 x ")
    else:
        assert len(head._parts) == 3 and head._file is None
    assert head.rounds_activations  # a GGUF file's blocks: int8 activations, as llama.cpp
    assert isinstance(held.model.model.embed_tokens._blocks, qb.GGUFRows)
    ids = mx.array([[5, 17, 250, 3, 99, 42]])
    a, b = np.array(plain.model(ids)), np.array(held.model(ids))
    assert np.abs(a - b).max() <= 3e-2 * np.abs(a).max(), np.abs(a - b).max()
    estimate = quant_linear.estimate_held(folder)
    assert held.need.weights == estimate < probe(folder).size_bytes
    blocks = sum(m.held_bytes for _, m in held.model.named_modules()
                 if isinstance(m, (quant_linear.QuantLinear, quant_linear.QuantRows)))  # joined products once
    assert blocks < estimate < 2 * blocks + held.model.model.embed_tokens.held_bytes


def test_auto_holds_a_model_as_blocks_where_float32_would_not_fit(tiny_gguf_folder, monkeypatch):
    """`--cpu-dtype auto`: float32 where it fits; where it doesn't but the blocks do, quantized
    (not the shipped weights through MLX's slow quantized kernels), saying why; neither: as shipped."""
    from engine.cpu import quant_linear
    from engine.models.memory import SAFETY_MARGIN, MemoryGate, dequantized_bytes
    from engine.models.probe import probe
    from engine.models.weights import KV_HEADROOM_TOKENS, choose_cpu_dtype, kv_bytes_per_token, load_gated

    p = probe(tiny_gguf_folder)
    kv = kv_bytes_per_token(p.config)
    f32, blocks = dequantized_bytes(p), quant_linear.estimate_held(tiny_gguf_folder)
    assert blocks < f32
    budget = KV_HEADROOM_TOKENS * kv + SAFETY_MARGIN
    assert choose_cpu_dtype("auto", p, MemoryGate(override=budget + f32), kv).dtype == "float32"
    between = MemoryGate(override=budget + (blocks + f32) // 2)
    choice = choose_cpu_dtype("auto", p, between, kv)
    assert choice.dtype == "quantized" and "would not fit" in choice.reason and "held as blocks" in choice.reason
    assert choose_cpu_dtype("auto", p, MemoryGate(override=budget + blocks // 2), kv).dtype == "keep"
    monkeypatch.setenv("OPENMLX_FAST_DECODE", "off")
    loaded = load_gated("tiny", p, "auto", between)
    assert loaded.dtype == "quantized" and "held as blocks" in loaded.dtype_reason
    assert isinstance(loaded.model.lm_head, quant_linear.QuantLinear)
    # where onnxruntime isn't there, auto doesn't pick it
    # a model of QUANTIZED_ABOVE float32 bytes or more is held as blocks even where float32 fits:
    # faster there (the 0.5B decodes at 28 against 59 ms a token)
    monkeypatch.setattr("engine.models.weights.QUANTIZED_ABOVE", f32)
    roomy = choose_cpu_dtype("auto", p, MemoryGate(override=budget + f32), kv)
    assert roomy.dtype == "quantized" and "decode faster" in roomy.reason
    monkeypatch.setattr("engine.models.weights.QUANTIZED_ABOVE", f32 + 1)
    assert choose_cpu_dtype("auto", p, MemoryGate(override=budget + f32), kv).dtype == "float32"
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "onnxruntime" else object())
    monkeypatch.setattr("engine.models.weights.QUANTIZED_ABOVE", f32)
    assert choose_cpu_dtype("auto", p, between, kv).dtype == "keep"
    assert choose_cpu_dtype("auto", p, MemoryGate(override=budget + f32), kv).dtype == "float32"
