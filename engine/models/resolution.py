"""The model store: which model folders exist and what id names each.

Three sources, in priority order: explicit local folders given on the CLI, openmlx's own store
(`$OPENMLX_HOME/models/<id>`, where converted models live, and `models/<org>/<name>`, where
`openmlx pull` puts Hub models), and the Hugging Face cache
(`models--org--name/snapshots/REV/`, scanned with huggingface_hub). A request's model id is only
ever *looked up* among these entries, never joined onto a path, so `../`, absolute paths and
encoded variants cannot reach outside the store.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.errors import ModelNotFound


@dataclass(frozen=True)
class ModelEntry:
    """One model folder the server knows about."""

    id: str
    path: Path
    source: str  # "local" | "store" | "hf-cache"


def _hf_entries(cache_dir: Optional[Path]) -> list[ModelEntry]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except (CacheNotFound, OSError, ValueError):
        return []
    entries = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        main = [r for r in repo.revisions if "main" in r.refs]
        revision = main[0] if main else max(repo.revisions, key=lambda r: r.last_modified)
        entries.append(ModelEntry(repo.repo_id, Path(revision.snapshot_path), "hf-cache"))
    return entries


def _store_entries(models_dir: Path) -> list[ModelEntry]:
    """Converted models at `models/<id>`, pulled ones at `models/<org>/<name>` (id `org/name`);
    folders being written (`.downloads/`, `*.partial`) are not models yet."""
    if not models_dir.is_dir():
        return []
    entries = []
    for d in sorted(models_dir.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or d.name.endswith(".partial"):
            continue
        if (d / "config.json").is_file():
            entries.append(ModelEntry(d.name, d, "store"))
            continue
        entries += [ModelEntry(f"{d.name}/{m.name}", m, "store") for m in sorted(d.iterdir())
                    if m.is_dir() and not m.name.startswith(".") and (m / "config.json").is_file()]
    return entries


class ModelStore:
    """Lists model folders and resolves a model id to exactly one of them."""

    def __init__(self, models_dir: Path, hf_cache: Optional[Path] = None,
                 local_models: Optional[list[Path]] = None, aliases: Optional[dict[str, str]] = None) -> None:
        self.models_dir = models_dir
        self.hf_cache = hf_cache
        self.local_models = [Path(p).expanduser().resolve() for p in (local_models or [])]
        # id -> source (a folder, or an id of the other sources): a config file's `models:` ids.
        self.aliases = dict(aliases or {})
        # name -> model id: Ollama's /api/copy. A copy is the same model under another name (one
        # loaded copy serves both), unlike a config alias, which may have settings of its own.
        self.copies: dict[str, str] = {}

    def add_local(self, path: Path) -> ModelEntry:
        """Register a local folder (CLI only) and return its entry."""
        path = Path(path).expanduser().resolve()
        if path not in self.local_models:
            self.local_models.append(path)
        return ModelEntry(path.name, path, "local")

    def entries(self) -> list[ModelEntry]:
        """Every known model folder, first occurrence of an id wins."""
        seen: dict[str, ModelEntry] = {}
        local = [ModelEntry(p.name, p, "local") for p in self.local_models if p.is_dir()]
        for entry in local + _store_entries(self.models_dir) + _hf_entries(self.hf_cache):
            seen.setdefault(entry.id, entry)
        named: dict[str, ModelEntry] = {}
        for alias, source in self.aliases.items():  # an alias whose source isn't there yet is not listed
            folder = Path(source).expanduser()
            if folder.is_dir():
                named[alias] = ModelEntry(alias, folder.resolve(), "config")
            elif source in seen:
                named[alias] = ModelEntry(alias, seen[source].path, "config")
        listed = {**named, **{k: v for k, v in seen.items() if k not in named}}
        for name, model_id in self.copies.items():
            if model_id in listed and name not in listed:
                listed[name] = ModelEntry(name, listed[model_id].path, "copy")
        return list(listed.values())

    def resolve(self, model_id: str) -> ModelEntry:
        """The entry named `model_id`, or ModelNotFound (404)."""
        if model_id in self.copies:
            return self.resolve(self.copies[model_id])
        entries = self.entries()  # one scan of the store and the HF cache
        for entry in entries:
            if entry.id == model_id:
                return entry
        # Ollama's names: `name:latest` is `name` (its apps send the tag /api/tags lists).
        if model_id.endswith(":latest") and len(model_id) > len(":latest"):
            try:
                return self.resolve(model_id[: -len(":latest")])
            except ModelNotFound:
                raise ModelNotFound(model_id) from None
        # Accept the bare repo name of a cached HF model ("SmolLM2" for "org/SmolLM2") only
        # when it is unambiguous.
        if "/" not in model_id:
            matches = [e for e in entries if e.id.rsplit("/", 1)[-1] == model_id]
            if len(matches) == 1:
                return matches[0]
        raise ModelNotFound(model_id)


def locate(store: ModelStore, spec: str) -> ModelEntry:
    """A model named on the command line: a local folder (registered under its folder name), a
    GGUF file (converted into the store once, served under the file's name without `.gguf`), or
    an id from the store or the Hugging Face cache."""
    from engine.models import external

    if spec.startswith(external.PREFIXES):  # Ollama's or LM Studio's file, converted once
        from engine.models.gguf_import import import_gguf

        found = external.find(spec)
        if found is None:
            raise ModelNotFound(spec)
        return store.add_local(import_gguf(found.path, store.models_dir, name=found.store_name))
    path = Path(spec).expanduser()
    if path.is_dir():
        from engine.formats.whisper_ct2 import convert, is_ct2_whisper

        if is_ct2_whisper(path):  # a CTranslate2 Whisper (as the default tiny.en): converted into the store once
            dest = store.models_dir / path.name
            if not (dest / "config.json").is_file():
                store.models_dir.mkdir(parents=True, exist_ok=True)
                convert(path, dest)
            return store.add_local(dest)
        return store.add_local(path)
    if path.is_file() and path.suffix.lower() == ".gguf":  # converted into the store once, served by its name
        from engine.models.gguf_import import import_gguf

        return store.add_local(import_gguf(path, store.models_dir))
    return store.resolve(spec)
