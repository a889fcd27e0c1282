"""POST /v1/completions (legacy text completions): one prompt or a batch (strings or token ids),
`n` choices and `best_of` candidates per prompt, `echo` with the prompt's own log probabilities
(what evaluation harnesses score with), `max_tokens: 0` to score without generating.

Choice i of prompt p has index p * n + i, as OpenAI numbers them; usage counts each prompt once
and every generated token (best_of candidates included). The budget rule for `max_tokens` is
engine/generation/budget.py's `max_new_tokens`.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from connexion import request
from starlette.responses import StreamingResponse

from engine.engine import Engine
from engine.request import CacheScope, Finished, Prepared, TextDelta, TokenLogprob
from engine.engine import StreamHandle
from handlers.conversation import cache_scope, choices
from handlers.wire import protocol, sse

ROUTE = "completions"


async def _prepare_all(engine: Engine, req: protocol.CompletionRequest, cache: CacheScope) -> list[Prepared]:
    prepared = [await engine.prepare_completion(req.model, p, req.params, req.echo, cache) for p in req.prompts]
    choices.check_batch(prepared, req.best_of, request.state.max_batch_tokens)
    if req.best_of > 1 or req.score_prompt is not None:  # one prefill for every choice (and the scores)
        prepared = [await engine.share_prefill(p, req.score_prompt) for p in prepared]
    return prepared


def _starts(engine: Engine, prepared: list[Prepared], per_prompt: int) -> list[Callable[[], StreamHandle]]:
    return [lambda p=p, i=i: engine.stream(choices.seeded(p, i)) for p in prepared for i in range(per_prompt)]


def _echo(req: protocol.CompletionRequest, prompt: str | list[int], prepared: Prepared) -> tuple[str, list[TokenLogprob]]:
    """What echo puts before a choice: the prompt's text and (with logprobs) its tokens' logprobs."""
    if not req.echo:
        return "", []
    text = prompt if isinstance(prompt, str) else prepared.prompt_text()
    return text, list(prepared.prompt_logprobs) if req.logprobs is not None else []


async def create(body: dict):
    engine = request.state.engine
    req = await asyncio.to_thread(protocol.parse_completion, body)  # off the loop: schemas and strict tools compile while parsing
    prepared = await _prepare_all(engine, req, cache_scope.of(body))
    cid, created = protocol.new_id("cmpl"), protocol.now()
    warnings = prepared[0].warnings
    echoes = [_echo(req, p, pp) for p, pp in zip(req.prompts, prepared)]
    starts = _starts(engine, prepared, req.best_of)
    prompt_tokens = sum(len(p.prompt) for p in prepared)  # each prompt once, whatever n
    if req.stream:
        return _stream(req, cid, created, starts, echoes, prompt_tokens, warnings)
    results = await choices.collect(starts, ROUTE, req.model)
    out, generated, cached = [], 0, 0
    for p in range(len(prepared)):
        candidates = results[p * req.best_of:(p + 1) * req.best_of]
        generated += sum(c.done.completion_tokens for c in candidates)
        cached += max(c.done.cached_tokens for c in candidates)  # each prompt once, as its tokens are
        for i, c in enumerate(choices.best(candidates, req.n)):
            text, logprobs = echoes[p]
            out.append(protocol.text_choice(p * req.n + i, text + c.text, c.done.finish_reason,
                                            logprobs + c.logprobs if req.logprobs is not None else None))
    return protocol.json_ok(protocol.completion_body(cid, created, req.model, out,
                                                     (prompt_tokens, generated, cached)), warnings)


def _stream(req: protocol.CompletionRequest, cid: str, created: int, starts: list[Callable[[], StreamHandle]],
            echoes: list[tuple[str, list[TokenLogprob]]], prompt_tokens: int,
            warnings: tuple[str, ...]) -> StreamingResponse:
    """Chunks of every choice, interleaved as they come, each with its index; with echo each
    choice opens with the prompt (and its logprobs)."""
    with_logprobs = req.logprobs is not None
    sent = [len(echoes[i // req.n][0]) for i in range(len(starts))]  # each choice's next text_offset
    generated = [0]
    cached = [0] * (len(starts) // req.n)  # per prompt: what the prompt cache held of it

    def chunk(index: int, text: str, finish: str | None = None, logprobs=None, offset: int = 0) -> dict:
        return protocol.text_completion(cid, created, req.model, text, finish,
                                        logprobs=logprobs if with_logprobs else None, offset=offset, index=index)

    first = [chunk(i, echoes[i // req.n][0], logprobs=echoes[i // req.n][1])
             for i in range(len(starts)) if echoes[i // req.n][0]]

    def on_event(index: int, ev: object) -> list[dict]:
        if isinstance(ev, TextDelta):
            out = chunk(index, ev.text, logprobs=ev.logprobs, offset=sent[index])
            sent[index] += len(ev.text)
            return [out]
        if isinstance(ev, Finished):
            generated[0] += ev.completion_tokens
            cached[index // req.n] = max(cached[index // req.n], ev.cached_tokens)
            return [chunk(index, "", ev.finish_reason)]
        return []

    def last() -> list[dict]:
        if not req.include_usage:
            return []
        return [protocol.usage_chunk("text_completion", cid, created, req.model, prompt_tokens, generated[0],
                                     sum(cached))]

    return sse.choices_response(choices.events(starts, ROUTE, req.model), first, on_event, last,
                                protocol.warning_headers(warnings))
