"""POST /v1/chat/completions: one answer, or `n` independent choices (one shared prefill, each
sampled with its own seed, streamed interleaved by index)."""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from connexion import request

from engine.request import Conversation, Finished
from engine.request import ToolCall
from engine.engine import AnswerStream, answer
from handlers.conversation import cache_scope, choices, generation
from handlers.wire import protocol, sse

ROUTE = "chat.completions"


def _finish(done: Finished, calls: list[ToolCall]) -> str:
    """"tool_calls" when the model ended its turn with calls (a cut-off answer stays "length")."""
    return "tool_calls" if calls and done.finish_reason == "stop" else done.finish_reason


async def create(body: dict):
    engine = request.state.engine
    req = await asyncio.to_thread(protocol.parse_chat, body)  # off the loop: schemas and strict tools compile while parsing
    conv = Conversation(req.model, req.messages, req.params, req.tools, req.newest_media,
                        image_chunk_size=req.image_chunk_size, tool_choice=req.tool_choice, fields=req.fields,
                        thinking=req.thinking, template_kwargs=req.template_kwargs, cache=cache_scope.of(body))
    prepared = await generation.prepare(engine, conv, request.state.image_sources)
    if req.n > 1:
        choices.check_batch([prepared], req.n, request.state.max_batch_tokens, param="n")
        prepared = await engine.share_prefill(prepared)
    starts = [lambda i=i: engine.stream(choices.seeded(prepared, i)) for i in range(req.n)]
    cid, created = protocol.new_id("chatcmpl"), protocol.now()
    if not req.stream:
        results = await choices.collect(starts, ROUTE, req.model)
        out, thought = [], None
        for c in results:
            a = generation.split_answer(conv, prepared, c.text, c.done)
            out.append(protocol.chat_choice(c.index, a.text, _finish(c.done, a.calls),
                                            c.logprobs if req.params.logprobs else None, a.calls, a.reasoning,
                                            req.custom_tools))
            if a.reasoning_tokens is not None:
                thought = (thought or 0) + a.reasoning_tokens
        done = results[0].done
        return protocol.json_ok(protocol.chat_completion(cid, created, req.model, out, done.prompt_tokens,
                                                         sum(c.done.completion_tokens for c in results),
                                                         done.cached_tokens, thought),
                                prepared.warnings)

    answers = [AnswerStream(conv, prepared) for _ in range(req.n)]  # with tools, calls are held back
    totals: dict[str, Any] = {"prompt": 0, "completion": 0, "cached": 0, "reasoning": None}

    def chunk(index: int, delta: dict[str, Any], finish: Optional[str] = None, logprobs=None) -> dict[str, Any]:
        return protocol.chat_chunk(cid, created, req.model, delta, finish, with_usage_field=req.include_usage,
                                   logprobs=logprobs, index=index)

    def encode(index: int, ev: answer.AnswerEvent) -> list[dict[str, Any]]:
        """Chat completion chunks for one choice's neutral events."""
        if isinstance(ev, answer.ReasoningPiece):
            return [chunk(index, {"reasoning_content": ev.text})]
        if isinstance(ev, answer.TextPiece):
            return [chunk(index, {"content": ev.text}, logprobs=ev.logprobs if req.params.logprobs else None)]
        if isinstance(ev, answer.CallMade):
            return [chunk(index, d) for d in protocol.tool_call_deltas([ev.call], first_index=ev.index,
                                                                         custom=req.custom_tools)]
        if isinstance(ev, answer.AnswerFinished):
            totals["prompt"], totals["cached"] = ev.done.prompt_tokens, ev.done.cached_tokens
            totals["completion"] += ev.done.completion_tokens
            if ev.reasoning_tokens is not None:
                totals["reasoning"] = (totals["reasoning"] or 0) + ev.reasoning_tokens
            return [chunk(index, {}, _finish(ev.done, list(ev.calls)))]
        return []

    def last() -> list[dict[str, Any]]:
        if not req.include_usage:
            return []
        return [protocol.usage_chunk("chat.completion.chunk", cid, created, req.model, totals["prompt"],
                                     totals["completion"], totals["cached"], totals["reasoning"])]

    first = [chunk(i, {"role": "assistant", "content": ""}) for i in range(req.n)]
    return sse.choices_response(choices.events(starts, ROUTE, req.model), first,
                                lambda i, ev: [c for n in answers[i].on(ev) for c in encode(i, n)], last,
                                protocol.warning_headers(prepared.warnings))
