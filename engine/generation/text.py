"""Text runner: load an mlx-lm model (with the CPU fast path) and generate from token ids.

All functions here run on the engine's worker thread; nothing touches the event loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from engine.generation.batching import PREFILL_STEP, BatchDecoder, batch_tokens, detokenized
from engine.generation import reasoning
from engine.generation.budget import BudgetPolicy, max_new_tokens
from engine.errors import InvalidRequest, Unsupported
from engine.models.memory import MemoryEstimate, MemoryGate
from engine.models.probe import Probe
from engine.generation.passes import InFlight, keep_prompt_end, read_in_passes
from engine.generation.prompt_cache import Hit, PromptCache, common_prefix, needs_snapshots
from engine.generation.sampling import make_sampler, penalty_processor
from engine.generation.speculative import NoGuess, Speculation, SpecStats, speculative_tokens
from engine.generation.stopping import StopMatcher
from engine.generation.last_rows import LastRowOnly, SplitHead, split_head
from engine.models.weights import load_gated
from engine.generation.chat_prompts import ChatPrompts
from engine.constrained.tools import ToolChoice
from engine.request import (ChatMessage, Conversation, Fields, Finished, GenerationEvent, Pass,  # noqa: F401
                            Prepared, SamplingParams, Started, TextDelta, TokenLogprob)

COMPLETION_FIELDS = Fields(prompt="prompt", media="prompt")



@dataclass
class TextRunner(ChatPrompts):
    """A loaded text model and what generation needs to know about it; its prompts and tool-call
    format are ChatPrompts' (engine/generation/chat_prompts.py)."""

    model_id: str
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    config: dict
    probe: Probe
    dtype: str
    context_length: int
    memory: MemoryEstimate
    warnings: tuple[str, ...] = ()
    prompt_cache: PromptCache = field(default_factory=PromptCache)
    in_flight: InFlight = field(default_factory=lambda: InFlight(PREFILL_STEP))  # prompts being read now
    decoder: Optional[BatchDecoder] = None  # set: concurrent streams decode together (engine/generation/batching.py)
    speculation: Speculation = field(default_factory=Speculation)
    streams: int = 0  # generations running now (on the worker thread)
    last_rows: Optional[SplitHead] = None  # logits for a pass's last rows only (engine/generation/last_rows.py)
    reasoning_parser: Optional[str] = None  # think | harmony | gemma4 | none (config file); None: from the chat template
    tool_parser: Optional[str] = None  # a tool-call format's name or generic (config file); None: from the template
    solo: Any = None  # what a lone stream's passes call (engine/cpu/decode.py); None: the model
    decode_path: str = "mlx"  # which path decodes a lone stream, and why (/health)
    dtype_reason: str = ""  # why the weights are held as `dtype` (/v1/models, engine/models/weights.py)

    @classmethod
    def load(cls, model_id: str, probe: Probe, cpu_dtype: str, gate: MemoryGate,
             batch: bool = False) -> "TextRunner":
        """Gate memory, load with mlx-lm, then apply the CPU dtype policy (engine/models/weights.py).
        `batch`: decode concurrent streams together (engine/generation/batching.py)."""
        loaded = load_gated(model_id, probe, cpu_dtype, gate)
        context = probe.context_length or int(getattr(loaded.tokenizer, "model_max_length", 0) or 4096)
        runner = cls(model_id, loaded.model, loaded.tokenizer, probe.config, probe, loaded.dtype, context,
                     loaded.need, loaded.warnings)
        runner.last_rows = split_head(loaded.model)
        runner.solo, runner.decode_path, runner.dtype_reason = loaded.solo, loaded.decode, loaded.dtype_reason
        if batch:
            runner.decoder = BatchDecoder(runner._last_row(loaded.model), _eos_ids(loaded.tokenizer))
        return runner

    def _last_row(self, model: Any) -> Any:
        """`model` for a caller that reads only the last row's logits: on the quantized path, whose
        head is eager, the head over that row only (engine/generation/last_rows.py LastRowOnly)."""
        return LastRowOnly(self.last_rows, model) if self.dtype == "quantized" and self.last_rows else model

    def load_draft(self, folder: str, cpu_dtype: str, gate: MemoryGate) -> None:
        """Load the draft model for speculative decoding (engine/generation/speculative.py); it must share
        this model's vocabulary, or its guesses would be other tokens."""
        from engine.models.probe import probe as probe_folder
        from engine.generation.speculative import same_vocabulary

        draft = probe_folder(Path(folder))
        if draft.type != "text" or not draft.runnable:
            raise Unsupported(f"draft model {folder} can't be used: {draft.reason or 'not a text model'}")
        loaded = load_gated(f"draft model {draft.path.name}", draft, cpu_dtype, gate)
        problem = same_vocabulary(self.tokenizer, loaded.tokenizer)
        if problem:
            raise Unsupported(f"draft model {folder} can't draft for {self.model_id}: {problem}")
        self.speculation.draft_model = loaded.solo

    # --- the runner interface (engine/runners.py) ------------------------------------------
    def plan(self, conv: "Conversation", policy: BudgetPolicy) -> "Prepared":
        """A chat request, checked and tokenized: the chat template with the tools on offer, the
        tool choice's call grammar (auto: only once a call starts; a response_format grammar then
        stays), the token budget."""
        params = conv.params
        choice = conv.tool_choice or ToolChoice()
        template = getattr(self.tokenizer, "chat_template", None) or ""
        # Under auto, a reasoning model's calls are parsed, not constrained: the grammar would hold
        # from the first token, where the model thinks.
        free = params.grammar or reasoning.thinks(template, self.reasoning_parser, conv.thinking)
        if conv.tools and not (choice.mode == "auto" and free):
            params = replace(params, grammar=self.tool_grammar(conv.tools, choice) or params.grammar)
        self.check_params(params)
        thinking = reasoning.plan(template, self.reasoning_parser, conv.thinking, dict(conv.template_kwargs),
                                  params.grammar is not None, policy.effort_budgets)
        prompt = self.encode_chat(conv.messages, conv.tools, conv.continue_final, conv.fields.prompt,
                                  thinking.template_kwargs)
        budget = max_new_tokens(len(prompt), params.max_tokens, self.context_length, policy, conv.fields)
        tail = self.tokenizer.decode(prompt[-16:])
        fmt = reasoning.ReasoningFormat(reasoning.prompt_opens_block(tail, thinking.style), thinking.style) \
            if thinking.parse else None
        if fmt is not None and thinking.budget is not None:
            params = replace(params, thinking_budget=thinking.budget, thinking_opened=fmt.opened,
                             thinking_style=fmt.style)
        resume_at: tuple[int, ...] = ()
        if self.snapshots and not conv.continue_final and getattr(self.tokenizer, "chat_template", None):
            # The next turn re-renders this turn's answer after the history, often not as the
            # generation prompt began it (Qwen3.5 drops the `<think>` it opens): a snapshot where
            # the history ends is where that turn resumes.
            bare = self.encode_chat(conv.messages, conv.tools, False, conv.fields.prompt, thinking.template_kwargs,
                                    generation_prompt=False)
            n = common_prefix(bare, prompt)
            resume_at = (n,) if 0 < n < len(prompt) - 1 else ()
        return Prepared(self.model_id, prompt, budget, params, self, reasoning=fmt, resume_at=resume_at)

    @cached_property
    def snapshots(self) -> bool:
        """Whether this model's cache can't be cut back (recurrent layers, sliding windows): its
        prompt cache keeps snapshots (engine/generation/prompt_cache.py)."""
        from mlx_lm.models.cache import make_prompt_cache

        return needs_snapshots(make_prompt_cache(self.model))

    def plan_completion(self, prompt: str | Sequence[int], params: SamplingParams, policy: BudgetPolicy,
                        echo: bool = False) -> "Prepared":
        """A text completion: the prompt tokenized (or its token ids checked against the
        vocabulary) and its budget; with `echo`, max_tokens 0 (score only) is allowed."""
        self.check_params(params)
        if isinstance(prompt, str):
            ids = self.encode_text(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(f"The prompt holds token ids outside the model's vocabulary (size "
                                     f"{self.vocab_size}): {bad[:5]}.", param="prompt")
        budget = max_new_tokens(len(ids), params.max_tokens, self.context_length, policy, COMPLETION_FIELDS,
                                score_only=echo)
        return Prepared(self.model_id, ids, budget, params, self, raw_text=True)

    def count_tokens(self, conv: "Conversation") -> int:
        """Prompt tokens the conversation takes with this model's template and tokenizer."""
        return len(self.encode_chat(conv.messages, conv.tools, conv.continue_final, conv.fields.prompt))

    def share_prefill(self, prepared: "Prepared", score_top: Optional[int] = None) -> Iterator[Pass]:
        """The prompt prefilled once (each stream of the result starts from a copy), and with
        `score_top` its tokens scored (engine/generation/scoring.py); a `Pass` after each pass."""
        from engine.generation.scoring import prefill

        prefix = yield from prefill(self, prepared.prompt, score_top, prepared.cache.key)
        return replace(prepared, prefix=prefix)

    def run(self, prepared: "Prepared", cancelled: Callable[[], bool]) -> Iterator[GenerationEvent]:
        """The generation's events: Started, TextDeltas, one Finished."""
        if prepared.max_tokens == 0:  # score only: nothing to generate
            yield Started(len(prepared.prompt), 0)
            yield Finished("length", len(prepared.prompt), 0, 0, None)
            return
        start = prepared.prefix.fork() if prepared.prefix is not None else None
        yield from self.generate(prepared.prompt, prepared.max_tokens, prepared.params, cancelled,
                                 keep_leading_space=prepared.raw_text, start=start, resume_at=prepared.resume_at,
                                 scope=prepared.cache.key)

    def close(self) -> None:
        """Free what the runner holds beyond its weights (unload)."""
        self.prompt_cache.clear()
        if self.prompt_cache.disk is not None:
            self.prompt_cache.disk.close()
        self.speculation.close()
        if self.decoder is not None:
            self.decoder.close()

    # --- generation ----------------------------------------------------------------------
    def _token_logprob(self, token: int, logprobs: mx.array, top: int) -> TokenLogprob:
        """The token's log probability (log-softmax after logits processors, before sampling)."""
        lp = logprobs.reshape(-1)
        alternatives: tuple[tuple[str, float], ...] = ()
        if top:
            ids = mx.argpartition(-lp, top - 1)[:top]
            values = lp[ids].tolist()
            order = sorted(zip(ids.tolist(), values), key=lambda x: -x[1])
            alternatives = tuple((self.tokenizer.decode([i]), float(v)) for i, v in order)
        return TokenLogprob(self.tokenizer.decode([token]), float(lp[token].item()), alternatives)

    def sampling(self, params: SamplingParams) -> tuple[Callable[[mx.array], mx.array], list[Callable]]:
        """The sampler and logits processors (bias, penalties, grammar last) for a request."""
        sampler = make_sampler(params.temperature, params.top_p, params.seed, params.top_k)
        processors = []
        if params.logit_bias:
            ids = mx.array([t for t, _ in params.logit_bias])
            biases = mx.array([b for _, b in params.logit_bias], dtype=mx.float32)
            processors.append(lambda _tokens, logits: logits.at[:, ids].add(biases.astype(logits.dtype)))
        if params.presence_penalty or params.frequency_penalty:
            processors.append(penalty_processor(params.presence_penalty, params.frequency_penalty,
                                                 self.vocab_size))
        if params.thinking_budget is not None:
            processors.append(reasoning.budget_processor(self.tokenizer, params.thinking_budget,
                                                         params.thinking_opened, params.thinking_style))
        if params.grammar:  # last, after biases and penalties
            from engine.constrained.structured import grammar_processor

            processors.append(grammar_processor(self.ll_tokenizer, params.grammar))
        return sampler, processors

    def generate(self, prompt: list[int], max_tokens: int, params: SamplingParams,
                 cancelled: Callable[[], bool], keep_leading_space: bool = False,
                 start: Optional[tuple[list[Any], int]] = None,
                 resume_at: Sequence[int] = (), scope: str = "") -> Iterator[GenerationEvent]:
        """Generate up to `max_tokens` tokens; stop strings and cancellation end it early.

        mlx-lm's streaming detokenizer drops the first token's leading space, right for a chat
        answer and wrong for a text completion (" Paris" after "The capital is"):
        `keep_leading_space` puts it back. `start`: a KV cache already holding all of the prompt
        but its last token (a shared prefill, engine/generation/scoring.py) and how many of those tokens it
        took from the prompt cache (reported as cached), used instead of the prompt cache.
        `resume_at`: prompt positions where a model whose cache can't be cut back keeps snapshots
        (besides the prompt's end). `scope`: the prompt cache entries it may reuse and adds to
        (engine/request.py CacheScope.key). A generation that fails on a cache read from disk drops
        that file and keeps nothing of it."""
        from mlx_lm import stream_generate
        from mlx_lm.models.cache import make_prompt_cache

        sampler, processors = self.sampling(params)
        hit = Hit(None, 0)
        if start is not None:  # the shared prefill's cache, and what it took from the prompt cache
            cache, cached = start
            reused = len(prompt) - 1
        else:  # a prefix another request is reading now is waited for, not read twice
            yield from self.in_flight.wait(prompt, self.prompt_cache, cancelled, scope)
            hit = self.prompt_cache.take_hit(prompt, scope)
            cache, reused = hit.cache, hit.length
            cached = reused
        if cache is None:
            cache = make_prompt_cache(self.model)
        if start is None:  # a long prompt's whole passes, the other streams running between them
            try:
                passes = self._last_row(self.model)
                reused, left = yield from read_in_passes(passes, prompt, reused, cache, PREFILL_STEP, cancelled,
                                                         self.prompt_cache, self.in_flight,
                                                         min((p for p in resume_at if p > reused), default=None),
                                                         scope)
            except Exception:
                if hit.disk is not None:
                    self.prompt_cache.discard(prompt, hit, scope)
                raise
            if left:
                yield Started(len(prompt), cached)
                yield Finished("cancelled", len(prompt), 0, cached)
                return
            if needs_snapshots(cache):  # a recurrent state resumes only where it was kept
                reused = keep_prompt_end(self.model, prompt, reused, cache, self.prompt_cache, resume_at, scope)
        tokens: list[int] = []
        batch: dict[str, Any] = {}  # its uid in the batch; the batch hands its KV cache back here
        kept = False

        def keep() -> None:
            # The cache now holds the prompt and what was generated (its offset says how much).
            # Put back before Finished goes out, so the client's next turn finds it.
            nonlocal kept
            if kept:
                return
            kept = True
            held = cache
            if "uid" in batch:  # it was in the batch, which hands the cache back
                if "cache" not in batch:  # closed before its first step: still in the batch
                    batch["cache"] = self.decoder.remove(batch["uid"])
                held = batch["cache"]
            if held is not None:
                self.prompt_cache.put(prompt + tokens, held, prompt_len=len(prompt), scope=scope)

        stats = SpecStats()
        drafter = None
        if start is None and self.streams == 0:  # a stream that starts alone speculates
            drafter = self.speculation.drafter(prompt, cache, scope)
            if drafter is None and self.decoder is not None and self.solo is not None and self.solo is not self.model:
                # Speculation off: a lone stream still decodes through the solo step (the numpy one,
                # 59 against MLX's 153 ms a token on the 0.5B here), a token a pass, until another
                # stream starts and it joins the batch. Through the batch it took MLX's step.
                drafter = NoGuess()
        if drafter is not None:
            pairs = self._speculate(cache, prompt, reused, drafter, max_tokens, sampler, processors, stats, batch)
            steps = detokenized(pairs, self.tokenizer, _eos_ids(self.tokenizer), max_tokens)
        elif self.decoder is not None:
            batch["uid"] = self.decoder.insert(prompt[reused:], cache, max_tokens, sampler, processors)
            steps = detokenized(batch_tokens(self.decoder, batch["uid"], batch), self.tokenizer,
                                _eos_ids(self.tokenizer), max_tokens)
        else:
            steps = stream_generate(self._last_row(self.solo or self.model), self.tokenizer, mx.array(prompt[reused:]),
                                    max_tokens=max_tokens,
                                    sampler=sampler, prompt_cache=cache, logits_processors=processors or None,
                                    prefill_step_size=PREFILL_STEP)
        self.streams += 1
        try:
            for event in decode_steps(self, steps, tokens, len(prompt), cached, max_tokens, params, cancelled,
                                      keep_leading_space):
                if isinstance(event, Finished):
                    steps.close()  # leaves the batch (a stop string ends it early) and frees the cache
                    keep()
                    if drafter is not None:
                        event = replace(event, drafted=stats.proposed, accepted=stats.accepted)
                yield event
        except Exception:
            if hit.disk is not None:  # what was read from disk may be what failed: not kept, not written again
                kept = True
                self.prompt_cache.discard(prompt, hit, scope)
            raise
        finally:
            self.streams -= 1
            steps.close()
            keep()
            if drafter is not None:
                self.speculation.done(drafter, scope)


    def _speculate(self, cache: list[Any], prompt: list[int], reused: int, drafter: Any, max_tokens: int,
                   sampler: Callable, processors: list[Callable], stats: SpecStats,
                   batch: dict[str, Any]) -> Iterator[tuple[int, Any]]:
        """Speculate while this is the only stream; when others start, join their batch (one pass
        for all of them beats one pass each), the cache and sampler carried over. The batch gives
        processors only the tokens it was handed, so they are given the history before it too."""
        history = list(prompt)
        alone = (lambda: self.streams <= 1) if self.decoder is not None else (lambda: True)
        for token, logprobs in speculative_tokens(self.solo or self.model, cache, prompt, reused, drafter,
                                                  self.speculation.num_draft, max_tokens, sampler, processors,
                                                  stats, alone, self.last_rows):
            history.append(token)
            yield token, logprobs
        # Here only when another stream started (the end of sequence and max_tokens close this
        # generator from `detokenized` instead): carry on in the batch.
        left = max_tokens - (len(history) - len(prompt))
        before = mx.array(history[:-1])
        joined = [partial(_after, before, p) for p in processors]
        batch["uid"] = self.decoder.insert(history[-1:], cache, left, sampler, joined)
        yield from batch_tokens(self.decoder, batch["uid"], batch)


def _after(before: mx.array, processor: Callable, tokens: mx.array, logits: mx.array) -> mx.array:
    return processor(mx.concatenate([before, tokens.reshape(-1).astype(before.dtype)]), logits)


def _eos_ids(tokenizer: Any) -> set[int]:
    """End-of-sequence ids: mlx-lm's wrapper has a set, a transformers tokenizer one id."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(ids)} if isinstance(ids, int) else {int(i) for i in ids}


def decode_steps(runner: TextRunner, steps: Iterator[Any], tokens: list[int], prompt_tokens: int, reused: int,
                 max_tokens: int, params: SamplingParams, cancelled: Callable[[], bool],
                 keep_leading_space: bool = False) -> Iterator[GenerationEvent]:
    """Turn a library's generation steps (mlx-lm or mlx-vlm responses: token, text, logprobs,
    finish_reason) into our events: stop strings, logprobs, cancellation, honest counts.
    A step whose token is None only carries text (mlx-vlm's final detokenizer flush).
    `tokens` is filled with the generated ids as they come."""
    yield Started(prompt_tokens, reused)
    stops = StopMatcher(params.stop)
    pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not sent yet
    started = False  # has any text come out yet
    eos = _eos_ids(runner.tokenizer)
    finish = "length"
    for response in steps:
        if response.token is not None:
            tokens.append(int(response.token))
            if params.logprobs and not (response.finish_reason == "stop" and response.token in eos):
                pending.append(runner._token_logprob(int(response.token), response.logprobs, params.top_logprobs))
        piece = response.text
        if keep_leading_space and piece and not started:
            started = True
            if runner.tokenizer.decode(tokens).startswith(" ") and not piece.startswith(" "):
                piece = " " + piece
        text = stops.feed(piece)
        if text:
            yield TextDelta(text, tuple(pending))
            pending.clear()
        if stops.stopped:
            finish = "stop"
            break
        if response.finish_reason:
            finish = response.finish_reason
        if cancelled():
            finish = "cancelled"
            break
    tail = stops.flush()
    if tail or (pending and not stops.stopped):
        yield TextDelta(tail, tuple(pending))
    yield Finished(finish, prompt_tokens, len(tokens), reused, stops.matched)
