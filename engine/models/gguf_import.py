"""A GGUF file named by the user (`--model FILE.gguf`, a config `source:`), converted into the
store once (engine/formats/gguf.py) and served under the file's name without `.gguf`.

The store folder records which file it came from (size, modification time, sha256); the same
file is never converted twice, and a different file of the same name replaces the old folder.
The user's file is only read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

from engine.errors import Unsupported
from engine.formats.gguf import GGUFConversionError, convert_gguf

log = logging.getLogger("openmlx.engine")
MARK = ".openmlx-gguf.json"


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_gguf(path: Path, models_dir: Path, say: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                name: Optional[str] = None) -> Path:
    """The store folder for GGUF file `path` (named `name`, else the file's name without
    `.gguf`), converting it first if it isn't there yet."""
    folder = models_dir / (name or path.name[: -len(path.suffix)])
    stamp = _stamp(path)
    mark = folder / MARK
    if mark.is_file() and (folder / "config.json").is_file():
        recorded = json.loads(mark.read_text())
        if {k: recorded.get(k) for k in stamp} == stamp:
            return folder
    say(f"openmlx: converting {path.name} into the store (one time)...")
    try:
        convert_gguf(path, folder, progress=lambda step: say(f"openmlx: {path.name}: {step}"))
    except GGUFConversionError as e:
        raise Unsupported(f"{path.name} can't be served: {e}") from None
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:  # the reader's, on a damaged file
        raise Unsupported(f"{path.name} is not a GGUF file openmlx can read ({type(e).__name__}: {e})") from None
    (folder / MARK).write_text(json.dumps({**stamp, "sha256": sha256(path)}))
    log.info("converted %s into %s", path, folder)
    return folder
