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
wraps its shard's runner (engine/distributed `LockstepRunner`); tests wrap runners too
(`FaultyRunner`).
"""
from __future__ import annotations

import json

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

from engine.generation.budget import BudgetPolicy
from engine.errors import Unsupported
from engine.config import EngineConfig
from engine.models.memory import MemoryGate
from engine.models.probe import Probe
from engine.request import Conversation, Pass, Prepared
from engine.generation.text import GenerationEvent, SamplingParams, TextDelta


class Runner(Protocol):
    model_id: str
    warnings: tuple[str, ...]

    def plan(self, conv: Conversation, policy: BudgetPolicy) -> Prepared: ...

    def plan_completion(self, prompt: Any, params: SamplingParams, policy: BudgetPolicy,
                        echo: bool = False) -> Prepared: ...

    def count_tokens(self, conv: Conversation) -> int: ...

    def share_prefill(self, prepared: Prepared, score_top: Optional[int] = None) -> Iterator[Pass]:
        """A generator: yields `Pass` between passes over the prompt, returns the Prepared."""

    def run(self, prepared: Prepared, cancelled: Callable[[], bool]) -> Iterator[GenerationEvent]: ...

    def close(self) -> None: ...


def _text(model_id: str, probe: Probe, config: EngineConfig, gate: MemoryGate) -> Runner:
    from engine.generation.text import TextRunner

    runner = TextRunner.load(model_id, probe, config.cpu_dtype, gate, batch=config.batch in ("on", "auto"))
    config.prompt_cache_settings().apply(runner.prompt_cache)
    if config.prompt_cache_dir is not None:
        from engine.generation.prompt_store import PromptStore

        identity = json.dumps([model_id, runner.dtype, probe.size_bytes, runner.config], sort_keys=True, default=str)
        runner.prompt_cache.disk = PromptStore(config.prompt_cache_dir, identity, config.prompt_cache_dir_bytes)
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


class FaultyRunner:
    """A runner that fails half-way through each generation, as a bug in a model or kernel
    would (the error paths' tests; OPENMLX_FAULT_MAX_TOKENS). Everything else is the runner's."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def run(self, prepared: Prepared, cancelled: Callable[[], bool]) -> Iterator[GenerationEvent]:
        sent = 0
        for event in self._runner.run(prepared, cancelled):
            yield event
            sent += isinstance(event, TextDelta)
            if sent > prepared.max_tokens // 2:
                raise RuntimeError("injected fault (OPENMLX_FAULT_MAX_TOKENS)")
