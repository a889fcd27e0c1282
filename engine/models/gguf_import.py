"""A GGUF file named by the user (`--model FILE.gguf`, a config `source:`), converted into the
store once (engine/formats/gguf.py) and served under the file's name without `.gguf`.

The store folder records which file it came from (size, modification time, sha256); the same
file is never converted twice, and a different file of the same name replaces the old folder
(only a folder converted from a GGUF or pulled from the Hub: any other model of that name is
kept, and the file refused). Before converting, the file's layout is checked and the converted
size must fit free disk and memory (engine/formats/gguf.py plan_conversion). The user's file is
only read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

from engine.errors import EngineError, InsufficientMemory, InvalidRequest, Unsupported
from engine.formats.gguf import SOURCE_MARK, GGUFConversionError, GGUFPlan, convert_gguf
from engine.models.memory import MemoryEstimate, MemoryGate
from engine.models.store_marks import PULLED_MARK

log = logging.getLogger("openmlx.engine")


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def store_folder(models_dir: Path, name: str) -> Path:
    """The store folder a model named `name` (`NAME` or `ORG/NAME`) lives in. A name that is
    empty, `.`, `..` or holds a separator anywhere else would name the store itself, its parent
    or a folder beside it: refused (400)."""
    parts = name.split("/")
    if not 1 <= len(parts) <= 2 or any(p in ("", ".", "..") or "\\" in p or "\0" in p or len(p.encode()) > 200
                                         for p in parts):
        raise InvalidRequest(f"'{name[:200]}' can't name a model folder in the store (it must not be empty, "
                             "'.' or '..', or hold a path separator); rename the file", param="model",
                             code="invalid_model_id")
    return models_dir.joinpath(*parts)


def _replaceable(folder: Path) -> bool:
    """Whether an existing store folder may be replaced by a conversion: one an import or a pull
    made (another model of that name, or an ORG folder holding several, is not ours to delete)."""
    if not folder.exists() and not folder.is_symlink():
        return True
    if folder.is_symlink() or not folder.is_dir():
        return False
    return (folder / SOURCE_MARK).is_file() or (folder / PULLED_MARK).is_file() or not any(folder.iterdir())


def check_room(name: str, plan: GGUFPlan, models_dir: Path, gate: Optional[MemoryGate] = None) -> None:
    """Refuse a conversion whose converted size does not fit free disk (507) or whose peak does
    not fit memory (507), from the sizes the file's header declares."""
    free = shutil.disk_usage(_existing(models_dir)).free
    if plan.converted_bytes > free:
        raise EngineError(f"'{name}' converts to {plan.converted_bytes / 2**30:.2f} GiB and {free / 2**30:.2f} GiB "
                          f"of disk is free in {models_dir}", code="insufficient_storage", status=507)
    (gate or MemoryGate()).check(name, MemoryEstimate(plan.peak_bytes, 0))


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def import_gguf(path: Path, models_dir: Path, say: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                name: Optional[str] = None, gate: Optional[MemoryGate] = None,
                check: Optional[Callable[[GGUFPlan], None]] = None) -> Path:
    """The store folder for GGUF file `path` (named `name`, else the file's name without
    `.gguf`), converting it first if it isn't there yet. Before converting, the converted size is
    checked against free disk and `gate` (the machine's available memory when None), then
    `check` (a store quota, say) sees the plan."""
    name = name or path.name[: -len(path.suffix)]
    folder = store_folder(models_dir, name)
    stamp = _stamp(path)
    mark = folder / SOURCE_MARK
    if mark.is_file() and (folder / "config.json").is_file():
        try:
            recorded = json.loads(mark.read_text())
        except (OSError, ValueError):
            recorded = {}
        if isinstance(recorded, dict) and {k: recorded.get(k) for k in stamp} == stamp:
            return folder
    if not _replaceable(folder):
        raise Unsupported(f"The store already holds '{name}', which was not converted from a GGUF file; "
                          f"{path.name} is not converted over it (rename the file, or remove that model with "
                          f"`openmlx rm {name}`)")

    def before(plan: GGUFPlan) -> None:
        check_room(name, plan, models_dir, gate)
        if check is not None:
            check(plan)

    say(f"openmlx: converting {path.name} into the store (one time)...")
    try:
        convert_gguf(path, folder, progress=lambda step: say(f"openmlx: {path.name}: {step}"), check=before)
    except GGUFConversionError as e:
        raise Unsupported(f"{path.name} can't be served: {e}") from None
    except MemoryError:
        raise InsufficientMemory(f"Converting {path.name} ran out of memory; nothing was kept") from None
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:  # the reader's, on a damaged file
        raise Unsupported(f"{path.name} is not a GGUF file openmlx can read ({type(e).__name__}: {e})") from None
    (folder / SOURCE_MARK).write_text(json.dumps({**stamp, "sha256": sha256(path)}))
    log.info("converted %s into %s", path, folder)
    return folder
