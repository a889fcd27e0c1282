"""The engine's model management (the Ollama-style model manager and /v1/models): list and
describe models, keep and unload them, pull, copy and delete, and fetch a missing one from the Hub
with --allow-download. A mixin of the facade (engine/engine.py `Engine`), which holds the store,
residency, scheduler and downloads these use; handlers reach ModelInfo and Resident through
engine.engine.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.config import EngineConfig
from engine.distributed import Lockstep, ShardPlan
from engine.errors import EngineError, InvalidRequest
from engine.model_card import ModelCard, card
from engine.models.downloads import Downloads
from engine.models.probe import Probe, probe
from engine.models.resolution import ModelEntry, ModelStore
from engine.residency import Residency
from engine.scheduler import Scheduler


@dataclass(frozen=True)
class ModelInfo:
    """A model as /v1/models and the CLI show it."""

    id: str
    created: int
    owned_by: str
    type: str
    context_length: Optional[int]
    size_bytes: int
    runnable: bool
    reason: str
    loaded: bool
    path: Path
    source: str
    architecture: Optional[str]
    dtype: Optional[str] = None  # how a loaded model's weights are held
    dtype_reason: Optional[str] = None  # and why (engine/models/weights.py)
    embedding_dim: Optional[int] = None
    world_size: int = 1  # ranks the loaded model is split over
    sharding: Optional[str] = None  # "tensor" | "pipeline" when split


@dataclass(frozen=True)
class Resident:
    """A loaded model as /api/ps shows it."""

    id: str
    info: ModelInfo
    size_bytes: int  # its weights in memory (on disk when not known)
    expires_at: Optional[float]  # wall-clock time it is unloaded; None: it stays until the server stops


class ModelManager:
    """Which models there are and which stay loaded, for a facade with these attributes (Engine's)."""

    config: EngineConfig
    store: ModelStore
    residency: Residency
    scheduler: Scheduler
    downloads: Downloads
    lockstep: Optional[Lockstep]
    shard_plan: Optional[ShardPlan]
    default_model_id: Optional[str]
    default_embedding_id: Optional[str]
    default_audio_id: Optional[str]

    # --- models --------------------------------------------------------------------------
    def _info(self, entry: ModelEntry, p: Probe) -> ModelInfo:
        runner = self.residency.runners.get(entry.id)
        owner = entry.id.split("/", 1)[0] if "/" in entry.id else "openmlx"
        try:
            created = int(entry.path.stat().st_mtime)
        except OSError:
            created = 0
        split = self.shard_plan if runner is not None and self.lockstep is not None else None
        return ModelInfo(entry.id, created, owner, p.type, p.context_length, p.size_bytes,
                         p.runnable, p.reason, self.residency.loaded(entry.id), entry.path, entry.source,
                         p.architecture, runner.dtype if runner else None, runner.dtype_reason or None if runner else None,
                         p.embedding_dim, split.world_size if split else 1, split.mode if split else None)

    def list_models(self, include_unusable: bool = False) -> list[ModelInfo]:
        """Known models, loaded ones first; folders that can't run only when asked for."""
        infos = [self._info(e, probe(e.path)) for e in self.store.entries()]
        infos = [i for i in infos if include_unusable or i.runnable]
        return sorted(infos, key=lambda i: (not i.loaded, i.id != self.default_model_id, i.id))

    def model_info(self, model_id: str) -> ModelInfo:
        """One model by id (404 if unknown)."""
        entry = self.store.resolve(model_id)
        return self._info(entry, probe(entry.path))

    # --- residency (Ollama's keep_alive, /api/ps) ----------------------------------------
    async def keep(self, model_id: str, seconds: float) -> None:
        """Keep a loaded model for `seconds` more (math.inf: until the server stops; 0 or less:
        unload it now, once the streams running on the worker have ended)."""
        await self.scheduler.call(lambda: self.residency.keep(model_id, seconds), exclusive=lambda: seconds <= 0)

    def resident(self) -> list[Resident]:
        """The loaded models with their size in memory and when each is unloaded (from the event
        loop: reads of the residency's dicts, as health() does)."""
        now_mono, now_wall = time.monotonic(), time.time()
        idle = self.config.idle_unload_s
        out = []
        models = [(m, getattr(r, "memory", None)) for m, r in list(self.residency.runners.items())] \
            + [(m, None) for m in list(self.residency.embedders)] + [(m, None) for m in list(self.residency.transcribers)]
        for model_id, memory in models:
            deadline = self.residency.expires.get(model_id)
            if deadline is None and idle:
                deadline = self.residency.last_used + idle
            expires = None if deadline is None or deadline == math.inf else now_wall + (deadline - now_mono)
            try:
                info = self.model_info(model_id)
            except EngineError:
                continue
            size = int(getattr(memory, "weights", 0) or 0) or info.size_bytes
            out.append(Resident(model_id, info, size, expires))
        return out

    def describe(self, model_id: str) -> tuple[ModelInfo, ModelCard]:
        """A model's info and card (template, capabilities, parameter count); 404 if unknown."""
        entry = self.store.resolve(model_id)
        p = probe(entry.path)
        return self._info(entry, p), card(p)

    async def load(self, model_id: str) -> bool:
        """Make a model resident without generating (Ollama's empty request); True if it was
        loaded now. Text and vision models go through the same memory gate and --max-models
        LRU as any request; embedding models load as on first use."""
        def work() -> bool:
            was = self.residency.loaded(model_id)
            if self.residency.kind(model_id) == "embedding":
                self.residency.embedder(model_id)
            else:
                self.residency.runner(model_id)
            return not was

        await self.ensure_model(model_id)
        return await self.scheduler.call(work, exclusive=lambda: self.residency.needs_switch(model_id))

    async def unload(self, model_id: str) -> bool:
        """Unload a model now (after the running streams); False if it was not loaded."""
        return await self.scheduler.call(lambda: self.residency.unload_any(model_id), exclusive=lambda: True)

    async def pull(self, name: str) -> str:
        """Fetch ORG/NAME from the Hugging Face Hub into the store (--allow-download), through the
        download queue; the model's id. 403 without --allow-download, 400 for a name that is not a
        Hub repo."""
        if not self.config.hub_download:
            raise EngineError("Pulling models is off on this server; start it with --allow-download (or use "
                              "`openmlx pull ORG/NAME`).", code="downloads_disabled", status=403)
        source = self._hub_source(name)
        if source is None:
            raise InvalidRequest(f"'{name}' is not a Hugging Face repo id (ORG/NAME); openmlx pulls from the Hub, "
                                 "not from Ollama's library.", param="model")
        await self.downloads.ensure(source, name)
        return self.store.resolve(name).id

    def alias(self, name: str, model_id: str) -> None:
        """Serve `model_id` under `name` too (Ollama's /api/copy; kept until restart). The copy is
        the same model: loaded once, whichever name a request uses."""
        entry = self.store.resolve(model_id)
        if name == entry.id:
            return
        self.store.copies[name] = entry.id

    async def delete(self, model_id: str) -> list[Path]:
        """Remove a copy (/api/copy's name), or unload a model and delete its folder from openmlx's store or the
        Hugging Face cache; the folders removed."""
        if model_id in self.store.copies:
            del self.store.copies[model_id]
            return []
        entry = self.store.resolve(model_id)
        if entry.source in ("local", "config") or entry.id in self.store.copies.values():
            raise InvalidRequest(f"'{model_id}' is served from a folder given on the command line or in the config "
                                 "file, or has copies (delete those first); openmlx does not delete it.",
                                 param="model", code="model_not_deletable")
        if entry.id in (self.default_model_id, self.default_embedding_id, self.default_audio_id):
            raise InvalidRequest(f"'{model_id}' is one of this server's default models and stays.", param="model",
                                 code="model_not_deletable")
        from engine.models import hub

        await self.unload(entry.id)
        return await asyncio.to_thread(hub.remove, entry.id, self.config.models_dir, self.config.hf_cache)

    # --- fetching a missing model (--allow-download) --------------------------------------
    async def ensure_model(self, model_id: str) -> None:
        """With `--allow-download`, fetch a requested ORG/NAME (or a configured id whose source is
        one) that is not in the store from the Hugging Face Hub first, in the download queue
        (engine/models/downloads.py); the checks in engine/models/hub.py run before any weights
        are fetched. Otherwise nothing."""
        if self.config.hub_download and not self.residency.loaded(model_id):  # loaded: nothing to scan
            source = self._hub_source(model_id)
            if source is not None:
                await self.downloads.ensure(source, model_id)

    def _in_use(self, folder: Path) -> bool:
        """Is a loaded model (or a configured one) served from `folder`? The store quota keeps it."""
        ids = [*self.residency.runners, *self.residency.embedders, *self.residency.transcribers,
               *(m.served_id for m in self.config.models)]
        for model_id in ids:
            try:
                if self.store.resolve(model_id).path == folder:
                    return True
            except EngineError:
                continue
        return False

    def _hub_source(self, model_id: str) -> Optional[str]:
        """The Hub repo a model id is fetched from, or None when it names no repo."""
        settings = self.config.settings_for(model_id)
        source = settings.source if settings else model_id
        if "/" not in source or "@" in source or Path(source).expanduser().is_dir():
            return None
        return source

    def _fetch_missing(self, model_id: str) -> None:
        source = self._hub_source(model_id)
        if source is not None:
            self.downloads.fetch_now(source, model_id)
