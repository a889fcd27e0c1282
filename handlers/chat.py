"""POST /v1/chat/completions."""
from __future__ import annotations

from typing import Optional

from connexion import request

from engine.errors import InvalidRequest
from engine.tools import ToolCall, parse_tool_calls
from engine.text import Finished, TextDelta
from handlers import protocol, sse
from handlers.metrics import GenerationObserver


def _finish(done: Finished, calls: list[ToolCall]) -> str:
    """"tool_calls" when the model ended its turn with calls (a cut-off answer stays "length")."""
    return "tool_calls" if calls and done.finish_reason == "stop" else done.finish_reason


async def create(body: dict):
    engine = request.state.engine
    req = protocol.parse_chat(body)
    if req.newest_has_media:
        info = engine.model_info(req.model)
        vision = [m.id for m in engine.list_models() if m.type == "vision"]
        hint = f"Use a vision model such as '{vision[0]}'." if vision else "No vision model is available on this server."
        if info.type != "vision":
            raise InvalidRequest(f"The model '{req.model}' accepts text only, and the newest message has an "
                                 f"image or audio part. {hint}", param="messages", code="model_not_multimodal")
    prepared = await engine.prepare_chat(req.model, req.messages, req.params, req.tools)
    cid, created = protocol.new_id("chatcmpl"), protocol.now()
    handle = engine.stream(prepared)
    observer = GenerationObserver("chat.completions", req.model)
    if not req.stream:
        text, done, logprobs = await sse.collect(handle, observer)
        calls: list[ToolCall] = []
        if req.tools_active:
            text, calls = parse_tool_calls(text)
        return protocol.json_ok(protocol.chat_completion(cid, created, req.model, text, _finish(done, calls),
                                                         done.prompt_tokens, done.completion_tokens,
                                                         logprobs if req.params.logprobs else None, calls),
                                prepared.warnings)

    held: list[str] = []  # with tools on offer, text is held until the calls can be parsed

    def on_delta(delta: TextDelta) -> Optional[dict]:
        if req.tools_active:
            held.append(delta.text)
            return None
        return protocol.chat_chunk(cid, created, req.model, {"content": delta.text}, with_usage_field=req.include_usage,
                                   logprobs=delta.logprobs if req.params.logprobs else None)

    def on_finish(done: Finished) -> list[dict]:
        chunks = []
        calls: list[ToolCall] = []
        if req.tools_active:
            text, calls = parse_tool_calls("".join(held))
            if text:
                chunks.append(protocol.chat_chunk(cid, created, req.model, {"content": text},
                                                  with_usage_field=req.include_usage))
            chunks += [protocol.chat_chunk(cid, created, req.model, d, with_usage_field=req.include_usage)
                       for d in protocol.tool_call_deltas(calls)]
        chunks.append(protocol.chat_chunk(cid, created, req.model, {}, _finish(done, calls),
                                          with_usage_field=req.include_usage))
        if req.include_usage:
            chunks.append(protocol.usage_chunk("chat.completion.chunk", cid, created, req.model,
                                               done.prompt_tokens, done.completion_tokens))
        return chunks

    first = protocol.chat_chunk(cid, created, req.model, {"role": "assistant", "content": ""},
                                with_usage_field=req.include_usage)
    return sse.stream_response(handle, observer, on_delta, on_finish, first, headers=protocol.warning_headers(prepared.warnings))
