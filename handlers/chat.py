"""POST /v1/chat/completions."""
from __future__ import annotations

from connexion import request

from engine.errors import InvalidRequest
from engine.text import Finished, TextDelta
from handlers import protocol, sse
from handlers.metrics import GenerationObserver


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
    prepared = await engine.prepare_chat(req.model, req.messages, req.params)
    cid, created = protocol.new_id("chatcmpl"), protocol.now()
    handle = engine.stream(prepared)
    observer = GenerationObserver("chat.completions", req.model)
    if not req.stream:
        text, done, logprobs = await sse.collect(handle, observer)
        return protocol.json_ok(protocol.chat_completion(cid, created, req.model, text, done.finish_reason,
                                                         done.prompt_tokens, done.completion_tokens,
                                                         logprobs if req.params.logprobs else None),
                                prepared.warnings)

    def on_delta(delta: TextDelta) -> dict:
        return protocol.chat_chunk(cid, created, req.model, {"content": delta.text}, with_usage_field=req.include_usage,
                                   logprobs=delta.logprobs if req.params.logprobs else None)

    def on_finish(done: Finished) -> list[dict]:
        chunks = [protocol.chat_chunk(cid, created, req.model, {}, done.finish_reason,
                                      with_usage_field=req.include_usage)]
        if req.include_usage:
            chunks.append(protocol.usage_chunk("chat.completion.chunk", cid, created, req.model,
                                               done.prompt_tokens, done.completion_tokens))
        return chunks

    first = protocol.chat_chunk(cid, created, req.model, {"role": "assistant", "content": ""},
                                with_usage_field=req.include_usage)
    return sse.stream_response(handle, observer, on_delta, on_finish, first, headers=protocol.warning_headers(prepared.warnings))
