"""Hostile model files and model stores (issue 42 items 1 and 6, issue 50 items 4 and 5): a GGUF
whose tensors all read the same bytes (a dequantization bomb), a GGUF named `..gguf`, a hostile
Ollama store, and other tools' names that used to share a store folder.

Each test replays the attack as it was found; every one failed before its fix."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import Server, _write_tiny_llama
from fake_hub import FakeHub

CLI = [sys.executable, "-m", "handlers.cli"]
Q4_K = 12  # GGML's type number
BLOCK = 4608 * 1024  # 4.5 MiB of Q4_K data: 4096 x 2048 weights, 16.8 MB once dequantized to float16
LAYER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def bomb_gguf(path: Path, tensors: int) -> Path:
    """A llama GGUF, its metadata as llama.cpp writes it (llama.cpp's own writer), whose `tensors`
    Q4_K matrices of 4096 x 2048 all point at the same 4.5 MiB of data (offset 0): 4.7 MB that
    declares tensors x 16.8 MB of float16 weights."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", tensors // len(LAYER) + 1), ("embedding_length", 4096),
                       ("feed_forward_length", 2048), ("attention.head_count", 32),
                       ("attention.head_count_kv", 32), ("context_length", 2048)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    alphabet = sorted(set(ByteLevel.alphabet()))  # a byte-level BPE vocabulary transformers rebuilds
    w.add_tokenizer_model("gpt2")
    w.add_token_list(alphabet + [alphabet[0] + alphabet[1]] + [f"<t{i}>" for i in range(300 - len(alphabet) - 1)])
    w.add_token_types([1] * 300)
    w.add_token_merges([f"{alphabet[0]} {alphabet[1]}"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    head = bytearray(path.read_bytes())
    head[8:16] = tensors.to_bytes(8, "little")  # the header's tensor count (after magic and version)
    for i in range(tensors):  # the tensor infos: name, dims (innermost first), type, offset 0 for all
        name = f"blk.{i // len(LAYER)}.{LAYER[i % len(LAYER)]}.weight".encode()
        head += len(name).to_bytes(8, "little") + name + (2).to_bytes(4, "little")
        head += (4096).to_bytes(8, "little") + (2048).to_bytes(8, "little")
        head += Q4_K.to_bytes(4, "little") + (0).to_bytes(8, "little")
    head += b"\0" * (-len(head) % 32)  # the data section is aligned to 32 bytes
    path.write_bytes(bytes(head) + b"\0" * BLOCK)  # zero scales: every weight reads as 0
    return path


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) \
        if folder.exists() else 0


class PeakRSS:
    """The peak resident memory of a process (and its children), read every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, sum(p.memory_info().rss for p in [self.proc, *self.proc.children(True)]))
            except psutil.Error:
                return
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("bombs")
    return {n: bomb_gguf(root / f"bomb{n}.gguf", n) for n in (100, 600)}


# --- issue 42 item 1: the dequantization bomb -----------------------------------------------------
def test_overlapping_tensors_are_refused_from_the_header(bombs, tmp_path):
    from gguf import GGUFReader

    from engine.formats.gguf import GGUFConversionError, convert_gguf, plan_conversion

    path = bombs[600]
    assert path.stat().st_size < 5_000_000
    reader = GGUFReader(str(path))
    assert len(reader.tensors) == 600 and sum(int(t.n_bytes) for t in reader.tensors) == 600 * BLOCK
    with pytest.raises(GGUFConversionError, match="overlap"):
        plan_conversion(reader, path.stat().st_size)
    one = bomb_gguf(tmp_path / "one.gguf", 1)
    with pytest.raises(GGUFConversionError, match="outside the file"):  # a file cut short by one byte
        plan_conversion(GGUFReader(str(one)), one.stat().st_size - 1)
    one.unlink()
    started = time.monotonic()
    with pytest.raises(GGUFConversionError, match="overlap"):
        convert_gguf(path, tmp_path / "out")
    assert time.monotonic() - started < 5
    assert not list(tmp_path.iterdir())  # neither the folder nor a .partial


def test_a_tensor_past_the_end_of_the_file_is_refused(bombs, tmp_path):
    """One tensor whose offset points past the file's end: refused before any conversion."""
    from engine.errors import Unsupported
    from engine.models.gguf_import import import_gguf

    from gguf import GGUFReader

    path = bomb_gguf(tmp_path / "one.gguf", 1)  # well-formed: one tensor, its own data
    data = bytearray(path.read_bytes())
    last = GGUFReader(str(path)).tensors[-1].field  # its offset: the last part of its info
    offset_at = last.offset + sum(int(p.nbytes) for p in last.parts[:-1])
    data[offset_at:offset_at + 8] = (1 << 40).to_bytes(8, "little")
    path = tmp_path / "past-the-end.gguf"
    path.write_bytes(bytes(data))
    started = time.monotonic()
    with pytest.raises(Unsupported, match="past-the-end.gguf"):
        import_gguf(path, tmp_path / "models", say=lambda _m: None)
    assert time.monotonic() - started < 5
    assert _tree_bytes(tmp_path / "models") == 0


def test_the_converted_size_is_gated_before_converting(tmp_path, monkeypatch):
    """A well-formed file whose converted size does not fit memory (or the disk) is refused from
    its header, before anything is written: the gate sees the float16 size, not the file's."""
    import gguf

    from engine.errors import EngineError, InsufficientMemory
    from engine.formats.gguf import plan_conversion
    from engine.models.gguf_import import check_room, import_gguf
    from engine.models.memory import MemoryGate

    path = bomb_gguf(tmp_path / "one.gguf", 1)  # one tensor: a well-formed file
    plan = plan_conversion(gguf.GGUFReader(str(path)), path.stat().st_size)
    assert plan.converted_bytes == 4096 * 2048 * 2 and plan.peak_bytes > plan.converted_bytes
    assert not plan.mlx_blocks and plan.tensor_bytes == BLOCK
    gate = MemoryGate(override=plan.file_bytes + (512 << 20))  # room for the file, not for what it becomes
    with pytest.raises(InsufficientMemory):
        import_gguf(path, tmp_path / "models", say=lambda _m: None, gate=gate)
    assert _tree_bytes(tmp_path / "models") == 0
    check_room("one", plan, tmp_path, MemoryGate(override=1 << 40))  # fits
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=plan.converted_bytes - 1))
    with pytest.raises(EngineError, match="of disk is free") as e:
        check_room("one", plan, tmp_path, MemoryGate(override=1 << 40))
    assert e.value.status == 507


def test_memory_error_while_converting_leaves_nothing(tmp_path, monkeypatch):
    """MemoryError in the middle of a conversion: a 507 and no .partial folder."""
    import engine.formats.gguf as g
    from engine.errors import InsufficientMemory
    from engine.models.gguf_import import import_gguf

    path = bomb_gguf(tmp_path / "one.gguf", 1)

    def out_of_memory(*_a, **_k):
        raise MemoryError()

    monkeypatch.setattr(g, "_add_rope_scaling", out_of_memory)  # after the weights are dequantized
    with pytest.raises(InsufficientMemory, match="ran out of memory"):
        import_gguf(path, tmp_path / "models", say=lambda _m: None)
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


@pytest.mark.parametrize("tensors", [100, 600])
def test_serve_model_refuses_the_bomb_at_once(bombs, tmp_path, tensors):
    """`serve --model bomb.gguf`: one clear line, no traceback, at once, little memory, nothing kept."""
    proc = subprocess.Popen([*CLI, "serve", "--model", str(bombs[tensors]), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OPENMLX_HOME": str(tmp_path)})
    rss = PeakRSS(proc.pid)
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    seconds, peak = time.monotonic() - started, rss.stop()
    assert proc.returncode != 0 and "overlap" in err and "Traceback" not in err, err[-2000:]
    assert seconds < 60 and peak < 1.5 * 2**30, (seconds, peak / 2**30)
    assert _tree_bytes(tmp_path / "models") < 100 << 20
    assert not list((tmp_path / "models").glob("*.partial")) if (tmp_path / "models").exists() else True


def test_a_chat_naming_the_bomb_under_allow_download_is_refused(bombs, tmp_path, default_model_dir):
    """The attack as found: one unauthenticated chat names a Hub repo holding the bomb, on a server
    with --allow-download. Refused (501) with the reason, the server's memory barely moves, the
    store keeps nothing (no .partial, no .downloads), and the server serves on."""
    hub = FakeHub()
    for n, path in bombs.items():
        repo = tmp_path / f"repo{n}"
        repo.mkdir()
        (repo / f"bomb{n}.Q4_K_M.gguf").symlink_to(path)
        hub.repos[f"evil/bomb{n}-GGUF"] = repo
    home = tmp_path / "home"
    env = {"HF_ENDPOINT": hub.url, "OPENMLX_HOME": str(home), "HF_HOME": str(home / "hf"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "", "HF_HUB_OFFLINE": "0"}
    tiny = _write_tiny_llama(tmp_path / "tiny", default_model_dir)  # loads in a moment
    s = Server(["--model", str(tiny), "--allow-download", "--embedding-model", "none", "--audio-model", "none"],
               env=env)
    try:
        rss = PeakRSS(s.proc.pid)
        for n in bombs:
            started = time.monotonic()
            r = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
                "model": f"evil/bomb{n}-GGUF", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
            assert time.monotonic() - started < 60
            assert r.status_code == 501 and "overlap" in r.json()["error"]["message"], r.text
        peak = rss.stop()
        assert peak < 1.5 * 2**30, peak / 2**30
        assert httpx.get(s.url + "/v1/models", timeout=30).status_code == 200
        models = home / "models"
        assert _tree_bytes(models) < 100 << 20
        leftovers = [p for p in models.rglob("*") if p.name.endswith(".partial") or p.name == ".downloads"] \
            if models.exists() else []
        assert not leftovers, leftovers
    finally:
        s.stop()
        hub.close()
    assert "Traceback" not in s.log()


# --- issue 42 item 6: store folder names ------------------------------------------------------------
def test_a_gguf_named_dot_dot_gguf_leaves_the_store_alone(tmp_path):
    """`serve --model ..gguf`: its name worked out to `.`, and the import replaced the whole store."""
    from engine.config import openmlx_home
    from engine.models.default_model import find_gguf

    models = tmp_path / "home" / "models"
    other = models / "someone" / "model"
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")
    (models / "plain").mkdir()
    (models / "plain" / "config.json").write_text("{}")
    src = tmp_path / "files"
    src.mkdir()
    os.symlink(find_gguf(openmlx_home(), lambda _m: None), src / "..gguf")
    r = subprocess.run([*CLI, "serve", "--model", str(src / "..gguf"), "--port", "0"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OPENMLX_HOME": str(tmp_path / "home")})
    assert r.returncode != 0 and "can't name a model folder" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (other / "config.json").is_file() and (models / "plain" / "config.json").is_file()


@pytest.mark.parametrize("name", ["", ".", "..", "a/../b", "a\\b", "a/b/c", "/abs", "x\0y"])
def test_a_store_name_is_never_a_path(tmp_path, name):
    from engine.errors import InvalidRequest
    from engine.models.gguf_import import store_folder

    with pytest.raises(InvalidRequest):
        store_folder(tmp_path, name)


def test_a_file_named_like_an_existing_model_does_not_replace_it(tmp_path):
    """`acme.gguf` would have replaced the folder `acme` holding pulled models `acme/*`."""
    from engine.errors import Unsupported
    from engine.models.gguf_import import import_gguf

    models = tmp_path / "models"
    (models / "acme" / "tiny").mkdir(parents=True)
    (models / "acme" / "tiny" / "config.json").write_text("{}")
    path = bomb_gguf(tmp_path / "acme.gguf", 1)
    with pytest.raises(Unsupported, match="not converted from a GGUF file"):
        import_gguf(path, models, say=lambda _m: None)
    assert (models / "acme" / "tiny" / "config.json").is_file()


# --- issue 50 items 4 and 5: a hostile Ollama store, names that collide -----------------------------
def _manifest(digest: str) -> str:
    return json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 1}]})


@pytest.fixture
def hostile_store(tmp_path) -> dict[str, str]:
    ollama = tmp_path / "ollama"
    library = ollama / "manifests" / "registry.ollama.ai" / "library"
    digest = hashlib.sha256(b"good").hexdigest()
    (ollama / "blobs").mkdir(parents=True)
    (ollama / "blobs" / f"sha256-{digest}").write_bytes(b"GGUF good")

    def manifest(model: str, tag: str) -> Path:
        (library / model).mkdir(parents=True, exist_ok=True)
        return library / model / tag

    manifest("good", "latest").write_text(_manifest(digest))
    os.mkfifo(manifest("fifo", "latest"))
    manifest("zero", "latest").symlink_to("/dev/zero")
    manifest("deep", "latest").write_text("[" * 100_000)
    manifest("wrong", "latest").write_text(json.dumps({"layers": 5}))
    manifest("wronger", "latest").write_text(json.dumps([{"layers": []}]))
    manifest("digest", "latest").write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": {"x": 1}}]}))
    manifest("binary", "latest").write_bytes(b"\xff\xfe" * 10)
    big = manifest("big", "latest")
    with open(big, "wb") as f:  # sparse: 2 GB declared, nothing on disk
        f.truncate(2 << 30)
    for i in range(30):  # symbolic links to their own folders, at every level
        (ollama / "manifests" / f"loop{i}").symlink_to(".")
        (library / f"loop{i}").symlink_to("..")
        (library / "good" / f"loop{i}").symlink_to(".")
    lmstudio = tmp_path / "lmstudio"
    (lmstudio / "pub" / "repo").mkdir(parents=True)
    (lmstudio / "pub" / "repo" / "ok.gguf").write_bytes(b"GGUF ok")
    os.mkfifo(lmstudio / "pub" / "repo" / "fifo.gguf")
    (lmstudio / "pub" / "repo" / "zero.gguf").symlink_to("/dev/zero")
    for i in range(30):
        (lmstudio / f"loop{i}").symlink_to(".")
    return {"OLLAMA_MODELS": str(ollama), "LMSTUDIO_MODELS": str(lmstudio)}


def test_list_over_a_hostile_ollama_store(hostile_store, tmp_path):
    """A FIFO manifest (it hung), a symlink to /dev/zero (MemoryError at 2.6 GB), `[` x 100,000
    (RecursionError), `{"layers": 5}` (TypeError), 30 symlink loops (45^4 paths): `openmlx list`
    exits 0 in < 30 s, lists the good models and warns once for each bad manifest."""
    env = {**os.environ, **hostile_store, "OPENMLX_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([*CLI, "list", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    rss = PeakRSS(proc.pid)
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    seconds, peak = time.monotonic() - started, rss.stop()
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert seconds < 30 and peak < 1 << 30, (seconds, peak)
    ids = [m["id"] for m in json.loads(out)]
    assert "ollama:good:latest" in ids and "lmstudio:pub/repo/ok.gguf" in ids
    assert not any(i.startswith("ollama:") and i != "ollama:good:latest" for i in ids), ids
    assert ids.count("ollama:good:latest") == 1 and ids.count("lmstudio:pub/repo/ok.gguf") == 1
    for bad in ("fifo", "zero", "deep", "wrong", "wronger", "digest", "binary", "big"):
        warnings = [line for line in err.splitlines() if f"library/{bad}/latest" in line]
        assert len(warnings) == 1, (bad, err[-3000:])


def test_a_lookup_reads_only_the_named_manifest(hostile_store, monkeypatch):
    from engine.models import external

    for key, value in hostile_store.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(external, "_walk", lambda *_a: pytest.fail("a lookup walked the store"))
    assert external.find("ollama:good").path.name.startswith("sha256-")
    assert external.find("ollama:good:latest").store_name == "ollama-good--latest"
    for spec in ("ollama:fifo", "ollama:zero", "ollama:deep", "ollama:wrong", "ollama:../../x", "ollama:a/b",
                 "ollama:..", "lmstudio:pub/repo/fifo.gguf", "lmstudio:pub/repo/zero.gguf", "lmstudio:../x/y.gguf"):
        assert external.find(spec) is None, spec
    assert external.find("lmstudio:pub/repo/ok.gguf").store_name == "lmstudio-pub--repo--ok"


def test_ollama_names_that_used_to_collide_get_two_folders(tmp_path, monkeypatch):
    """`ollama:m:t-x` and `ollama:m-t:x` both mapped to `ollama-m-t-x`: serving one converted over
    the other, and `openmlx list` hid the second. LM Studio's stem-only names likewise."""
    from engine.models.external import find, lmstudio_models, ollama_models, store_name

    ollama, lmstudio = tmp_path / "ollama", tmp_path / "lmstudio"
    library = ollama / "manifests" / "registry.ollama.ai" / "library"
    for model, tag in (("m", "t-x"), ("m-t", "x")):
        digest = hashlib.sha256(f"{model}:{tag}".encode()).hexdigest()
        (ollama / "blobs").mkdir(parents=True, exist_ok=True)
        (ollama / "blobs" / f"sha256-{digest}").write_bytes(b"GGUF")
        (library / model).mkdir(parents=True, exist_ok=True)
        (library / model / tag).write_text(_manifest(digest))
    for publisher, repo in (("alice", "r"), ("bob", "r"), ("a-b", "r"), ("a", "b-r")):
        (lmstudio / publisher / repo).mkdir(parents=True)
        (lmstudio / publisher / repo / "model-q4.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    monkeypatch.setenv("LMSTUDIO_MODELS", str(lmstudio))
    found = ollama_models()
    assert sorted(m.spec for m in found) == ["ollama:m-t:x", "ollama:m:t-x"]
    assert len({m.store_name for m in found}) == 2 and len({m.path for m in found}) == 2
    assert find("ollama:m:t-x").store_name != find("ollama:m-t:x").store_name
    studio = lmstudio_models()
    assert len(studio) == 4 and len({m.store_name for m in studio}) == 4
    assert all("alice" in m.store_name or "bob" in m.store_name or m.store_name.startswith("lmstudio-a")
               for m in studio)
    # Names that can't be kept as they are get a digest: still distinct, never a plain name's shape.
    odd = {store_name("ollama", p) for p in (("a--b", "c"), ("a", "-b--c"), ("a-", "-b"), ("a b", "c"), ("a", "b c"))}
    assert len(odd) == 5 and all("---" in n for n in odd)


def test_the_store_quota_counts_the_converted_size(tmp_path, monkeypatch):
    """A 4.7 MB GGUF that converts to 16.8 MB, pulled under a 12 MB quota: the download fits the
    quota, the conversion does not, and that is known from the header before converting (507)."""
    import importlib

    import huggingface_hub.constants as constants

    from engine.errors import EngineError
    from engine.models import hub as hub_module

    repo = tmp_path / "repo"
    repo.mkdir()
    bomb_gguf(repo / "one.Q4_K_M.gguf", 1)
    hub = FakeHub()
    hub.repos["acme/one-GGUF"] = repo
    for key, value in {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1",
                       "HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}.items():
        monkeypatch.setenv(key, value)
    importlib.reload(constants)
    try:
        with pytest.raises(EngineError, match="quota") as e:
            hub_module.pull("acme/one-GGUF", tmp_path / "models", max_store_bytes=12 << 20)
        assert e.value.status == 507
        assert any(m == "GET" and p.endswith(".gguf") for m, p, _ in hub.requests)  # refused after the download
        assert _tree_bytes(tmp_path / "models") == 0
    finally:
        hub.close()
        monkeypatch.undo()
        importlib.reload(constants)
