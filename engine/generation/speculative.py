"""Speculative decoding: guess several tokens, check them all in one forward pass of the model.

On this CPU a decode step is bound by reading the weights, and a pass over k+1 tokens reads them
once too, so every accepted guess is a token nearly for free. Two drafters propose the guesses:

- `PromptLookup` (n-gram drafting): the longest recent n-gram of the text so far that also
  occurred earlier in the prompt or the answer, and the tokens that followed it there. Answers
  that quote their input (code edits, extraction, summaries, tool results) accept most guesses.
- `DraftModel`: a smaller model with the same tokenizer, greedy, with its own KV cache.

Verification is exact. The model's logits for every drafted position come from one pass; the
positions are then read in order, each through the request's own logits processors (bias,
penalties, grammar) and sampler, and reading stops at the first token the model did not pick.
For greedy decoding that is the plain path's text token for token; for sampling it is rejection
sampling against a point-mass draft (a draft token is kept with the model's own probability for
it), so the output keeps the model's distribution. The sampler is called exactly once per token
that is kept, so a `seed` gives the same text with speculation on or off. Nothing that was not
kept ever reaches a logits processor (a grammar's matcher only sees accepted tokens), and the KV
cache is trimmed back past rejected tokens before the next pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import mlx.core as mx
import mlx.nn as nn

from engine.generation.batching import PREFILL_STEP as PREFILL_CHUNK
from engine.generation.prompt_cache import PromptCache

@dataclass
class SpecStats:
    """Draft tokens proposed and accepted for one generation."""

    proposed: int = 0
    accepted: int = 0


class Drafter(Protocol):
    """Proposes up to `k` tokens to follow `history` (the prompt and the tokens kept so far)."""

    def propose(self, history: Sequence[int], k: int) -> list[int]: ...


class NoGuess:
    """Proposes nothing: `speculative_tokens` then decodes a token a pass through the solo step,
    and still hands the stream to the batch when another starts."""

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        return []


class PromptLookup:
    """n-gram drafting over the prompt and the answer so far (no second model).

    An index maps every n-gram (n in [min_n, max_n]) to the position after its latest earlier
    occurrence; it is extended as tokens are kept, so a proposal costs a few dict lookups."""

    def __init__(self, max_n: int = 4, min_n: int = 2) -> None:
        self.max_n, self.min_n = max_n, min_n
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in the index

    def _extend(self, history: Sequence[int]) -> None:
        # Index n-grams that end at i-1 and have a continuation at i (i < len(history)); the
        # n-gram ending at the very last token is what we look up, so it is not indexed yet.
        for i in range(max(self._indexed, 1), len(history)):
            for n in range(self.min_n, self.max_n + 1):
                if i - n >= 0:
                    self._index[tuple(history[i - n:i])] = i
        self._indexed = max(self._indexed, len(history))

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        self._extend(history)
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(history) < n:
                continue
            at = self._index.get(tuple(history[-n:]))
            if at is not None:
                return list(history[at:at + k])
        return []


class DraftModel:
    """Greedy guesses from a smaller model with the same tokenizer, over its own KV cache.

    `fed` mirrors what the draft cache holds; before each proposal the cache is trimmed to the
    part of it that still agrees with the history, and the rest of the history is fed."""

    def __init__(self, model: nn.Module, cache: list[Any], fed: Sequence[int]) -> None:
        self.model, self.cache = model, cache
        self.fed = list(fed)

    def _trim_to(self, keep: int) -> None:
        from mlx_lm.models.cache import trim_prompt_cache

        if len(self.fed) > keep:
            trim_prompt_cache(self.cache, len(self.fed) - keep)
            del self.fed[keep:]

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        common = 0
        for a, b in zip(self.fed, history):
            if a != b:
                break
            common += 1
        self._trim_to(min(common, len(history) - 1))  # the last token is fed to get its logits
        todo = list(history[len(self.fed):])
        logits = None
        for at in range(0, len(todo), PREFILL_CHUNK):
            logits = self.model(mx.array(todo[at:at + PREFILL_CHUNK])[None], cache=self.cache)
        self.fed.extend(todo)
        out: list[int] = []
        while logits is not None and len(out) < k:
            token = int(mx.argmax(logits[0, -1]).item())
            out.append(token)
            if len(out) < k:
                logits = self.model(mx.array([token])[None], cache=self.cache)
                self.fed.append(token)
        return out


# The longest prompt tail fed with the first pass rather than before it. Its rows' output-head
# products are wasted (~0.6 ms a row for SmolLM2 on this CPU) against one 1-row pass (~55 ms).
MERGE_TAIL = 64


class AdaptiveLength:
    """How many tokens to draft: grows by 2 while whole drafts are kept, shrinks by 1 when any
    is rejected (as Hugging Face's assisted generation does), between 1 and `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.k = limit

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.k = min(self.limit, self.k + 2) if accepted == proposed else max(1, self.k - 1)


def speculative_tokens(model: nn.Module, cache: list[Any], prompt: Sequence[int], cached: int,
                       drafter: Drafter, limit: int, max_tokens: int,
                       sampler: Callable[[mx.array], mx.array], processors: Sequence[Callable],
                       stats: SpecStats, alone: Callable[[], bool] = lambda: True,
                       last_rows: Optional[Callable[[mx.array, list[Any], int], mx.array]] = None,
                       ) -> Iterator[tuple[int, mx.array]]:
    """(token, logprobs) pairs of the model's own answer, several per forward pass where the
    drafter guessed right. `cache` holds the first `cached` tokens of `prompt`. On exit the cache
    holds exactly the prompt and the tokens taken by the consumer, but the last one. Returns early
    (after at least one token) when `alone()` turns false: other streams are running, and the
    caller moves this one into their batch. `last_rows(inputs, cache, n)`: the logits of a pass's
    last n rows only (engine/generation/last_rows.py), for the pass that carries the prompt's tail."""
    from mlx_lm.models.cache import trim_prompt_cache

    history = list(prompt)
    todo = history[cached:-1]
    # A short tail of the prompt rides along with the first pass (its logits are dropped): one
    # pass of T+1 rows costs less than T rows and then a pass of 1 row, which reads every weight.
    merged = len(todo) % PREFILL_CHUNK
    pending = todo[len(todo) - merged:] if merged <= MERGE_TAIL else []
    ahead = todo[:len(todo) - len(pending)]  # prefilled before the first pass
    for at in range(0, len(ahead), PREFILL_CHUNK):
        chunk = mx.array(ahead[at:at + PREFILL_CHUNK])[None]
        if last_rows is not None:  # no logits are read: the head over one row (it runs eagerly when held as blocks)
            last_rows(chunk, cache, 1)
        else:
            model(chunk, cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
    fed = len(history) - 1 - len(pending)  # tokens the cache holds
    length = AdaptiveLength(limit)
    made = 0
    try:
        while made < max_tokens:
            if made and not alone():
                return
            # Never draft past max_tokens: the last token of a pass is the model's own. The pass that
            # carries the prompt's tail drafts nothing: the first guess after a chat template's
            # "assistant" is mostly the previous answer's opening, and its rows cost the next turn's
            # first token ~15 ms (measured).
            guess = max_tokens - made > 1 and not pending
            draft = drafter.propose(history, min(length.k, max_tokens - made - 1)) if guess else []
            inputs = pending + history[-1:] + draft
            if pending and last_rows is not None:
                logits = last_rows(mx.array(inputs)[None], cache, 1 + len(draft))[0]
            else:
                logits = model(mx.array(inputs)[None], cache=cache)[0][len(pending):]
            fed += len(inputs)
            pending = []
            if not processors and _is_greedy(sampler):
                # the pick from the logits themselves: the log-softmax over a 151936-token vocabulary
                # cost ~2 ms a token (8% of a quantized 0.5B's decode, measured) and is evaluated
                # only where a caller reads a row's log-probabilities
                picks = mx.argmax(logits, axis=-1).tolist()
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                rows = [logprobs[i:i + 1] for i in range(len(picks))]
            else:
                picks, rows = [], []
            kept = 0
            for i in range(len(draft) + 1):
                if i < len(picks):
                    token, row = picks[i], rows[i]
                else:
                    row = logits[i:i + 1]
                    context = mx.array(history)
                    for p in processors:
                        row = p(context, row)
                    if _is_greedy(sampler):  # the pick from the processed logits; the log-softmax stays lazy
                        token = int(mx.argmax(row, axis=-1).item())
                        row = row - mx.logsumexp(row, axis=-1, keepdims=True)
                    else:
                        row = row - mx.logsumexp(row, axis=-1, keepdims=True)
                        token = int(sampler(row).item())
                history.append(token)
                made += 1
                yield token, row
                if i == len(draft) or token != draft[i] or made >= max_tokens:
                    break
                kept += 1
            stats.proposed += len(draft)
            stats.accepted += kept
            length.update(len(draft), kept)
            # The pass fed the rejected guesses too: drop them, so the cache holds all but the last token.
            extra = fed - (len(history) - 1)
            if extra > 0:
                trim_prompt_cache(cache, extra)
                fed -= extra
    finally:
        extra = fed - (len(history) - 1)
        if extra > 0:  # the consumer stopped inside a pass (a stop string, cancellation)
            trim_prompt_cache(cache, extra)


@dataclass
class Speculation:
    """A runner's speculative decoding: the mode (`auto`: the draft model when there is one, else
    prompt lookup), the most tokens drafted per pass, and the draft model with its own prompt
    cache (so the next turn of a conversation doesn't re-read its history in the draft model)."""

    mode: str = "off"
    num_draft: int = 12
    draft_model: Optional[nn.Module] = None
    draft_cache: PromptCache = field(default_factory=PromptCache)

    def drafter(self, prompt: Sequence[int], cache: list[Any], scope: str = "") -> Optional[Drafter]:
        """A drafter for one generation, or None where speculation is off or can't run (a KV
        cache that can't be trimmed back, e.g. a rotating window). The draft model's cache is
        reused within `scope` only, as the model's own (timing would tell the rest)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        if self.mode == "off" or not can_trim_prompt_cache(cache):
            return None
        if self.draft_model is not None and self.mode in ("auto", "draft"):
            draft_cache, reused = self.draft_cache.take(list(prompt), scope)
            if draft_cache is None:
                draft_cache, reused = make_prompt_cache(self.draft_model), 0
            if not can_trim_prompt_cache(draft_cache):
                return None
            return DraftModel(self.draft_model, draft_cache, prompt[:reused])
        if self.mode in ("auto", "ngram"):
            return PromptLookup()
        return None

    def done(self, drafter: Drafter, scope: str = "") -> None:
        """The generation ended: keep the draft model's cache for the next turn (of `scope`)."""
        if isinstance(drafter, DraftModel) and drafter.fed:
            self.draft_cache.put(drafter.fed, drafter.cache, scope=scope)

    def close(self) -> None:
        self.draft_cache.clear()


def _is_greedy(sampler: Callable) -> bool:
    return getattr(sampler, "greedy", False)


def same_vocabulary(a: Any, b: Any) -> Optional[str]:
    """Why tokenizer `b` can't draft for `a` (a different vocabulary), or None."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return None
    differ = sum(1 for t, i in va.items() if vb.get(t) != i) + sum(1 for t in vb if t not in va)
    return f"its tokenizer differs from the model's ({differ} of {max(len(va), len(vb))} tokens)"
