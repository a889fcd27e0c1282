"""Probe a model folder without loading weights: what kind of model it is and whether it can run.

One typed result reused by /v1/models, the CLI and the loader.
"""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

_AUDIO_TYPES = {"whisper"}
_ENCODER_TYPES = {"bert"}  # sentence-embedding encoders engine.media.embeddings runs
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


@dataclass(frozen=True)
class Probe:
    """What a model folder is and whether this server can run it."""

    path: Path
    type: str  # "text" | "vision" | "audio" | "unknown"
    architecture: Optional[str]
    runnable: bool
    reason: str  # why not runnable ("" when runnable)
    context_length: Optional[int]
    size_bytes: int  # weights on disk
    quantization: Optional[dict[str, Any]] = None
    float32_bytes: int = 0  # unquantized weights once held as float32 (from the headers; 0: not known)
    warnings: tuple[str, ...] = field(default_factory=tuple)
    embedding_dim: Optional[int] = None  # for embedding models: the vector size
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # config.json, parsed once

    @property
    def quantized(self) -> bool:
        return bool(self.quantization)


def sentence_config(folder: Path) -> dict:
    """max_seq_length, pooling and normalisation from a sentence-transformers folder."""
    cfg = {"max_seq_length": None, "pooling": "mean"}
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        cfg["max_seq_length"] = json.loads(st.read_text()).get("max_seq_length")
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file() and json.loads(pooling.read_text()).get("pooling_mode_cls_token"):
        cfg["pooling"] = "cls"
    return cfg


def _safetensors_problem(path: Path) -> Optional[str]:
    """Check a safetensors file's header against its size (detects truncated downloads)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{path.name} is truncated"
            n = struct.unpack("<Q", raw)[0]
            if n > min(size - 8, 100 << 20):
                return f"{path.name} has a corrupt header"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{path.name} cannot be read ({e.__class__.__name__})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"{path.name} is truncated ({size} of {8 + n + end} bytes)"
    return None


_FLOATS = {"F16", "BF16", "F32", "F64"}


def _float32_bytes(files: list[Path]) -> int:
    """The weights' bytes with every floating tensor held as float32 (a float16 or bfloat16 folder
    doubles on the CPU fast path), from the safetensors headers; 0 when a header can't be read."""
    total = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError, struct.error):
            return 0
        for name, t in header.items():
            if name == "__metadata__" or not isinstance(t, dict):
                continue
            if t.get("dtype") in _FLOATS:
                numel = 1
                for d in t.get("shape", []):
                    numel *= int(d)
                total += 4 * numel
            else:
                start, end = t.get("data_offsets", (0, 0))
                total += int(end) - int(start)
    return total


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, OSError):
            return []
    return sorted(folder.glob("*.safetensors"))


def _weights_problem(folder: Path) -> tuple[Optional[str], int]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as e:
            return f"model.safetensors.index.json is invalid ({e.__class__.__name__})", 0
        files = [folder / n for n in sorted(names)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            return f"weight files missing: {', '.join(missing[:3])}", 0
    else:
        files = _weight_files(folder)
        if not files:
            return "no weight files (*.safetensors)", 0
    size = sum(f.stat().st_size for f in files)
    for f in files:
        problem = _safetensors_problem(f)
        if problem:
            return problem, size
    return None, size


def _backend_known(model_type: str, kind: str) -> tuple[bool, str]:
    if kind == "embedding":
        if model_type in _ENCODER_TYPES:
            return True, ""
        return False, f"embedding architecture '{model_type}' is not supported (supported: {sorted(_ENCODER_TYPES)})"
    package = {"text": "mlx_lm", "vision": "mlx_vlm", "audio": "mlx_audio"}[kind]
    if importlib.util.find_spec(package) is None:
        return False, f"{kind} models need the '{package.replace('_', '-')}' package, which is not installed"
    if kind == "text":
        from mlx_lm.utils import MODEL_REMAPPING

        name = MODEL_REMAPPING.get(model_type, model_type)
        if importlib.util.find_spec(f"mlx_lm.models.{name}") is None:
            return False, f"architecture '{model_type}' is not supported by the installed mlx-lm"
    if kind == "vision" and importlib.util.find_spec(f"mlx_vlm.models.{model_type}") is None:
        return False, f"vision architecture '{model_type}' is not supported by the installed mlx-vlm"
    return True, ""


_CACHE: dict[Path, tuple[tuple, Probe]] = {}
_CACHE_LOCK = threading.Lock()


def _signature(folder: Path) -> tuple:
    """What a probe depends on, read with one directory listing: each file's name, size and
    modification time (a download, conversion or edit changes it)."""
    try:
        with os.scandir(folder) as it:
            return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in it))
    except OSError:
        return ()


def probe(folder: Path) -> Probe:
    """Inspect `folder`'s files (config, weights, tokenizer) and decide type and runnability.
    Cached by folder and its files' sizes and modification times, so listing models or checking a
    request's model costs one directory listing, not re-reading configs and weight headers."""
    folder = Path(folder)
    key = _signature(folder)
    with _CACHE_LOCK:
        hit = _CACHE.get(folder)
    if hit is not None and hit[0] == key:
        return hit[1]
    result = _probe(folder)
    with _CACHE_LOCK:
        _CACHE[folder] = (key, result)
    return result


def _kind(folder: Path, config: dict, model_type: str) -> str:
    if model_type in _AUDIO_TYPES:
        return "audio"
    if model_type in _ENCODER_TYPES or (folder / "sentence_bert_config.json").is_file() \
            or (folder / "modules.json").is_file():
        return "embedding"
    if "vision_config" in config or (folder / "preprocessor_config.json").is_file():
        return "vision"
    return "text"


def config_problem(folder: Path) -> Optional[str]:
    """Why the model whose config.json (and small files) are in `folder` can't be served, judged
    before any weights are there (a download checks this first), or None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"config.json is missing or not valid JSON ({e})"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        return "config.json has no model_type"
    return _backend_known(model_type, _kind(folder, config, model_type))[1] or None


def _probe(folder: Path) -> Probe:
    config_path = folder / "config.json"

    def broken(reason: str, kind: str = "unknown", arch: Optional[str] = None, size: int = 0) -> Probe:
        return Probe(folder, kind, arch, False, reason, None, size)

    if not config_path.is_file():
        return broken("config.json is missing")
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        return broken(f"config.json is not valid JSON ({e})")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return broken("config.json has no model_type")
    kind = _kind(folder, config, model_type)
    problem, size = _weights_problem(folder)
    if problem:
        return broken(problem, kind, model_type, size)
    if kind != "audio" and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return broken("no tokenizer files", kind, model_type, size)
    known, reason = _backend_known(model_type, kind)
    text_cfg = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    context = text_cfg.get("max_position_embeddings") or config.get("n_text_ctx")
    quant = config.get("quantization") or config.get("quantization_config")
    unquantized = not isinstance(quant, dict) or not quant
    float32 = _float32_bytes(_weight_files(folder)) if unquantized and kind == "text" else 0
    dim = None
    if kind == "embedding":
        context = sentence_config(folder)["max_seq_length"] or context
        dim = config.get("hidden_size")
    return Probe(folder, kind, model_type, known, reason,
                 int(context) if isinstance(context, int) else None, size,
                 quant if isinstance(quant, dict) else None, float32, embedding_dim=dim, config=config)
