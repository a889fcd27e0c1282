"""POST /v1/completions (legacy text completions)."""
from __future__ import annotations

from connexion import request

from engine.text import Finished, TextDelta
from handlers import protocol, sse
from handlers.metrics import GenerationObserver


async def create(body: dict):
    engine = request.state.engine
    req = protocol.parse_completion(body)
    prepared = await engine.prepare_completion(req.model, req.prompt, req.params)
    cid, created = protocol.new_id("cmpl"), protocol.now()
    handle = engine.stream(prepared)
    observer = GenerationObserver("completions", req.model)
    if not req.stream:
        text, done, logprobs = await sse.collect(handle, observer)
        return protocol.json_ok(protocol.text_completion(cid, created, req.model, text, done.finish_reason,
                                                         (done.prompt_tokens, done.completion_tokens),
                                                         logprobs if req.params.logprobs else None),
                                prepared.warnings)

    sent = 0  # characters streamed so far: the text_offset of the next token

    def on_delta(delta: TextDelta) -> dict:
        nonlocal sent
        chunk = protocol.text_completion(cid, created, req.model, delta.text, None,
                                         logprobs=delta.logprobs if req.params.logprobs else None, offset=sent)
        sent += len(delta.text)
        return chunk

    def on_finish(done: Finished) -> list[dict]:
        chunks = [protocol.text_completion(cid, created, req.model, "", done.finish_reason)]
        if req.include_usage:
            chunks.append(protocol.usage_chunk("text_completion", cid, created, req.model,
                                               done.prompt_tokens, done.completion_tokens))
        return chunks

    return sse.stream_response(handle, observer, on_delta, on_finish, headers=protocol.warning_headers(prepared.warnings))
