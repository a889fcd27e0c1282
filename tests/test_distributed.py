"""Distributed serving on one machine (loopback): tiny random models split over 2 ranks give the
same greedy answers as one process; the default model is refused; a dead worker rank gives an
error event and 503, then the supervisor restarts the group; stopping leaves no rank behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import Server
from tests.tiny_sharded import write_tiny_sharded

PROMPTS = ["Hello there", "Tell me a story", "What is two plus two?"]
NO_SIDE_MODELS = ["--embedding-model", "none", "--audio-model", "none"]


@pytest.fixture(scope="module")
def sharded_models(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    return {t: write_tiny_sharded(root / f"tiny-{t}", t, default_model_dir) for t in ("llama", "qwen2")}


def ask(url: str, model: str, prompt: str, stream: bool = False, max_tokens: int = 12) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    text = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"].get("content") or "" if chunk["choices"] else ""
    return text


def pids(*needles: str) -> list[int]:
    """Processes whose command line contains every needle (psutil: no pgrep needed)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if all(n in line for n in needles):
            found.append(proc.info["pid"])
    return found


@pytest.mark.parametrize("kind, shard", [("llama", "tensor"), ("qwen2", "pipeline")])
def test_two_ranks_answer_like_one_process(sharded_models, kind, shard):
    folder = sharded_models[kind]
    model = folder.name
    single = Server(["--model", str(folder), *NO_SIDE_MODELS])
    try:
        want = [ask(single.url, model, p) for p in PROMPTS]
    finally:
        single.stop()
    group = Server(["--model", str(folder), "--ranks", "2", "--shard", shard, *NO_SIDE_MODELS])
    try:
        health = httpx.get(group.url + "/health").json()
        assert (health["world_size"], health["sharding"]) == (2, shard)
        listed = {m["id"]: m for m in httpx.get(group.url + "/v1/models").json()["data"]}
        assert (listed[model]["world_size"], listed[model]["sharding"]) == (2, shard)
        assert [ask(group.url, model, p) for p in PROMPTS] == want
        assert [ask(group.url, model, p, stream=True) for p in PROMPTS] == want
        with ThreadPoolExecutor(3) as pool:  # concurrent streams interleave in lockstep
            assert list(pool.map(lambda p: ask(group.url, model, p, stream=True), PROMPTS)) == want
        # A client that leaves mid-stream: every rank drops the stream at the same step.
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 500,
                "stream": True}
        with httpx.stream("POST", group.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for n, line in enumerate(r.iter_lines()):
                if n > 4:
                    break
        assert ask(group.url, model, PROMPTS[0]) == want[0]
        # Seeded sampling agrees on every rank (rank 0 also seeds unseeded requests for all).
        seeded = [httpx.post(group.url + "/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 8,
            "temperature": 0.9, "seed": 11}).json()["choices"][0]["message"]["content"] for _ in range(2)]
        assert seeded[0] == seeded[1]
        assert httpx.post(group.url + "/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 8,
            "temperature": 0.9}).status_code == 200
    finally:
        status = group.stop()
    assert status in (0, -15)


def test_an_uneven_pipeline_keeps_one_prompt_cache_bound_on_every_rank(default_model_dir, tmp_path):
    """Five layers over two ranks: rank 0 holds three layers' KV, rank 1 two. --prompt-cache-bytes
    and --kv-bits reach every rank, and an entry counts the whole model's bytes per token on each,
    so both ranks drop the same entries under a small bound and stay in step (counting each rank's
    own bytes, rank 1 would still reuse a prefix rank 0 had dropped, and their passes would differ)."""
    folder = write_tiny_sharded(tmp_path / "tiny-qwen2-5", "qwen2", default_model_dir, layers=5)
    model = folder.name
    bound = 150_000  # 1,280 bytes a token: room for two or three of these conversations
    flags = ["--model", str(folder), "--prompt-cache-bytes", str(bound), *NO_SIDE_MODELS]
    turns = [[{"role": "user", "content": f"Conversation {i}: tell me about ships and harbours."}] for i in range(4)]

    def run(url: str) -> list[str]:
        answers = []
        for round_ in range(2):  # every conversation's second turn comes after the others evicted it
            for i, messages in enumerate(turns):
                body = {"model": model, "messages": messages if round_ == 0 else
                        [*messages, {"role": "assistant", "content": answers[i]}, {"role": "user", "content": "More."}],
                        "max_tokens": 6, "temperature": 0}
                r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
                assert r.status_code == 200, r.text
                answers.append(r.json()["choices"][0]["message"]["content"])
                cache = httpx.get(url + "/health", timeout=5).json()["prompt_cache"]
                assert 0 < cache["bytes"] <= bound, cache
        return answers

    single = Server(flags)
    try:
        want = run(single.url)
    finally:
        single.stop()
    group = Server([*flags, "--ranks", "2", "--shard", "pipeline", "--kv-bits", "8", "--kv-group-size", "32"])
    try:
        assert httpx.get(group.url + "/health").json()["sharding"] == "pipeline"
        assert run(group.url) == want
        follower = " ".join(psutil_cmdline(pids("launch.py", "follow", f"--model {folder}")[0]))
        assert f"--prompt-cache-bytes {bound}" in follower and "--kv-bits 8" in follower, follower
    finally:
        assert group.stop() in (0, -15)


def test_a_follower_whose_prompt_cache_differs_stops_instead_of_hanging():
    """Rank 0 says with each new stream how much of its prompt its cache holds. A follower whose
    cache holds another amount would read the prompt in other passes and hang the group in a
    collective; it exits instead (the supervisor then restarts every rank). Fakes: the real
    group's path is the uneven-pipeline test above."""
    from engine.distributed import follow

    class Lock:
        rank, size = 1, 2

        def __init__(self, commands):
            self.commands = list(commands)

        def receive(self):
            return self.commands.pop(0)

    class Runner:
        class prompt_cache:
            @staticmethod
            def peek(prompt, scope):
                return 2  # this rank's cache holds the first two tokens

        started = []

        def generate(self, prompt, *args, **kwargs):
            self.started.append(prompt)
            return (event for event in ())

    runner = Runner()
    assert follow(Lock([("start", 1, [5, 6, 7], 4, None, False, 2, ""), ("shutdown",)]), runner) == 0
    assert runner.started == [[5, 6, 7]]
    assert follow(Lock([("start", 2, [5, 6, 8], 4, None, False, 0, ""), ("shutdown",)]), runner) == 3
    assert runner.started == [[5, 6, 7]]  # the diverged stream never started


def psutil_cmdline(pid: int) -> list[str]:
    import psutil

    return psutil.Process(pid).cmdline()


def test_a_prompt_cache_dir_is_refused_on_two_ranks(sharded_models, tmp_path):
    out = subprocess.run([sys.executable, "-m", "handlers.cli", "serve", "--ranks", "2", "--port", "1",
                          "--model", str(sharded_models["llama"]), "--prompt-cache-dir", str(tmp_path / "kv")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--prompt-cache-dir is not supported with --ranks > 1" in out.stderr, out.stderr


def test_default_model_is_refused_on_two_ranks(default_model_dir):
    out = subprocess.run([sys.executable, "-m", "handlers.cli", "serve", "--ranks", "2", "--port", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "9 attention heads" in out.stderr and "2 ranks" in out.stderr


def test_a_busy_ring_port_is_a_clear_error(sharded_models):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "handlers.cli", "serve", "--ranks", "2", "--port", "1",
                              "--model", str(sharded_models["llama"]), "--ring-port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and f"ring port {port} is busy" in out.stderr


def test_a_dead_worker_fails_streams_then_the_group_recovers(sharded_models):
    folder = sharded_models["llama"]
    model = folder.name
    group = Server(["--model", str(folder), "--ranks", "2", *NO_SIDE_MODELS])
    try:
        follower = pids("launch.py", "follow", f"--model {folder}")[0]
        events = []
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 2000,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", group.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 5:
                        os.kill(follower, signal.SIGKILL)
        assert any('"error"' in e for e in events), events[-3:]  # the stream ended with an error event
        assert events[-1] != "[DONE]" or any('"rank_failed"' in e for e in events)
        health = httpx.get(group.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "rank_failed"
        r = httpx.post(group.url + "/v1/chat/completions", timeout=10, json={**body, "stream": False})
        assert r.status_code == 503 and r.headers["Retry-After"]
        group.wait_ready(timeout=90)  # the supervisor restarts every rank
        assert httpx.get(group.url + "/health", timeout=5).json()["world_size"] == 2
        assert ask(group.url, model, PROMPTS[1])
    finally:
        group.stop()


def test_stopping_leaves_no_rank_and_no_temp_files(sharded_models, tmp_path):
    folder = sharded_models["llama"]
    env = {"TMPDIR": str(tmp_path)}
    group = Server(["--model", str(folder), "--ranks", "2", *NO_SIDE_MODELS], env=env)
    before = pids(f"--model {folder}")
    assert len(before) >= 3  # supervisor, rank 0, rank 1
    assert list(tmp_path.glob("openmlx-ranks-*"))
    assert group.stop() in (0, -15)
    time.sleep(1)
    after = pids(f"--model {folder}")
    assert after == []
    assert not list(tmp_path.glob("openmlx-ranks-*"))


def test_ranks_start_from_a_folder_that_shadows_openmlx(sharded_models, tmp_path):
    """A user's folder holding `engine.py` and `handlers/` must not break the ranks (they never
    put the working directory on sys.path). Started as the `openmlx` console script starts."""
    (tmp_path / "engine.py").write_text("raise SystemExit('the wrong engine was imported')\n")
    (tmp_path / "handlers").mkdir()
    (tmp_path / "handlers" / "__init__.py").write_text("raise SystemExit('the wrong handlers were imported')\n")
    root = Path(__file__).resolve().parent.parent
    entry = [sys.executable, "-c", f"import sys; sys.path[0] = {str(root)!r}; from handlers.cli import main; main()"]
    folder = sharded_models["llama"]
    group = Server(["--model", str(folder), "--ranks", "2", *NO_SIDE_MODELS], cwd=tmp_path, entry=entry)
    try:
        assert ask(group.url, folder.name, PROMPTS[0])
        assert httpx.get(group.url + "/health", timeout=5).json()["world_size"] == 2
    finally:
        group.stop()
