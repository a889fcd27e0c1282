"""The prompt cache on disk (`--prompt-cache-dir`): KV caches that survive a restart.

Each entry the prompt cache keeps is also written here: one safetensors file per token sequence
(keys and values per layer, cut to the tokens held; the tokens and the model's identity in the
header), under a folder per model identity, so another model's segments are never read. The
arrays are copied out on the worker (MLX evaluates there); the file is written by a thread of its
own, to a temporary name and then renamed, so a crash never leaves half a file under a real name.
A file that can't be read (corrupt, foreign, another format) is removed and ignored. The folder
is bounded by bytes: the least recently used files go first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from engine.generation.prompt_cache import common_prefix, plain_kv

log = logging.getLogger("openmlx.engine")
MIN_TOKENS = 32  # shorter prompts are cheap to compute again: not worth a file


@dataclass
class _File:
    path: Path
    tokens: list[int]
    nbytes: int
    exact: bool = False  # a snapshot (recurrent layers): resumable at all of its tokens only


class PromptStore:
    """KV caches on disk for one model (its `identity`: id, dtype and configuration)."""

    def __init__(self, root: Path, identity: str, max_bytes: int) -> None:
        self.folder = Path(root).expanduser() / hashlib.sha256(identity.encode()).hexdigest()[:24]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.max_bytes = max_bytes
        self._files: dict[str, _File] = {}
        self._lock = threading.Lock()
        self._queue: "queue.Queue[Optional[tuple[str, dict[str, np.ndarray], dict[str, str]]]]" = queue.Queue(8)
        self._index()
        self._writer = threading.Thread(target=self._write_loop, name="openmlx-prompt-store", daemon=True)
        self._writer.start()

    # --- reading ---------------------------------------------------------------------------
    def _index(self) -> None:
        """Read every file's header (tokens, identity); what can't be read is removed."""
        from safetensors import safe_open

        for path in sorted(self.folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="numpy") as f:
                    meta = f.metadata() or {}
                if meta.get("identity") != self.identity:
                    raise ValueError("another model's file")
                tokens = json.loads(meta["tokens"])
                self._files[path.name] = _File(path, [int(t) for t in tokens], path.stat().st_size,
                                               "layers" in meta)
            except Exception as e:  # noqa: BLE001 - any unreadable file is dropped, never fatal
                log.warning("prompt cache: removing unreadable %s (%s)", path.name, e)
                path.unlink(missing_ok=True)
        for tmp in self.folder.glob("*.tmp"):  # a write a crash interrupted
            tmp.unlink(missing_ok=True)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(f.nbytes for f in self._files.values())

    def best(self, prompt: list[int]) -> tuple[Optional[str], int]:
        """The file sharing the longest prefix with `prompt`, and that length."""
        with self._lock:
            scored = [(_usable(f, prompt), name) for name, f in self._files.items()]
        length, name = max(scored, default=(0, None))
        return name, length

    def load(self, name: str) -> Optional[tuple[list[int], list[Any]]]:
        """(tokens, KV caches) of a file, or None (and the file removed) if it can't be read.
        Runs on the worker."""
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache
        from safetensors import safe_open

        with self._lock:
            entry = self._files.get(name)
        if entry is None:
            return None
        try:
            with safe_open(str(entry.path), framework="numpy") as f:
                meta = f.metadata()
                dtype = getattr(mx, meta["dtype"])
                arrays = {k: f.get_tensor(k) for k in f.keys()}
            if "layers" in meta:
                cache = _snapshot_layers(arrays, meta, len(entry.tokens))
                os.utime(entry.path)
                return entry.tokens, cache
            layers = len(arrays) // 2
            cache = []
            for i in range(layers):
                c = KVCache()
                c.keys = mx.array(arrays[f"k.{i}"]).astype(dtype)
                c.values = mx.array(arrays[f"v.{i}"]).astype(dtype)
                c.offset = int(c.keys.shape[2])
                if c.offset != len(entry.tokens):
                    raise ValueError("tokens and arrays disagree")
                cache.append(c)
            os.utime(entry.path)  # used: the last the byte bound removes
            return entry.tokens, cache
        except Exception as e:  # noqa: BLE001
            log.warning("prompt cache: removing unreadable %s (%s)", entry.path.name, e)
            self._forget(name)
            return None

    # --- writing ---------------------------------------------------------------------------
    def save(self, tokens: list[int], cache: list[Any]) -> None:
        """Queue `cache` (holding `tokens`) for writing. Copies the arrays out on the caller's
        thread (the worker); skipped for short prompts, known sequences and other cache kinds."""
        import mlx.core as mx

        snapshot = not plain_kv(cache)
        if len(tokens) < MIN_TOKENS or (snapshot and not _snapshot_kinds(cache)):
            return
        name = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:32] + ".safetensors"
        with self._lock:
            if name in self._files:
                return
        if snapshot:
            arrays, layers, dtypes = _snapshot_arrays(cache, len(tokens))
            meta = {"identity": self.identity, "tokens": json.dumps(tokens), "dtype": dtypes[0] if dtypes else "float32",
                    "layers": json.dumps(layers), "dtypes": json.dumps(dtypes)}
            try:
                self._queue.put_nowait((name, arrays, meta))
            except queue.Full:
                pass
            return
        n = len(tokens)
        dtype = str(cache[0].keys.dtype).removeprefix("mlx.core.")
        arrays = {}
        for i, c in enumerate(cache):
            for kind, a in (("k", c.keys), ("v", c.values)):
                part = a[..., :n, :].astype(mx.float32)  # numpy has no bfloat16: widened, narrowed on load
                mx.eval(part)
                arrays[f"{kind}.{i}"] = np.array(part)
        meta = {"identity": self.identity, "tokens": json.dumps(tokens), "dtype": dtype}
        try:
            self._queue.put_nowait((name, arrays, meta))
        except queue.Full:  # the disk is behind: this one is not kept, generation never waits
            pass

    def _write_loop(self) -> None:
        from safetensors.numpy import save_file

        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._write(*item, save_file)
            finally:
                self._queue.task_done()

    def _write(self, name: str, arrays: dict[str, np.ndarray], meta: dict[str, str], save_file: Any) -> None:
        path = self.folder / name
        tmp = path.with_suffix(".tmp")
        try:
            save_file(arrays, str(tmp), metadata=meta)
            os.replace(tmp, path)  # atomic: a reader sees the whole file or none
        except OSError as e:
            log.warning("prompt cache: could not write %s (%s)", path.name, e)
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self._files[name] = _File(path, json.loads(meta["tokens"]), path.stat().st_size, "layers" in meta)
        self._bound()

    def _bound(self) -> None:
        with self._lock:
            files = sorted(self._files.values(), key=lambda f: _mtime(f.path))
            total = sum(f.nbytes for f in files)
        for f in files:
            if total <= self.max_bytes:
                break
            self._forget(f.path.name)
            total -= f.nbytes

    def _forget(self, name: str) -> None:
        with self._lock:
            entry = self._files.pop(name, None)
        if entry is not None:
            entry.path.unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait until queued files are written."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# --- snapshots: caches with recurrent layers (engine/generation/prompt_cache.py) ---------------
# A file holds each layer as it is: an attention layer's keys and values ("k.i", "v.i", cut to the
# tokens held) or a recurrent layer's state arrays ("s.i.j"); metadata "layers" names each layer's
# kind (["kv"] or ["arrays", size]) and "dtypes" each array's dtype, in the order written.

def _usable(f: _File, prompt: list[int]) -> int:
    """What a file gives `prompt`: the common prefix, or a snapshot's whole length or nothing."""
    if not f.exact:
        return common_prefix(f.tokens, prompt)
    n = len(f.tokens)
    return n if n < len(prompt) and prompt[:n] == f.tokens else 0


def _snapshot_kinds(cache: list[Any]) -> bool:
    """Every layer an attention KVCache or a recurrent ArraysCache (what a snapshot file holds)."""
    from mlx_lm.models.cache import ArraysCache, KVCache

    return bool(cache) and all(type(c) is KVCache or type(c) is ArraysCache for c in cache)


def _snapshot_arrays(cache: list[Any], n: int) -> tuple[dict[str, np.ndarray], list[list[Any]], list[str]]:
    """Each layer's arrays as float32 numpy (numpy has no bfloat16), its kind, each array's dtype."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    arrays: dict[str, np.ndarray] = {}
    layers: list[list[Any]] = []
    dtypes: list[str] = []

    def add(name: str, a: Any) -> None:
        part = a.astype(mx.float32)
        mx.eval(part)
        arrays[name] = np.array(part)
        dtypes.append(str(a.dtype).removeprefix("mlx.core."))

    for i, c in enumerate(cache):
        if type(c) is KVCache:
            layers.append(["kv"])
            if c.keys is not None:
                add(f"k.{i}", c.keys[..., :n, :])
                add(f"v.{i}", c.values[..., :n, :])
        else:
            layers.append(["arrays", len(c.cache)])
            for j, a in enumerate(c.cache):
                if a is not None:
                    add(f"s.{i}.{j}", a)
    return arrays, layers, dtypes


def _snapshot_layers(arrays: dict[str, np.ndarray], meta: dict[str, str], n: int) -> list[Any]:
    """The caches a snapshot file holds, each array back in its dtype (the order `_snapshot_arrays`
    wrote them in); raises ValueError where the file and its tokens disagree."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache

    dtypes = iter(json.loads(meta["dtypes"]))

    def get(name: str) -> Any:
        return mx.array(arrays[name]).astype(getattr(mx, next(dtypes)))

    cache: list[Any] = []
    for i, kind in enumerate(json.loads(meta["layers"])):
        if kind[0] == "kv":
            c = KVCache()
            if f"k.{i}" in arrays:
                c.keys, c.values = get(f"k.{i}"), get(f"v.{i}")
                c.offset = int(c.keys.shape[2])
                if c.offset != n:
                    raise ValueError("tokens and arrays disagree")
        elif kind[0] == "arrays":
            c = ArraysCache(int(kind[1]))
            for j in range(int(kind[1])):
                if f"s.{i}.{j}" in arrays:
                    c[j] = get(f"s.{i}.{j}")
        else:
            raise ValueError(f"unknown layer kind {kind[0]!r}")
        cache.append(c)
    return cache
