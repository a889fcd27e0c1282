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


def test_every_required_field_is_declared_beside_it():
    """`required` names only properties of the same schema object: generators (openapi-typescript,
    openapi-python-client) read them there, not across `allOf` branches."""
    doc = yaml.safe_load(OUR_SPEC.read_text())
    problems = []

    def walk(node, path):
        if isinstance(node, dict):
            if isinstance(node.get("required"), list) and node.get("type") == "object":
                missing = set(node["required"]) - set(node.get("properties", {}))
                if missing:
                    problems.append(f"{'/'.join(path)}: {sorted(missing)}")
            for key, value in node.items():
                walk(value, path + [str(key)])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, path + [str(i)])

    walk(doc["components"], ["components"])
    assert problems == []


def test_streams_are_declared_as_text():
    """A text/event-stream body is a string (validators and generators must not read it as JSON),
    whose description names the payload schema."""
    doc = yaml.safe_load(OUR_SPEC.read_text())
    schemas = doc["components"]["schemas"]
    seen = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if not isinstance(op, dict):
                continue
            for code, response in op.get("responses", {}).items():
                stream = response.get("content", {}).get("text/event-stream") if "content" in response else None
                if stream is None:
                    continue
                seen += 1
                schema = schemas[stream["schema"]["$ref"].rsplit("/", 1)[1]]
                assert schema["type"] == "string" and "data" in schema["description"], (path, schema)
    assert seen == 5
