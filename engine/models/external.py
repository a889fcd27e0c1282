"""GGUF models already on the machine in other tools' stores: Ollama's and LM Studio's.

Ollama keeps `models/manifests/<registry>/<namespace>/<model>/<tag>` (JSON; the layer whose
mediaType is `application/vnd.ollama.image.model` names the weights blob by digest) and
`models/blobs/sha256-<hex>`. LM Studio keeps plain `models/<publisher>/<repo>/<file>.gguf`.
openmlx only reads them: `serve --model ollama:NAME[:TAG]` or `lmstudio:PUBLISHER/REPO/FILE`
converts the file into its own store once (engine/models/gguf_import.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger("openmlx.engine")
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
PREFIXES = ("ollama:", "lmstudio:")
# An Ollama manifest is about a kilobyte; anything much larger is not one.
MAX_MANIFEST_BYTES = 1 << 20
# A walk reads at most this many entries (a store of millions of files is not one we list).
MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class ExternalGGUF:
    """One GGUF model in another tool's store."""

    spec: str  # how to name it: ollama:NAME:TAG or lmstudio:PUBLISHER/REPO/FILE
    path: Path  # the weights file (read only)
    store_name: str  # the folder (and served id) it is converted into

    @property
    def size_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0


def ollama_root() -> Path:
    """Ollama's models folder: $OLLAMA_MODELS (Ollama's own setting), else ~/.ollama/models."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def lmstudio_root() -> Path:
    """LM Studio's models folder: $LMSTUDIO_MODELS, else ~/.lmstudio/models."""
    return Path(os.environ.get("LMSTUDIO_MODELS") or Path.home() / ".lmstudio" / "models").expanduser()


# A name part kept as it is in a store folder name: no `--` (the separator) and no `-` at either end.
_PART = re.compile(r"[A-Za-z0-9._]+(?:-[A-Za-z0-9._]+)*")


def store_name(prefix: str, parts: tuple[str, ...]) -> str:
    """The store folder (and served id) for another tool's model named by `parts`: distinct
    names always give distinct folders. The parts are joined with `--` when none holds `--`, a
    `-` at an end or any other character (Ollama's `m:t-x` is `ollama-m--t-x`, `m-t:x` is
    `ollama-m-t--x`); otherwise, or past 200 characters, a readable slug ends in `---` and a
    digest of the exact parts (neither form can take the other's shape: a plain name never
    holds `---`)."""
    if all(_PART.fullmatch(p) for p in parts):
        name = f"{prefix}-{'--'.join(parts)}"
        if len(name) <= 200:
            return name
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", "-".join(parts)).strip("-.")[:150].rstrip("-")
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{prefix}-{slug}---{digest}"


def _valid_part(part: str) -> bool:
    return part not in ("", ".", "..") and "/" not in part and "\0" not in part


def _walk(root: Path, depth: int) -> Iterator[tuple[str, ...]]:
    """The entries `depth` levels below `root`, as path parts, in name order. Each real folder is
    read once (a symlink to a folder already seen, a loop included, is skipped), at most
    MAX_ENTRIES entries in all."""
    seen: set[tuple[int, int]] = set()
    budget = [MAX_ENTRIES]

    def visit(folder: Path, parts: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        try:
            st = os.stat(folder)
        except OSError:
            return
        if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        names = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if budget[0] <= 0:
                        log.warning("openmlx: stopped reading %s after %d entries", root, MAX_ENTRIES)
                        break
                    budget[0] -= 1
                    names.append(entry.name)
        except OSError:
            return
        for name in sorted(names):
            if len(parts) + 1 == depth:
                yield (*parts, name)
            else:
                yield from visit(folder / name, (*parts, name))

    yield from visit(root, ())


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes (not a symlink, FIFO
    or device: opened without following a link or waiting for a writer); ValueError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError("a symbolic link" if os.path.islink(path) else f"unreadable ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{st.st_size} bytes, more than a manifest's {limit}")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # grew while read
            raise ValueError(f"more than a manifest's {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _manifest_digest(path: Path) -> Optional[str]:
    """The weights blob's digest an Ollama manifest names (None: it names none); ValueError for a
    file that is not a manifest we can read."""
    try:
        manifest = json.loads(_read_regular(path, MAX_MANIFEST_BYTES))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    layers = manifest.get("layers") or []
    if not isinstance(layers, list):
        raise ValueError("'layers' is not a list")
    digest = next((layer.get("digest") for layer in layers if isinstance(layer, dict)
                   and layer.get("mediaType") == OLLAMA_MODEL_LAYER), None)
    if digest is None:
        return None
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValueError("the model layer's digest is not sha256:<64 hex digits>")
    return digest


def _regular(path: Path) -> bool:
    """A regular file (a symlink to one counts: its target is only read)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _ollama_entry(root: Path, parts: tuple[str, ...]) -> Optional[ExternalGGUF]:
    """The model of manifest `manifests/<registry>/<namespace>/<model>/<tag>`, or None (a bad
    manifest is skipped with one warning)."""
    manifest = root / "manifests" / Path(*parts)
    try:
        digest = _manifest_digest(manifest)
    except FileNotFoundError:  # no such model (a lookup by name), or gone since the folder was read
        return None
    except (ValueError, TypeError, AttributeError) as e:  # UnicodeDecodeError and JSON errors are ValueErrors
        log.warning("openmlx: skipped Ollama manifest %s: %s", manifest, e)
        return None
    if digest is None:
        return None
    blob = root / "blobs" / digest.replace(":", "-")
    if not _regular(blob):
        return None  # not downloaded (yet)
    registry, namespace, model, tag = parts
    library = (registry, namespace) == ("registry.ollama.ai", "library")
    name = f"{model}:{tag}" if library else f"{registry}/{namespace}/{model}:{tag}"
    return ExternalGGUF(f"ollama:{name}", blob, store_name("ollama", (model, tag) if library else parts))


def ollama_models(root: Optional[Path] = None) -> list[ExternalGGUF]:
    """Ollama's models whose manifest names a weights blob that is present. Models of the
    default `registry.ollama.ai/library` are named `model:tag`, others with their path. The
    manifests are read in one walk of the store: regular files only, each bounded in size; one
    that can't be read is skipped with a warning."""
    root = root or ollama_root()
    found = []
    for parts in _walk(root / "manifests", 4):
        entry = _ollama_entry(root, parts)
        if entry is not None:
            found.append(entry)
    return found


_LATER_PART = re.compile(r"-0*[2-9]\d*-of-\d+\.gguf$")


def _lmstudio_entry(root: Path, parts: tuple[str, ...]) -> Optional[ExternalGGUF]:
    publisher, repo, file = parts
    if not file.endswith(".gguf") or _LATER_PART.search(file):
        return None  # split files' later parts are left out
    path = root / publisher / repo / file
    if not os.path.lexists(path):
        return None
    if not _regular(path):
        log.warning("openmlx: skipped LM Studio file %s: not a regular file", path)
        return None
    return ExternalGGUF(f"lmstudio:{publisher}/{repo}/{file}", path,
                        store_name("lmstudio", (publisher, repo, file[: -len(".gguf")])))


def lmstudio_models(root: Optional[Path] = None) -> list[ExternalGGUF]:
    """LM Studio's `publisher/repo/file.gguf` files (split files' later parts left out), found in
    one walk of its folder."""
    root = root or lmstudio_root()
    found = []
    for parts in _walk(root, 3):
        entry = _lmstudio_entry(root, parts)
        if entry is not None:
            found.append(entry)
    return found


def external_models() -> list[ExternalGGUF]:
    return ollama_models() + lmstudio_models()


def find(spec: str) -> Optional[ExternalGGUF]:
    """The model an `ollama:` / `lmstudio:` spec names (a missing tag means `latest`), or None.
    Only the one file the name points at is read, not the whole store."""
    if spec.startswith("ollama:"):
        name, _, tag = spec[len("ollama:"):].partition(":")
        path = name.split("/")
        parts = (("registry.ollama.ai", "library", *path) if len(path) == 1 else tuple(path)) + (tag or "latest",)
        if len(parts) != 4 or not all(map(_valid_part, parts)) or ":" in parts[3]:
            return None
        entry = _ollama_entry(ollama_root(), parts)
    elif spec.startswith("lmstudio:"):
        parts = tuple(spec[len("lmstudio:"):].split("/"))
        if len(parts) != 3 or not all(map(_valid_part, parts)):
            return None
        entry = _lmstudio_entry(lmstudio_root(), parts)
    else:
        return None
    return entry
