"""Which path decodes a lone stream on this machine: the numpy step (engine/cpu/decode.py) or MLX's
own, chosen by measurement.

The step must first check out against the model's own logits (`decode.checked_step`); then both
steps are timed on the loaded model, in turns, and the faster is used. The timings are cached in
OPENMLX_HOME/decode.json per CPU, BLAS library, threads and model shape, as engine/cpu/blas.py
caches its choice of library. `OPENMLX_FAST_DECODE=off` keeps MLX's step.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from engine.cpu import blas, decode

log = logging.getLogger("openmlx.engine")


def _signature(model: nn.Module, step: decode.OneTokenStep) -> str:
    info = blas.active()
    shapes = [step.embed.shape, step.head.shape, len(step.layers)] + [w.shape for w in step.layers[0].qkv.weights]
    # the weights' kind too: float32 arrays and block-held projections (--cpu-dtype quantized) time differently
    shapes += [type(w).__name__ for w in step.layers[0].qkv.weights]
    return json.dumps([blas.cpu_name(), info.name, info.path, info.threads, step.blas.name, str(shapes)])


def _paired(a: Callable[[], Any], b: Callable[[], Any], rounds: int = 8) -> tuple[float, float]:
    """The fastest of `rounds` runs of each, taken in turns: whatever else the machine does at load
    time (a server start is often beside an install or another process) slows both alike, and the
    fastest run is the one least disturbed by it."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for call, out in ((a, times[0]), (b, times[1])):
            t0 = time.perf_counter()
            call()
            out.append(time.perf_counter() - t0)
    return min(times[0]), min(times[1])


def _measure(model: nn.Module, step: decode.OneTokenStep) -> tuple[float, float]:
    """Seconds per decode step: (the model's own, the numpy step), over a 64-token context."""
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    prompt = mx.array([list(range(1, 65))]) % step.embed.shape[0]
    cache = make_prompt_cache(model)
    mx.eval(model(prompt, cache=cache))

    def own() -> None:
        mx.eval(model(mx.array([[9]]), cache=cache))
        trim_prompt_cache(cache, 1)

    def ours() -> None:
        step(9, cache)
        trim_prompt_cache(cache, 1)

    return _paired(own, ours)


def install(model: nn.Module) -> tuple[Any, str]:
    """(what to call for a solo stream's passes, why): a `FastDecode` where the numpy step checks
    out and is faster on this machine, else the model itself. CPU, float32 or block-held weights."""
    if os.environ.get("OPENMLX_FAST_DECODE", "").lower() in ("off", "0", "no"):
        return model, "mlx (OPENMLX_FAST_DECODE=off)"
    if mx.default_device() != mx.cpu:
        return model, "mlx (not on the CPU)"
    if getattr(model, "model_type", None) not in decode.ARCHITECTURES:
        return model, f"mlx (numpy step: architecture {getattr(model, 'model_type', None)!r} isn't one of {decode.ARCHITECTURES})"
    try:
        step = decode.checked_step(model)
    except decode.Unsupported as e:
        return model, f"mlx (numpy step: {e})"
    key = _signature(model, step)
    path = os.path.join(blas.home(), "decode.json")
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    timings = known.get(key)
    if not (isinstance(timings, list) and len(timings) == 2 and all(isinstance(t, float) for t in timings)):
        timings = list(_measure(model, step))
        known[key] = timings
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(known, f)
            os.replace(tmp, path)
        except OSError:
            pass
    own, ours = timings
    measured = f"{ours * 1000:.0f} ms a step against MLX's {own * 1000:.0f} ms"
    if ours >= own:
        return model, f"mlx (numpy step slower here: {measured})"
    log.info("decode: one-token steps in numpy (%s, %s)", step.blas.name, measured)
    return decode.FastDecode(model, step, f"numpy {step.blas.name} ({measured})"), f"numpy {step.blas.name} ({measured})"
