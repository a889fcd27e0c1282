"""The scheduler with fake generations: FIFO, round-robin, bounded queue, cancellation."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine.errors import Overloaded, ShuttingDown
from engine.scheduler import Scheduler


@pytest.fixture
def sched():
    s = Scheduler(max_queue=3)
    s.start()
    yield s
    s.stop()


def counting(n: int, log: list, name: str, delay: float = 0.0):
    def gen(cancelled):
        for i in range(n):
            if cancelled():
                log.append((name, "cancelled"))
                return
            time.sleep(delay)
            log.append((name, i))
            yield i
    return gen


def test_streams_interleave_round_robin(sched):
    log: list = []

    async def main():
        a = sched.submit_stream(counting(3, log, "a"))
        b = sched.submit_stream(counting(3, log, "b"))
        return [x async for x in a], [x async for x in b]

    assert asyncio.run(main()) == ([0, 1, 2], [0, 1, 2])
    names = [n for n, _ in log]
    assert names.index("b") < names.index("a") + 3  # b started before a finished


def test_queue_full_is_429(sched):
    started = threading.Event()

    def slow(cancelled):
        started.set()
        while not cancelled():
            time.sleep(0.01)
            yield 0

    async def main():
        handles = [sched.submit_stream(slow) for _ in range(3)]
        with pytest.raises(Overloaded) as e:
            sched.submit_stream(slow)
        assert e.value.status == 429 and e.value.headers["Retry-After"]
        for h in handles:
            h.cancel()

    asyncio.run(main())


def test_cancel_stops_the_generator(sched):
    log: list = []

    async def main():
        h = sched.submit_stream(counting(10_000, log, "x", delay=0.001))
        got = 0
        async for _ in h:
            got += 1
            if got == 3:
                break
        h.cancel()
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert ("x", "cancelled") in log
    assert len([1 for n, i in log if n == "x" and i != "cancelled"]) < 200


def test_exclusive_call_waits_for_running_streams(sched):
    order: list = []

    async def main():
        h = sched.submit_stream(counting(5, order, "s", delay=0.01))
        result = asyncio.create_task(sched.call(lambda: order.append(("switch", 0)) or "ok", exclusive=lambda: True))
        items = [x async for x in h]
        assert await result == "ok" and items == list(range(5))

    asyncio.run(main())
    assert order[-1] == ("switch", 0)


def test_call_exception_reaches_caller(sched):
    async def main():
        with pytest.raises(ZeroDivisionError):
            await sched.call(lambda: 1 / 0)
    asyncio.run(main())


def test_stop_refuses_new_work():
    s = Scheduler()
    s.start()
    s.stop()

    async def main():
        with pytest.raises(ShuttingDown):
            await s.call(lambda: 1)
    asyncio.run(main())
