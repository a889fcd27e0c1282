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


# --- long prompts in passes --------------------------------------------------------------
def passes(n: int, seconds: float, log: list, name: str, result=None):
    """A fake long prompt: `n` passes of `seconds` each, a Pass after each, then one token."""
    from engine.request import PASS

    def gen(cancelled=None):
        for i in range(n):
            time.sleep(seconds)
            log.append((name, f"pass {i}"))
            yield PASS
        log.append((name, "token"))
        if result is None:
            yield "token"
        return result
    return gen


def test_a_stream_between_passes_of_a_long_prompt_gets_half_the_worker(sched):
    """While a prompt is read in 0.1 s passes, a stream of 0.02 s steps runs about five steps
    between two passes (as long as one pass took): it isn't held until the prompt is read, nor does
    it take the worker from the prompt. Pass items never reach the client."""
    log: list = []

    async def main():
        long = sched.submit_stream(passes(6, 0.1, log, "long"))
        await asyncio.sleep(0.05)  # the first pass is under way
        short = sched.submit_stream(counting(10, log, "short", delay=0.02))
        return [x async for x in short], [x async for x in long]

    short, long = asyncio.run(main())
    assert short == list(range(10)) and long == ["token"]
    order = [name for name, _ in log]
    first_short = order.index("short")
    assert order[:first_short] == ["long"]  # the short stream started after the first pass
    assert order.index(("short")) < order.index("long", first_short)  # and before the next pass
    between = order[first_short:order.index("long", first_short)]
    assert 3 <= len(between) <= 7
    assert log[-1] == ("long", "token") or ("long", "token") in log


def test_a_call_in_passes_returns_its_value_and_lets_streams_run(sched):
    log: list = []

    async def main():
        stream = sched.submit_stream(counting(4, log, "s", delay=0.02))
        value = await sched.call_in_passes(passes(3, 0.05, log, "call", result="prefix"))
        return value, [x async for x in stream]

    value, tokens = asyncio.run(main())
    assert value == "prefix" and tokens == [0, 1, 2, 3]
    order = [name for name, _ in log]
    assert order.index("s") < max(i for i, n in enumerate(order) if n == "call")  # interleaved


def test_a_lone_long_prompt_never_waits(sched):
    log: list = []

    async def main():
        t0 = time.monotonic()
        out = [x async for x in sched.submit_stream(passes(5, 0.02, log, "alone"))]
        return out, time.monotonic() - t0

    out, took = asyncio.run(main())
    assert out == ["token"] and [e for _, e in log][-1] == "token" and len(log) == 6
