"""The runner registry: which runner serves which kind of model.

Every generating runner has the same steps, called on the worker thread:
- `plan(conversation, policy) -> Prepared`: a chat request checked, tokenized (media decoded) and
  given its token budget (engine/generation/budget.py); `plan_completion(prompt, params, policy, echo)` for a
  text completion; `count_tokens(conversation)`;
- `share_prefill(prepared, score_top) -> Prepared`: the prompt processed once for several choices
  (and scored), where the runner can;
- `run(prepared, cancelled) -> Iterator[GenerationEvent]`: Started, TextDeltas, one Finished;
- `close()` on unload.
A new kind of model is one runner module and one line in LOADERS. Rank 0 of a distributed group
wraps its shard's runner (engine/distributed `LockstepRunner`); the error paths' tests wrap one
too (tests/faulty_server.py).
"""
from __future__ import annotations

import json

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from engine.generation.batching import BatchDecoder
from engine.generation.budget import BudgetPolicy
from engine.generation.prompt_cache import PromptCache
from engine.errors import Unsupported
from engine.config import EngineConfig
from engine.models.memory import MemoryGate
from engine.models.probe import Probe
from engine.request import Conversation, Planner, Prepared
from engine.generation.text import SamplingParams


class Runner(Planner, Protocol):
    """What the facade and the residency read of a loaded model, beyond what a Prepared calls
    (`Planner`: tokenizer, warnings, tool_format, split_calls, share_prefill, run). TextRunner has it
    all; VisionRunner is one; rank 0's LockstepRunner passes every read on to its shard's runner."""

    model_id: str
    dtype: str  # how the weights are held (/v1/models)
    dtype_reason: str  # why (/v1/models); "" when there is nothing to say
    prompt_cache: PromptCache  # hits and sizes for /health
    decoder: Optional[BatchDecoder]  # set while concurrent streams decode together (/health's peak)
    decode_path: str  # which path decodes a lone stream (/health)

    def plan(self, conv: Conversation, policy: BudgetPolicy) -> Prepared: ...

    def plan_completion(self, prompt: Any, params: SamplingParams, policy: BudgetPolicy,
                        echo: bool = False) -> Prepared: ...

    def count_tokens(self, conv: Conversation) -> int: ...

    def close(self) -> None: ...


def _text(model_id: str, probe: Probe, config: EngineConfig, gate: MemoryGate) -> Runner:
    from engine.generation.text import TextRunner

    runner = TextRunner.load(model_id, probe, config.cpu_dtype, gate, batch=config.batch in ("on", "auto"))
    config.prompt_cache_settings().apply(runner.prompt_cache)
    if config.prompt_cache_dir is not None:
        from engine.generation.prompt_files import kv_shape, weights_fingerprint
        from engine.generation.prompt_store import PromptStore

        # The weights themselves are part of the identity: others under the same id, size and
        # configuration (a replaced GGUF) must not reuse KV computed with these.
        identity = json.dumps([model_id, runner.dtype, probe.size_bytes, runner.config,
                               weights_fingerprint(probe.path)], sort_keys=True, default=str)
        runner.prompt_cache.disk = PromptStore(config.prompt_cache_dir, identity, config.prompt_cache_dir_bytes,
                                               kv_shape(runner.model), runner.prompt_cache.max_bytes,
                                               runner.context_length)
    runner.speculation.mode = config.speculative
    runner.speculation.num_draft = config.num_draft_tokens
    if config.draft_model and config.speculative in ("auto", "draft"):
        runner.load_draft(config.draft_model, config.cpu_dtype, gate)
    return runner


def _vision(model_id: str, probe: Probe, config: EngineConfig, gate: MemoryGate) -> Runner:
    from engine.media.vision import VisionRunner

    return VisionRunner.load(model_id, probe, config.cpu_dtype, gate, config.image_limits)


# A probe's `type` -> how to load a runner for it.
LOADERS: dict[str, Callable[[str, Probe, EngineConfig, MemoryGate], Runner]] = {"text": _text, "vision": _vision}


def load(model_id: str, probe: Probe, config: EngineConfig, gate: MemoryGate) -> Runner:
    """Load the runner for a probed model (its kind is in LOADERS: the policy checked that), with
    the config file's settings for this model (CPU dtype, draft model, chat template) applied."""
    settings = config.settings_for(model_id)
    if settings is not None:
        draft = config.draft_model
        if settings.draft_model:  # a folder, or an id in the store
            from engine.models.resolution import ModelStore, locate

            draft = str(locate(ModelStore(config.models_dir, config.hf_cache), settings.draft_model).path)
        config = replace(config, cpu_dtype=settings.cpu_dtype or config.cpu_dtype, draft_model=draft)
    runner = LOADERS[probe.type](model_id, probe, config, gate)
    if settings is not None and settings.reasoning_parser:
        runner.reasoning_parser = settings.reasoning_parser
    if settings is not None and settings.tool_parser:
        if probe.type != "text":
            raise Unsupported(f"{model_id}: tool_parser in the config file is for text models only")
        runner.tool_parser = settings.tool_parser
    if settings is not None and settings.chat_template:
        if probe.type != "text":  # a vision model's prompt comes from its processor's template
            raise Unsupported(f"{model_id}: chat_template in the config file is for text models only")
        template = Path(settings.chat_template).expanduser()
        runner.tokenizer.chat_template = template.read_text() if template.is_file() else settings.chat_template
    return runner
