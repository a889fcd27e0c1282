"""On-demand Hub downloads (`--allow-download`): off the event loop, the worker and the shared
thread pool, in a queue of their own.

A client can name any repo, so downloads must never take the server down with them: one runs at
a time on its own thread; a few more may wait (past that: 503 with Retry-After); the same repo
asked for twice shares one download; a request waits at most the download's deadline (504), and
the transfer itself stops there too (engine/models/hub_transfer.py). A model already in the store
never touches any of it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path
from typing import Callable, Optional

from engine.errors import EngineError, ModelNotFound
from engine.models.memory import MemoryGate
from engine.models.resolution import ModelStore


class Downloads:
    """The download queue of one engine."""

    def __init__(self, store: ModelStore, models_dir: Path, gate: MemoryGate, timeout_s: float, max_waiting: int,
                 max_store_bytes: Optional[int], in_use: Callable[[Path], bool]) -> None:
        self.store = store
        self.models_dir = models_dir
        self.gate = gate
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.max_store_bytes = max_store_bytes
        self.in_use = in_use
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="openmlx-download")
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()

    def in_store(self, model_id: str) -> bool:
        try:
            self.store.resolve(model_id)
            return True
        except ModelNotFound:
            return False

    def fetch_now(self, source: str, model_id: str) -> None:
        """Blocking: at start-up, the preloaded model."""
        if not self.in_store(model_id):
            self._pull(source, model_id)

    async def ensure(self, source: str, model_id: str) -> None:
        """The model in the store, downloaded first if it is not; 503 when the queue is full,
        504 past the deadline."""
        from engine.models.hub import parse_spec

        if await asyncio.to_thread(self.in_store, model_id):
            return
        parse_spec(source)  # a malformed id is a 400 now, not after the queue
        with self._lock:
            future = self._pending.get(source)
            if future is None:
                if len(self._pending) > self.max_waiting:  # the running one plus max_waiting queued
                    raise EngineError(f"{len(self._pending)} Hub downloads are running or queued; try '{model_id}' "
                                      "again shortly.", code="downloads_busy", status=503,
                                      headers={"Retry-After": "30"})
                future = self._pool.submit(self._pull, source, model_id)
                self._pending[source] = future
                future.add_done_callback(lambda _f, key=source: self._forget(key))
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout_s)
        except asyncio.TimeoutError:
            raise EngineError(f"Downloading '{model_id}' did not finish within {self.timeout_s:g} s "
                              "(--download-timeout).", code="download_timeout", status=504) from None

    def _forget(self, source: str) -> None:
        with self._lock:
            self._pending.pop(source, None)

    def _pull(self, source: str, model_id: str) -> None:
        from engine.models import hub

        if self.in_store(model_id):  # queued behind a download of the same model
            return
        hub.pull(source, self.models_dir, self.gate, max_store_bytes=self.max_store_bytes, in_use=self.in_use,
                 timeout_s=self.timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
