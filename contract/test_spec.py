"""openapi.yaml itself: a valid OpenAPI 3.0 document Connexion accepts, with no YAML slips."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from contract.schemas import OUR_SPEC


def test_connexion_accepts_the_spec():
    from connexion.spec import Specification

    spec = Specification.load(OUR_SPEC)
    assert spec["openapi"].startswith("3.0")


def test_no_keys_swallowed_by_flow_mappings():
    """An unquoted ', ' inside `{description: ...}` silently turns words into keys with null values."""
    doc = yaml.safe_load(OUR_SPEC.read_text())
    allowed_null = {"param", "code"}

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                assert value is not None or key in allowed_null, f"null value at {'/'.join(path + [str(key)])}"
                walk(value, path + [str(key)])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, path + [str(i)])

    walk(doc, [])


# --- the standard OpenAPI linters (issue 29): 0 errors on the yaml and on what the server serves ---
LINTERS = {
    "redocly": ["npx", "--yes", "@redocly/cli@2.77.0", "lint", "--format", "stylish"],
    "spectral": ["npx", "--yes", "@stoplight/spectral-cli@6.16.3", "lint", "--fail-severity", "error"],
}


def _lint(linter: str, document: Path, workdir: Path) -> subprocess.CompletedProcess:
    argv = list(LINTERS[linter])
    if linter == "spectral":
        ruleset = workdir / ".spectral.yaml"
        ruleset.write_text('extends: ["spectral:oas"]\n')
        argv += ["-r", str(ruleset)]
    return subprocess.run([*argv, str(document)], capture_output=True, text=True, timeout=600, cwd=workdir)


needs_npx = pytest.mark.skipif(shutil.which("npx") is None, reason="Redocly and Spectral run through node's npx")


@needs_npx
@pytest.mark.parametrize("linter", list(LINTERS))
def test_linters_find_no_errors_in_the_yaml(linter, tmp_path):
    r = _lint(linter, OUR_SPEC, tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


@needs_npx
@pytest.mark.parametrize("linter", list(LINTERS))
def test_linters_find_no_errors_in_the_served_document(linter, server, tmp_path):
    import httpx

    served = tmp_path / "openapi.json"
    served.write_text(httpx.get(server.url + "/openapi.json", timeout=30).text)
    r = _lint(linter, served, tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


def test_the_served_document_is_the_one_written(server):
    """Components and $refs as in openapi.yaml, not Connexion's resolved copy."""
    import httpx

    served = httpx.get(server.url + "/openapi.json", timeout=30).json()
    assert served == yaml.safe_load(OUR_SPEC.read_text())
    assert '"$ref"' in json.dumps(served)
