"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart uploads)."""
from __future__ import annotations

from typing import Any, AsyncIterator, Optional

from connexion import request
from starlette.responses import StreamingResponse

from engine.engine import TranscribeOptions, TranscriptDelta, TranscriptDone
from engine.errors import EngineError, InvalidRequest
from handlers.wire import sse

# Whisper's language codes -> the names OpenAI's verbose_json reports.
_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian", "ja": "japanese",
          "zh": "chinese", "pt": "portuguese", "ru": "russian", "nl": "dutch", "ko": "korean"}


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(done: TranscriptDone) -> str:
    return "".join(f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n\n"
                   for i, s in enumerate(done.segments, start=1))


def vtt(done: TranscriptDone) -> str:
    return "WEBVTT\n\n" + "".join(f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in done.segments)


def verbose(done: TranscriptDone, task: str, words: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task": task, "language": _NAMES.get(done.language, done.language), "duration": round(done.duration, 2),
        "text": done.text,
        "segments": [{"id": s.id, "seek": int(s.start * 100), "start": s.start, "end": s.end, "text": s.text,
                      "tokens": list(s.tokens), "temperature": s.temperature, "avg_logprob": s.avg_logprob,
                      "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob}
                     for s in done.segments],
        "usage": usage(done),
    }
    if words:
        out["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for w in done.words]
    return out


def usage(done: TranscriptDone) -> dict[str, Any]:
    return {"type": "duration", "seconds": round(done.duration, 2)}


async def _collect(handle) -> TranscriptDone:
    try:
        async for event in handle:
            if isinstance(event, TranscriptDone):
                return event
    finally:
        handle.cancel()
    raise RuntimeError("transcription ended without a result")


async def _run(body: dict, file: Any, task: str):
    engine = request.state.engine
    if file is None or not hasattr(file, "read"):
        raise InvalidRequest("The 'file' field must be an uploaded audio file.", param="file")
    data = await file.read()
    fmt = body.get("response_format") or "json"
    granularities = body.get("timestamp_granularities[]") or []
    if isinstance(granularities, str):
        granularities = [granularities]
    words = "word" in granularities
    if granularities and fmt != "verbose_json":
        raise InvalidRequest("timestamp_granularities needs response_format verbose_json.",
                             param="timestamp_granularities[]")
    stream = str(body.get("stream", "false")).lower() == "true"
    if stream and fmt not in ("json", "text"):
        raise InvalidRequest("stream=true gives text events; use response_format json or text.", param="stream")
    options = TranscribeOptions(language=body.get("language") or None, prompt=body.get("prompt") or None,
                                temperature=float(body.get("temperature") or 0.0), task=task,
                                word_timestamps=words)
    handle = await engine.transcribe(body["model"], data, getattr(file, "filename", "") or "", options)
    if stream:
        return _stream(handle)
    done = await _collect(handle)
    if fmt == "text":
        return done.text + "\n", 200, {"Content-Type": "text/plain"}
    if fmt == "srt":
        return srt(done), 200, {"Content-Type": "text/plain"}
    if fmt == "vtt":
        return vtt(done), 200, {"Content-Type": "text/plain"}
    if fmt == "verbose_json":
        return verbose(done, task, words), 200, {"Content-Type": "application/json"}
    return {"text": done.text, "usage": usage(done)}, 200, {"Content-Type": "application/json"}


def _stream(handle) -> StreamingResponse:
    """OpenAI's transcript events: a delta per finished window, then done."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in handle:
                if isinstance(event, TranscriptDelta):
                    yield sse.named_event({"type": "transcript.text.delta", "delta": event.text})
                elif isinstance(event, TranscriptDone):
                    yield sse.named_event({"type": "transcript.text.done", "text": event.text,
                                           "usage": usage(event)})
        except EngineError as e:
            yield sse.event(sse.openai_error_event(e))
        except Exception:
            sse.log.exception("transcription stream failed")
            yield sse.event(sse.openai_error_event(None))
        finally:
            handle.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def transcribe(body: dict, file: Optional[Any] = None):
    return await _run(body, file, "transcribe")


async def translate(body: dict, file: Optional[Any] = None):
    return await _run(body, file, "translate")
