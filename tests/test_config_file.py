"""`openmlx serve --config FILE`: settings under the flags' names, a models: list, the schema made
from the flags, and errors that name the key and its line (a Hub source: tests/test_hub.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from conftest import Server

CLI = [sys.executable, "-m", "handlers.cli"]


def test_config_file_settings_models_and_overrides(tmp_path, fixture_models):
    from handlers.cli import parse_args

    cfg = tmp_path / "openmlx.yaml"
    cfg.write_text(f"port: 8123\nmax-queue: 7\nspeculative: ngram\napi-key: [k1, k2]\n"
                   f"models:\n  - source: {fixture_models['tiny']}\n    preload: true\n")
    args = parse_args(["serve", "--config", str(cfg), "--max-queue", "9"])
    assert (args.port, args.max_queue, args.speculative, args.api_key) == (8123, 9, "ngram", ["k1", "k2"])
    assert args.model == "tiny-llama" and str(fixture_models["tiny"]) in args.model_dir  # served under its name


@pytest.mark.parametrize("text, expect", [
    ("port: 8123\nmax-queue: seven\n", ":2: 'max-queue': 'seven' is not of type 'integer'"),
    ("port: 8123\n\nmax-qeueu: 3\n", ":3: unknown setting 'max-qeueu'"),
    ("speculative: sometimes\n", ":1: 'speculative': 'sometimes' is not one of"),
    ("models:\n  - source: a\n    prelod: true\n", ":3: unknown setting 'models.0.prelod'"),
    ("port: [\n", "not valid YAML"),
])
def test_config_file_errors_name_the_key_and_line(tmp_path, text, expect):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    r = subprocess.run([*CLI, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and expect in r.stderr, r.stderr


def test_config_schema_command_covers_every_serve_flag():
    from handlers.cli import _subparser, build_parser

    schema = json.loads(subprocess.run([*CLI, "config-schema"], capture_output=True, text=True, timeout=60).stdout)
    serve = _subparser(build_parser(), "serve")
    flags = {o[2:] for a in serve._actions for o in a.option_strings[:1] if o.startswith("--")} - {"help", "config"}
    assert flags <= set(schema["properties"]) and "models" in schema["properties"]
    assert schema["properties"]["speculative"]["enum"] == ["auto", "ngram", "draft", "off"]


def test_config_file_starts_a_server(tmp_path, fixture_models):
    cfg = tmp_path / "openmlx.yaml"
    cfg.write_text(f"embedding-model: none\naudio-model: none\nmodels:\n  - source: {fixture_models['tiny']}\n"
                   f"    preload: true\n")
    s = Server(["--config", str(cfg)])
    try:
        assert httpx.get(s.url + "/health").json()["model"] == "tiny-llama"
    finally:
        s.stop()


def test_config_file_models_with_ids_and_defaults(tmp_path, default_model_dir):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cfg = tmp_path / "openmlx.yaml"
    cfg.write_text(f"embedding-model: none\naudio-model: none\nmodels:\n"
                   f"  - source: {default_model_dir}\n    id: smol\n    preload: true\n"
                   f"    max_tokens: 5\n    temperature: 0\n"
                   f"  - source: {default_model_dir}\n    id: smol-plain\n    chat_template: {template}\n")
    s = Server(["--config", str(cfg)])
    try:
        assert httpx.get(s.url + "/health").json()["model"] == "smol"
        ids = [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]]
        assert {"smol", "smol-plain"} <= set(ids)
        body = {"model": "smol", "messages": [{"role": "user", "content": "Tell me a long story."}]}
        answers = [httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120).json() for _ in range(2)]
        assert [a["usage"]["completion_tokens"] for a in answers] == [5, 5]  # the model's max_tokens
        assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]  # its temperature 0
        # The request's own values still win.
        r = httpx.post(s.url + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=120).json()
        assert r["usage"]["completion_tokens"] == 2
        # The other id renders with its own chat template: just the text, no role markers.
        r = httpx.post(s.url + "/v1/chat/completions", timeout=120,
                       json={"model": "smol-plain", "messages": [{"role": "user", "content": "hello world"}],
                             "max_tokens": 1}).json()
        assert r["usage"]["prompt_tokens"] <= 3
    finally:
        s.stop()


def test_config_file_duplicate_ids_are_refused(tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("models:\n  - source: a/b\n    id: x\n  - source: c/d\n    id: x\n")
    r = subprocess.run([*CLI, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "same id (x)" in r.stderr
