"""Ollama's native API on openmlx's port: /api/chat, generate, embed, tags, show, ps, pull,
copy, delete, version, and HEAD /.

Chat and generate take the same path as the OpenAI and Anthropic APIs (handlers/conversation/generation.py:
prepare, the scheduler, the prompt cache, tool-call parsing, the neutral answer events of
engine/generation/answer.py); this module only maps Ollama's wire types (handlers/wire/ollama_protocol.py) and
the model manager's keep_alive onto the engine. Streams are NDJSON, on unless `stream: false`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Callable, Optional

from connexion import request
from starlette.responses import Response, StreamingResponse

from engine.engine import AnswerStream, Engine, answer
from engine.errors import EngineError
from engine.request import Conversation, Finished, Prepared, Started, TextDelta
from handlers.conversation import choices, generation
from handlers.wire import ollama_protocol as op
from handlers.wire.protocol import warning_headers

log = logging.getLogger("openmlx.http")
NDJSON = "application/x-ndjson"


def _engine() -> Engine:
    return request.state.engine


async def _model_id(engine: Engine, name: str) -> str:
    """The id the name stands for (`name:latest`, an alias, a bare repo name); 404 if unknown."""
    return (await asyncio.to_thread(engine.model_info, name)).id


def _keep_alive(engine: Engine, body: dict[str, Any]) -> float:
    value = body.get("keep_alive")
    return engine.config.keep_alive_s if value is None else op.parse_duration(value)


def _json(body: dict[str, Any], headers: Optional[dict[str, str]] = None) -> tuple[dict[str, Any], int, dict[str, str]]:
    return body, 200, {"Content-Type": "application/json", **(headers or {})}


def _ndjson(lines: AsyncIterator[dict[str, Any]], headers: Optional[dict[str, str]] = None) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for line in lines:
            yield json.dumps(line, ensure_ascii=False) + "\n"

    return StreamingResponse(body(), media_type=NDJSON, headers={"Cache-Control": "no-cache",
                                                                 "X-Accel-Buffering": "no", **(headers or {})})


# --- version, tags, show, ps ------------------------------------------------------------
async def version() -> dict[str, Any]:
    return {"version": op.VERSION}


async def head_root() -> Response:
    """Ollama's liveness answer to HEAD / (its GET / says "Ollama is running"; here GET / is the chat page)."""
    return Response(status_code=200, media_type="text/plain")


async def tags() -> dict[str, Any]:
    engine = _engine()

    def listing() -> list[dict[str, Any]]:
        out = []
        for info in engine.list_models():
            try:
                out.append(op.tag(info, engine.describe(info.id)[1]))  # a copy keeps its own name
            except EngineError:  # removed meanwhile
                continue
        return out

    return {"models": await asyncio.to_thread(listing)}


async def show(body: dict[str, Any]) -> dict[str, Any]:
    engine = _engine()
    return op.show(*await asyncio.to_thread(engine.describe, body["model"]))


async def ps() -> dict[str, Any]:
    engine = _engine()

    def listing() -> list[dict[str, Any]]:
        on_gpu = "gpu" in engine.health().device.lower()
        return [op.running(r, engine.describe(r.id)[1], on_gpu) for r in engine.resident()]

    return {"models": await asyncio.to_thread(listing)}


# --- chat and generate -------------------------------------------------------------------
async def _prepare(engine: Engine, conv: Conversation, timing: op.Timing, was_loaded: bool) -> Prepared:
    prepared = await generation.prepare(engine, conv, request.state.image_sources)
    timing.loaded = time.monotonic()
    timing.load_s = 0.0 if was_loaded else timing.loaded - timing.start
    return prepared


async def _load_only(engine: Engine, model_id: str, keep: float, kind: str) -> tuple[dict[str, Any], int, dict]:
    """A request without messages (prompt): load the model, or with keep_alive 0 unload it."""
    if keep <= 0:
        await engine.unload(model_id)
        reason = "unload"
    else:
        await engine.load(model_id)
        await engine.keep(model_id, keep)
        reason = "load"
    body = {"model": op.ollama_name(model_id), "created_at": op.now_iso(), "done": True, "done_reason": reason}
    body.update({"message": op.chat_message("")} if kind == "chat" else {"response": ""})
    return _json(body)


def _run(engine: Engine, conv: Conversation, prepared: Prepared, route: str, name: str, timing: op.Timing,
         piece: Callable[[str, Optional[str], list], dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Ollama's chunks of one generation: `piece(content, thinking, calls)` shapes a chunk; the
    last one carries done, done_reason and the counts and durations."""
    stream = AnswerStream(conv, prepared)

    async def lines() -> AsyncIterator[dict[str, Any]]:
        done: Optional[Finished] = None
        events = choices.events([lambda: engine.stream(prepared)], route, name)
        try:
            async for _i, ev in events:
                if isinstance(ev, Started):
                    timing.started = time.monotonic()
                elif isinstance(ev, TextDelta) and not timing.first:
                    timing.first = time.monotonic()
                for n in stream.on(ev):
                    if isinstance(n, answer.ReasoningPiece) and n.text:
                        yield piece("", n.text, [])
                    elif isinstance(n, answer.TextPiece) and n.text:
                        yield piece(n.text, None, [])
                    elif isinstance(n, answer.CallMade):
                        yield piece("", None, [n.call])
                    elif isinstance(n, answer.AnswerFinished):
                        done = n.done
        finally:
            await events.aclose()  # type: ignore[attr-defined]  (cancels the generation if we stop early)
        timing.end = time.monotonic()
        if done is not None:
            yield {**piece("", None, []), "done": True, **timing.stats(done)}

    return lines()


async def _answer(engine: Engine, model_id: str, keep: float, lines: AsyncIterator[dict[str, Any]],
                  stream: bool, merge: Callable[[list[dict[str, Any]]], dict[str, Any]], warnings: tuple[str, ...]):
    """Stream the chunks (NDJSON), or merge them into one answer; then apply keep_alive."""
    headers = warning_headers(warnings)
    if not stream:
        try:
            chunks = [c async for c in lines]
        finally:
            await engine.keep(model_id, keep)
        return _json(merge(chunks), headers)

    async def guarded() -> AsyncIterator[dict[str, Any]]:
        try:
            async for c in lines:
                yield c
        except EngineError as e:  # after the headers: the error is the stream's last line
            yield {"error": e.message}
        except Exception:
            log.exception("ollama stream failed")
            yield {"error": "The server had an error while generating."}
        finally:
            await lines.aclose()  # type: ignore[attr-defined]
            try:
                await asyncio.shield(engine.keep(model_id, keep))
            except (EngineError, asyncio.CancelledError):
                pass

    return _ndjson(guarded(), headers)


async def chat(body: dict[str, Any]):
    engine = _engine()
    timing = op.Timing(time.monotonic())
    keep = _keep_alive(engine, body)
    model_id = await _model_id(engine, body["model"])
    if not body["messages"]:
        return await _load_only(engine, model_id, keep, "chat")
    info = await asyncio.to_thread(engine.model_info, model_id)
    opts = op.options(body, info.context_length)
    conv = await asyncio.to_thread(op.chat_conversation, model_id, body, opts)
    prepared = await _prepare(engine, conv, timing, info.loaded)
    name = body["model"]  # echoed as sent, as Ollama does

    def piece(content: str, thinking: Optional[str], calls: list) -> dict[str, Any]:
        return {"model": name, "created_at": op.now_iso(), "message": op.chat_message(content, thinking, calls),
                "done": False}

    def merge(chunks: list[dict[str, Any]]) -> dict[str, Any]:
        last = chunks[-1]
        text = "".join(c["message"]["content"] for c in chunks)
        thought = "".join(c["message"].get("thinking") or "" for c in chunks)
        calls = [t for c in chunks for t in c["message"].get("tool_calls") or ()]
        message = {"role": "assistant", "content": text, **({"thinking": thought} if thought else {}),
                   **({"tool_calls": [{**t, "function": {**t["function"], "index": i}}
                                      for i, t in enumerate(calls)]} if calls else {})}
        return {**last, "message": message}

    lines = _run(engine, conv, prepared, "ollama.chat", name, timing, piece)
    return await _answer(engine, model_id, keep, lines, body.get("stream", True), merge,
                         opts.warnings + prepared.warnings)


async def generate(body: dict[str, Any]):
    engine = _engine()
    timing = op.Timing(time.monotonic())
    keep = _keep_alive(engine, body)
    model_id = await _model_id(engine, body["model"])
    if not body.get("prompt") and not body.get("images") and not body.get("suffix"):
        return await _load_only(engine, model_id, keep, "generate")
    info = await asyncio.to_thread(engine.model_info, model_id)
    opts = op.options(body, info.context_length)
    op.refuse_suffix(body)
    if body.get("raw"):
        if body.get("images"):
            from engine.errors import InvalidRequest

            raise InvalidRequest("raw prompts can't carry images; send them without raw.", param="images")
        conv = Conversation(model_id, [], opts.params, fields=op.GENERATE_FIELDS)
        await engine.ensure_model(model_id)
        prepared = await engine.prepare_completion(model_id, body.get("prompt") or "", opts.params)
        timing.loaded = time.monotonic()
        timing.load_s = 0.0 if info.loaded else timing.loaded - timing.start
    else:
        conv = await asyncio.to_thread(op.generate_conversation, model_id, body, opts)
        prepared = await _prepare(engine, conv, timing, info.loaded)
    name = body["model"]  # echoed as sent, as Ollama does

    def piece(content: str, thinking: Optional[str], _calls: list) -> dict[str, Any]:
        return {"model": name, "created_at": op.now_iso(), "response": content,
                **({"thinking": thinking} if thinking else {}), "done": False}

    def merge(chunks: list[dict[str, Any]]) -> dict[str, Any]:
        thought = "".join(c.get("thinking") or "" for c in chunks)
        return {**chunks[-1], "response": "".join(c["response"] for c in chunks),
                **({"thinking": thought} if thought else {})}

    lines = _run(engine, conv, prepared, "ollama.generate", name, timing, piece)
    return await _answer(engine, model_id, keep, lines, body.get("stream", True), merge,
                         opts.warnings + prepared.warnings)


# --- embeddings ----------------------------------------------------------------------------
async def embed(body: dict[str, Any]):
    engine = _engine()
    start = time.monotonic()
    keep = _keep_alive(engine, body)
    model_id = await _model_id(engine, body["model"])
    texts = [body["input"]] if isinstance(body["input"], str) else list(body["input"])
    loaded = engine.residency.loaded(model_id)
    result = await engine.embed(model_id, texts, body.get("dimensions")) if texts else None
    await engine.keep(model_id, keep)
    elapsed = int((time.monotonic() - start) * 1e9)
    return {"model": body["model"],
            "embeddings": [[float(x) for x in v] for v in result.vectors] if result else [],
            "total_duration": elapsed, "load_duration": 0 if loaded else elapsed,
            "prompt_eval_count": sum(result.token_counts) if result else 0}


async def embeddings(body: dict[str, Any]):
    """The older /api/embeddings: one `prompt`, one `embedding`."""
    engine = _engine()
    keep = _keep_alive(engine, body)
    model_id = await _model_id(engine, body["model"])
    result = await engine.embed(model_id, [body.get("prompt") or ""])
    await engine.keep(model_id, keep)
    return {"embedding": [float(x) for x in result.vectors[0]]}


# --- the model manager ---------------------------------------------------------------------
async def pull(body: dict[str, Any]):
    engine = _engine()
    name = body.get("model") or body.get("name") or ""
    if not engine.config.hub_download:  # refused before any stream starts
        await engine.pull(name)
    if not body.get("stream", True):
        await engine.pull(name)
        return _json({"status": "success"})

    async def lines() -> AsyncIterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        task = asyncio.ensure_future(engine.pull(name))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=2.0)
                if not task.done():
                    yield {"status": f"pulling {name}"}
            model_id = task.result()
        except EngineError as e:
            yield {"error": e.message}
            return
        finally:
            if not task.done():
                task.cancel()
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success", "model": op.ollama_name(model_id)}

    return _ndjson(lines())


def _bare(name: str) -> str:
    return name[: -len(":latest")] if name.endswith(":latest") else name


async def copy(body: dict[str, Any]):
    engine = _engine()
    destination = _bare(body["destination"])
    if not destination.strip() or any(c.isspace() for c in destination):
        from engine.errors import InvalidRequest

        raise InvalidRequest("destination must be a model name without spaces.", param="destination")
    await asyncio.to_thread(engine.alias, destination, body["source"])
    return None, 200, {"Content-Type": "application/json"}


async def delete(body: dict[str, Any]):
    engine = _engine()
    name = body.get("model") or body.get("name") or ""
    if _bare(name) in engine.store.copies:
        name = _bare(name)
    else:
        name = await _model_id(engine, name)
    await engine.delete(name)
    return None, 200, {"Content-Type": "application/json"}
