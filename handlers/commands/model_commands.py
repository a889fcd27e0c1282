"""The CLI's model commands: list, show, pull, rm (the store and the Hugging Face Hub)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config(args: argparse.Namespace):
    from handlers.commands.settings import engine_config

    return engine_config(args)


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def cmd_list(args: argparse.Namespace) -> int:
    from engine.engine import Engine

    from engine.models.external import external_models

    infos = Engine(_config(args)).list_models(include_unusable=args.all)
    converted = {i.id for i in infos}
    others = [m for m in external_models() if m.store_name not in converted]  # not in openmlx's store yet
    if args.json:
        print(json.dumps([{"id": i.id, "type": i.type, "size_bytes": i.size_bytes,
                           "context_length": i.context_length, "runnable": i.runnable,
                           "reason": i.reason, "path": str(i.path)} for i in infos]
                         + [{"id": m.spec, "type": "gguf", "size_bytes": m.size_bytes, "context_length": None,
                             "runnable": None, "reason": f"converted on first use (serve --model {m.spec})",
                             "path": str(m.path)} for m in others], indent=2))
        return 0
    print(f"{'ID':<48} {'TYPE':<7} {'SIZE':>9} {'CONTEXT':>8}  SOURCE")
    for i in infos:
        note = "" if i.runnable else f"  (cannot run: {i.reason})"
        print(f"{i.id:<48} {i.type:<7} {_size(i.size_bytes):>9} {i.context_length or '-':>8}  {i.source}{note}")
    for m in others:
        print(f"{m.spec:<48} {'gguf':<7} {_size(m.size_bytes):>9} {'-':>8}  {m.spec.split(':')[0]} "
              f"(serve --model {m.spec} converts it once)")
    if not infos and not others:
        print("(no models yet: `openmlx serve` prepares the default model on first start)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from engine.cpu import blas
    from engine.engine import Engine
    from engine.errors import EngineError
    from engine.models.probe import probe

    config = _config(args)
    engine = Engine(config)
    try:
        path = Path(args.name).expanduser()
        entry_path = path if path.is_dir() else engine.store.resolve(args.name).path
    except EngineError as e:
        print(f"openmlx: {e.message}", file=sys.stderr)
        return 1
    p = probe(entry_path)
    b = blas.active()
    dtype, kv = None, None
    if p.type == "text" and p.runnable:  # what loading it now would hold its weights as, and why
        from engine.models.memory import MemoryGate
        from engine.models.weights import choose_cpu_dtype, kv_bytes_per_token

        kv = kv_bytes_per_token(p.config)
        dtype = choose_cpu_dtype(config.cpu_dtype, p, MemoryGate(), kv)
    info = {"id": args.name, "path": str(p.path), "type": p.type, "architecture": p.architecture,
            "runnable": p.runnable, "reason": p.reason or None, "context_length": p.context_length,
            "size_bytes": p.size_bytes, "quantization": p.quantization,
            "dtype": dtype.dtype if dtype else None, "dtype_reason": dtype.reason if dtype else None,
            # what one prompt token's keys and values take in the prompt cache (float32 on the CPU):
            # --prompt-cache-bytes / this = the tokens of history it holds
            "kv_bytes_per_token": kv,
            "blas": b.name, "blas_path": b.path, "blas_version": b.version, "blas_threads": b.threads,
            "blas_note": b.reason}
    cache_dir = config.prompt_cache_dir
    if cache_dir:  # every model's segments there (each model has a folder of its own)
        files = list(cache_dir.glob("*/*.safetensors"))
        info["prompt_cache_dir"] = {"path": str(cache_dir), "files": len(files),
                                    "bytes": sum(f.stat().st_size for f in files)}
    print(json.dumps(info, indent=2))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Download ORG/NAME[@REVISION][:QUANT] with huggingface_hub's progress bars (a GGUF repo's one
    file, converted into the store), then say whether (and why not) openmlx can serve it."""
    from engine.models import hub
    from engine.errors import EngineError
    from engine.models.memory import MemoryGate

    config = _config(args)
    try:
        pulled = hub.pull(args.name, config.models_dir, MemoryGate(), gguf_file=args.file)
    except EngineError as e:
        print(f"openmlx: {e.message}", file=sys.stderr)
        return 1
    p = pulled.probe
    print(f"pulled {pulled.id} ({p.type}, {p.architecture}, {_size(p.size_bytes)}) in {pulled.seconds:.1f} s "
          f"to {pulled.path}")
    print(f"serve it: openmlx serve --model {pulled.id}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete a model from openmlx's store or the Hugging Face cache."""
    from engine.models import hub
    from engine.errors import EngineError

    config = _config(args)
    try:
        removed = hub.remove(args.name, config.models_dir, config.hf_cache)
    except EngineError as e:
        print(f"openmlx: {e.message}", file=sys.stderr)
        return 1
    for path in removed:
        print(f"removed {path}")
    return 0
