"""Hostile input against the prompt cache's files (issue 42 item 5, issue 50 item 3): the disk
cache's identity includes the weights; planted cache files are refused before they cost memory.
Keys and cache salts kept apart: tests/test_hostile_cache_scopes.py."""
from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, Server
from tests.kv_caches import random_kv as _kv


# --- the weights are part of the disk cache's identity (issue 42 item 5) -----------------------
def test_weights_changed_under_the_same_id_reuse_nothing_from_disk(default_model_dir, tmp_path):
    import numpy as np

    from conftest import _write_tiny_llama
    from engine.config import EngineConfig
    from engine.generation.text import SamplingParams, Started
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine import runners

    folder = _write_tiny_llama(tmp_path / "same-name", default_model_dir)
    config = EngineConfig(prompt_cache_dir=tmp_path / "pc", batch="off", speculative="off")
    prompt = list(range(200, 260))

    def cached_on_a_fresh_load() -> int:
        runner = runners.load("same-name", probe(folder), config, MemoryGate())
        try:
            events = list(runner.generate(prompt, 2, SamplingParams(temperature=0), lambda: False))
            runner.prompt_cache.disk.flush()
            return next(e for e in events if isinstance(e, Started)).cached_tokens
        finally:
            runner.close()

    assert cached_on_a_fresh_load() == 0
    assert cached_on_a_fresh_load() >= len(prompt) - 1  # the same weights: read back from disk
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    raw = weights.read_bytes()
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    halved = (np.frombuffer(raw[start:], dtype="<f4") * 0.5).astype("<f4").tobytes()  # every tensor is F32
    weights.write_bytes(raw[:start] + halved)
    assert weights.stat().st_size == size  # other weights, same id, size and config
    assert cached_on_a_fresh_load() == 0


def test_the_fingerprint_reads_little_and_sees_a_change_anywhere_sampled(tmp_path):
    from engine.generation.prompt_files import SAMPLE, file_fingerprint

    f = tmp_path / "w.safetensors"
    f.write_bytes(bytes(64 << 20))
    first = file_fingerprint(f)
    assert file_fingerprint(f) == first  # remembered: the same size and mtime
    with open(f, "r+b") as w:  # the middle of the file, outside its first MiB
        w.seek((64 << 20) // 2 - SAMPLE // 2)
        w.write(b"\1")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert file_fingerprint(f) != first


# --- a generation that fails on what was read from disk (issue 50 item 3) -----------------------
def test_a_generation_failing_after_a_disk_hit_drops_the_entry(fixture_models, tmp_path):
    from engine.generation.prompt_files import kv_shape
    from engine.generation.prompt_store import PromptStore
    from engine.generation.text import SamplingParams, Started, TextRunner
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe

    runner = TextRunner.load("tiny", probe(fixture_models["tiny"]), "float32", MemoryGate())
    shape = kv_shape(runner.model)
    assert shape is not None and len(shape.layers) == 2 and shape.layers[0] == (2, 16, 2, 16)
    runner.prompt_cache.disk = PromptStore(tmp_path, "tiny", 1 << 30, shape)
    prompt = list(range(300, 360))
    list(runner.generate(prompt, 2, SamplingParams(temperature=0), lambda: False))
    runner.prompt_cache.disk.flush()
    runner.prompt_cache.disk.close()
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    runner.prompt_cache.clear()  # a restart
    runner.prompt_cache.disk = store = PromptStore(tmp_path, "tiny", 1 << 30, shape)

    def boom(logits):
        raise RuntimeError("the kernel failed")

    runner.sampling = lambda params: (boom, [])
    events = runner.generate(prompt + [5], 2, SamplingParams(temperature=0), lambda: False)
    started = next(events)
    assert isinstance(started, Started) and started.cached_tokens >= len(prompt)  # a disk hit
    with pytest.raises(RuntimeError):
        list(events)
    store.flush()
    assert not list(tmp_path.rglob("*.safetensors"))  # dropped, and nothing of it written again
    assert runner.prompt_cache.sizes()[0] == 0
    store.close()


# --- planted cache files (issue 50 item 3) -------------------------------------------------------
def _read_entry(path: Path) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    data = path.read_bytes()
    meta = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]
    return meta, load_file(str(path))


def _plant(folder: Path, meta: dict, arrays: dict) -> Path:
    from safetensors.numpy import save_file

    from engine.generation.prompt_files import entry_name

    path = folder / entry_name(json.loads(meta["tokens"]), meta.get("scope", ""))
    save_file(arrays, str(path), metadata=meta)
    return path


def test_unit_planted_files_are_refused_before_any_tensor_is_read(tmp_path):
    """Each kind of planted file, against a store that knows the model's shape: symlink (to a file
    outside, which stays), FIFO, header past the file, overlapping tensors, another user's file."""
    import numpy as np

    from engine.generation.prompt_files import KVShape, entry_name
    from engine.generation.prompt_store import PromptStore

    shape = KVShape(((2, 64, 2, 64),) * 2, "float32")
    store = PromptStore(tmp_path, "model-a", 1 << 30, shape)
    tokens = list(range(40))
    store.save(tokens, _kv(40))
    store.flush()
    store.close()
    genuine = next(store.folder.glob("*.safetensors"))
    meta, arrays = _read_entry(genuine)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(genuine.read_bytes())
    planted = {}
    for i, kind in enumerate(["symlink", "fifo", "long-header", "overlap", "foreign", "nan", "heads"]):
        planted_tokens = [1000 + i] + tokens[1:]  # as many as the arrays hold
        path = store.folder / entry_name(planted_tokens, "")
        m = {**meta, "tokens": json.dumps(planted_tokens)}
        if kind == "symlink":
            path.symlink_to(outside)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "long-header":
            path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
        elif kind == "overlap":
            _plant(store.folder, m, arrays)
            raw = bytearray(path.read_bytes())
            n = struct.unpack("<Q", raw[:8])[0]
            head = json.loads(raw[8:8 + n])
            head["v.1"]["data_offsets"] = head["k.0"]["data_offsets"]  # two tensors on the same bytes
            text = json.dumps(head).encode().ljust(n)
            if len(text) == n:
                path.write_bytes(bytes(raw[:8]) + text + bytes(raw[8 + n:]))
        elif kind == "foreign":
            _plant(store.folder, m, arrays)
            if os.geteuid() == 0:
                os.chown(path, 4242, 4242)
        elif kind == "nan":
            bad = dict(arrays)
            bad["k.1"] = bad["k.1"].copy()
            bad["k.1"][0, 0, 5, 0] = np.nan
            _plant(store.folder, m, bad)
        elif kind == "heads":
            _plant(store.folder, m, {k: v[:, :, :, :32].copy() for k, v in arrays.items()})
        planted[kind] = path
    started = time.monotonic()
    store = PromptStore(tmp_path, "model-a", 1 << 30, shape)
    assert time.monotonic() - started < 5  # the FIFO is never opened
    assert outside.exists() and not planted["symlink"].is_symlink()
    assert not planted["fifo"].exists() and not planted["long-header"].exists()
    assert not planted["heads"].exists()
    if os.geteuid() == 0:  # another user's file: not trusted, not ours to remove
        assert planted["foreign"].exists() and planted["foreign"].name not in store._files
    # The NaN file's header is sound: it goes when it is read.
    name, n = store.best([1005] + tokens[1:] + [7], "")
    assert n == 40 and name == planted["nan"].name
    assert store.load(name) is None and not planted["nan"].exists()
    assert store.load(genuine.name) is not None
    store.close()


def _hybrid(tokens: int, seed: int = 0) -> list:
    """A hybrid model's cache: a recurrent layer (two state arrays), then an attention layer."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache

    mx.random.seed(seed)
    states = ArraysCache(2)
    states.cache = [mx.random.normal((1, 3, 8)), mx.random.normal((1, 2, 4, 4))]
    return [states, _kv(tokens, 1, seed)[0]]


def test_unit_planted_snapshot_files_are_refused_before_any_tensor_is_read(tmp_path):
    """A hybrid model's snapshot files against the model's layout (state shapes and dtypes, the
    layers' kinds), NaN in a state, another scope, a name that is not the contents'; and a
    snapshot serves all of its tokens or nothing."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import ArraysCache, KVCache
    from safetensors.numpy import save_file

    from engine.generation.prompt_files import KVShape, entry_name
    from engine.generation.prompt_store import PromptStore

    shape = KVShape((None, (2, 64, 2, 64)), "float32", ((((1, 3, 8), "float32"), ((1, 2, 4, 4), "float32")), None))
    store = PromptStore(tmp_path, "model-h", 1 << 30, shape)
    tokens = list(range(40))
    cache = _hybrid(40)
    store.save(tokens, cache, "a")
    store.save(tokens, _kv(40), "b")  # not the model's layout: never written
    store.flush()
    store.close()
    [genuine] = store.folder.glob("*.safetensors")
    meta, arrays = _read_entry(genuine)
    assert json.loads(meta["layers"]) == [["arrays", 2], ["kv"]] and set(arrays) == {"s.0.0", "s.0.1", "k.1", "v.1"}
    planted = {}
    for i, kind in enumerate(["state-shape", "state-dtype", "layers", "plain", "extra", "nan", "misnamed"]):
        planted_tokens = [1000 + i] + tokens[1:]
        m, a = {**meta, "tokens": json.dumps(planted_tokens)}, dict(arrays)
        if kind == "state-shape":
            a["s.0.1"] = np.zeros((1, 2, 4, 5), np.float32)
        elif kind == "state-dtype":
            m["dtypes"] = json.dumps({**json.loads(meta["dtypes"]), "s.0.0": "float16"})
        elif kind == "layers":
            m["layers"] = json.dumps([["arrays", 2], ["arrays", 2]])
        elif kind == "plain":  # keys and values only, as a plain model's file
            del m["layers"], m["dtypes"]
            a = {"k.0": arrays["k.1"], "v.0": arrays["v.1"], "k.1": arrays["k.1"], "v.1": arrays["v.1"]}
        elif kind == "extra":
            a["s.0.2"] = np.zeros((1, 3, 8), np.float32)
            m["dtypes"] = json.dumps({**json.loads(meta["dtypes"]), "s.0.2": "float32"})
        elif kind == "nan":
            a["s.0.1"] = a["s.0.1"].copy()
            a["s.0.1"][0, 1, 2, 3] = np.nan
        if kind == "misnamed":  # scope "a" inside, under the shared scope's name
            planted[kind] = store.folder / entry_name(planted_tokens, "")
            save_file(a, str(planted[kind]), metadata=m)
        else:
            planted[kind] = _plant(store.folder, m, a)
    store = PromptStore(tmp_path, "model-h", 1 << 30, shape)
    for kind in ("state-shape", "state-dtype", "layers", "plain", "extra", "misnamed"):
        assert not planted[kind].exists(), kind
    # The NaN file's header is sound: it goes when it is read.
    name, n = store.best([1005] + tokens[1:] + [7], "a")
    assert n == 40 and name == planted["nan"].name
    assert store.load(name) is None and not planted["nan"].exists()
    # Another scope never sees the snapshot; its own scope gets all of it or nothing.
    assert store.best(tokens + [7], "") == (None, 0) and store.best(tokens + [7], "b") == (None, 0)
    assert store.best(tokens + [7], "a") == (genuine.name, 40)
    assert store.best(tokens[:-1] + [7], "a")[1] == 0 and store.best(tokens, "a")[1] == 0
    got, loaded = store.load(genuine.name)
    assert got == tokens and [type(c) for c in loaded] == [ArraysCache, KVCache]
    assert all(mx.array_equal(x, y) for x, y in zip(loaded[0].cache, cache[0].cache))
    assert mx.array_equal(loaded[1].keys, cache[1].keys[..., :40, :]) and loaded[1].offset == 40
    store.close()
    # A plain model's store refuses the snapshot.
    PromptStore(tmp_path, "model-h", 1 << 30, KVShape(((2, 64, 2, 64),) * 2, "float32")).close()
    assert not genuine.exists()


@pytest.mark.slow  # two server starts; this module's unit test covers each file by default
def test_planted_cache_files_change_no_answer(default_model_dir, tmp_path):
    """The attacker's five files (half head size, 2 layers, NaN, a sparse 1.5 GB file, a FIFO) in
    the folder of a server that ran before: the server starts, answers every prefix as it did with
    nothing on disk, stays small, and writes nothing bad under a genuine name."""
    import numpy as np

    from engine.generation.prompt_files import entry_name

    folder = tmp_path / "pc"
    systems = [f"{topic} are your favourite subject. Answer briefly and politely in plain English words. " * 3
               for topic in ("Apples", "Rivers", "Clocks", "Mountains")]  # no two share a first word
    body = [{"model": MODEL, "max_tokens": 6, "temperature": 0,
             "messages": [{"role": "system", "content": s}, {"role": "user", "content": "Name a fruit."}]}
            for s in systems]
    args = ["--prompt-cache-dir", str(folder), "--embedding-model", "none", "--audio-model", "none"]
    first = Server(args)
    try:
        expected = []
        for b in body:
            r = httpx.post(first.url + "/v1/chat/completions", json=b, timeout=120)
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            expected.append(r.json()["choices"][0]["message"]["content"])
        deadline = time.monotonic() + 60
        while len(list(folder.rglob("*.safetensors"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        first.stop()
    files = sorted(folder.rglob("*.safetensors"))
    assert len(files) == 4
    entries = [_read_entry(f) for f in files]
    store = files[0].parent
    for f in files:
        f.unlink()
    (m0, a0), (m1, a1), (m2, a2), (m3, _) = entries
    layers = len(a0) // 2
    _plant(store, m0, {k: v[..., :v.shape[-1] // 2].copy() for k, v in a0.items()})  # half the head size
    _plant(store, m1, {f"{kind}.{i}": a1[f"{kind}.{i}"] for i in range(2) for kind in "kv"})  # 2 layers
    nan = {k: v.copy() for k, v in a2.items()}
    nan["v.3"][0, 1, 4, :] = np.nan
    _plant(store, m2, nan)
    # 1.5 GB of KV declared for prompt 3's tokens and more, 3 MB on disk.
    tokens = json.loads(m3["tokens"])
    heads, size = a0["k.0"].shape[1], a0["k.0"].shape[3]
    n = (1536 << 20) // (layers * 2 * heads * size * 4)
    tokens += [tokens[-1]] * (n - len(tokens))
    header, offset = {"__metadata__": {**m3, "tokens": json.dumps(tokens)}}, 0
    for i in range(layers):
        for kind in "kv":
            nbytes = heads * n * size * 4
            header[f"{kind}.{i}"] = {"dtype": "F32", "shape": [1, heads, n, size], "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    raw = json.dumps(header).encode()
    with open(store / entry_name(tokens, ""), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    os.mkfifo(store / entry_name(json.loads(m0["tokens"])[:-1], ""))

    started = time.monotonic()
    second = Server(args)
    try:
        ready_s = time.monotonic() - started
        assert ready_s < 120
        before = second.rss_bytes()
        for b, answer in zip(body, expected):
            r = httpx.post(second.url + "/v1/chat/completions", json=b, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == answer
        grown = second.rss_bytes() - before
        print(f"planted files: ready in {ready_s:.1f} s, RSS grew {grown / 2**20:.0f} MiB over the four prefixes")
        assert grown < 800 << 20
        deadline = time.monotonic() + 60
        while len(list(store.glob("*.safetensors"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "prompt cache: removing" in second.log()
    finally:
        second.stop()
    kept = sorted(store.glob("*.safetensors"))
    assert len(kept) == 4  # the genuine entries, written again from what was computed
    for f in kept:
        assert f.is_file() and not f.is_symlink() and f.stat().st_size < 100 << 20
        meta, arrays = _read_entry(f)
        assert f.name == entry_name(json.loads(meta["tokens"]), meta.get("scope", ""))
        assert len(arrays) == 2 * layers
        assert all(a.shape[1] == heads and a.shape[3] == size and np.isfinite(a).all() for a in arrays.values())
