"""Models from the Hub, for real but offline: `openmlx pull`/`rm` and `serve --allow-download`
run huggingface_hub's own client against a local Hub endpoint (tests/fake_hub.py, HF_ENDPOINT);
and `serve --config FILE`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import Server, _write_tiny_llama
from fake_hub import FakeHub

CLI = [sys.executable, "-m", "handlers.cli"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("hub-repos")
    h = FakeHub()
    tiny = _write_tiny_llama(root / "tiny", default_model_dir)
    (tiny / "README.md").write_text("# tiny\n")
    (tiny / "pytorch_model.bin").write_bytes(b"\0" * 4096)  # not a file a model needs here
    h.repos["acme/tiny"] = tiny
    h.repos["acme/gated"] = tiny
    h.gated.add("acme/gated")
    gguf_only = root / "gguf"
    gguf_only.mkdir()
    (gguf_only / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (gguf_only / "model.gguf").write_bytes(b"GGUF")
    h.repos["acme/gguf-only"] = gguf_only
    alien = _write_tiny_llama(root / "alien", default_model_dir)
    cfg = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**cfg, "model_type": "alien_arch_42"}))
    h.repos["acme/alien"] = alien
    # A GGUF repo as they come: several quantizations, one of them the default model's real file.
    from engine.config import openmlx_home
    from engine.models.default_model import find_gguf

    ggufs = root / "smol-gguf"
    ggufs.mkdir()
    (ggufs / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(find_gguf(openmlx_home(), lambda _m: None))
    (ggufs / "SmolLM2-135M-Instruct.Q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
    (ggufs / "SmolLM2-135M-Instruct.Q4_K_M-00001-of-00002.gguf").write_bytes(b"GGUF")
    (ggufs / "SmolLM2-135M-Instruct.Q4_K_M-00002-of-00002.gguf").write_bytes(b"GGUF")
    (ggufs / "README.md").write_text("# GGUF\n")
    h.repos["acme/SmolLM2-GGUF"] = ggufs
    yield h
    h.close()


def _env(hub: FakeHub, home: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "OPENMLX_HOME": str(home), "HF_HOME": str(home / "hf"),
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "",
            # The fake Hub is local: these tests need the client online, whatever the caller's shell says.
            "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """This process's huggingface_hub pointed at the fake Hub: its settings are read once, at import,
    so the module that holds them is reloaded with the test's environment (and again after)."""
    import importlib

    import huggingface_hub.constants as constants

    for key, value in _env(hub, tmp_path).items():
        monkeypatch.setenv(key, value)
    importlib.reload(constants)
    yield
    monkeypatch.undo()
    importlib.reload(constants)


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([*CLI, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_pull_fetches_only_model_files_and_the_store_serves_it(hub, tmp_path):
    env = _env(hub, tmp_path)
    r = _cli(["pull", "acme/tiny"], env)
    assert r.returncode == 0, r.stderr
    assert "pulled acme/tiny (text, llama" in r.stdout and "openmlx serve --model acme/tiny" in r.stdout
    folder = tmp_path / "models" / "acme" / "tiny"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "README.md" not in names and "pytorch_model.bin" not in names and ".cache" not in names
    assert not any((tmp_path / "models" / ".downloads").iterdir())
    listed = json.loads(_cli(["list", "--json"], env).stdout)
    assert any(m["id"] == "acme/tiny" and m["runnable"] for m in listed)
    # rm frees it.
    r = _cli(["rm", "acme/tiny"], env)
    assert r.returncode == 0 and not folder.exists()
    assert _cli(["rm", "acme/tiny"], env).returncode == 1


def test_an_interrupted_download_is_resumed(hub, tmp_path, hub_env):
    from engine.models import hub as hub_module

    try:
        # Cut once inside the second 10 MiB chunk: huggingface_hub resumes it with a Range request.
        hub.cut["model.safetensors"] = [11 << 20, 1]
        hub.requests.clear()
        hub_module.pull("acme/tiny", tmp_path / "models")
        assert any(path.endswith("model.safetensors") and rng and rng.startswith("bytes=")
                   for _, path, rng in hub.requests)
        # Cut every time: the pull fails with a clear error and nothing usable is left in the store.
        hub_module.remove("acme/tiny", tmp_path / "models")
        hub.cut["model.safetensors"] = [1000, 100]
        with pytest.raises(hub_module.DownloadFailed, match="run it again to resume"):
            hub_module.pull("acme/tiny", tmp_path / "models")
        from engine.models.resolution import ModelStore

        assert "acme/tiny" not in [e.id for e in ModelStore(tmp_path / "models").entries()]
        # Run again: the small files already there are not fetched again.
        hub.cut.clear()
        hub.requests.clear()
        pulled = hub_module.pull("acme/tiny", tmp_path / "models")
        assert pulled.probe.runnable
        assert not any(m == "GET" and p.endswith("/config.json") for m, p, _ in hub.requests)
    finally:
        hub.cut.clear()


@pytest.mark.parametrize("repo, expect", [
    ("acme/missing", "No such model repo on the Hugging Face Hub"),
    ("acme/gated", "gated or private"),
    ("acme/gguf-only", "model.gguf is not a GGUF file openmlx can read"),
    ("acme/alien", "alien_arch_42"),
    ("not-a-repo", "not a Hugging Face repo id"),
])
def test_pull_refusals_are_clear_and_leave_nothing(hub, tmp_path, repo, expect):
    hub.requests.clear()
    r = _cli(["pull", repo], _env(hub, tmp_path))
    assert r.returncode == 1 and expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    models = tmp_path / "models"
    assert not models.exists() or not [p for p in models.rglob("config.json") if ".downloads" not in p.parts]
    if repo == "acme/alien":  # refused from config.json alone: the weights were never fetched
        assert not any(p.endswith(".safetensors") for m, p, _ in hub.requests if m == "GET")


def _ollama_pull(s: Server) -> None:
    """Ollama's client pulls through /api/pull: NDJSON progress that ends in success, the model
    then listed by /api/tags; a repo the Hub lacks ends the stream with Ollama's error line."""
    import ollama

    client = ollama.Client(host=s.url, timeout=120)
    statuses = [p.status for p in client.pull("acme/tiny", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    assert "acme/tiny:latest" in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError):
        list(client.pull("acme/missing", stream=True))


def test_serve_with_allow_download_fetches_on_first_request(hub, tmp_path):
    env = _env(hub, tmp_path)
    plain = Server(["--embedding-model", "none", "--audio-model", "none"], env=env)
    try:
        r = httpx.post(plain.url + "/v1/chat/completions", timeout=60,
                       json={"model": "acme/tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 404 and "openmlx pull acme/tiny" in r.json()["error"]["message"]
    finally:
        plain.stop()
    s = Server(["--allow-download", "--embedding-model", "none", "--audio-model", "none"], env=env)
    try:
        _ollama_pull(s)
        body = {"model": "acme/tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "acme/tiny" and r.json()["usage"]["completion_tokens"] == 3
        assert "downloaded acme/tiny" in s.log()
        for repo, status, code in (("acme/gated", 403, "model_access_denied"), ("acme/alien", 501, "unsupported_model"),
                                   ("acme/missing", 404, "model_not_found")):
            r = httpx.post(s.url + "/v1/chat/completions", json={**body, "model": repo}, timeout=60)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
            assert r.headers.get("x-request-id")
    finally:
        s.stop()


def test_download_is_refused_before_fetching_when_memory_is_short(hub, tmp_path, hub_env):
    from engine.models import hub as hub_module
    from engine.errors import InsufficientMemory
    from engine.models.memory import MemoryGate

    hub.requests.clear()
    with pytest.raises(InsufficientMemory):
        hub_module.pull("acme/tiny", tmp_path / "models", MemoryGate(override=1 << 20))
    assert not any(m == "GET" and "/resolve/" in p for m, p, _ in hub.requests)  # nothing was fetched
    assert not (tmp_path / "models" / "acme").exists()


# --- the config file (the rest: tests/test_config_file.py) ---------------------------------------
def test_config_file_hub_source_with_an_id_is_fetched_at_start(hub, tmp_path):
    cfg = tmp_path / "openmlx.yaml"
    cfg.write_text("allow-download: true\nembedding-model: none\naudio-model: none\n"
                   "models:\n  - source: acme/tiny\n    id: tiny-from-hub\n    preload: true\n")
    s = Server(["--config", str(cfg)], env=_env(hub, tmp_path))
    try:
        assert httpx.get(s.url + "/health").json()["model"] == "tiny-from-hub"
        r = httpx.post(s.url + "/v1/chat/completions", timeout=120,
                       json={"model": "tiny-from-hub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "tiny-from-hub"
        assert (tmp_path / "models" / "acme" / "tiny" / "config.json").is_file()
    finally:
        s.stop()


# --- a hub that fights back (issue 35) ------------------------------------------------------
def test_a_hub_that_sends_more_than_it_declared_is_cut_off(hub, tmp_path, hub_env):
    from engine.models import hub as hub_module

    declared = sum(p.stat().st_size for p in hub.repos["acme/tiny"].rglob("*") if p.is_file())
    hub.extra_bytes["model.safetensors"] = 64 << 20
    try:
        with pytest.raises(hub_module.DownloadFailed, match="more bytes than"):
            hub_module.pull("acme/tiny", tmp_path / "models")
    finally:
        hub.extra_bytes.clear()
    on_disk = sum(p.stat().st_size for p in (tmp_path / "models").rglob("*") if p.is_file())
    assert on_disk < declared + (8 << 20)


def test_a_redirect_to_a_non_public_address_is_refused(hub, tmp_path, hub_env):
    import http.server

    from engine.models import hub as hub_module

    hits = []

    class Trap(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"inner")

        def log_message(self, *args):
            pass

    trap = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trap)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    # "localhost" is not the endpoint's host (127.0.0.1), and it is loopback.
    hub.redirect["model.safetensors"] = f"http://localhost:{trap.server_address[1]}/secret"
    try:
        with pytest.raises(hub_module.DownloadFailed, match="not a public address"):
            hub_module.pull("acme/tiny", tmp_path / "models")
    finally:
        hub.redirect.clear()
        trap.shutdown()
    assert hits == []


def test_an_invalid_commit_id_is_refused_before_anything_is_written(hub, tmp_path, hub_env):
    from engine.models import hub as hub_module

    hub.commit["acme/tiny"] = "../../../../escaped"
    try:
        with pytest.raises(hub_module.DownloadFailed, match="invalid commit id"):
            hub_module.pull("acme/tiny", tmp_path / "models")
    finally:
        hub.commit.clear()
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.json"))
    assert not list(tmp_path.rglob("escaped*"))


def test_a_file_named_like_a_pattern_fetches_only_itself(hub, tmp_path, hub_env, default_model_dir):
    from engine.models import hub as hub_module

    repo = tmp_path / "repo-star"
    shutil.copytree(hub.repos["acme/tiny"], repo)
    (repo / "*.safetensors").write_bytes((repo / "model.safetensors").read_bytes())
    (repo / "sub").mkdir()
    (repo / "sub" / "huge.safetensors").write_bytes(b"\0" * (4 << 20))
    hub.repos["acme/star"] = repo
    hub.requests.clear()
    try:
        hub_module.pull("acme/star", tmp_path / "models")
    except hub_module.EngineError:
        pass  # whether the odd file probes well is not the point
    assert not any("sub/huge" in path for method, path, _ in hub.requests if method == "GET")


def test_the_store_quota_removes_the_least_recently_used_download(hub, tmp_path, hub_env):
    from engine.models import hub as hub_module

    hub.repos["acme/tiny-b"] = hub.repos["acme/tiny"]
    models = tmp_path / "models"
    first = hub_module.pull("acme/tiny", models)
    size = hub_module.folder_bytes(first.path)
    quota = int(size * 1.5)  # room for one model, not two
    second = hub_module.pull("acme/tiny-b", models, max_store_bytes=quota)
    assert second.path.exists() and not first.path.exists()
    # The one in use is kept: then there is no room, and that is a clear 507.
    with pytest.raises(hub_module.EngineError) as e:
        hub_module.pull("acme/tiny", models, max_store_bytes=quota, in_use=lambda folder: folder == second.path)
    assert e.value.status == 507 and "--max-store-bytes" in e.value.message
    assert second.path.exists()


@pytest.mark.parametrize("spec", ["acme/../etc", "a/b/c", "-bad/name", "acme/" + "x" * 200, "acme/tiny@../../x"])
def test_invalid_repo_ids_are_400(spec):
    from engine.errors import InvalidRequest
    from engine.models.hub import parse_spec

    with pytest.raises(InvalidRequest) as e:
        parse_spec(spec)
    assert e.value.status == 400


def test_a_slow_hub_gets_504_and_the_server_serves_on(hub, tmp_path):
    hub.repos["acme/slow"] = hub.repos["acme/tiny"]
    hub.delay["model.safetensors"] = 30
    s = Server(["--allow-download", "--download-timeout", "3", "--embedding-model", "none", "--audio-model", "none"],
               env=_env(hub, tmp_path))
    try:
        result: dict = {}

        def ask():
            result["r"] = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
                "model": "acme/slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})

        t = threading.Thread(target=ask)
        t.start()
        time.sleep(1)
        # Meanwhile: the list, a chat on the resident model and a bad id answer at once.
        assert httpx.get(s.url + "/v1/models", timeout=5).status_code == 200
        chat = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200
        bad = httpx.post(s.url + "/v1/chat/completions", timeout=10, json={
            "model": "acme/../x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert bad.status_code == 400, bad.text
        t.join(60)
        assert result["r"].status_code == 504, result["r"].text
        assert result["r"].json()["error"]["code"] == "download_timeout"
    finally:
        hub.delay.clear()
        s.stop(timeout=30)


def test_sigterm_exits_in_time_while_a_download_hangs(hub, tmp_path):
    """A download thread stuck on a slow hub would be joined at exit (minutes): the process still
    ends within twice --shutdown-timeout."""
    import signal

    hub.repos["acme/slow2"] = hub.repos["acme/tiny"]
    hub.delay["model.safetensors"] = 40
    s = Server(["--allow-download", "--shutdown-timeout", "1", "--embedding-model", "none", "--audio-model", "none"],
               env=_env(hub, tmp_path))
    try:
        threading.Thread(target=lambda: httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
            "model": "acme/slow2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
            daemon=True).start()
        time.sleep(2.0)
        start = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        try:
            s.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - start
    finally:
        hub.delay.clear()
        s.stop()
    assert took < 2 * 1 + 4, took  # twice --shutdown-timeout, and a little for the interpreter


def test_pull_a_gguf_repo_by_quantization(hub, tmp_path):
    """Issue 30: `pull ORG/NAME-GGUF:QUANT` fetches only that file, converts it into the store and
    drops the download; the store serves it as ORG/NAME-GGUF."""
    env = _env(hub, tmp_path)
    hub.requests.clear()
    r = _cli(["pull", "acme/SmolLM2-GGUF:q4_1"], env)
    assert r.returncode == 0, r.stderr
    assert "pulled acme/SmolLM2-GGUF (text, llama" in r.stdout
    fetched = [p for m, p, _ in hub.requests if m == "GET" and p.endswith(".gguf")]
    assert fetched and all(p.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") for p in fetched)
    folder = tmp_path / "models" / "acme" / "SmolLM2-GGUF"
    assert (folder / "config.json").is_file() and not list(folder.glob("*.gguf"))
    assert json.loads((folder / ".openmlx-pull.json").read_text())["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not (tmp_path / "models" / ".downloads").exists()  # the download and its empty folder are gone
    listed = json.loads(_cli(["list", "--json"], env).stdout)
    assert any(m["id"] == "acme/SmolLM2-GGUF" and m["runnable"] for m in listed)


@pytest.mark.parametrize("args, expect", [
    (["acme/SmolLM2-GGUF"], "has several GGUF files; name one as acme/SmolLM2-GGUF:QUANT"),
    (["acme/SmolLM2-GGUF:Q5_K_M"], "has no GGUF file for 'Q5_K_M'; its GGUF files: SmolLM2-135M-Instruct.Q4_1.gguf"),
    (["acme/SmolLM2-GGUF:Q4_K_M"], "as a split GGUF"),
    (["acme/SmolLM2-GGUF", "--file", "nope.gguf"], "has no GGUF file for 'nope.gguf'"),
    (["acme/tiny:Q4_K_M"], "has no GGUF files; pull it without ':Q4_K_M'"),
])
def test_gguf_pull_refusals_name_the_files(hub, tmp_path, args, expect):
    hub.requests.clear()
    r = _cli(["pull", *args], _env(hub, tmp_path))
    assert r.returncode == 1 and expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not any(m == "GET" and p.endswith(".gguf") for m, p, _ in hub.requests)


def test_choose_gguf():
    from engine.models.hub import choose_gguf, split_quantization

    files = {"m-Q4_K_M.gguf": 1, "m-Q4_K_S.gguf": 1, "m-Q8_0.gguf": 1}
    assert choose_gguf("a/b", files, "q4_k_m") == "m-Q4_K_M.gguf"
    assert choose_gguf("a/b", files, "m-Q8_0.gguf") == "m-Q8_0.gguf"
    assert choose_gguf("a/b", {"only.gguf": 1}, None) == "only.gguf"
    assert split_quantization("org/name-GGUF:Q4_K_M") == ("org/name-GGUF", "Q4_K_M")
    assert split_quantization("org/name@main") == ("org/name@main", None)
    assert split_quantization("name:Q4") == ("name:Q4", None)  # not a repo id: left for parse_spec to refuse
