"""Hostile input against the prompt cache (issue 42 items 4-5, issue 50 item 3): entries never
cross API keys or cache salts (in memory, on disk, and for prompts offered pass by pass); the disk
cache's identity includes the weights; planted cache files are refused before they cost memory."""
from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, Server
from engine.generation.prompt_cache import PromptCache
from engine.generation.passes import InFlight
from engine.request import CacheScope

SYSTEM = ("You are the support assistant of the Example Bank. The customer's secret PIN is 4821; never say it. "
          "Answer in one short sentence. ") * 3


def _kv(tokens: int, layers: int = 2, seed: int = 0) -> list:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    mx.random.seed(seed)
    cache = []
    for _ in range(layers):
        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, 2, tokens, 64)), mx.random.normal((1, 2, tokens, 64)))
        cache.append(c)
    return cache


# --- scopes, in memory ------------------------------------------------------------------------
def test_cache_scope_key_hides_owner_and_salt():
    assert CacheScope().key == ""
    a, b = CacheScope("owner-a"), CacheScope("owner-b")
    assert a.key != b.key and "owner-a" not in a.key
    assert CacheScope("owner-a", "s1").key not in (a.key, CacheScope("owner-a", "s2").key)
    assert CacheScope("", "salt").key != CacheScope("salt", "").key  # owner and salt can't be swapped


def test_entries_are_reused_in_their_own_scope_only():
    pc = PromptCache(min_reuse=2)
    prompt = list(range(100))
    pc.put(prompt, _kv(100), scope="a")
    assert pc.peek(prompt + [7], "b") == 0 and pc.take(prompt + [7], "b") == (None, 0)
    assert pc.take(prompt + [7], "")[0] is None  # the shared space is a scope too
    # Another scope's entry over the same tokens doesn't replace a's (each keeps its own).
    pc.put(prompt, _kv(100, seed=1), scope="b")
    assert pc.sizes()[0] == 2
    got, n = pc.take(prompt + [7], "a")
    assert got is not None and n == 100


def test_prompts_offered_pass_by_pass_stay_in_their_scope():
    pc = PromptCache(min_reuse=2)
    prompt = list(range(300))
    pc.share(prompt[:256], _kv(256), "a")
    assert pc.take(prompt, "b") == (None, 0)
    assert pc.take(prompt, "a")[1] == 256
    flight = InFlight(step=64)
    done = flight.start(prompt, "a")
    assert flight._worth_waiting(prompt, 0, "a")
    assert not flight._worth_waiting(prompt, 0, "b")
    assert list(flight.wait(prompt, pc, lambda: False, "b")) == []  # b never waits on a's prefill
    flight.end(done)


def test_disk_entries_stay_in_their_scope(tmp_path):
    from engine.generation.prompt_store import PromptStore

    store = PromptStore(tmp_path, "model-a", 1 << 30)
    tokens = list(range(40))
    store.save(tokens, _kv(40), "a")
    store.flush()
    store.close()
    store = PromptStore(tmp_path, "model-a", 1 << 30)  # a restart
    store.close()
    assert store.best(tokens + [1], "b") == (None, 0) and store.best(tokens + [1], "") == (None, 0)
    name, n = store.best(tokens + [1], "a")
    assert n == 40 and store.load(name)[0] == tokens
    meta = json.loads((store.folder / name).read_bytes()[8:8 + struct.unpack("<Q", (store.folder / name).read_bytes()[:8])[0]])
    assert meta["__metadata__"]["scope"] == "a"


# --- scopes, end to end over HTTP --------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(default_model_dir, tmp_path_factory):
    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text("sk-bob\n")
    folder = tmp_path_factory.mktemp("prompt-cache")
    s = Server(["--api-key", "sk-alice", "--api-key-file", str(keyfile), "--prompt-cache-dir", str(folder),
                "--embedding-model", "none", "--audio-model", "none"])
    s.cache_dir = folder
    yield s
    s.stop()


def _chat(server, key: str, user: str, **extra) -> int:
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": MODEL, "max_tokens": 1, "temperature": 0, **extra,
                         "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_another_key_gets_no_cached_tokens_from_a_shared_system_prompt(keyed):
    assert _chat(keyed, "sk-alice", "What is my balance?") == 0
    assert _chat(keyed, "sk-alice", "Where is the nearest branch?") > 40  # the same key shares its prefix
    # Bob sends Alice's system prompt: nothing of it is reported cached, however often he tries.
    assert _chat(keyed, "sk-bob", "What is my balance?") == 0
    assert _chat(keyed, "sk-bob", "Where is the nearest branch?") > 40  # his own entry now


def test_every_api_keeps_keys_apart(keyed):
    auth = {"alice": {"Authorization": "Bearer sk-alice"}, "bob": {"x-api-key": "sk-bob"}}

    def cached(who: str, route: str, ask: str) -> int:
        # Each route's prompt differs from its first words: Bob's own entries of one route share
        # no more than the template's opening (under min_reuse) with the next.
        prefix = f"{route.title()} vault code 7731: keep it secret and reply with one word. " * 4
        if route == "completions":
            r = httpx.post(keyed.url + "/v1/completions", headers=auth[who], timeout=120,
                           json={"model": MODEL, "prompt": prefix + ask, "max_tokens": 1, "temperature": 0})
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        if route == "responses":
            r = httpx.post(keyed.url + "/v1/responses", headers=auth[who], timeout=120,
                           json={"model": MODEL, "instructions": prefix, "input": ask, "max_output_tokens": 1,
                                 "temperature": 0, "store": False})
            return r.json()["usage"]["input_tokens_details"]["cached_tokens"]
        r = httpx.post(keyed.url + "/v1/messages", headers=auth[who], timeout=120,
                       json={"model": MODEL, "system": prefix, "max_tokens": 1, "temperature": 0,
                             "messages": [{"role": "user", "content": ask}]})
        return r.json()["usage"]["cache_read_input_tokens"]

    for route in ("completions", "responses", "messages"):
        cached("alice", route, "One")
        assert cached("bob", route, "Two") == 0, route
        assert cached("alice", route, "Three") > 40, route


def test_cache_salt_shares_only_with_the_same_salt(keyed):
    user = "Tell me a colour."
    assert _chat(keyed, "sk-alice", user, cache_salt="tenant-1-" + "x" * 30) == 0  # not the unsalted entries
    assert _chat(keyed, "sk-alice", user + "!", cache_salt="tenant-1-" + "x" * 30) > 40
    assert _chat(keyed, "sk-alice", user + "?", cache_salt="tenant-2-" + "x" * 30) == 0
    assert _chat(keyed, "sk-bob", user + ".", cache_salt="tenant-1-" + "x" * 30) == 0  # a salt never crosses keys


@pytest.mark.parametrize("salt,why", [("", "empty"), ("x" * 257, "too long"), (42, "not a string")])
def test_bad_cache_salts_are_400(keyed, salt, why):
    r = httpx.post(keyed.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-alice"}, timeout=60,
                   json={"model": MODEL, "max_tokens": 1, "cache_salt": salt,
                         "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, why
    assert r.json()["error"]["param"] == "cache_salt", r.text


def test_keys_stay_apart_on_disk_after_a_restart(keyed, tmp_path):
    """The files Alice's requests wrote are hers after a restart too; no file holds a key."""
    deadline = time.monotonic() + 60
    while not list(keyed.cache_dir.rglob("*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.2)
    files = list(keyed.cache_dir.rglob("*.safetensors"))
    assert files
    for f in files:
        data = f.read_bytes()
        assert b"sk-alice" not in data and b"sk-bob" not in data and b"tenant-1" not in data
    restarted = Server(["--api-key", "sk-alice", "--api-key", "sk-carol", "--prompt-cache-dir", str(keyed.cache_dir),
                        "--embedding-model", "none", "--audio-model", "none"])
    try:
        assert _chat(restarted, "sk-carol", "What is my balance?") == 0
        assert _chat(restarted, "sk-alice", "What is my balance?") > 40  # read back from disk
    finally:
        restarted.stop()


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


@pytest.mark.slow  # two server starts; tests/test_hostile_cache.py's unit test covers each file by default
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
