"""One worker thread owns all MLX work; requests reach it through a bounded FIFO queue.

Why one thread: MLX streams and the model's state are not meant to be shared across threads, and
on a 2-core CPU one compute thread (with BLAS threads under it) is the most the machine can use.
Streams are advanced round-robin, one token each, so concurrent clients share the model fairly and
none waits for another to finish. A long prompt is read in passes (a stream yields `Pass` after
each): after a pass, the other streams run for as long as it took before its next pass, so they
keep half the worker and a short request arriving meanwhile starts after one pass, not after the
whole prompt (chunked prefill, as vLLM and llama.cpp schedule it). A job that must not overlap running streams (loading another
model) waits for them to drain, and nothing queued after it overtakes it.

The event loop never blocks: results cross back with `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from engine.errors import EngineError, Overloaded, RequestTimeout, ShuttingDown
from engine.request import WAIT_S, Pass

log = logging.getLogger("openmlx.scheduler")

_END = object()


@dataclass
class _Job:
    sink: Callable[[Any], None]  # thread-safe: hands a result, event or exception to the waiter
    call: Optional[Callable[[], Any]] = None
    stream: Optional[Callable[[Callable[[], bool]], Iterator[Any]]] = None
    exclusive: Callable[[], bool] = lambda: False
    cancelled: threading.Event = field(default_factory=threading.Event)
    gen: Optional[Iterator[Any]] = None
    deadline: Optional[float] = None  # time.monotonic() after which a stream is cut off
    owed: float = 0.0  # seconds the other streams run before this one's next step (after a Pass)
    returns: bool = False  # a call run in passes: its generator's return value is the result

    def deliver(self, item: Any) -> None:
        try:
            self.sink(item)
        except RuntimeError:  # event loop closed: the client is gone
            self.cancelled.set()


def _async_sink(out: asyncio.Queue) -> Callable[[Any], None]:
    loop = asyncio.get_running_loop()
    return lambda item: loop.call_soon_threadsafe(out.put_nowait, item)


class Scheduler:
    """A bounded FIFO of calls and token streams served by one worker thread."""

    def __init__(self, max_queue: int = 64, on_idle: Callable[[], None] = lambda: None,
                 timeout_s: Optional[float] = None) -> None:
        self.max_queue = max_queue
        self.timeout_s = timeout_s  # per stream, from admission (queue time included)
        self._on_idle = on_idle  # called on the worker about every 50 ms while nothing runs
        self._queue: "queue.Queue[_Job]" = queue.Queue()
        self._active: list[_Job] = []
        # Jobs admitted and not yet finished (queued or running), calls and streams alike (an
        # embedding batch or a token count occupies the worker too): the queue bound and /health.
        self._jobs = 0
        self._jobs_lock = threading.Lock()
        self._closing = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.shutdown_reason = "The server is shutting down."
        self._aborted: Optional[Exception] = None

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="openmlx-worker", daemon=True)
            self._thread.start()

    def close(self, reason: str) -> None:
        """Refuse new work and end running streams with `reason`; returns at once (signal-safe)."""
        self.shutdown_reason = reason
        self._closing.set()

    def abort(self, error: Exception) -> None:
        """From any thread: hand `error` to every running and queued request now, without the
        worker (which may be stuck in a collective whose peer died)."""
        self._aborted = error  # and refuse new work: the worker may never come back
        for job in list(self._active):
            job.deliver(error)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.deliver(error)

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new work, end running streams with an error, and join the worker."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def load(self) -> int:
        """Jobs (calls and streams) queued or running."""
        return self._jobs

    def _job_done(self) -> None:
        with self._jobs_lock:
            self._jobs -= 1

    def run_sync(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread from a non-async context (start-up) and wait."""
        done = threading.Event()
        box: list[Any] = []
        self._submit(_Job(sink=lambda item: (box.append(item), done.set()), call=fn))
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    # --- async API -----------------------------------------------------------------------
    def _submit(self, job: _Job) -> None:
        if self._aborted is not None:
            raise self._aborted
        if self._closing.is_set():
            raise ShuttingDown(self.shutdown_reason, headers={"Retry-After": "5"})
        with self._jobs_lock:
            if self._jobs >= self.max_queue:
                raise Overloaded(f"The server is busy ({self._jobs} requests queued or running); "
                                 "retry shortly.", headers={"Retry-After": "1"})
            self._jobs += 1
        self._queue.put(job)

    async def call(self, fn: Callable[[], Any], exclusive: Callable[[], bool] = lambda: False) -> Any:
        """Run `fn` on the worker and return its result (its exception is raised here)."""
        out: asyncio.Queue = asyncio.Queue()
        job = _Job(sink=_async_sink(out), call=fn, exclusive=exclusive)
        self._submit(job)
        try:
            item = await out.get()
        finally:
            job.cancelled.set()  # if we were cancelled while queued, the worker skips it
        if isinstance(item, BaseException):
            raise item
        return item

    async def call_in_passes(self, fn: Callable[[], Iterator[Any]]) -> Any:
        """Run the generator `fn()` on the worker as a stream that yields `Pass` between passes
        (other streams run meanwhile) and return what it returns."""
        out: asyncio.Queue = asyncio.Queue()
        job = _Job(sink=_async_sink(out), stream=lambda _cancelled: fn(), returns=True)
        self._submit(job)
        try:
            item = await out.get()
        finally:
            job.cancelled.set()
        if isinstance(item, BaseException):
            raise item
        return item

    def submit_stream(self, fn: Callable[[Callable[[], bool]], Iterator[Any]]) -> "StreamHandle":
        """Queue a generator factory; it gets a `cancelled()` callable and runs on the worker."""
        out: asyncio.Queue = asyncio.Queue()
        job = _Job(sink=_async_sink(out), stream=fn,
                   deadline=time.monotonic() + self.timeout_s if self.timeout_s else None)
        self._submit(job)
        return StreamHandle(job, out)

    # --- worker --------------------------------------------------------------------------
    def _run(self) -> None:
        blocked: Optional[_Job] = None
        while True:
            if self._closing.is_set():
                self._drain(ShuttingDown(self.shutdown_reason), blocked)
                return
            while blocked is None:
                try:
                    job = self._queue.get(timeout=0.05) if not self._active else self._queue.get_nowait()
                except queue.Empty:
                    if not self._active:
                        self._safe_idle()
                    break
                if job.cancelled.is_set():
                    self._job_done()
                    job.deliver(_END)
                    continue
                if job.call is not None:
                    if self._active and job.exclusive():
                        blocked = job
                        break
                    self._run_call(job)
                else:
                    self._active.append(job)
            if blocked is not None and not self._active:
                self._run_call(blocked)
                blocked = None
            self._round()

    def _round(self) -> None:
        """Step each active stream once, but a stream that owes time (its last step was a Pass)
        waits while others run, unless every stream owes."""
        ready = [job for job in self._active if job.owed <= 0] or list(self._active)
        for job in ready:
            t0 = time.monotonic()
            passed = self._step(job)
            spent = time.monotonic() - t0
            for other in self._active:
                if other is not job and other.owed > 0:
                    other.owed -= spent
            if passed is not None:  # a waiting stream owes a little, so the one it waits for runs
                job.owed = max(spent, WAIT_S) if passed.wait else spent

    def _safe_idle(self) -> None:
        try:
            self._on_idle()
        except Exception:
            log.exception("idle task failed")

    def _run_call(self, job: _Job) -> None:
        try:
            result: Any = job.call()
        except BaseException as e:  # delivered to the awaiting request, never lost
            result = e
        self._job_done()  # before delivery: the waiter may submit its stream at once
        job.deliver(result)

    def _step(self, job: _Job) -> Optional[Pass]:
        """Take one item from the stream and hand it over; the Pass, when it was one."""
        if job.deadline is not None and time.monotonic() > job.deadline and not job.cancelled.is_set():
            timeout = RequestTimeout(f"The request took longer than this server's limit of {self.timeout_s:g} s "
                                     "(--request-timeout).", headers={"Retry-After": "1"})
            if job.gen is None or job.returns:  # nothing read yet (or a call's result): ends here
                if job.gen is not None:
                    job.gen.close()
                self._active.remove(job)
                self._job_done()
                job.deliver(timeout)
                if not job.returns:
                    job.deliver(_END)
                return None
            # The client hears of it at once; the stream, told to stop, ends within a pass with
            # its Finished "cancelled" (what it read and wrote), which the request's accounting
            # reads after the error (handlers/conversation/choices.py).
            job.deliver(timeout)
            job.cancelled.set()
        try:
            if job.gen is None:
                job.gen = job.stream(job.cancelled.is_set)
            item = next(job.gen)
        except StopIteration as stop:
            self._active.remove(job)
            self._job_done()
            job.deliver(stop.value if job.returns else _END)
            return None
        except BaseException as e:
            if isinstance(e, EngineError) and e.status < 500:  # the client's mistake: one line, no traceback
                log.info("request refused: %s", e.message)
            else:
                log.exception("generation failed")
            self._active.remove(job)
            self._job_done()
            job.deliver(e)
            return None
        if isinstance(item, Pass):
            return item
        job.deliver(item)
        return None

    def _drain(self, error: EngineError, blocked: Optional[_Job]) -> None:
        for job in self._active + ([blocked] if blocked else []):
            if job.gen is not None:
                job.gen.close()
            job.deliver(error)
        self._active.clear()
        while True:
            try:
                self._queue.get_nowait().deliver(error)
            except queue.Empty:
                break
        with self._jobs_lock:
            self._jobs = 0


class StreamHandle:
    """The async side of a queued stream: iterate events; cancel on client disconnect."""

    def __init__(self, job: _Job, out: asyncio.Queue) -> None:
        self._job = job
        self._out = out

    def cancel(self) -> None:
        self._job.cancelled.set()

    @property
    def deadline(self) -> Optional[float]:
        """When the worker cuts this stream off (time.monotonic()), or None."""
        return self._job.deadline

    def limit_to(self, deadline: Optional[float]) -> None:
        """Cut this stream off no later than `deadline`: the choices of one request share the
        first one's, so --request-timeout bounds the request, not each of its streams."""
        if deadline is not None and (self._job.deadline is None or deadline < self._job.deadline):
            self._job.deadline = deadline

    async def remaining(self, timeout: float) -> list[Any]:
        """After cancel(): what the worker still hands over until the stream ends (its last
        event is a Finished "cancelled" with the tokens read and written by then), within
        `timeout` seconds; whatever came if the worker takes longer."""
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = await asyncio.wait_for(self._out.get(), left)
            except asyncio.TimeoutError:
                break
            if item is _END or isinstance(item, BaseException):
                break
            out.append(item)
        return out

    async def __aiter__(self) -> AsyncIterator[Any]:  # type: ignore[override]
        try:
            while True:
                item = await self._out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._job.cancelled.set()
