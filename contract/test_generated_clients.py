"""Clients generated from the spec, as users make them, calling the live server (issue 29).

- openapi-python-client, from the served /openapi.json and from openapi.yaml: six calls
  (models, chat, completion, embeddings, a Response, a Message) that return parsed objects.
- openapi-typescript + openapi-fetch: a program that compiles under `tsc --strict` and runs.
- Prism's validating proxy: plain and streamed chat and completions pass its response checks.

The tools are installed once: openapi-python-client into a venv under bench/.venvs (as the bench's
peers are), the node tools into ~/.cache/openmlx/test-assets/tools from the npm registry; without
node, the node tools' tests skip and say so.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import MODEL
from contract.schemas import OUR_SPEC
from engine.config import openmlx_home

CLIENTS = Path(__file__).resolve().parent / "clients"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
PYTHON_GENERATOR = "openapi-python-client==0.29.1"
NODE_TOOLS = ["openapi-typescript@7.13.0", "openapi-fetch@0.17.0", "typescript@5.9.3", "@stoplight/prism-cli@5.14.2"]
needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="openapi-typescript, tsc and Prism run on node (npm)")


def _tools_dir() -> Path:
    return openmlx_home() / "test-assets" / "tools"


@pytest.fixture(scope="module")
def python_generator() -> Path:
    """openapi-python-client in a venv of its own (it pins an older httpx than the server's),
    made as the bench makes its peers' venvs."""
    from bench.servers import ensure_venv

    return ensure_venv("openapi-python-client", [PYTHON_GENERATOR]) / "openapi-python-client"


@pytest.fixture(scope="module")
def node_tools() -> Path:
    folder = _tools_dir() / "node"
    if not (folder / "node_modules" / ".bin" / "prism").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"private": true}\n')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", *NODE_TOOLS], cwd=folder,
                       check=True, timeout=900)
    return folder / "node_modules"


def _served_spec(server, folder: Path) -> Path:
    path = folder / "openapi.json"
    path.write_text(httpx.get(server.url + "/openapi.json", timeout=30).text)
    return path


@pytest.mark.parametrize("source", ["served", "yaml"])
def test_openapi_python_client_makes_the_six_calls(source, server, python_generator, tmp_path):
    spec = _served_spec(server, tmp_path) if source == "served" else OUR_SPEC
    config = tmp_path / "generator.yaml"
    config.write_text("post_hooks: []\n")  # no ruff formatting pass: the code is run, not read
    gen = subprocess.run([str(python_generator), "generate", "--path", str(spec), "--meta", "none", "--config",
                          str(config), "--output-path", str(tmp_path / "client")],
                         capture_output=True, text=True, timeout=300)
    # Every schema and every operation generated: the tool warns (and drops them) otherwise.
    assert gen.returncode == 0 and "Warning" not in gen.stdout + gen.stderr, (gen.stdout + gen.stderr)[-4000:]
    run = subprocess.run([sys.executable, str(CLIENTS / "python_client_calls.py"), server.url, MODEL, EMBEDDING_MODEL],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert [line.split()[0] for line in run.stdout.splitlines()] == [
        "models", "chat", "completion", "embeddings", "response", "message"], run.stdout


@needs_npm
def test_typescript_client_compiles_strict_and_runs(server, node_tools, tmp_path):
    for name in ("calls.ts", "tsconfig.json"):
        shutil.copy(CLIENTS / "ts" / name, tmp_path / name)
    (tmp_path / "package.json").write_text('{"type": "module", "private": true}\n')
    (tmp_path / "node_modules").symlink_to(node_tools)
    bin_ = node_tools / ".bin"
    steps = [[str(bin_ / "openapi-typescript"), str(_served_spec(server, tmp_path)), "--default-non-nullable", "false",
              "-o", "api.d.ts"],
             [str(bin_ / "tsc"), "-p", "."],
             ["node", "out/calls.js", server.url, MODEL, EMBEDDING_MODEL]]
    for argv in steps:
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (argv[0], (r.stdout + r.stderr)[-4000:])
    assert "message" in r.stdout and "chat stream" in r.stdout, r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Prism:
    """Prism's validating proxy (`--errors`: a response that breaks the spec becomes a 500)."""

    def __init__(self, node_tools: Path, spec: Path, upstream: str, folder: Path):
        self.port = _free_port()
        self.log_path = folder / f"prism-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(node_tools / ".bin" / "prism"), "proxy", str(spec), upstream, "--errors",
                                      "-p", str(self.port), "-h", "127.0.0.1"], stdout=self._log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while "listening" not in self.log_path.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log_path.read_text()[-2000:]
            time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._log.close()


@needs_npm
def test_prism_validating_proxy_accepts_plain_and_streamed_answers(server, node_tools, tmp_path):
    messages = [{"role": "user", "content": "Hi"}]
    calls = [("/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 3}),
             ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3}),
             ("/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 3}),
             ("/v1/messages", {"model": MODEL, "messages": messages, "max_tokens": 3})]
    prism = _Prism(node_tools, OUR_SPEC, server.url, tmp_path)
    try:
        with httpx.Client(timeout=300) as h:
            for path, body in calls:
                for stream in (False, True):
                    r = h.post(prism.url + path, json={**body, "stream": stream})
                    assert r.status_code == 200, (path, stream, r.text[:2000])
                    assert ("data:" in r.text) == stream, (path, stream, r.text[:300])
    finally:
        prism.close()

    # The proxy does check: with the stream declared as a JSON object (as the spec once had it),
    # the same streamed request is refused.
    import yaml

    doc = yaml.safe_load(OUR_SPEC.read_text())
    doc["components"]["schemas"]["ChatCompletionEventStream"] = {"type": "object", "required": ["data"],
                                                                 "properties": {"data": {"type": "string"}}}
    broken = tmp_path / "object-stream.yaml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    prism = _Prism(node_tools, broken, server.url, tmp_path)
    try:
        r = httpx.post(prism.url + calls[0][0], json={**calls[0][1], "stream": True}, timeout=300)
        assert r.status_code == 500, r.text[:2000]
    finally:
        prism.close()
