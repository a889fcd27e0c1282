"""Which models are loaded, on the worker thread: text and vision runners (least recently used
out beyond `--max-models`, all out after `--idle-unload`), and the side models (embeddings,
speech to text), loaded on first use and kept. Each load is probed, policy-checked and
memory-gated first; /health reads `current` from the event loop (one attribute read).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

from engine import runners
from engine.models.hub import mark_used
from engine.media.audio import AudioRunner
from engine.config import EngineConfig
from engine.media.embeddings import BertEmbedder
from engine.errors import InvalidRequest
from engine.models.memory import MemoryEstimate, MemoryGate
from engine.models.policy import decide_runnable
from engine.models.probe import Probe, probe
from engine.models.resolution import ModelStore

log = logging.getLogger("openmlx.engine")


class Residency:
    def __init__(self, config: EngineConfig, store: ModelStore, gate: MemoryGate) -> None:
        self.config = config
        self.store = store
        self.gate = gate
        self.max_models = max(1, config.max_models)
        self.runners: "OrderedDict[str, runners.Runner]" = OrderedDict()
        self.embedders: dict[str, BertEmbedder] = {}
        self.transcribers: dict[str, AudioRunner] = {}
        self.current: Optional[Any] = None  # the most recently used runner (for /health)
        self.last_used = time.monotonic()
        self._released = self.last_used  # when idle memory was last handed back
        self.pinned: Optional[str] = None  # a distributed group's model: the only one served
        self.default_ids: dict[str, Optional[str]] = {"text": None, "embedding": None, "audio": None}
        # Ollama's keep_alive: model id -> when (time.monotonic) it is unloaded; math.inf: never.
        # Set when an Ollama request ends, dropped when any request uses the model: a model
        # without an entry follows --idle-unload (the OpenAI routes' rule).
        self.expires: dict[str, float] = {}

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def count(self) -> int:
        return len(self.runners) + len(self.embedders) + len(self.transcribers)

    def loaded(self, model_id: str) -> bool:
        return model_id in self.runners or model_id in self.embedders or model_id in self.transcribers

    def keep(self, model_id: str, seconds: float) -> None:
        """Keep a loaded model for `seconds` from now (math.inf: until the server stops; 0: unload
        it now). Nothing happens to a model that is not loaded."""
        if not self.loaded(model_id):
            return
        if seconds <= 0:
            self.unload_any(model_id)
            return
        self.expires[model_id] = time.monotonic() + seconds if math.isfinite(seconds) else math.inf

    def unload_any(self, model_id: str) -> bool:
        """Unload a text, vision, embedding or speech model; False if it was not loaded. The model
        a distributed group runs stays."""
        self.expires.pop(model_id, None)
        if model_id in self.runners and model_id != self.pinned:
            self.unload(model_id)
            return True
        for side in (self.embedders, self.transcribers):
            if side.pop(model_id, None) is not None:
                gc.collect()
                release_memory()
                log.info("unloaded %s", model_id)
                return True
        return False

    def needs_switch(self, model_id: str) -> bool:
        """Would using `model_id` unload another model (so running streams must finish first)?"""
        return model_id not in self.runners and len(self.runners) >= self.max_models

    def add(self, model_id: str, runner: Any) -> None:
        self.runners[model_id] = self.current = runner

    # --- generating models -----------------------------------------------------------------
    def runner(self, model_id: str) -> runners.Runner:
        """The loaded runner for a text or vision model (loaded now if needed)."""
        self.touch()
        self.expires.pop(model_id, None)  # in use: an Ollama request sets a new keep_alive when it ends
        found = self.runners.get(model_id)
        if found is not None:
            self.runners.move_to_end(model_id)
            self.current = found
            return found
        entry = self.store.resolve(model_id)
        if entry.id != model_id:  # another name of the model (`name:latest`): one copy, under its id
            return self.runner(entry.id)
        mark_used(entry.path)  # a downloaded model used now is the last the store quota would remove
        if self.pinned is not None:
            raise InvalidRequest(f"This server runs '{self.pinned}' split over {self.config.world_size} ranks and "
                                 "serves no other text model.", param="model")
        p = probe(entry.path)
        self._refuse_side_kinds(model_id, p)
        decision = decide_runnable(model_id, p, serves=tuple(runners.LOADERS))
        decision.raise_if_blocked()
        while len(self.runners) >= self.max_models:
            self.unload(next(iter(self.runners)))
        loaded = runners.load(model_id, p, self.config, self.gate)
        loaded.warnings = decision.warnings + loaded.warnings
        self.add(model_id, loaded)
        return loaded

    def _refuse_side_kinds(self, model_id: str, p: Probe) -> None:
        if p.type == "embedding":
            default = self.default_ids["text"]
            hint = f" such as '{default}'" if default else ""
            raise InvalidRequest(f"The model '{model_id}' is an embedding model: use it with /v1/embeddings, "
                                 f"and chat or complete with a text model{hint}.", param="model",
                                 code="model_not_chat")
        if p.type == "audio":
            raise InvalidRequest(f"The model '{model_id}' is a speech-to-text model: send audio to "
                                 "/v1/audio/transcriptions (chat with audio parts is not supported).",
                                 param="model", code="model_not_chat")

    def unload(self, model_id: str) -> None:
        import mlx.core as mx

        runner = self.runners.pop(model_id)
        self.expires.pop(model_id, None)
        if self.current is runner:
            self.current = None
        freed = runner.memory.weights
        runner.close()
        del runner
        gc.collect()
        mx.clear_cache()
        if freed >= 256 << 20:  # small models come back at once and are lost in the noise
            self.gate.wait_for_release(freed, timeout=5.0)
        log.info("unloaded %s", model_id)

    def idle(self) -> None:
        """Worker idle hook: unload models nobody used for `--idle-unload` seconds; a second
        after the last use, hand the memory the last requests needed back to the system."""
        limit = self.config.idle_unload_s
        if limit and self.runners and time.monotonic() - self.last_used > limit:
            for model_id in list(self.runners):
                if model_id not in self.expires:  # a keep_alive of its own decides for that one
                    self.unload(model_id)
        now = time.monotonic()
        for model_id, deadline in list(self.expires.items()):
            if deadline <= now:
                self.unload_any(model_id)
        if self.last_used > self._released and time.monotonic() - self.last_used > 1.0:
            self._released = time.monotonic()
            release_memory()

    def kind(self, model_id: str) -> str:
        """What the model is (the probe's type: text, vision, embedding, audio, unknown)."""
        if model_id in self.embedders:
            return "embedding"
        return probe(self.store.resolve(model_id).path).type

    # --- side models -----------------------------------------------------------------------
    def _side(self, model_id: str, kind: str, loaded: dict, label: str, code: str,
              load: Callable[[Probe], Any]) -> Any:
        self.expires.pop(model_id, None)
        found = loaded.get(model_id)
        if found is not None:
            return found
        entry = self.store.resolve(model_id)
        p = probe(entry.path)
        if p.type != kind:
            default = self.default_ids[kind]
            hint = f" such as '{default}'" if default else ""
            raise InvalidRequest(f"The model '{model_id}' is a {p.type} model, not {label}; use {label}{hint}.",
                                 param="model", code=code)
        decide_runnable(model_id, p, serves=(kind,)).raise_if_blocked()
        loaded[model_id] = load(p)
        return loaded[model_id]

    def embedder(self, model_id: str) -> BertEmbedder:
        def load(p: Probe) -> BertEmbedder:
            self.gate.check(model_id, MemoryEstimate(p.size_bytes, 64 << 20))  # + activations of a batch
            return BertEmbedder(model_id, p.path, config=p.config)

        return self._side(model_id, "embedding", self.embedders, "an embedding model", "model_not_embedding", load)

    def transcriber(self, model_id: str) -> AudioRunner:
        return self._side(model_id, "audio", self.transcribers, "a speech-to-text model", "model_not_audio",
                          lambda p: AudioRunner.load(model_id, p, self.gate))


def release_memory() -> None:
    """MLX's buffer cache and glibc's free lists back to the system. After 64 concurrent streams
    the process kept ~6 GB of freed KV-cache buffers until it was restarted."""
    import mlx.core as mx

    mx.clear_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@dataclass(frozen=True)
class MlxMemory:
    """MLX's own accounting, in bytes: arrays alive now, the most ever alive at once, and freed
    buffers it keeps for reuse. The process's RSS follows `peak` rather than `active` while
    requests keep coming (glibc keeps the heap's high-water mark) until `release_memory` runs,
    a second after the last request."""
    active: int
    peak: int
    cache: int


def mlx_memory() -> MlxMemory:
    """Read from any thread (the allocator's counters); zeros before MLX is first imported."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return MlxMemory(0, 0, 0)
    return MlxMemory(int(mx.get_active_memory()), int(mx.get_peak_memory()), int(mx.get_cache_memory()))
