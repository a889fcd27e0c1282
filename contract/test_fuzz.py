"""schemathesis fuzzes every operation of the live server against openapi.yaml.

The fuzz server caps max_tokens (`--max-tokens-cap`) and the tokens one request may ask for
(`--max-batch-tokens`; requests above either get a documented 400) so
that a bounded run over all operations fits in a few minutes. `--run-slow` runs many more examples.
"""
from __future__ import annotations

import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import MODEL, Server
from engine.models.default_model import DEFAULT_EMBEDDING_ID as EMBEDDING_MODEL



_SPEC = None
# Each line of an NDJSON answer (Ollama's /api/* streams) is one of these, or a last {"error": "..."}.
_NDJSON_LINES = {"/api/chat": "OllamaChatResponse", "/api/generate": "OllamaGenerateResponse",
                 "/api/pull": "OllamaStatus"}


def _is(response, media_type: str) -> bool:
    return any(v.startswith(media_type) for v in response.headers.get("content-type", []))


def ndjson_line_conformance(ctx, response, case):
    """Every line of an application/x-ndjson answer is a JSON object valid against its chunk
    schema in openapi.yaml (Connexion does not validate streams, nor does schemathesis read
    NDJSON); only the last line may be an error, and a finished stream ends with done: true."""
    global _SPEC
    if not _is(response, "application/x-ndjson"):
        return None
    import jsonschema
    import yaml
    from pathlib import Path

    if _SPEC is None:
        _SPEC = yaml.safe_load((Path(__file__).resolve().parent.parent / "openapi.yaml").read_text())
    name = _NDJSON_LINES[case.path]
    schema = {"$ref": f"#/components/schemas/{name}", "components": _SPEC["components"]}
    lines = [line for line in response.content.decode().split("\n") if line]
    assert lines, "an empty NDJSON stream"
    for i, line in enumerate(lines):
        obj = json.loads(line)
        if "error" in obj:
            assert i == len(lines) - 1 and isinstance(obj["error"], str), f"line {i}: {line}"
            continue
        jsonschema.validate(obj, schema)
    last = json.loads(lines[-1])
    if case.path != "/api/pull" and "error" not in last:
        assert last["done"] is True and "done_reason" in last, lines[-1]
    return None


def body_schema_conformance(ctx, response, case):
    """schemathesis' response_schema_conformance, for every answer but an event stream.

    openapi.yaml declares each stream as text (`type: string`), as Prism's validating proxy and
    the code generators need (contract/test_generated_clients.py). schemathesis reads an OpenAPI
    3.0 stream's `schema` as the schema of each event object instead, so it would reject them all;
    the events themselves are validated in contract/test_conformance*.py (each chunk against our
    spec and OpenAI's or Anthropic's own schemas)."""
    if _is(response, "text/event-stream") or _is(response, "application/x-ndjson"):
        return None
    return response_schema_conformance(ctx, response, case)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          body_schema_conformance, response_headers_conformance, ndjson_line_conformance]
# Per operation and phase; `--run-slow` raises it to 500 (see conftest.py).
QUICK_EXAMPLES = int(os.environ.get("OPENMLX_FUZZ_EXAMPLES", "100"))


@pytest.fixture(scope="session")
def fuzz_server(default_model_dir):
    s = Server(["--max-tokens-cap", "4", "--max-queue", "8", "--max-batch-tokens", "2000"])
    yield s
    s.stop()


@pytest.fixture(scope="session")
def fuzz_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("fuzz_schema")
if os.environ.get("OPENMLX_FUZZ_TAG"):  # one area's operations, e.g. OPENMLX_FUZZ_TAG=Ollama
    schema = schema.include(tag=os.environ["OPENMLX_FUZZ_TAG"])


@schema.parametrize()
@settings(max_examples=QUICK_EXAMPLES, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz(case):
    # Random model ids almost never name a real model, so most generated requests would stop at
    # the 404; point three in four string model ids at the served model to reach generation. Rerank
    # requests go to the embedding model: with the text model every fuzzed document is an LLM
    # judge's pass (~2 minutes of the suite for three routes); the judge has its own tests
    # (tests/test_rerank.py, tests/test_real_models.py).
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and len(case.body["model"]) % 4:
        case.body["model"] = EMBEDDING_MODEL if case.path.endswith("/rerank") else MODEL
    if case.path_parameters and isinstance(case.path_parameters.get("model"), str) \
            and len(case.path_parameters["model"]) % 4:
        case.path_parameters["model"] = MODEL
    if isinstance(case.body, dict) and case.path.startswith("/api/") and _unloads(case.body.get("keep_alive")):
        case.body["keep_alive"] = "5m"  # each unload would cost the next request a reload (tested elsewhere)
    case.call_and_validate(checks=CHECKS, timeout=120)


def _unloads(keep_alive) -> bool:
    from engine.errors import EngineError
    from handlers.wire.ollama_protocol import parse_duration

    if keep_alive is None:
        return False
    try:
        return parse_duration(keep_alive) == 0
    except EngineError:
        return False
