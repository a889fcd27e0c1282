"""The engine facade handlers talk to: models, health, prepare and stream generations."""
from __future__ import annotations

import asyncio
import gc
import os
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from engine import blas
from engine.audio import AudioRunner, TranscribeOptions, check_audio_header, decode_audio
from engine.batching import BatchDecoder
from engine.config import EngineConfig
from engine.default_model import (DEFAULT_AUDIO_ID, DEFAULT_EMBEDDING_ID, DEFAULT_MODEL_ID, DefaultModelUnavailable,
                                  ensure_default_audio_model,
                                  ensure_default_embedding_model, ensure_default_model)
from engine.distributed import GroupFailed, Lockstep, ShardPlan, join_group, lockstep_stream, with_seed
from engine.embeddings import BATCH, BertEmbedder, Embeddings
from engine.errors import EngineError, InvalidRequest
from engine.memory import MemoryEstimate, MemoryGate
from engine.policy import decide_runnable
from engine.probe import Probe, probe
from engine.resolution import ModelEntry, ModelStore, locate
from engine.scheduler import Scheduler, StreamHandle
from engine.scoring import Prefix, prefill
from engine.text import (ChatMessage, Finished, SamplingParams, Started, TextDelta, TextRunner, TokenLogprob,
                         _eos_ids)
from engine.toolcalls import ToolFormat
from engine.tools import ToolCall, ToolChoice, ToolSpec
from engine.vision import VisionPlan, VisionRunner

log = logging.getLogger("openmlx.engine")


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
    embedding_dim: Optional[int] = None
    world_size: int = 1  # ranks the loaded model is split over
    sharding: Optional[str] = None  # "tensor" | "pipeline" when split


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


@dataclass(frozen=True)
class Prepared:
    """A request that passed every check and is ready to generate."""

    model_id: str
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    runner: TextRunner
    raw_text: bool = False  # a text completion (keeps the first token's leading space)
    vision: Optional[VisionPlan] = None  # a vision model's passes (prompt is then unused)
    prefix: Optional[Prefix] = None  # a shared prefill of the prompt (n choices, echoed logprobs)

    @property
    def prompt_logprobs(self) -> tuple[TokenLogprob, ...]:
        """Each prompt token's log probability (after `Engine.share_prefill` with scoring)."""
        return self.prefix.logprobs if self.prefix is not None else ()

    def prompt_text(self) -> str:
        """The prompt as text (what `echo` puts before a completion)."""
        return self.runner.tokenizer.decode(self.prompt)

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.runner.warnings

    def split_calls(self, text: str) -> tuple[str, list[ToolCall]]:
        """The text and the tool calls in it, in this model's format."""
        return self.runner.split_calls(text)

    @property
    def tool_format(self) -> ToolFormat:
        return self.runner.tool_format[0]


class FaultyRunner:
    """A runner that fails half-way through each generation, as a bug in a model or kernel
    would (the error paths' tests; see OPENMLX_FAULT_MAX_TOKENS). Everything else is the runner's."""

    def __init__(self, runner: TextRunner) -> None:
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def generate(self, prompt: list[int], max_tokens: int, *args: Any, **kwargs: Any) -> Iterator[Any]:
        sent = 0
        for event in self._runner.generate(prompt, max_tokens, *args, **kwargs):
            yield event
            sent += isinstance(event, TextDelta)
            if sent > max_tokens // 2:
                raise RuntimeError("injected fault (OPENMLX_FAULT_MAX_TOKENS)")


class Engine:
    """Finds, checks, loads and runs models; one instance per server."""

    def __init__(self, config: EngineConfig, gate: Optional[MemoryGate] = None) -> None:
        self.config = config
        self.store = ModelStore(config.models_dir, config.hf_cache, config.local_models)
        self.gate = gate or MemoryGate(override=config.available_memory_override)
        self.scheduler = Scheduler(config.max_queue, on_idle=self._idle, timeout_s=config.request_timeout_s)
        self.max_models = max(1, config.max_models)
        self._last_used = time.monotonic()
        self._runners: "OrderedDict[str, TextRunner]" = OrderedDict()
        self._embedders: dict[str, BertEmbedder] = {}
        self._transcribers: dict[str, AudioRunner] = {}
        self.default_embedding_id: Optional[str] = None
        self.default_audio_id: Optional[str] = None
        # The most recently used runner, for /health (read from the event loop, set by the worker).
        self._current: Optional[TextRunner] = None
        self._started = time.monotonic()
        self.default_model_id: Optional[str] = None
        self.lockstep: Optional[Lockstep] = None  # set when this is rank 0 of a distributed group
        self.shard_plan: Optional[ShardPlan] = None
        self._stream_ids = 0
        # Tests only: a generation whose max_tokens equals this fails half-way (FaultyRunner).
        self._fault_max_tokens = int(os.environ.get("OPENMLX_FAULT_MAX_TOKENS", "0") or 0) or None
        self._decoding = asyncio.Semaphore(1)  # audio uploads decoded one at a time, off the worker
        import mlx.core as mx

        self._device = str(mx.default_device())

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker and preload the configured (or default) model; raises on failure.
        The embedding model is made available (listed, loaded on first use); if it can't be, the
        server still starts and says why."""
        self.scheduler.start()
        self.default_model_id = self._preload_id()
        if self.config.world_size > 1:
            self.scheduler.run_sync(self._load_sharded)
        self.scheduler.run_sync(lambda: self._ensure_loaded(self.default_model_id))
        try:
            self.default_embedding_id = self._embedding_id()
        except (EngineError, DefaultModelUnavailable, OSError) as e:
            log.warning("no embedding model: %s", getattr(e, "message", e))
        try:
            self.default_audio_id = self._audio_id()
        except (EngineError, DefaultModelUnavailable, OSError, ValueError) as e:
            log.warning("no speech-to-text model: %s", getattr(e, "message", e))

    def _audio_id(self) -> Optional[str]:
        if self.config.audio_model == "none":
            return None
        return self._model_id(self.config.audio_model, ensure_default_audio_model, DEFAULT_AUDIO_ID)

    def _load_sharded(self) -> None:
        """Rank 0: join the group and load this rank's shard (the other ranks do the same)."""
        entry = self.store.resolve(self.default_model_id)
        rank = join_group(entry.id, entry.path, self.config.world_size, self.config.shard, self.config.backend,
                          self.gate)
        self.shard_plan, self.lockstep = rank.plan, rank.lockstep
        self._runners[entry.id] = self._current = rank.runner
        log.info("rank 0 of %d: %s split by %s parallelism", rank.lockstep.size, entry.id, rank.plan.mode)

    def mark_failed(self, reason: str) -> None:
        """A rank died (the supervisor says so, or a collective did): 503 until restarted."""
        if self.lockstep is not None:
            self.lockstep.fail(reason)
            self.scheduler.abort(GroupFailed(reason))

    def _check_group(self) -> None:
        if self.lockstep is not None and self.lockstep.failed:
            raise GroupFailed(self.lockstep.failed)

    def _embedding_id(self) -> Optional[str]:
        if self.config.embedding_model == "none":
            return None
        return self._model_id(self.config.embedding_model, ensure_default_embedding_model, DEFAULT_EMBEDDING_ID)

    def _preload_id(self) -> str:
        return self._model_id(self.config.model, ensure_default_model, DEFAULT_MODEL_ID)

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
        self.scheduler.stop()
        if self.lockstep is not None and not self.lockstep.failed:
            try:  # the worker thread is gone: nothing else issues collectives now
                self.lockstep.command("shutdown")
            except EngineError:
                pass

    # --- models --------------------------------------------------------------------------
    def _info(self, entry: ModelEntry, p: Probe) -> ModelInfo:
        runner = self._runners.get(entry.id)
        owner = entry.id.split("/", 1)[0] if "/" in entry.id else "openmlx"
        try:
            created = int(entry.path.stat().st_mtime)
        except OSError:
            created = 0
        loaded = runner is not None or entry.id in self._embedders or entry.id in self._transcribers
        split = self.shard_plan if runner is not None and self.lockstep is not None else None
        return ModelInfo(entry.id, created, owner, p.type, p.context_length, p.size_bytes,
                         p.runnable, p.reason, loaded, entry.path, entry.source,
                         p.architecture, runner.dtype if runner else None, p.embedding_dim,
                         split.world_size if split else 1, split.mode if split else None)

    def list_models(self, include_unusable: bool = False) -> list[ModelInfo]:
        """Known models, loaded ones first; folders that can't run only when asked for."""
        infos = [self._info(e, probe(e.path)) for e in self.store.entries()]
        infos = [i for i in infos if include_unusable or i.runnable]
        return sorted(infos, key=lambda i: (not i.loaded, i.id != self.default_model_id, i.id))

    def model_info(self, model_id: str) -> ModelInfo:
        """One model by id (404 if unknown)."""
        entry = self.store.resolve(model_id)
        return self._info(entry, probe(entry.path))

    def health(self) -> Health:
        """From the event loop: in-memory state only, no MLX call (the worker may hold MLX)."""
        current = self._current  # one read: the worker may replace it meanwhile
        loaded = current.model_id if current else None
        hits = current.prompt_cache.hits if current else 0
        peak = current.decoder.peak if current is not None and current.decoder is not None else None
        status = "rank_failed" if self.lockstep is not None and self.lockstep.failed else \
            "shutting_down" if self.scheduler.closing else "ok"
        plan = self.shard_plan
        return Health(status, loaded, time.monotonic() - self._started, blas.active(), self._device,
                      self.scheduler.load(), hits, peak, plan.world_size if plan else 1, plan.mode if plan else None)

    def resident_models(self) -> int:
        return len(self._runners) + len(self._embedders) + len(self._transcribers)

    # --- loading (worker thread only) -----------------------------------------------------
    def _needs_switch(self, model_id: str) -> bool:
        return model_id not in self._runners and len(self._runners) >= self.max_models

    def _idle(self) -> None:
        """Worker idle hook: unload models nobody used for `idle_unload_s`."""
        limit = self.config.idle_unload_s
        if limit and self._runners and time.monotonic() - self._last_used > limit:
            for model_id in list(self._runners):
                self._unload(model_id)

    def _ensure_loaded(self, model_id: str) -> TextRunner:
        self._last_used = time.monotonic()
        runner = self._runners.get(model_id)
        if runner is not None:
            self._runners.move_to_end(model_id)
            self._current = runner
            return runner
        entry = self.store.resolve(model_id)
        if self.lockstep is not None:
            raise InvalidRequest(f"This server runs '{self.default_model_id}' split over {self.config.world_size} "
                                 f"ranks and serves no other text model.", param="model")
        p = probe(entry.path)
        if p.type == "embedding":
            hint = f" such as '{self.default_model_id}'" if self.default_model_id else ""
            raise InvalidRequest(f"The model '{model_id}' is an embedding model: use it with /v1/embeddings, "
                                 f"and chat or complete with a text model{hint}.", param="model",
                                 code="model_not_chat")
        if p.type == "audio":
            raise InvalidRequest(f"The model '{model_id}' is a speech-to-text model: send audio to "
                                 "/v1/audio/transcriptions (chat with audio parts is not supported).",
                                 param="model", code="model_not_chat")
        decision = decide_runnable(model_id, p, serves=("text", "vision"))
        decision.raise_if_blocked()
        while len(self._runners) >= self.max_models:
            self._unload(next(iter(self._runners)))
        if p.type == "vision":
            runner: TextRunner = VisionRunner.load(model_id, p, self.config.cpu_dtype, self.gate,
                                                   self.config.image_limits)
        else:
            runner = TextRunner.load(model_id, p, self.config.cpu_dtype, self.gate)
            if self.config.world_size == 1 and self.config.batch in ("on", "auto"):
                runner.decoder = BatchDecoder(runner.model, _eos_ids(runner.tokenizer))
        runner.warnings = decision.warnings + runner.warnings
        self._runners[model_id] = runner
        self._current = runner
        return runner

    def _unload(self, model_id: str) -> None:
        import mlx.core as mx

        runner = self._runners.pop(model_id)
        if self._current is runner:
            self._current = None
        freed = runner.memory.weights
        runner.prompt_cache.clear()
        if runner.decoder is not None:
            runner.decoder.close()
        del runner
        gc.collect()
        mx.clear_cache()
        if freed >= 256 << 20:  # small models come back at once and are lost in the noise
            self.gate.wait_for_release(freed, timeout=5.0)
        log.info("unloaded %s", model_id)

    # --- embeddings ----------------------------------------------------------------------
    def _side_model(self, model_id: str, kind: str, loaded: dict, default_id: Optional[str], label: str,
                    code: str, load: Callable[[ModelEntry, Probe], Any]) -> Any:
        """Worker thread: the loaded embedding or speech-to-text model for `model_id` (probed,
        policy-checked and memory-gated by `load`, loaded on first use, kept)."""
        found = loaded.get(model_id)
        if found is not None:
            return found
        entry = self.store.resolve(model_id)
        p = probe(entry.path)
        if p.type != kind:
            hint = f" such as '{default_id}'" if default_id else ""
            raise InvalidRequest(f"The model '{model_id}' is a {p.type} model, not {label}; use {label}{hint}.",
                                 param="model", code=code)
        decide_runnable(model_id, p, serves=(kind,)).raise_if_blocked()
        loaded[model_id] = load(entry, p)
        return loaded[model_id]

    def _embedder(self, model_id: str) -> BertEmbedder:
        def load(entry: ModelEntry, p: Probe) -> BertEmbedder:
            self.gate.check(model_id, MemoryEstimate(p.size_bytes, 64 << 20))  # + activations of a batch
            return BertEmbedder(model_id, entry.path)

        return self._side_model(model_id, "embedding", self._embedders, self.default_embedding_id,
                                "an embedding model", "model_not_embedding", load)

    async def embed(self, model_id: str, texts: list[str], dimensions: Optional[int] = None) -> Embeddings:
        """Embed `texts`, BATCH at a time, each batch its own short job on the worker, so
        embeddings never wait behind a long generation (and don't hold one up for long)."""
        embedder = await self.scheduler.call(lambda: self._embedder(model_id))
        if dimensions is not None and dimensions != embedder.dim:
            raise InvalidRequest(f"The model '{model_id}' makes {embedder.dim}-dimensional embeddings and can't "
                                 f"shorten them; dimensions={dimensions} is not supported.", param="dimensions")
        parts = []
        for i in range(0, len(texts), BATCH):
            chunk = texts[i:i + BATCH]
            parts.append(await self.scheduler.call(lambda chunk=chunk: embedder.embed(chunk)))
        return Embeddings(np.concatenate([p.vectors for p in parts]), [n for p in parts for n in p.token_counts])

    def _lockstep_stream(self, prepared: Prepared) -> StreamHandle:
        lock, runner = self.lockstep, prepared.runner
        params = with_seed(prepared.params)  # sampling must agree on every rank
        self._stream_ids += 1
        uid = self._stream_ids
        start = (prepared.prompt, prepared.max_tokens, params, prepared.raw_text)

        def run(cancelled: Callable[[], bool]):
            yield from lockstep_stream(lock, uid, start, lambda: runner.generate(
                prepared.prompt, prepared.max_tokens, params, lambda: False, keep_leading_space=prepared.raw_text),
                cancelled)
            self._last_used = time.monotonic()

        return self.scheduler.submit_stream(run)

    # --- speech to text ------------------------------------------------------------------
    def _transcriber(self, model_id: str) -> AudioRunner:
        return self._side_model(model_id, "audio", self._transcribers, self.default_audio_id,
                                "a speech-to-text model", "model_not_audio",
                                lambda _entry, p: AudioRunner.load(model_id, p, self.gate))

    async def transcribe(self, model_id: str, audio: bytes, filename: str,
                         options: TranscribeOptions) -> StreamHandle:
        """Check the header and decode the audio off the worker (one upload at a time, so
        decoding never delays generation and concurrent uploads don't multiply memory), load the
        model on the worker, then queue the transcription: iterate the handle for
        TranscriptDelta events and one TranscriptDone."""
        limit = self.config.max_audio_seconds
        # The header first (a bomb is refused before it waits its turn), then the bounded decode.
        await asyncio.to_thread(check_audio_header, audio, limit)
        async with self._decoding:
            samples = await asyncio.to_thread(decode_audio, audio, filename, "file", limit)
        runner = await self.scheduler.call(lambda: self._transcriber(model_id))

        def run(cancelled: Callable[[], bool]):
            yield from runner.transcribe(samples, options, cancelled)
            self._last_used = time.monotonic()

        return self.scheduler.submit_stream(run)

    # --- generation ----------------------------------------------------------------------
    async def _prepare(self, model_id: str, encode: Callable[[TextRunner], list[int]],
                       params: SamplingParams, raw_text: bool = False, score_only: bool = False) -> Prepared:
        def work() -> Prepared:
            self._check_group()
            runner = self._ensure_loaded(model_id)
            if isinstance(runner, VisionRunner) and raw_text:
                raise InvalidRequest(f"The model '{model_id}' is a vision model: use /v1/chat/completions.",
                                     param="model")
            return self._checked(model_id, runner, encode(runner), params, raw_text, score_only)

        return await self.scheduler.call(work, exclusive=lambda: self._needs_switch(model_id))

    def _checked(self, model_id: str, runner: TextRunner, prompt: list[int], params: SamplingParams,
                 raw_text: bool = False, score_only: bool = False) -> Prepared:
        runner.check_params(params)
        prompt_param = "prompt" if raw_text else "messages"
        if not prompt:
            raise InvalidRequest("The prompt is empty.", param=prompt_param)
        if params.max_tokens == 0 and not score_only:
            raise InvalidRequest("max_tokens 0 (score the prompt, generate nothing) needs echo: true on "
                                 "/v1/completions.", param="max_tokens")
        max_tokens = runner.max_new_tokens(len(prompt), params.max_tokens or None, self.config.default_max_tokens,
                                           self.config.max_tokens_cap, prompt_param)
        if params.max_tokens == 0:
            max_tokens = 0
        return Prepared(model_id, prompt, max_tokens, params, runner, raw_text)

    async def prepare_chat(self, model_id: str, messages: Sequence[ChatMessage],
                           params: SamplingParams, tools: Sequence[ToolSpec] = (),
                           continue_final: bool = False, image_chunk_size: Optional[int] = None,
                           tool_choice: Optional[ToolChoice] = None) -> Prepared:
        """Load the model if needed, apply its chat template (with the tools on offer), check the
        context budget. `continue_final`: a last assistant message is continued, not closed.
        With tools, `tool_choice` adds the model's call grammar (auto: only once a call starts;
        a response_format grammar then stays). A vision model gets the images (decoded and
        checked here, on the worker)."""
        def work() -> Prepared:
            self._check_group()
            runner = self._ensure_loaded(model_id)
            choice = tool_choice or ToolChoice()
            params_ = params
            if tools and not isinstance(runner, VisionRunner) and not (choice.mode == "auto" and params.grammar):
                params_ = replace(params, grammar=runner.tool_grammar(tools, choice) or params.grammar)
            if not isinstance(runner, VisionRunner):
                return self._checked(model_id, runner, runner.encode_chat(messages, tools, continue_final), params_)
            if tools and choice.mode != "auto":
                raise InvalidRequest("tool_choice required or a named function needs constrained decoding, which "
                                     "vision models don't support here; use tool_choice auto.", param="tool_choice")
            runner.check_params(params)
            plan = runner.plan(messages, tools, continue_final, image_chunk_size)
            budget = runner.max_new_tokens(plan.prompt_tokens, params.max_tokens, self.config.default_max_tokens,
                                           self.config.max_tokens_cap)
            return Prepared(model_id, [], budget, params, runner, vision=plan)

        return await self.scheduler.call(work, exclusive=lambda: self._needs_switch(model_id))

    async def count_chat_tokens(self, model_id: str, messages: Sequence[ChatMessage],
                                tools: Sequence[ToolSpec] = ()) -> int:
        """Prompt tokens a chat would take (the model is loaded to use its own tokenizer)."""
        def work() -> int:
            runner = self._ensure_loaded(model_id)
            if isinstance(runner, VisionRunner):
                return runner.plan(messages, tools).prompt_tokens
            return len(runner.encode_chat(messages, tools))

        return await self.scheduler.call(work, exclusive=lambda: self._needs_switch(model_id))

    async def prepare_completion(self, model_id: str, prompt: str | Sequence[int], params: SamplingParams,
                                 echo: bool = False) -> Prepared:
        """Load the model if needed, tokenize the prompt (or check its token ids against the
        vocabulary), check the context budget. With `echo`, max_tokens 0 (score only) is allowed."""
        def encode(runner: TextRunner) -> list[int]:
            if isinstance(prompt, str):
                return runner.encode_text(prompt)
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < runner.vocab_size]
            if bad:
                raise InvalidRequest(f"The prompt holds token ids outside the model's vocabulary (size "
                                     f"{runner.vocab_size}): {bad[:5]}.", param="prompt")
            return ids

        return await self._prepare(model_id, encode, params, raw_text=True, score_only=echo)

    async def share_prefill(self, prepared: Prepared, score_top: Optional[int] = None) -> Prepared:
        """Prefill the prompt once on the worker (every stream of the result starts from a copy:
        `n` choices process the prompt once); with `score_top` not None, also score each prompt
        token with that many alternatives (`echo` with `logprobs`)."""
        if isinstance(prepared.runner, VisionRunner) or self.lockstep is not None:
            if score_top is not None:
                raise InvalidRequest("Prompt log probabilities (echo with logprobs) are not supported for this "
                                     "model.", param="echo")
            return prepared  # each choice prefills on its own
        runner = prepared.runner
        prefix = await self.scheduler.call(lambda: prefill(runner, prepared.prompt, score_top))
        return replace(prepared, prefix=prefix)

    def stream(self, prepared: Prepared) -> StreamHandle:
        """Queue the generation; iterate the handle for TextDelta events and one Finished.
        On rank 0 of a group, every step is announced to the other ranks first."""
        self._check_group()
        if self.lockstep is not None and prepared.max_tokens:
            return self._lockstep_stream(prepared)
        runner = prepared.runner
        if self._fault_max_tokens == prepared.max_tokens:
            runner = FaultyRunner(runner)

        def run(cancelled: Callable[[], bool]):
            if prepared.max_tokens == 0:  # score only: nothing to generate
                yield Started(len(prepared.prompt), 0)
                yield Finished("length", len(prepared.prompt), 0, 0, None)
            elif prepared.vision is not None:
                yield from runner.generate_plan(prepared.vision, prepared.max_tokens, prepared.params, cancelled)
            else:
                start = prepared.prefix.fork() if prepared.prefix is not None else None
                yield from runner.generate(prepared.prompt, prepared.max_tokens, prepared.params, cancelled,
                                           keep_leading_space=prepared.raw_text, start=start)
            self._last_used = time.monotonic()

        return self.scheduler.submit_stream(run)
