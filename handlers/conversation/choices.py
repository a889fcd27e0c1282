"""Several generations for one request: `n` choices, `best_of` candidates, batched prompts.

Each choice is its own stream on the engine's worker, so they are decoded together (batched) and
interleave with other clients' streams; at most LIMIT run at once, so a 64-prompt batch never
floods the queue or stalls a chat. Events come back tagged with the choice's index, in the order
they are produced (streamed choices interleave by index, as OpenAI's do).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Sequence

from engine.errors import InvalidRequest, RequestTimeout
from engine.request import Finished, Prepared, TextDelta, TokenLogprob
from engine.engine import StreamHandle
from handlers.asgi.middleware import deadline_passed
from handlers.metrics import GenerationObserver

LIMIT = 8  # choices generating at once for one request
_END = object()
ABANDONED_WAIT_S = 60.0  # how long an abandoned stream's final count is waited for (the worker stops within a pass)
_accounting: set[asyncio.Task] = set()  # abandoned streams' counts being awaited (held, or asyncio drops them)


async def _account_abandoned(handle: StreamHandle, observer: GenerationObserver, reason: str = "cancelled") -> None:
    """A stream whose client went away, or that --request-timeout cut off (`reason` "timeout"):
    its Finished "cancelled" (what it read and wrote by then) still goes to /metrics and the
    request log, under `reason`."""
    done = [ev for ev in await handle.remaining(ABANDONED_WAIT_S) if isinstance(ev, Finished)]
    # None: it was still queued (nothing read), or the worker took too long to say.
    observer.finished(replace(done[-1] if done else Finished("cancelled", 0, 0), finish_reason=reason))


def _account_later(handle: StreamHandle, observer: GenerationObserver, reason: str) -> None:
    task = asyncio.get_running_loop().create_task(_account_abandoned(handle, observer, reason))
    _accounting.add(task)
    task.add_done_callback(_accounting.discard)


@dataclass
class ChoiceResult:
    """One finished choice."""

    index: int
    text: str = ""
    done: Finished | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def score(self) -> float:
        """The sum of its tokens' log probabilities (how best_of ranks candidates)."""
        return sum(t.logprob or 0.0 for t in self.logprobs)


def seeded(prepared: Prepared, choice: int) -> Prepared:
    """Choice `choice`'s own seed (seed + choice), so a seeded request stays reproducible and its
    choices still differ."""
    if choice == 0 or prepared.params.seed is None:
        return prepared
    return replace(prepared, params=replace(prepared.params, seed=prepared.params.seed + choice))


def check_batch(prepared: list[Prepared], per_prompt: int, limit: int, param: str = "prompt") -> None:
    """A 400 when a request's prompts plus max_tokens, times its choices, pass --max-batch-tokens."""
    total = sum((len(p.prompt) + p.max_tokens) * per_prompt for p in prepared)
    if total > limit:
        raise InvalidRequest(f"The request asks for {total} tokens (prompts plus max_tokens, times n or best_of); "
                             f"this server takes at most {limit} per request (--max-batch-tokens).",
                             param=param, code="batch_too_large")


async def events(starts: Sequence[Callable[[], StreamHandle]], route: str, model: str,
                 limit: int = LIMIT) -> AsyncIterator[tuple[int, Any]]:
    """(index, event) for every choice's events as they come; a failure is raised here once,
    and every other choice is then cancelled. All choices end by the first one's deadline
    (--request-timeout is per request)."""
    queue: asyncio.Queue = asyncio.Queue()
    handles: dict[int, StreamHandle] = {}
    deadline: list[float | None] = []  # the first stream's: every later choice shares it

    async def pump(index: int) -> None:
        observer = GenerationObserver(route, model)
        finished = False
        try:
            handle = handles[index] = starts[index]()
            if deadline:
                handle.limit_to(deadline[0])
            else:
                deadline.append(handle.deadline)
            async for ev in handle:
                if isinstance(ev, TextDelta):
                    observer.first_text()
                elif isinstance(ev, Finished):
                    finished = True
                    observer.finished(ev)
                await queue.put((index, ev))
        except asyncio.CancelledError:
            handle = handles.get(index)
            if handle is not None and not finished:
                handle.cancel()
                _account_later(handle, observer, "timeout" if deadline_passed() else "cancelled")
            raise
        except Exception as e:  # handed to the consumer, which raises it
            handle = handles.get(index)
            if isinstance(e, RequestTimeout) and handle is not None and not finished:
                _account_later(handle, observer, "timeout")
            await queue.put((index, e))
        finally:
            await queue.put((index, _END))

    waiting = list(range(len(starts)))
    tasks: list[asyncio.Task] = []
    running = 0
    try:
        while waiting or running:
            while waiting and running < limit:
                tasks.append(asyncio.create_task(pump(waiting.pop(0))))
                running += 1
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for handle in handles.values():
            handle.cancel()
        for task in tasks:
            task.cancel()


async def collect(starts: Sequence[Callable[[], StreamHandle]], route: str, model: str) -> list[ChoiceResult]:
    """Run every choice to its end."""
    results = [ChoiceResult(i) for i in range(len(starts))]
    parts: list[list[str]] = [[] for _ in starts]
    async for index, ev in events(starts, route, model):
        if isinstance(ev, TextDelta):
            parts[index].append(ev.text)
            results[index].logprobs.extend(ev.logprobs)
        elif isinstance(ev, Finished):
            results[index].done = ev
    for result, text in zip(results, parts):
        result.text = "".join(text)
    return results


def best(candidates: list[ChoiceResult], n: int) -> list[ChoiceResult]:
    """The `n` candidates with the highest total log probability, in their original order."""
    if len(candidates) <= n:
        return candidates
    return sorted(sorted(candidates, key=lambda c: -c.score)[:n], key=lambda c: c.index)
