"""Batched decoding: concurrent streams of one model advance together through mlx-lm's
`BatchGenerator`, one forward pass per step for all of them.

The scheduler still visits streams round-robin, one token each. With a batch, the first stream
visited in a round runs the batch step and the others find their token already made. Each
request keeps its own sampler (seeded key), logits processors (bias, penalties, grammar) and
prompt-cache entry; its tokens are turned into text by `detokenized` (shared with speculative
decoding), and stop strings, logprobs and accounting are handled per stream as in the unbatched
path (engine/generation/text.py `decode_steps`).

Decoding reads every weight once per step, whatever the number of streams in it, so batching
pays off wherever decode is bound by weight reads: on a GPU, and on this CPU with float32 weights
and OpenBLAS too (`python -m bench.batching`, 2 cores: 4 streams 36.8 tok/s together instead of
16.0 one at a time; one stream 17.3 vs 16.9, so a lone stream loses nothing). `--batch auto`
(the default) therefore batches text models everywhere; `--batch off` keeps the round-robin path.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, Optional

import mlx.nn as nn

# Prompt tokens per forward pass while prefilling, everywhere (plain, batched, speculative,
# scoring). MLX's CPU attention computes every query x key score of a pass before the causal mask,
# so a long prompt in one pass pays for the masked half too; 256-token passes skip most of it with
# matmuls still large enough for BLAS. Measured (SmolLM2, 2 cores): prefill of 858 tokens 4.37 ->
# 3.57 s, 2,000 tokens 20.2 -> 13.1 s, 4,000 tokens 56.3 -> 42.3 s against mlx-lm's 2,048; the
# same at 500 tokens (1.74 s at 128, 256 or 384).
PREFILL_STEP = 256


@dataclass
class Step:
    """One generated token as `decode_steps` (engine/generation/text.py) reads it, whoever made it: a batch
    step here, mlx-vlm's responses (engine/media/vision.py). `token` None: text only (a final flush)."""

    token: Optional[int]
    text: str
    logprobs: Any
    finish_reason: Optional[str]


class BatchDecoder:
    """One BatchGenerator per loaded model."""

    def __init__(self, model: nn.Module, eos_ids: set[int], max_batch: int = 32) -> None:
        from mlx_lm.generate import BatchGenerator

        self.generator = BatchGenerator(model, stop_tokens=[[e] for e in sorted(eos_ids)],
                                        completion_batch_size=max_batch, prefill_batch_size=min(8, max_batch),
                                        prefill_step_size=PREFILL_STEP)
        self._queues: dict[int, deque] = {}
        self.steps = 0  # batch forward steps run (for tests and stats)
        self.peak = 0  # the most sequences decoded in one step

    def insert(self, prompt: list[int], cache: list[Any], max_tokens: int, sampler: Callable,
               processors: list[Callable]) -> int:
        uid = self.generator.insert([prompt], max_tokens=[max_tokens], caches=[cache], samplers=[sampler],
                                    logits_processors=[processors])[0]
        self._queues[uid] = deque()
        return uid

    def next_for(self, uid: int) -> Any:
        """The next response for `uid`, running batch steps until there is one."""
        queue = self._queues[uid]
        while not queue:
            if not self.generator._find_uids([uid]):  # gone (finished or removed): nothing will come
                raise RuntimeError(f"sequence {uid} left the batch")
            _, responses = self.generator.next()
            if responses:
                self.steps += 1
                self.peak = max(self.peak, len(responses))
            for r in responses:
                if r.uid in self._queues:
                    self._queues[r.uid].append(r)
        return queue.popleft()

    def remove(self, uid: int) -> Optional[list[Any]]:
        """Take a sequence out early (cancelled, stop string); returns its KV cache."""
        self._queues.pop(uid, None)
        caches = self.generator.remove([uid], return_prompt_caches=True)
        entry = caches.get(uid)
        return entry[0] if entry else None

    def done(self, uid: int) -> None:
        self._queues.pop(uid, None)

    def close(self) -> None:
        self.generator.close()


def batch_tokens(decoder: BatchDecoder, uid: int, result: dict[str, Any]) -> Generator[tuple[int, Any], None, None]:
    """(token, logprobs) of sequence `uid` (already inserted: requests that arrive together are
    inserted before any of them runs a step, so their prompts are processed in one batch).
    `result["cache"]` gets the KV cache when it leaves the batch, finished or closed early."""
    finished = False
    try:
        while not finished:
            r = decoder.next_for(uid)
            if r.finish_reason:
                finished = True
                result["cache"] = r.prompt_cache
                decoder.done(uid)
            yield int(r.token), r.logprobs
    finally:
        if not finished:
            result["cache"] = decoder.remove(uid)


def detokenized(pairs: Generator[tuple[int, Any], None, None], tokenizer: Any, eos_ids: set[int],
                max_tokens: int) -> Iterator[Step]:
    """Steps (token, text, logprobs, finish_reason) from a stream of tokens, as mlx-lm's
    stream_generate makes them: an end-of-sequence token ends it with "stop" (and has no text),
    the `max_tokens`-th with "length". Closing it closes `pairs` at once (a speculating stream
    trims its KV cache then; a batched one leaves the batch)."""
    detokenizer = tokenizer.detokenizer  # a fresh one per access
    made = 0
    try:
        for token, logprobs in pairs:
            made += 1
            if token in eos_ids:
                detokenizer.finalize()
                yield Step(token, detokenizer.last_segment, logprobs, "stop")
                return
            detokenizer.add_token(token)
            if made >= max_tokens:
                detokenizer.finalize()
                yield Step(token, detokenizer.last_segment, logprobs, "length")
                return
            yield Step(token, detokenizer.last_segment, logprobs, None)
    finally:
        pairs.close()
