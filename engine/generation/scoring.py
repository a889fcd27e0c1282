"""One pass over a prompt that several answers share: the KV cache of the prompt (so `n` choices
prefill it once) and, when asked, each prompt token's log probability (`echo` with `logprobs`,
what evaluation harnesses score multiple-choice answers with).

The pass covers the prompt without its last token: position i's logits score token i + 1, so
every prompt token but the first gets a log probability (the first has none, as OpenAI and vLLM
report it), and each choice then starts from a copy of the cache with just the last token to
process. Prompt log probabilities are the model's own (log-softmax of its logits): logit_bias,
penalties and grammars shape sampling only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Generator, Optional

from engine.generation.batching import PREFILL_STEP
from engine.request import PASS, Pass, TokenLogprob

# Prompt tokens per forward pass (engine/generation/batching.py says why); it also bounds the logits held at
# once when scoring (256 x vocab floats).
CHUNK = PREFILL_STEP


@dataclass(frozen=True)
class Prefix:
    """A prompt's shared prefill: its KV cache up to the last token, and its tokens' logprobs."""

    cache: list[Any]  # holds the prompt but its last token; never used directly, each answer gets a copy
    logprobs: tuple[TokenLogprob, ...] = ()  # one per prompt token when scored (the first: logprob None)
    reused: int = 0  # prompt tokens the prompt cache already held (reported as cached)

    def fork(self) -> tuple[list[Any], int]:
        """A copy of the cache for one answer to extend (KV caches are updated in place), and
        the cached count to report."""
        return copy.deepcopy(self.cache), self.reused


def prefill(runner: Any, prompt: list[int], top: Optional[int] = None,
            scope: str = "") -> Generator[Pass, None, Prefix]:
    """Run the prompt (without its last token) through `runner`'s model (a TextRunner) in chunks;
    with `top` not None, also score each prompt token with `top` alternatives. Yields `Pass`
    after each chunk (the worker runs other streams between them) and returns the Prefix. Only
    `scope`'s prompt cache entries are reused (engine/request.py CacheScope.key)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    reused = 0
    cache = None
    if top is None:  # scores need the logits of every position: only a plain prefill reuses a cache
        cache, reused = runner.prompt_cache.take(prompt, scope)
    if cache is None:
        cache, reused = make_prompt_cache(runner.model), 0
    body = prompt[:-1]
    decode = runner.tokenizer.decode
    scored = [TokenLogprob(decode([prompt[0]]), None)] if top is not None else []
    for start in range(reused, len(body), CHUNK):
        piece = body[start:start + CHUNK]
        logits = runner.model(mx.array(piece)[None], cache=cache)
        if top is None:
            mx.eval([c.state for c in cache])
            yield PASS
            continue
        logits = logits[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        following = prompt[start + 1:start + 1 + len(piece)]
        chosen = mx.take_along_axis(logp, mx.array(following)[:, None], axis=1)[:, 0]
        if top:
            ids = mx.argpartition(-logp, top - 1, axis=-1)[:, :top]
            values = mx.take_along_axis(logp, ids, axis=1)
            mx.eval(chosen, ids, values)
            alternatives = [sorted(zip(i, v), key=lambda x: -x[1]) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            mx.eval(chosen)
            alternatives = [[] for _ in following]
        for token, value, alts in zip(following, chosen.tolist(), alternatives):
            scored.append(TokenLogprob(decode([token]), float(value),
                                       tuple((decode([int(i)]), float(v)) for i, v in alts)))
        yield PASS
    if top is None and len(body) > reused:
        from engine.generation.prompt_cache import needs_snapshots, snapshot

        held = snapshot(cache) if needs_snapshots(cache) else None
        if held is not None:  # where the same prompt and the next turn resume (prompt_cache.py)
            runner.prompt_cache.put(body, held, scope=scope)
    return Prefix(cache, tuple(scored), reused)
