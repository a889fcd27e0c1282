"""Prompt cache files that may be hostile (engine/generation/prompt_store.py): what the model's
cache looks like (`KVShape`, `kv_shape`), the weights' fingerprint, an entry's name, and the
low-level reads: only regular files of ours are opened (`open_regular`: no symlinks, FIFOs or
devices), never past what the header says (`read_exactly`). The header's checks against the
model are the store's (`PromptStore._header`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from engine.generation.prompt_cache import plain_kv

MAX_HEADER = 16 << 20  # a header holds the tokens as JSON: 16 MiB is over a million of them
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # what an entry's dtype costs in memory, per value
ENTRY_NAME = re.compile(r"^[0-9a-f]{32}\.safetensors$")  # the names entry_name gives


# --- the model's cache layout --------------------------------------------------------------------
StateSpec = tuple[tuple[tuple[int, ...], str], ...]  # a recurrent layer's arrays: (shape, dtype) each


@dataclass(frozen=True)
class KVShape:
    """What the loaded model's cache looks like: per layer (key heads, key size, value heads, value
    size) for an attention layer, None for a recurrent one; the dtype the keys and values are held
    in; and for a hybrid model (`states` not empty) per layer None for an attention layer, or each
    state array's exact shape and dtype for a recurrent one. A file must match it exactly."""

    layers: tuple[Optional[tuple[int, int, int, int]], ...]
    dtype: str
    states: tuple[Optional[StateSpec], ...] = ()

    @property
    def values_per_token(self) -> int:
        return sum(kh * kd + vh * vd for kh, kd, vh, vd in filter(None, self.layers))


def kv_shape(model: Any) -> Optional[KVShape]:
    """The model's cache layout, from one token run through it (what its layers really keep, for
    every architecture); None when it is neither plain KV nor attention and recurrent layers
    (rotating, quantized): no file fits then."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    return cache_layout(cache)


def dtype_of(a: Any) -> str:
    return str(a.dtype).removeprefix("mlx.core.")


def cache_layout(cache: list[Any]) -> Optional[KVShape]:
    """A cache's layout (heads, sizes, state shapes and dtypes; not its length), or None when no
    file can hold it."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache

    if plain_kv(cache):
        mx.eval([x for c in cache for x in (c.keys, c.values)])
        if len({dtype_of(x) for c in cache for x in (c.keys, c.values)}) != 1:
            return None
        return KVShape(tuple((int(c.keys.shape[1]), int(c.keys.shape[3]), int(c.values.shape[1]),
                              int(c.values.shape[3])) for c in cache), dtype_of(cache[0].keys))
    if not cache or not all((type(c) is KVCache and c.keys is not None)
                            or (type(c) is ArraysCache and c.cache and all(a is not None for a in c.cache))
                            for c in cache):
        return None
    arrays = [x for c in cache for x in ((c.keys, c.values) if type(c) is KVCache else c.cache)]
    mx.eval(arrays)
    kv = {dtype_of(x) for c in cache if type(c) is KVCache for x in (c.keys, c.values)}
    if len(kv) > 1:
        return None
    layers = tuple((int(c.keys.shape[1]), int(c.keys.shape[3]), int(c.values.shape[1]), int(c.values.shape[3]))
                   if type(c) is KVCache else None for c in cache)
    states = tuple(None if type(c) is KVCache else tuple((tuple(int(d) for d in a.shape), dtype_of(a)) for a in c.cache)
                   for c in cache)
    return KVShape(layers, kv.pop() if kv else dtype_of(arrays[0]), states)


# --- the weights' fingerprint --------------------------------------------------------------------
SAMPLE = 64 << 10  # bytes per sampled block
SAMPLES = 32  # blocks spread evenly over a file, besides its first MiB and last block
_fingerprints: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime_ns, inode) -> digest
_fingerprint_lock = threading.Lock()


def file_fingerprint(path: Path) -> str:
    """A cheap digest of one weight file: its size, its first MiB (the safetensors header and the
    first tensors), SAMPLES blocks of 64 KiB evenly spread, and its last block: about 3 MiB read
    whatever the file's size. Computed once per file, remembered by path, size, mtime and inode."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    with _fingerprint_lock:
        if key in _fingerprints:
            return _fingerprints[key]
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        span = max(st.st_size - SAMPLE, 0)
        for i in range(SAMPLES + 1):
            f.seek(span * i // SAMPLES)
            h.update(f.read(SAMPLE))
    digest = h.hexdigest()
    with _fingerprint_lock:
        _fingerprints[key] = digest
    return digest


def weights_fingerprint(folder: Path) -> str:
    """The fingerprint of a model folder's weights (every *.safetensors file in it)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        h.update(path.name.encode() + b"\0" + file_fingerprint(path).encode())
    return h.hexdigest()[:32]


# --- reading a file that may be hostile ----------------------------------------------------------
def entry_name(tokens: list[int], scope: str) -> str:
    """A file's name: its scope and tokens hashed (a file under another name is not ours)."""
    return hashlib.sha256(json.dumps([scope, tokens]).encode()).hexdigest()[:32] + ".safetensors"


class BadFile(ValueError):
    """A file that is not a prompt cache entry this model can use (the message says why)."""


class NotOurs(BadFile):
    """A file another user owns: skipped, left in place."""


@dataclass(frozen=True)
class Header:
    """A file's header once checked (PromptStore._header)."""

    tokens: list[int]
    scope: str
    kinds: list[list[Any]]  # per layer ["kv"], or ["arrays", count] for a recurrent layer
    dtypes: dict[str, str]  # tensor name -> its dtype in memory (the file holds float32)
    tensors: dict[str, tuple[tuple[int, ...], int, int]]  # name -> (shape, start, end) in the file
    nbytes: int  # what the entry takes in memory
    exact: bool  # a snapshot


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """An fd of `path` when it is a regular file of ours: never follows a symlink, never blocks on
    a FIFO, never opens a device."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise (NotOurs if st.st_uid != os.geteuid() else BadFile)("not a regular file")
    if st.st_uid != os.geteuid():
        raise NotOurs(f"owned by uid {st.st_uid}, not this server's")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between the two looks
            raise BadFile("not a regular file")
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def read_exactly(fd: int, offset: int, n: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise BadFile("shorter than its header says")
    return data
