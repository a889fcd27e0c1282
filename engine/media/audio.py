"""Speech to text with Whisper through mlx-audio, window by window.

Audio is decoded to 16 kHz mono (the upload limit bounds it) and transcribed in 30-second
windows, so memory stays bounded however long the recording and each window's text can be sent
as soon as it is done. A window that is full and ends mid-speech hands its last (possibly cut)
segment to the next window, which starts where that segment started, as Whisper's own seek does.
Earlier windows' text is not fed back as a prompt: with tiny models that made windows loop on a
sentence (measured on a 97-second recording: word error rate 52% with it, 14% without; mlx-audio's own
whole-file loop: 33%).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np

from engine.config import EngineConfig
from engine.errors import InvalidRequest
from engine.models.memory import MemoryEstimate, MemoryGate
from engine.models.probe import Probe

log = logging.getLogger("openmlx.engine")
SAMPLE_RATE = 16000
WINDOW_S = 30


@dataclass(frozen=True)
class TranscribeOptions:
    language: Optional[str] = None
    prompt: Optional[str] = None
    temperature: float = 0.0
    task: str = "transcribe"  # or "translate" (to English)
    word_timestamps: bool = False


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class TranscriptDelta:
    """The text of one finished window."""

    text: str
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class TranscriptDone:
    text: str
    language: str
    duration: float
    segments: tuple[Segment, ...]
    cancelled: bool = False

    @property
    def words(self) -> tuple[Word, ...]:
        return tuple(w for s in self.segments for w in s.words)


TranscriptEvent = TranscriptDelta | TranscriptDone


# Limits decided from the header, before a sample is decoded. A 12 KB WAV that declares a 1 Hz
# rate would otherwise be resampled into hours of 16 kHz audio (a memory bomb).
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
# No codec decoded here encodes speech in fewer than 500 bytes a second (4 kbps), so a file may
# hold at most len(data) / 500 seconds: decoded float32 at 16 kHz is then at most
# 64000 / 500 = 128 bytes per uploaded byte (and at most --max-audio-seconds in all).
MIN_BYTES_PER_SECOND = 500
DEFAULT_MAX_SECONDS = EngineConfig.max_audio_seconds  # --max-audio-seconds
_UNCHECKED = object()


def _header_info(data: bytes) -> Any:
    """miniaudio's header facts (rate, frames) for wav/flac/ogg/mp3; None for other formats."""
    import miniaudio

    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        reader = miniaudio.wav_get_info
    elif data[:4] == b"fLaC":
        reader = miniaudio.flac_get_info
    elif data[:4] == b"OggS":
        reader = miniaudio.vorbis_get_info
    elif data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        reader = miniaudio.mp3_get_info
    else:
        return None
    try:
        return reader(data)
    except miniaudio.DecodeError:
        return None  # not what its first bytes say: the ffmpeg path decides, bounded the same way


def check_audio_header(data: bytes, max_seconds: float = DEFAULT_MAX_SECONDS, param: str = "file") -> Optional[float]:
    """The declared duration in seconds (None where the header can't be read here), or a 400
    (sample rate outside 8-192 kHz, more audio than the bytes can hold) / 413 (too long)."""
    if not data:
        raise InvalidRequest("The audio file is empty.", param=param, code="invalid_audio")
    info = _header_info(data)
    if info is None:
        return None
    if not MIN_SAMPLE_RATE <= info.sample_rate <= MAX_SAMPLE_RATE or info.nchannels < 1:
        raise InvalidRequest(f"The audio declares a sample rate of {info.sample_rate} Hz and {info.nchannels} "
                             f"channel(s); send {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz audio.", param=param,
                             code="invalid_audio")
    seconds = info.num_frames / info.sample_rate
    _check_duration(seconds, len(data), max_seconds, param)
    return seconds


def _check_duration(seconds: float, size: int, max_seconds: float, param: str) -> None:
    if seconds > max_seconds:
        raise InvalidRequest(f"The audio is {seconds:.0f} s long; this server transcribes at most {max_seconds:g} s "
                             "(--max-audio-seconds).", param=param, code="audio_too_long", status=413)
    if seconds > size / MIN_BYTES_PER_SECOND + 1:
        raise InvalidRequest(f"The audio declares {seconds:.0f} s in {size} bytes, more than any real "
                             "recording holds.", param=param, code="invalid_audio")


def decode_audio(data: bytes, filename: str = "", param: str = "file",
                 max_seconds: float = DEFAULT_MAX_SECONDS, declared: Any = _UNCHECKED) -> np.ndarray:
    """Bytes of wav/mp3/flac/ogg/m4a -> 16 kHz mono float32 samples, or a 400/413. The header is
    checked first (`declared`: what `check_audio_header` already said, so it isn't read twice);
    what is decoded is bounded by `max_seconds` and by the upload's size (see
    MIN_BYTES_PER_SECOND), whatever the file claims."""
    if declared is _UNCHECKED:
        declared = check_audio_header(data, max_seconds, param)
    if declared is not None:  # wav, mp3, flac and ogg/vorbis in-process
        samples = _decode_bounded(data, declared, max_seconds, param)
    else:  # m4a and the rest, where ffmpeg exists: told to stop at the limit
        bound = min(max_seconds, len(data) / MIN_BYTES_PER_SECOND + 1)
        samples = _decode_with_ffmpeg(data, filename, param, bound + 1)
        _check_duration(samples.size / SAMPLE_RATE, len(data), max_seconds, param)
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if samples.size == 0:
        raise InvalidRequest("The audio has no samples.", param=param, code="invalid_audio")
    return samples


def _decode_bounded(data: bytes, declared: float, max_seconds: float, param: str) -> np.ndarray:
    """miniaudio's decoder, streamed a few seconds at a time and stopped at the bound.

    The header check read one format, but miniaudio's decoder picks its own: a polyglot (an ID3
    tag, then a 1 Hz FLAC stream whose padding holds a few MP3 frames) passes as 0.3 s of MP3 and
    decodes as hours of FLAC. So what the decoder really yields is bounded too: never more than the
    limits allow, and never much more than the header declared."""
    import miniaudio

    bound = min(max_seconds, len(data) / MIN_BYTES_PER_SECOND + 1, declared + 1.0)
    limit = int(bound * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        stream = miniaudio.stream_memory(data, output_format=miniaudio.SampleFormat.FLOAT32, nchannels=1,
                                         sample_rate=SAMPLE_RATE, frames_to_read=SAMPLE_RATE * 4)
        try:
            for chunk in stream:
                if not len(chunk):
                    break
                chunks.append(np.frombuffer(chunk, dtype=np.float32).copy())
                total += len(chunk)
                if total > limit:
                    break
        finally:
            stream.close()
    except miniaudio.DecodeError as e:
        raise InvalidRequest("The audio could not be decoded (a damaged file).", param=param,
                             code="invalid_audio") from e
    if total > limit:
        if total / SAMPLE_RATE > max_seconds and bound >= max_seconds:
            _check_duration(total / SAMPLE_RATE, len(data), max_seconds, param)
        raise InvalidRequest(f"The audio decodes to more than its header declares ({declared:.1f} s): the file is "
                             "not what its first bytes say.", param=param, code="invalid_audio")
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def _decode_with_ffmpeg(data: bytes, filename: str, param: str, seconds: float) -> np.ndarray:
    from mlx_audio.audio_io import read

    buffer = io.BytesIO(data)
    buffer.name = filename or "audio"  # the decoder falls back on the extension
    try:
        samples, _ = read(buffer, dtype="float32", sample_rate=SAMPLE_RATE, nchannels=1, duration=seconds)
    except Exception as e:  # each decoder raises its own types; ffmpeg may be missing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "ffmpeg" in str(e).lower():
            reason = "not wav, mp3, flac or ogg, and ffmpeg (for m4a and others) is not installed"
        raise InvalidRequest(f"The audio could not be decoded ({reason}). Send wav, mp3, flac or ogg "
                             "(m4a where the server has ffmpeg).", param=param, code="invalid_audio") from e
    return samples


@dataclass
class AudioRunner:
    """A loaded Whisper model."""

    model_id: str
    model: Any
    probe: Probe
    memory: MemoryEstimate
    warnings: tuple[str, ...] = ()
    multilingual: bool = field(default=False)

    @classmethod
    def load(cls, model_id: str, probe: Probe, gate: MemoryGate) -> "AudioRunner":
        """Gate memory and load with mlx-audio. On the CPU the float16 weights are held as
        float32: MLX's CPU matmuls are several times faster in float32 (with OpenBLAS)."""
        import mlx.core as mx
        from mlx.utils import tree_map
        from mlx_audio.stt import load as stt_load

        from engine.models.weights import on_gpu

        need = MemoryEstimate(probe.size_bytes * (1 if on_gpu() else 2), 64 << 20)
        warnings = tuple(gate.check(model_id, need))
        model = stt_load(str(probe.path))
        if not on_gpu():
            model.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype == mx.float16 else a, model.parameters()))
            model.dtype = mx.float32
            mx.eval(model.parameters())
        config = probe.config
        log.info("loaded %s (whisper, speech to text)", model_id)
        return cls(model_id, model, probe, need, warnings, int(config.get("n_vocab", 0)) >= 51865)

    def transcribe(self, samples: np.ndarray, options: TranscribeOptions,
                   cancelled: Callable[[], bool]) -> Iterator[TranscriptEvent]:
        """Window by window: a TranscriptDelta per window with text, then a TranscriptDone."""
        import mlx.core as mx

        if options.task == "translate" and not self.multilingual:
            raise InvalidRequest(f"The model '{self.model_id}' is English-only and can't translate; "
                                 "use a multilingual Whisper model.", param="model")
        language = options.language or ("en" if not self.multilingual else None)
        if language and not self.multilingual and language != "en":
            raise InvalidRequest(f"The model '{self.model_id}' is English-only; language '{language}' "
                                 "is not supported.", param="language")
        window = WINDOW_S * SAMPLE_RATE
        start, segments, texts = 0, [], []
        fp16 = self.model.dtype == mx.float16
        while start < len(samples) and not cancelled():
            chunk = samples[start:start + window]
            prompt = options.prompt or None  # earlier text as a prompt made tiny models loop
            result = self.model.generate(mx.array(chunk), language=language, task=options.task,
                                         temperature=options.temperature, initial_prompt=prompt, fp16=fp16,
                                         word_timestamps=options.word_timestamps, verbose=None)
            language = language or result.language
            found = list(result.segments)
            full = start + window < len(samples)
            following = start + window
            if full and len(found) > 1 and found[-1]["start"] > 0:  # the last one may be cut: redo it
                following = start + int(found[-1]["start"] * SAMPLE_RATE)
                found = found[:-1]
            offset = start / SAMPLE_RATE
            new = tuple(_segment(len(segments) + i, s, offset) for i, s in enumerate(found) if s["text"].strip())
            segments.extend(new)
            text = "".join(s.text for s in new)
            texts.append(text)
            if text:
                yield TranscriptDelta(text, new)
            start = max(following, start + SAMPLE_RATE)  # always move on
        yield TranscriptDone("".join(texts).strip(), language or "en", len(samples) / SAMPLE_RATE,
                             tuple(segments), cancelled())


def _segment(index: int, s: dict, offset: float) -> Segment:
    words = tuple(Word(w["word"], round(w["start"] + offset, 2), round(w["end"] + offset, 2))
                  for w in s.get("words") or [])
    return Segment(index, round(s["start"] + offset, 2), round(s["end"] + offset, 2), s["text"],
                   tuple(int(t) for t in s.get("tokens", [])), float(s.get("temperature", 0.0)),
                   float(s.get("avg_logprob", 0.0)), float(s.get("compression_ratio", 0.0)),
                   float(s.get("no_speech_prob", 0.0)), words)
