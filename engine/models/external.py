"""GGUF models already on the machine in other tools' stores: Ollama's and LM Studio's.

Ollama keeps `models/manifests/<registry>/<namespace>/<model>/<tag>` (JSON; the layer whose
mediaType is `application/vnd.ollama.image.model` names the weights blob by digest) and
`models/blobs/sha256-<hex>`. LM Studio keeps plain `models/<publisher>/<repo>/<file>.gguf`.
openmlx only reads them: `serve --model ollama:NAME[:TAG]` or `lmstudio:PUBLISHER/REPO/FILE`
converts the file into its own store once (engine/models/gguf_import.py).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
PREFIXES = ("ollama:", "lmstudio:")


@dataclass(frozen=True)
class ExternalGGUF:
    """One GGUF model in another tool's store."""

    spec: str  # how to name it: ollama:NAME:TAG or lmstudio:PUBLISHER/REPO/FILE
    path: Path  # the weights file (read only)
    store_name: str  # the folder (and served id) it is converted into

    @property
    def size_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0


def ollama_root() -> Path:
    """Ollama's models folder: $OLLAMA_MODELS (Ollama's own setting), else ~/.ollama/models."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def lmstudio_root() -> Path:
    """LM Studio's models folder: $LMSTUDIO_MODELS, else ~/.lmstudio/models."""
    return Path(os.environ.get("LMSTUDIO_MODELS") or Path.home() / ".lmstudio" / "models").expanduser()


def _safe(name: str) -> str:
    """A store folder name from another tool's model name (no path separators)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def ollama_models(root: Optional[Path] = None) -> list[ExternalGGUF]:
    """Ollama's models whose manifest names a weights blob that is present. Models of the
    default `registry.ollama.ai/library` are named `model:tag`, others with their path."""
    root = root or ollama_root()
    manifests = root / "manifests"
    found = []
    for manifest in sorted(manifests.glob("*/*/*/*")) if manifests.is_dir() else []:
        try:
            layers = json.loads(manifest.read_text()).get("layers") or []
        except (OSError, ValueError, AttributeError):
            continue  # not a manifest we can read: not ours to judge
        digest = next((layer.get("digest") for layer in layers if isinstance(layer, dict)
                       and layer.get("mediaType") == OLLAMA_MODEL_LAYER), None)
        if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            continue
        blob = root / "blobs" / digest.replace(":", "-")
        if not blob.is_file():
            continue
        registry, namespace, model, tag = manifest.relative_to(manifests).parts
        name = f"{model}:{tag}" if (registry, namespace) == ("registry.ollama.ai", "library") \
            else f"{registry}/{namespace}/{model}:{tag}"
        found.append(ExternalGGUF(f"ollama:{name}", blob, _safe(f"ollama-{name.replace(':', '-')}")))
    return found


def lmstudio_models(root: Optional[Path] = None) -> list[ExternalGGUF]:
    """LM Studio's `publisher/repo/file.gguf` files (split files' later parts left out)."""
    root = root or lmstudio_root()
    found = []
    for path in sorted(root.glob("*/*/*.gguf")) if root.is_dir() else []:
        if re.search(r"-0*[2-9]\d*-of-\d+\.gguf$", path.name):
            continue
        name = "/".join(path.relative_to(root).parts)
        found.append(ExternalGGUF(f"lmstudio:{name}", path, _safe(f"lmstudio-{path.stem}")))
    return found


def external_models() -> list[ExternalGGUF]:
    return ollama_models() + lmstudio_models()


def find(spec: str) -> Optional[ExternalGGUF]:
    """The model an `ollama:` / `lmstudio:` spec names (a missing tag means `latest`), or None."""
    if not spec.startswith(PREFIXES):
        return None
    if spec.startswith("ollama:") and ":" not in spec[len("ollama:"):]:
        spec += ":latest"
    return next((m for m in external_models() if m.spec == spec), None)
