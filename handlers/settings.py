"""The engine's settings from the command line (shared by `serve` and the model commands)."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.config import ImageLimits


def _number(text: str, convert: Callable[[str], Any], kind: str, ok: Callable[[Any], bool], rule: str) -> Any:
    """`text` as a number that keeps `ok`, or argparse's error naming the rule."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text} {rule}")
    return value


def positive_int(text: str) -> int:
    """A count or size flag: a whole number of at least 1 (0 or -1 would disable a limit silently)."""
    return _number(text, int, "a whole number", lambda v: v >= 1, "must be at least 1")


def positive_float(text: str) -> float:
    """A duration or limit flag: a finite number above 0 (NaN or inf would never fire)."""
    return _number(text, float, "a number", lambda v: math.isfinite(v) and v > 0, "must be a finite number above 0")


def keep_alive(text: str) -> float:
    """Ollama's keep_alive: seconds or a duration ("5m", "1h30m"); negative: forever."""
    from engine.errors import EngineError
    from handlers.ollama_protocol import parse_duration

    try:
        return parse_duration(text, "--keep-alive")
    except EngineError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def port_number(text: str) -> int:
    """A TCP port, 0-65535 (0: the system picks a free one)."""
    return _number(text, int, "a port number", lambda v: 0 <= v <= 65535, "is not a port (0-65535)")


def effort_budgets(text: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """Thinking budgets for reasoning efforts low, medium and high: three whole numbers, LOW,MEDIUM,HIGH."""
    if isinstance(text, tuple):  # the default
        return text
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not three budgets LOW,MEDIUM,HIGH (e.g. 512,2048,8192)")
    return tuple(positive_int(p.strip()) for p in parts)  # type: ignore[return-value]


# The same rules for a config file's values (argparse does not convert a file's values).
FLAG_SCHEMAS = {positive_int: {"type": "integer", "minimum": 1},
                positive_float: {"type": "number", "exclusiveMinimum": 0, "maximum": 1e15},
                port_number: {"type": "integer", "minimum": 0, "maximum": 65535},
                effort_budgets: {"type": "string", "pattern": "^ *[1-9][0-9]* *, *[1-9][0-9]* *, *[1-9][0-9]* *$"}}


def engine_config(args: argparse.Namespace) -> "EngineConfig":
    """The engine's settings from parsed CLI arguments (missing ones take their defaults)."""
    from engine.config import EngineConfig

    return EngineConfig(model=getattr(args, "model", None),
                        embedding_model=getattr(args, "embedding_model", None),
                        rerank_model=getattr(args, "rerank_model", None),
                        audio_model=getattr(args, "audio_model", None),
                        batch=getattr(args, "batch", "auto"),
                        hub_download=getattr(args, "allow_download", False),
                        download_timeout_s=getattr(args, "download_timeout", 3600.0),
                        max_store_bytes=getattr(args, "max_store_bytes", None),
                        speculative=getattr(args, "speculative", "auto"),
                        num_draft_tokens=getattr(args, "num_draft_tokens", 12),
                        draft_model=getattr(args, "draft_model", None),
                        models=list(getattr(args, "models", None) or []),
                        local_models=[Path(p) for p in getattr(args, "model_dir", None) or []],
                        default_max_tokens=getattr(args, "max_tokens", None),
                        max_tokens_cap=getattr(args, "max_tokens_cap", None),
                        reasoning_budgets=effort_budgets(getattr(args, "reasoning_budgets", "512,2048,8192")),
                        cpu_dtype=getattr(args, "cpu_dtype", "auto"),
                        max_queue=getattr(args, "max_queue", 64),
                        prompt_cache_bytes=getattr(args, "prompt_cache_bytes", 512 << 20),
                        prompt_cache_dir=Path(args.prompt_cache_dir).expanduser()
                        if getattr(args, "prompt_cache_dir", None) else None,
                        prompt_cache_dir_bytes=getattr(args, "prompt_cache_dir_bytes", 4 << 30),
                        kv_bits=getattr(args, "kv_bits", None),
                        kv_group_size=getattr(args, "kv_group_size", 64),
                        max_models=getattr(args, "max_models", 1),
                        request_timeout_s=getattr(args, "request_timeout", None),
                        idle_unload_s=getattr(args, "idle_unload", None),
                        keep_alive_s=getattr(args, "keep_alive", 300.0),
                        available_memory_override=getattr(args, "assume_available_memory", None),
                        image_limits=_image_limits(args),
                        max_audio_seconds=getattr(args, "max_audio_seconds", 2 * 3600.0),
                        world_size=getattr(args, "ranks", 1),
                        shard=getattr(args, "shard", "auto"),
                        backend=getattr(args, "backend", "ring"))


def _image_limits(args: argparse.Namespace) -> "ImageLimits":
    from engine.config import ImageLimits

    default = ImageLimits()
    chunk = getattr(args, "image_chunk_size", None) or int(os.environ.get("OPENMLX_IMAGE_CHUNK_SIZE", default.chunk_size))
    return ImageLimits(max_bytes=getattr(args, "max_image_bytes", default.max_bytes),
                       max_pixels=getattr(args, "max_image_pixels", default.max_pixels),
                       max_images=getattr(args, "max_images", default.max_images),
                       chunk_size=min(max(1, chunk), default.max_chunk_size))
