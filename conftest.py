"""Shared fixtures: the real default model, and live `openmlx serve` processes.

Servers run as subprocesses (real uvicorn, real MLX) so the tests see exactly what users see,
and MLX's worker thread never lives inside the pytest process.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from engine.config import openmlx_home
from engine.default_model import DEFAULT_MODEL_ID, ensure_default_model

MODEL = DEFAULT_MODEL_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `openmlx serve` subprocess."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"openmlx-test-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "handlers.cli", "serve", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        if wait:
            self.wait_ready()

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run long fuzzing and soak tests")


def pytest_configure(config):
    if config.getoption("--run-slow"):
        os.environ.setdefault("OPENMLX_FUZZ_EXAMPLES", "500")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: use --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model in the store (converted once, fetched once if needed)."""
    home = openmlx_home()
    return ensure_default_model(home / "models", home)


@pytest.fixture(scope="session")
def server(default_model_dir: Path) -> Iterator[Server]:
    """One live server on the default model for the session."""
    s = Server(["--max-queue", "16"])
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def hf_tokenizer(default_model_dir: Path):
    """The model's own tokenizer (transformers, no MLX) for checking token counts."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))
