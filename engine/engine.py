"""The engine facade handlers talk to: models, health, prepare and stream generations.

A request's path: `prepare(conversation)` (or `prepare_completion`) runs on the worker: the
modality rule, the model made resident (engine/residency.py), the runner's `plan` (template,
media, grammar, budget); `stream(prepared)` queues the runner's `run`. Which runner serves a
model is engine/runners.py's business; nothing here depends on its kind. Listing, describing,
keeping, pulling, copying and deleting models is the facade's too, written in
engine/model_manager.py (`ModelManager`, which `Engine` extends).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Awaitable, Callable, Optional, Sequence

import numpy as np

from engine.cpu import blas
from engine.media.audio import AudioRunner, TranscribeOptions, check_audio_header, decode_audio
# Values and checks handlers use, named here so that they import only the facade:
from engine.addresses import Network, address_allowed  # noqa: F401  (image URLs' addresses)
from engine.constrained.structured import grammar_for, schema_problem  # noqa: F401  (schemas checked early)
from engine.media.audio import TranscriptDelta, TranscriptDone  # noqa: F401  (a transcription's events)
from engine.generation.budget import BudgetPolicy
# The API-neutral answer (events, tool calls and thinking split out) handlers encode: reached here.
from engine.generation import answer  # noqa: F401
from engine.generation.answer import Answer, AnswerStream, split_answer  # noqa: F401
from engine.config import EngineConfig
from engine.models.default_model import (DEFAULT_AUDIO_ID, DEFAULT_EMBEDDING_ID, DEFAULT_MODEL_ID, DefaultModelUnavailable,
                                  ensure_default_audio_model, ensure_default_embedding_model, ensure_default_model)
from engine.distributed import GroupFailed, Lockstep, LockstepRunner, ShardPlan, join_group
from engine.media import rerank as ranking
from engine.media.embeddings import BATCH, Embeddings
from engine.errors import EngineError, InvalidRequest
from engine.models.downloads import Downloads
from engine.model_card import ModelCard, size_label  # noqa: F401  (Ollama's cards and size labels)
from engine.models.memory import MemoryGate
from engine.request import CacheScope, Conversation, Prepared
from engine.residency import MlxMemory, Residency, mlx_memory
from engine.models.resolution import ModelStore, locate
from engine.scheduler import Scheduler, StreamHandle
from engine.generation.text import ChatMessage, SamplingParams
from engine.model_manager import ModelInfo, ModelManager, Resident  # noqa: F401  (handlers' model values)

log = logging.getLogger("openmlx.engine")
LoadMedia = Callable[[list[ChatMessage]], Awaitable[list[ChatMessage]]]


@dataclass(frozen=True)
class Health:
    status: str  # "ok" | "shutting_down"
    model: Optional[str]
    uptime_s: float
    blas: blas.BlasInfo
    device: str
    queued: int
    prompt_cache_hits: int
    batch_peak: Optional[int] = None  # with batched decoding: the most streams decoded in one step
    world_size: int = 1
    sharding: Optional[str] = None
    prompt_cache_entries: int = 0  # the loaded model's prompt cache: entries and bytes in memory, bytes on disk
    prompt_cache_bytes: int = 0
    prompt_cache_disk_bytes: int = 0
    decode: Optional[str] = None  # the loaded text model's path for a lone stream's decode steps
    prompt_cache_quantized: int = 0  # prompt cache entries held quantized (--kv-bits)


class Engine(ModelManager):
    """Finds, checks, loads and runs models; one instance per server."""

    def __init__(self, config: EngineConfig, gate: Optional[MemoryGate] = None) -> None:
        self.config = config
        self.store = ModelStore(config.models_dir, config.hf_cache, config.local_models,
                                {m.id: m.source for m in config.models if m.id})
        self.gate = gate or MemoryGate(override=config.available_memory_override)
        if config.draft_model:  # resolved once: a missing draft model is a start-up error
            config.draft_model = str(locate(self.store, config.draft_model).path)
        self.residency = Residency(config, self.store, self.gate)
        self.scheduler = Scheduler(config.max_queue, on_idle=self.residency.idle, timeout_s=config.request_timeout_s)
        self.budget = BudgetPolicy(config.default_max_tokens, config.max_tokens_cap, tuple(config.reasoning_budgets))
        self._started = time.monotonic()
        self.default_model_id: Optional[str] = None
        self.default_embedding_id: Optional[str] = None
        self.default_audio_id: Optional[str] = None
        self.default_rerank_id: Optional[str] = None
        self.lockstep: Optional[Lockstep] = None  # set when this is rank 0 of a distributed group
        self.shard_plan: Optional[ShardPlan] = None
        self._decoding = asyncio.Semaphore(1)  # audio uploads decoded one at a time, off the worker
        self.downloads = Downloads(self.store, config.models_dir, self.gate, config.download_timeout_s,
                                   config.max_waiting_downloads, config.max_store_bytes, self._in_use)
        import mlx.core as mx

        self._device = str(mx.default_device())

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker and preload the configured (or default) model; raises on failure.
        The embedding model is made available (listed, loaded on first use); if it can't be, the
        server still starts and says why."""
        self.scheduler.start()
        for m in self.config.models:  # a config file's GGUF sources: converted into the store once, now
            if m.is_gguf:
                self.store.aliases[m.served_id] = str(locate(self.store, m.source).path)
        if self.config.model is not None and self.config.hub_download:  # a Hub id to preload: fetch it first
            self._fetch_missing(self.config.model)
        self.default_model_id = self._model_id(self.config.model, ensure_default_model, DEFAULT_MODEL_ID)
        self.residency.default_ids["text"] = self.default_model_id
        if self.config.world_size > 1:
            self.scheduler.run_sync(self._load_sharded)
        self.scheduler.run_sync(lambda: self.residency.runner(self.default_model_id))
        try:
            self.default_embedding_id = self._side_id(self.config.embedding_model, ensure_default_embedding_model,
                                                      DEFAULT_EMBEDDING_ID)
        except (EngineError, DefaultModelUnavailable, OSError) as e:
            log.warning("no embedding model: %s", getattr(e, "message", e))
        try:
            self.default_audio_id = self._side_id(self.config.audio_model, ensure_default_audio_model,
                                                  DEFAULT_AUDIO_ID)
        except (EngineError, DefaultModelUnavailable, OSError, ValueError) as e:
            log.warning("no speech-to-text model: %s", getattr(e, "message", e))
        self.residency.default_ids.update(embedding=self.default_embedding_id, audio=self.default_audio_id)
        self.default_rerank_id = locate(self.store, self.config.rerank_model).id if self.config.rerank_model \
            else self.default_embedding_id

    def _side_id(self, spec: Optional[str], ensure_default: Callable[..., Path], default_id: str) -> Optional[str]:
        return None if spec == "none" else self._model_id(spec, ensure_default, default_id)

    def _load_sharded(self) -> None:
        """Rank 0: join the group and load this rank's shard (the other ranks do the same)."""
        entry = self.store.resolve(self.default_model_id)
        rank = join_group(entry.id, entry.path, self.config.world_size, self.config.shard, self.config.backend,
                          self.gate, self.config.prompt_cache_settings())
        self.shard_plan, self.lockstep = rank.plan, rank.lockstep
        self.residency.add(entry.id, LockstepRunner(rank.runner, rank.lockstep))
        self.residency.pinned = entry.id
        log.info("rank 0 of %d: %s split by %s parallelism", rank.lockstep.size, entry.id, rank.plan.mode)

    def mark_failed(self, reason: str) -> None:
        """A rank died (the supervisor says so, or a collective did): 503 until restarted."""
        if self.lockstep is not None:
            self.lockstep.fail(reason)
            self.scheduler.abort(GroupFailed(reason))

    def _check_group(self) -> None:
        if self.lockstep is not None and self.lockstep.failed:
            raise GroupFailed(self.lockstep.failed)

    def _model_id(self, spec: Optional[str], ensure_default: Callable[..., Path], default_id: str) -> str:
        """The id for a CLI model spec: the embedded default (prepared on first use), a local
        folder (registered under its name), or an id from the store."""
        if spec is None:
            ensure_default(self.config.models_dir, self.config.home, allow_download=self.config.allow_download)
            return default_id
        return locate(self.store, spec).id

    def begin_shutdown(self, reason: str = "The server is shutting down.") -> None:
        """Refuse new requests (503) and end running streams with an error event; non-blocking."""
        if not self.scheduler.closing:
            log.info("shutting down: %s", reason)
            self.scheduler.close(reason)

    def stop(self) -> None:
        """Shut down and wait for the worker to finish (and tell the other ranks to stop)."""
        self.begin_shutdown()
        self.downloads.close()
        self.scheduler.stop()
        if self.lockstep is not None and not self.lockstep.failed:
            try:  # the worker thread is gone: nothing else issues collectives now
                self.lockstep.command("shutdown")
            except EngineError:
                pass

    # --- health ------------------------------------------------------------------------
    def health(self) -> Health:
        """From the event loop: in-memory state only, no MLX call (the worker may hold MLX)."""
        current = self.residency.current  # one read: the worker may replace it meanwhile
        loaded = current.model_id if current else None
        cache = current.prompt_cache if current is not None else None  # None: no model loaded
        hits = cache.hits if cache is not None else 0
        decoder = current.decoder if current is not None else None
        status = "rank_failed" if self.lockstep is not None and self.lockstep.failed else \
            "shutting_down" if self.scheduler.closing else "ok"
        plan = self.shard_plan
        entries, held, on_disk, quantized = cache.sizes() if cache is not None else (0, 0, 0, 0)
        return Health(status, loaded, time.monotonic() - self._started, blas.active(), self._device,
                      self.scheduler.load(), hits, decoder.peak if decoder is not None else None,
                      plan.world_size if plan else 1, plan.mode if plan else None, entries, held, on_disk,
                      current.decode_path if current is not None else None, quantized)

    def resident_models(self) -> int:
        return self.residency.count()

    def mlx_memory(self) -> MlxMemory:
        """MLX's active, peak and buffer-cache bytes (counter reads, safe beside the worker)."""
        return mlx_memory()

    # --- embeddings ----------------------------------------------------------------------
    async def embed(self, model_id: str, texts: list[str], dimensions: Optional[int] = None) -> Embeddings:
        """Embed `texts`, BATCH at a time, each batch its own short job on the worker, so
        embeddings never wait behind a long generation (and don't hold one up for long)."""
        embedder = await self.scheduler.call(lambda: self.residency.embedder(model_id))
        if dimensions is not None and dimensions != embedder.dim:
            raise InvalidRequest(f"The model '{model_id}' makes {embedder.dim}-dimensional embeddings and can't "
                                 f"shorten them; dimensions={dimensions} is not supported.", param="dimensions")
        parts = []
        for i in range(0, len(texts), BATCH):
            chunk = texts[i:i + BATCH]
            parts.append(await self.scheduler.call(lambda chunk=chunk: embedder.embed(chunk)))
        return Embeddings(np.concatenate([p.vectors for p in parts]), [n for p in parts for n in p.token_counts])

    # --- rerank --------------------------------------------------------------------------
    async def rerank(self, model_id: str, query: str, documents: Sequence[str],
                     max_tokens: Optional[int] = None) -> ranking.Ranking:
        """Each document's relevance to `query` (input order), by the model's kind: an embedding
        model's cosine, a cross-encoder's classifier, or a text model judging yes/no
        (engine/media/rerank.py). Each batch is its own short job on the worker; a judge's
        prompts together must fit `max_tokens` (--max-batch-tokens)."""
        kind = await self.scheduler.call(lambda: self.residency.kind(model_id))
        if kind == "embedding":
            embedder = await self.scheduler.call(lambda: self.residency.embedder(model_id))
            return await ranking.by_encoder(embedder, query, documents, self.scheduler.call)
        if kind == "text":
            runner = await self.scheduler.call(lambda: self.residency.runner(model_id),
                                               exclusive=lambda: self.residency.needs_switch(model_id))
            return await ranking.by_judge(runner, query, documents, self.scheduler.call, self.scheduler.call_in_passes,
                                          max_tokens)
        raise InvalidRequest(f"The model '{model_id}' is a {kind} model; rerank with an embedding model, a "
                             "cross-encoder or a text model.", param="model", code="model_not_reranker")

    # --- speech to text ------------------------------------------------------------------
    async def transcribe(self, model_id: str, audio: bytes, filename: str,
                         options: TranscribeOptions) -> StreamHandle:
        """Check the header and decode the audio off the worker (one upload at a time, so
        decoding never delays generation and concurrent uploads don't multiply memory), load the
        model on the worker, then queue the transcription: iterate the handle for
        TranscriptDelta events and one TranscriptDone."""
        limit = self.config.max_audio_seconds
        # The header first (a bomb is refused before it waits its turn), then the bounded decode.
        declared = await asyncio.to_thread(check_audio_header, audio, limit)
        async with self._decoding:
            samples = await asyncio.to_thread(decode_audio, audio, filename, "file", limit, declared)
        runner: AudioRunner = await self.scheduler.call(lambda: self.residency.transcriber(model_id))

        def run(cancelled: Callable[[], bool]):
            yield from runner.transcribe(samples, options, cancelled)
            self.residency.touch()

        return self.scheduler.submit_stream(run)

    # --- generation ----------------------------------------------------------------------
    def _modality(self, conv: Conversation) -> str:
        """The model's type; an image (audio) part in the newest user turn needs a vision (audio)
        model: a 400 naming one otherwise."""
        info = self.model_info(conv.model)
        for media, kind in (("image", "vision"), ("audio", "audio")):
            if media in conv.newest_media and info.type != kind:
                others = [m.id for m in self.list_models() if m.type == kind]
                hint = f"Use a {kind} model such as '{others[0]}'." if others else \
                    f"No {kind} model is available on this server."
                raise InvalidRequest(f"The model '{conv.model}' is a {info.type} model and the newest message has "
                                     f"an {media} part. {hint}", param=conv.fields.media, code="model_not_multimodal")
        return info.type

    def _defaults(self, model_id: str, params: SamplingParams) -> tuple[SamplingParams, BudgetPolicy]:
        """The request's sampling with the model's configured defaults where the request set
        nothing (temperature: the model's, else OpenAI's 1.0), and the token budget's default."""
        settings = self.config.settings_for(model_id)
        if params.temperature is None:
            params = replace(params, temperature=settings.temperature if settings and settings.temperature is not None
                             else 1.0)
        if settings and settings.max_tokens is not None:
            return params, replace(self.budget, default=settings.max_tokens)
        return params, self.budget

    async def prepare(self, conv: Conversation, load_media: Optional[LoadMedia] = None) -> Prepared:
        """Check the modality, make the model resident, plan the request (chat template, tools,
        images, token budget), all on the worker. A vision model's images are loaded first by
        `load_media` (fetching is the API layer's: it knows URLs and flags)."""
        await self.ensure_model(conv.model)
        checked = False
        if load_media is not None and any(m.images for m in conv.messages):
            checked = True
            if await self.scheduler.call(lambda: self._modality(conv)) == "vision":
                conv = replace(conv, messages=await load_media(conv.messages))

        def work() -> Prepared:
            self._check_group()
            if not checked:
                self._modality(conv)
            params, budget = self._defaults(conv.model, conv.params)
            prepared = self.residency.runner(conv.model).plan(replace(conv, params=params), budget)
            return replace(prepared, cache=conv.cache)

        return await self.scheduler.call(work, exclusive=lambda: self.residency.needs_switch(conv.model))

    async def count_tokens(self, conv: Conversation) -> int:
        """Prompt tokens the conversation takes with the model's own template and tokenizer."""
        await self.ensure_model(conv.model)

        def work() -> int:
            self._modality(conv)
            return self.residency.runner(conv.model).count_tokens(conv)

        return await self.scheduler.call(work, exclusive=lambda: self.residency.needs_switch(conv.model))

    async def prepare_completion(self, model_id: str, prompt: str | Sequence[int], params: SamplingParams,
                                 echo: bool = False, cache: CacheScope = CacheScope()) -> Prepared:
        """Load the model if needed, tokenize the prompt (or check its token ids against the
        vocabulary), check the budget. With `echo`, max_tokens 0 (score only) is allowed. `cache`:
        whose prompt cache entries it may reuse."""
        await self.ensure_model(model_id)

        def work() -> Prepared:
            self._check_group()
            filled, budget = self._defaults(model_id, params)
            return replace(self.residency.runner(model_id).plan_completion(prompt, filled, budget, echo), cache=cache)

        return await self.scheduler.call(work, exclusive=lambda: self.residency.needs_switch(model_id))

    async def share_prefill(self, prepared: Prepared, score_top: Optional[int] = None) -> Prepared:
        """Prefill the prompt once on the worker (every stream of the result starts from a copy:
        `n` choices process the prompt once); with `score_top` not None, also score each prompt
        token with that many alternatives (`echo` with `logprobs`)."""
        return await self.scheduler.call_in_passes(lambda: prepared.runner.share_prefill(prepared, score_top))

    def stream(self, prepared: Prepared) -> StreamHandle:
        """Queue the generation; iterate the handle for TextDelta events and one Finished."""
        self._check_group()
        runner = prepared.runner

        def run(cancelled: Callable[[], bool]):
            yield from runner.run(prepared, cancelled)
            self.residency.touch()

        return self.scheduler.submit_stream(run)
