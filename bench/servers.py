"""Start and stop the servers under test, each on a free local port with the same model folder."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Peer:
    """How to start one server and what its model id is in requests."""

    name: str
    argv: list[str]
    model_id: str
    ready_path: str = "/v1/models"
    env: Optional[dict[str, str]] = None


def peers(model_dir: Path, model_id: str, python: str = sys.executable) -> dict[str, Peer]:
    """The servers the bench knows. Each gets `{port}` substituted."""
    return {
        "openmlx": Peer("openmlx", [python, "-m", "handlers.cli", "serve", "--model", str(model_dir),
                                    "--port", "{port}", "--log-level", "warning"], model_dir.name, "/health"),
        "openmlx-keep": Peer("openmlx-keep", [python, "-m", "handlers.cli", "serve", "--model", str(model_dir),
                                              "--port", "{port}", "--cpu-dtype", "keep", "--log-level", "warning"],
                             model_dir.name, "/health"),
        "mlx_lm.server": Peer("mlx_lm.server", [python, "-m", "mlx_lm", "server", "--model", str(model_dir),
                                                "--port", "{port}", "--log-level", "WARNING"], str(model_dir)),
    }


class Running:
    def __init__(self, peer: Peer, log_dir: Path) -> None:
        self.peer = peer
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [a.replace("{port}", str(self.port)) for a in peer.argv]
        self.log = open(log_dir / f"{peer.name}.log", "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(peer.env or {})})
        self.started = time.perf_counter()
        self.ready_s: float = 0.0

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer.name} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + self.peer.ready_path, timeout=2).status_code == 200:
                    self.ready_s = time.perf_counter() - self.started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.peer.name} not ready after {timeout}s")

    def rss_bytes(self) -> int:
        try:
            p = psutil.Process(self.proc.pid)
            return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)])
        except psutil.Error:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
