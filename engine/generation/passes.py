"""A long prompt read in whole passes, and requests waiting on one another's passes.

`read_in_passes` runs a prompt's whole PREFILL_STEP passes through the model, yielding PASS after
each so the worker runs the other streams between them (engine/scheduler.py), and offers each
pass to requests that share the prefix (PromptCache.share). `InFlight` knows which prompts are
being read now: a request that shares a long prefix with one waits for those passes instead of
reading the same tokens again (agents starting together on one system prompt read it once).
Both within one cache scope (engine/request.py `CacheScope`): another caller's prompt is neither
offered nor waited for.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Generator, Iterator, Optional, Sequence

import mlx.core as mx

from engine.generation.prompt_cache import PromptCache, common_prefix, snapshot
from engine.request import PASS, WAIT, Pass

class InFlight:
    """Prompts being prefilled in passes now, and how far each has got. A request that shares a
    long prefix with one waits for those passes (yielding WAIT, so the worker runs them) and then
    starts from what they shared (PromptCache.share) instead of computing the same tokens: agents
    that start together on one long system prompt read it once."""

    def __init__(self, step: int, max_wait_s: float = 120.0) -> None:
        self.step = step  # the prefill pass: what is shared grows by this much
        self.max_wait_s = max_wait_s  # then it reads what is left itself; 0: never waits
        self._now: dict[int, tuple[list[int], list[int], str]] = {}  # id -> (prompt, [tokens done], scope)

    def start(self, prompt: list[int], scope: str = "") -> list[int]:
        """Register a prefill in `scope`; returns the counter to advance (`done[0] = n`) and to `end`."""
        done = [0]
        self._now[id(done)] = (prompt, done, scope)
        return done

    def end(self, done: list[int]) -> None:
        self._now.pop(id(done), None)

    def _worth_waiting(self, prompt: list[int], have: int, scope: str) -> bool:
        for other, done, theirs in list(self._now.values()):
            if theirs != scope:  # its passes are offered to its own scope only
                continue
            # what its passes will share: whole passes, within the prefix both prompts have
            target = min(common_prefix(other, prompt), (len(other) - 1) // self.step * self.step, len(prompt) - 1)
            if done[0] < target and target - have >= self.step:
                return True
        return False

    def wait(self, prompt: list[int], cache: PromptCache, cancelled: Callable[[], bool],
             scope: str = "") -> Iterator[Pass]:
        """WAIT while another prefill of `scope` would give `prompt` at least a pass more than
        the prompt cache holds for it (bounded by max_wait_s)."""
        deadline = time.monotonic() + self.max_wait_s
        while self._now and not cancelled() and time.monotonic() < deadline \
                and self._worth_waiting(prompt, cache.peek(prompt, scope), scope):
            yield WAIT


def read_in_passes(model: Any, prompt: list[int], reused: int, cache: list[Any], step: int,
                   cancelled: Callable[[], bool], prompt_cache: PromptCache,
                   in_flight: InFlight, until: Optional[int] = None,
                   scope: str = "") -> Generator[Pass, None, tuple[int, bool]]:
    """Read `prompt` from `reused` in whole passes of `step` tokens into `cache` (the rest, under
    one pass and the last token, is left for the first decode pass; with `until`, the passes stop
    there at the latest), offering each pass to `scope`. Returns how far it got and whether the
    client left (what was read is then kept in the prompt cache)."""
    done = in_flight.start(prompt, scope)
    limit = len(prompt) - 1 if until is None else min(until, len(prompt) - 1)
    try:
        for _ in range(max(0, limit - reused) // step):
            model(mx.array(prompt[reused:reused + step])[None], cache=cache)
            mx.eval([c.state for c in cache])
            mx.clear_cache()
            reused += step
            if cancelled():
                prompt_cache.put(prompt[:reused], cache, scope=scope)
                return reused, True
            done[0] = reused
            prompt_cache.share(prompt[:reused], cache, scope)
            yield PASS
    finally:
        in_flight.end(done)
    return reused, False


def keep_prompt_end(model: Any, prompt: list[int], reused: int, cache: list[Any], prompt_cache: PromptCache,
                    resume_at: Sequence[int] = (), scope: str = "") -> int:
    """For a cache that can't be cut back (engine/generation/prompt_cache.py): read the prompt up
    to its last token (under one pass is left after `read_in_passes`) and keep a snapshot there,
    where the same prompt again and the conversation's next turn resume, and at each of
    `resume_at` on the way (where the history ends and the generation prompt begins), for `scope`.
    Returns how far `cache` now holds the prompt."""
    end = len(prompt) - 1
    for point in sorted({p for p in resume_at if reused < p < end} | {end}):
        if point <= reused:  # it came from that very snapshot
            continue
        model(mx.array(prompt[reused:point])[None], cache=cache)
        mx.eval([c.state for c in cache])
        reused = point
        held = snapshot(cache)
        if held is not None:
            prompt_cache.put(prompt[:point], held, scope=scope)
    return reused
