"""The prompt cache on disk (`--prompt-cache-dir`): KV caches that survive a restart.

Each entry the prompt cache keeps is also written here: one safetensors file per token sequence
and cache scope (keys and values per layer, cut to the tokens held; the tokens, the scope and the
model's identity in the header), under a folder per model identity, so another model's segments
are never read. A hybrid model's entry (recurrent `ArraysCache` layers beside attention layers)
is a snapshot: its attention layers' keys and values ("k.i", "v.i") and its recurrent layers'
state arrays as they are ("s.i.j"; metadata "layers" names each layer's kind, "dtypes" each
tensor's dtype); it serves a prompt all of its tokens or nothing. The identity includes a
fingerprint of the weight files (`weights_fingerprint`), so weights replaced under the same id and
configuration start a new folder. The arrays are copied out on the worker (MLX evaluates there);
the file is written by a thread of its own, to a temporary name and then renamed, so a crash never
leaves half a file under a real name. The folder is bounded by bytes: the least recently used
files go first.

The folder may be writable by others (a shared or /tmp folder), so a file is trusted no more than
a request body: only regular files are opened (no symlinks, FIFOs or devices; `O_NOFOLLOW |
O_NONBLOCK`, then `S_ISREG` on the open file), the header is read and checked before any tensor:
its size, the tensors' names, dtypes, shapes and offsets against the file's size, the layer count
and kinds, heads, head size, state shapes and dtypes against the model (`KVShape`), the bytes it
would take against the prompt cache's bound, the tokens against the context; the tensors are
checked for NaN and infinity as they are read. A file that fails is removed, or skipped when
another user owns it (one warning each). What can't be checked is what finite, well-shaped values
mean: keep the folder private to the server's user. The layout, fingerprint and low-level reads
live in engine/generation/prompt_files.py; the header's checks and the store are here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from engine.generation.prompt_cache import common_prefix
from engine.generation.prompt_files import (ENTRY_NAME, ITEMSIZE, MAX_HEADER, BadFile, Header, KVShape, NotOurs,
                                            cache_layout, dtype_of, entry_name, open_regular, read_exactly)

log = logging.getLogger("openmlx.engine")
MIN_TOKENS = 32  # shorter prompts are cheap to compute again: not worth a file


@dataclass
class _File:
    path: Path
    tokens: list[int]
    nbytes: int
    scope: str = ""
    exact: bool = False  # a snapshot (recurrent layers): resumable at all of its tokens only



class PromptStore:
    """KV caches on disk for one model (its `identity`: id, dtype, configuration and weights).

    `shape`: the model's KV shape (every file must match it; None only in tests, where the files
    are checked for consistency alone). `max_entry_bytes`: the most one entry may take in memory
    (the prompt cache's bound: a larger one could not be kept); `max_tokens`: the model's context."""

    def __init__(self, root: Path, identity: str, max_bytes: int, shape: Optional[KVShape] = None,
                 max_entry_bytes: Optional[int] = None, max_tokens: Optional[int] = None) -> None:
        self.folder = Path(root).expanduser() / hashlib.sha256(identity.encode()).hexdigest()[:24]
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.identity = identity
        self.max_bytes = max_bytes
        self.shape = shape
        self.max_entry_bytes = max_entry_bytes
        self.max_tokens = max_tokens
        self._files: dict[str, _File] = {}
        self._lock = threading.Lock()
        self._queue: "queue.Queue[Optional[tuple[str, dict[str, np.ndarray], dict[str, str]]]]" = queue.Queue(8)
        self._index()
        self._writer = threading.Thread(target=self._write_loop, name="openmlx-prompt-store", daemon=True)
        self._writer.start()

    # --- checks ----------------------------------------------------------------------------
    @property
    def entry_limit(self) -> int:
        return min(self.max_bytes, self.max_entry_bytes or self.max_bytes)


    def _header(self, fd: int, size: int, name: str) -> Header:
        """The file's header, checked before any tensor is read."""
        if size < 8:
            raise BadFile("too short")
        (length,) = struct.unpack("<Q", read_exactly(fd, 0, 8))
        if length > min(MAX_HEADER, size - 8):
            raise BadFile(f"a header of {length} bytes")
        header = json.loads(read_exactly(fd, 8, length))
        if not isinstance(header, dict):
            raise BadFile("a header that is not an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or meta.get("identity") != self.identity:
            raise BadFile("another model's file")
        tokens = json.loads(meta["tokens"])
        scope, dtype = meta.get("scope", ""), meta.get("dtype")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens) or not isinstance(scope, str):
            raise BadFile("tokens or scope malformed")
        if dtype not in ITEMSIZE or (self.shape is not None and dtype != self.shape.dtype):
            raise BadFile(f"dtype {dtype!r}, the model's KV is {self.shape.dtype if self.shape else 'float'}")
        if name != entry_name(tokens, scope):
            raise BadFile("its name is not its contents'")
        n = len(tokens)
        if n < MIN_TOKENS or (self.max_tokens is not None and n > self.max_tokens):
            raise BadFile(f"{n} tokens (the model's context is {self.max_tokens})")
        exact = "layers" in meta
        kinds, dtypes = self._kinds(meta, header, dtype) if exact else self._plain_kinds(header, dtype)
        # What each tensor must be: [1, heads, n, size] for keys and values, the model's state shape.
        expect: dict[str, Optional[tuple[int, ...]]] = {}
        for i, kind in enumerate(kinds):
            if kind[0] == "kv":
                for kind_, at in (("k", 0), ("v", 2)):
                    layer = self.shape.layers[i] if self.shape is not None else None
                    expect[f"{kind_}.{i}"] = (1, layer[at], n, layer[at + 1]) if layer else None
            else:
                for j in range(kind[1]):
                    expect[f"s.{i}.{j}"] = self.shape.states[i][j][0] if self.shape is not None else None
        if set(header) != set(expect):
            raise BadFile("tensors that are not each layer's keys and values or states")
        tensors, spans, nbytes = {}, [], 0
        for tname, want in expect.items():
            t = header[tname]
            shape, (start, end) = tuple(t["shape"]), t["data_offsets"]
            if t.get("dtype") != "F32" or not 1 <= len(shape) <= 8 or not all(type(d) is int and d > 0 for d in shape):
                raise BadFile(f"{tname}: {t.get('dtype')} {list(shape)}")
            if want is not None and shape != want:
                raise BadFile(f"{tname}: {list(shape)}, the model's layer holds {list(want)}")
            if tname[0] in "kv" and (len(shape) != 4 or shape[0] != 1 or shape[2] != n):
                raise BadFile(f"{tname}: {list(shape)} for {n} tokens")
            count = int(np.prod(shape, dtype=object))
            if type(start) is not int or type(end) is not int or end - start != 4 * count or start < 0:
                raise BadFile(f"{tname}: offsets disagree with its shape")
            nbytes += count * ITEMSIZE[dtypes[tname]]
            spans.append((start, end))
            tensors[tname] = (shape, 8 + length + start, 8 + length + end)
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])) or (spans and 8 + length + spans[-1][1] > size):
            raise BadFile("tensors overlap or lie past the end of the file")
        if nbytes > self.entry_limit:
            raise BadFile(f"{nbytes} bytes of KV, over the bound of {self.entry_limit}")
        return Header(tokens, scope, kinds, dtypes, tensors, nbytes, exact)

    def _plain_kinds(self, header: dict, dtype: str) -> tuple[list[list[Any]], dict[str, str]]:
        """A plain file's layers: a key and a value each, all of `dtype`."""
        layers = len(header) // 2
        if not layers or (self.shape is not None and (self.shape.states or layers != len(self.shape.layers))):
            raise BadFile(f"{layers} layers of keys and values, the model has "
                          f"{len(self.shape.layers) if self.shape else 'others'}")
        return [["kv"]] * layers, {f"{kind}.{i}": dtype for i in range(layers) for kind in "kv"}

    def _kinds(self, meta: dict, header: dict, dtype: str) -> tuple[list[list[Any]], dict[str, str]]:
        """A snapshot's layers (metadata "layers") and each tensor's dtype (metadata "dtypes"),
        checked against the model's layout."""
        kinds, dtypes = json.loads(meta["layers"]), json.loads(meta.get("dtypes", "null"))
        if not isinstance(kinds, list) or not kinds or not isinstance(dtypes, dict) \
                or not all(k == ["kv"] or (isinstance(k, list) and len(k) == 2 and k[0] == "arrays"
                                           and type(k[1]) is int and 0 < k[1] <= 16) for k in kinds):
            raise BadFile("layers or dtypes malformed")
        if self.shape is not None:
            want = [["kv"] if st is None else ["arrays", len(st)] for st in self.shape.states]
            if kinds != want:
                raise BadFile("its layers are not the model's")
        for i, kind in enumerate(kinds):
            names = [f"k.{i}", f"v.{i}"] if kind[0] == "kv" else [f"s.{i}.{j}" for j in range(kind[1])]
            for j, tname in enumerate(names):
                want = dtype if kind[0] == "kv" else self.shape.states[i][j][1] if self.shape is not None else None
                if dtypes.get(tname) not in ITEMSIZE or (want is not None and dtypes[tname] != want):
                    raise BadFile(f"{tname}: dtype {dtypes.get(tname)!r}, the model's is {want}")
        if set(dtypes) != set(header):
            raise BadFile("dtypes that are not its tensors'")
        return kinds, dtypes

    def _reject(self, path: Path, e: Exception) -> None:
        if isinstance(e, NotOurs):
            log.warning("prompt cache: skipping %s (%s)", path.name, e)
            return
        log.warning("prompt cache: removing %s (%s)", path.name, e)
        try:
            path.unlink(missing_ok=True)  # a symlink goes, never what it points at
        except OSError as err:
            log.warning("prompt cache: can't remove %s (%s)", path.name, err)

    # --- reading ---------------------------------------------------------------------------
    def _index(self) -> None:
        """Read every file's header (tokens, scope, identity); what can't be used is removed."""
        for path in sorted(self.folder.glob("*.safetensors")):
            try:
                if not ENTRY_NAME.match(path.name):
                    raise BadFile("not a name this server writes")
                fd, st = open_regular(path)
                try:
                    head = self._header(fd, st.st_size, path.name)
                finally:
                    os.close(fd)
                self._files[path.name] = _File(path, head.tokens, st.st_size, head.scope, head.exact)
            except Exception as e:  # noqa: BLE001 - any unusable file is dropped, never fatal
                self._reject(path, e)
        for tmp in self.folder.glob("*.tmp"):  # a write a crash interrupted
            tmp.unlink(missing_ok=True)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(f.nbytes for f in self._files.values())

    def best(self, prompt: list[int], scope: str = "") -> tuple[Optional[str], int]:
        """The file of `scope` sharing the longest prefix with `prompt` (a snapshot: all of its
        tokens or none), and that length."""
        with self._lock:
            scored = [(_usable(f, prompt), name) for name, f in self._files.items() if f.scope == scope]
        length, name = max(scored, default=(0, None))
        return name, length

    def load(self, name: str) -> Optional[tuple[list[int], list[Any]]]:
        """(tokens, caches) of a file, or None (and the file removed) if it can't be used. Runs on
        the worker. A layer at a time: its float32 copy is freed before the next is read."""
        import mlx.core as mx
        from mlx_lm.models.cache import ArraysCache, KVCache

        with self._lock:
            entry = self._files.get(name)
        if entry is None:
            return None
        try:
            fd, st = open_regular(entry.path)
            try:
                head = self._header(fd, st.st_size, name)
                if (head.tokens, head.scope, head.exact) != (entry.tokens, entry.scope, entry.exact):
                    raise BadFile("changed since it was indexed")

                def read(tname: str) -> Any:
                    shape, start, end = head.tensors[tname]
                    a = np.frombuffer(read_exactly(fd, start, end - start), dtype="<f4").reshape(shape)
                    if not np.isfinite(a).all():
                        raise BadFile(f"{tname} holds NaN or infinity")
                    return mx.array(a).astype(getattr(mx, head.dtypes[tname]))

                cache = []
                for i, kind in enumerate(head.kinds):
                    if kind[0] == "kv":
                        c = KVCache()
                        c.keys, c.values = read(f"k.{i}"), read(f"v.{i}")
                        c.offset = len(head.tokens)
                        mx.eval(c.keys, c.values)
                    else:
                        c = ArraysCache(kind[1])
                        c.cache = [read(f"s.{i}.{j}") for j in range(kind[1])]
                        mx.eval(c.cache)
                    cache.append(c)
            finally:
                os.close(fd)
            os.utime(entry.path)  # used: the last the byte bound removes
            return head.tokens, cache
        except Exception as e:  # noqa: BLE001
            self._reject(entry.path, e)
            with self._lock:
                self._files.pop(name, None)
            return None

    def drop(self, name: str) -> None:
        """Remove a file (a generation failed on what it held)."""
        log.warning("prompt cache: removing %s (a generation failed on it)", name)
        self._forget(name)

    # --- writing ---------------------------------------------------------------------------
    def save(self, tokens: list[int], cache: list[Any], scope: str = "") -> None:
        """Queue `cache` (holding `tokens`, made by requests of `scope`) for writing: keys and
        values cut to the tokens, and a hybrid model's recurrent states as they are (a snapshot).
        Copies the arrays out on the caller's thread (the worker); skipped for short prompts, known
        sequences, other cache kinds and what `load` would refuse."""
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        if len(tokens) < MIN_TOKENS or (self.max_tokens and len(tokens) > self.max_tokens):
            return
        name = entry_name(tokens, scope)
        with self._lock:
            if name in self._files:
                return
        layout = cache_layout(cache)
        if layout is None or layout.dtype not in ITEMSIZE or (self.shape is not None and layout != self.shape):
            return
        n = len(tokens)
        if layout.states and any(type(c) is KVCache and c.offset != n for c in cache):
            return  # a snapshot's recurrent state is of all its tokens: its keys can't be cut to fewer
        parts: dict[str, Any] = {}
        for i, c in enumerate(cache):
            if type(c) is KVCache:
                parts[f"k.{i}"], parts[f"v.{i}"] = c.keys[..., :n, :], c.values[..., :n, :]
            else:
                parts.update((f"s.{i}.{j}", a) for j, a in enumerate(c.cache))
        dtypes = {k: dtype_of(a) for k, a in parts.items()}
        if not set(dtypes.values()) <= set(ITEMSIZE) \
                or sum(a.size * ITEMSIZE[dtypes[k]] for k, a in parts.items()) > self.entry_limit:
            return
        arrays = {}
        for k, a in parts.items():
            part = a.astype(mx.float32)  # numpy has no bfloat16: widened, narrowed on load
            mx.eval(part)
            arrays[k] = np.array(part)
        meta = {"identity": self.identity, "tokens": json.dumps(tokens), "dtype": layout.dtype, "scope": scope}
        if layout.states:
            meta["layers"] = json.dumps([["kv"] if st is None else ["arrays", len(st)] for st in layout.states])
            meta["dtypes"] = json.dumps(dtypes)
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
        if not all(np.isfinite(a).all() for a in arrays.values()):  # (an overflow): load would refuse it
            return
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
            self._files[name] = _File(path, json.loads(meta["tokens"]), path.stat().st_size, meta["scope"],
                                      "layers" in meta)
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


def _usable(f: _File, prompt: list[int]) -> int:
    """What a file gives `prompt`: the common prefix, or a snapshot's whole length or nothing."""
    if not f.exact:
        return common_prefix(f.tokens, prompt)
    n = len(f.tokens)
    return n if n < len(prompt) and prompt[:n] == f.tokens else 0
