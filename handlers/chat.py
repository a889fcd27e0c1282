"""POST /v1/chat/completions."""
from __future__ import annotations

from typing import Optional

from connexion import request

from engine.tools import ToolCall
from engine.text import Finished, TextDelta
from handlers import generation, protocol, sse
from handlers.generation import Conversation

ROUTE = "chat.completions"


def _finish(done: Finished, calls: list[ToolCall]) -> str:
    """"tool_calls" when the model ended its turn with calls (a cut-off answer stays "length")."""
    return "tool_calls" if calls and done.finish_reason == "stop" else done.finish_reason


async def create(body: dict):
    engine = request.state.engine
    req = protocol.parse_chat(body)
    conv = Conversation(req.model, req.messages, req.params, req.tools, req.newest_media,
                        image_chunk_size=req.image_chunk_size, tool_choice=req.tool_choice)
    prepared = await generation.prepare(engine, conv, request.state.image_sources)
    cid, created = protocol.new_id("chatcmpl"), protocol.now()
    if not req.stream:
        out = await generation.answer(engine, conv, prepared, ROUTE)
        done = out.done
        return protocol.json_ok(protocol.chat_completion(cid, created, req.model, out.text, _finish(done, out.calls),
                                                         done.prompt_tokens, done.completion_tokens,
                                                         out.logprobs if req.params.logprobs else None, out.calls,
                                                         done.cached_tokens),
                                prepared.warnings)
    handle, observer = generation.start_stream(engine, conv, prepared, ROUTE)

    out = generation.ToolTextStream(conv, prepared)  # with tools, a call is held until it can be parsed

    def on_delta(delta: TextDelta) -> Optional[dict]:
        text = out.feed(delta.text)
        if not text and (req.tools_active or not delta.logprobs):
            return None
        return protocol.chat_chunk(cid, created, req.model, {"content": text}, with_usage_field=req.include_usage,
                                   logprobs=delta.logprobs if req.params.logprobs else None)

    def on_finish(done: Finished) -> list[dict]:
        chunks = []
        calls: list[ToolCall] = []
        if req.tools_active:
            _, text, calls = out.finish(done)
            if text:
                chunks.append(protocol.chat_chunk(cid, created, req.model, {"content": text},
                                                  with_usage_field=req.include_usage))
            chunks += [protocol.chat_chunk(cid, created, req.model, d, with_usage_field=req.include_usage)
                       for d in protocol.tool_call_deltas(calls)]
        chunks.append(protocol.chat_chunk(cid, created, req.model, {}, _finish(done, calls),
                                          with_usage_field=req.include_usage))
        if req.include_usage:
            chunks.append(protocol.usage_chunk("chat.completion.chunk", cid, created, req.model,
                                               done.prompt_tokens, done.completion_tokens, done.cached_tokens))
        return chunks

    first = protocol.chat_chunk(cid, created, req.model, {"role": "assistant", "content": ""},
                                with_usage_field=req.include_usage)
    return sse.stream_response(handle, observer, on_delta, on_finish, [first], headers=protocol.warning_headers(prepared.warnings))
