"""A server in a subprocess on a free local port: start, wait until it answers, measure, stop.
The tests' and the bench's `openmlx serve` processes (Server) and the bench's peers
(bench/servers.py) are all this; it lives outside conftest.py so the bench never imports the suite."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`argv` with "{port}" replaced by a free port, logging to `log_path`."""

    def __init__(self, argv: list[str], log_path: Path, env: Optional[dict[str, str]] = None,
                 cwd: Optional[Path] = None, ready_path: str = "/health", port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([a.replace("{port}", str(self.port)) for a in argv], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
        self.started = time.perf_counter()
        self.ready_s = 0.0  # seconds from start until it answered

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1).status_code == 200:
                    self.ready_s = time.perf_counter() - self.started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def rss_bytes(self) -> int:
        """Resident memory of the process and its children."""
        try:
            p = psutil.Process(self.proc.pid)
            return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)])
        except psutil.Error:
            return 0

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


class Server(ServerProcess):
    """A running `openmlx serve` subprocess."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, wait: bool = True,
                 cwd: Path | None = None, entry: list[str] | None = None) -> None:
        port = free_port()
        entry = entry or [sys.executable, "-m", "handlers.cli"]
        super().__init__([*entry, "serve", "--port", str(port), *args],
                         Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"openmlx-test-{port}.log",
                         env=env, cwd=cwd, port=port)
        if wait:
            self.wait_ready()
