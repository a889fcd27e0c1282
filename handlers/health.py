"""GET /health: answered on the event loop from in-memory state, never waits for the engine."""
from __future__ import annotations

from connexion import request


async def get() -> tuple[dict, int]:
    h = request.state.engine.health()
    body = {"status": h.status, "model": h.model, "uptime_s": round(h.uptime_s, 3), "device": h.device,
            "blas": h.blas.name, "blas_threads": h.blas.threads, "blas_version": h.blas.version, "queued": h.queued,
            "prompt_cache_hits": h.prompt_cache_hits, "batch_peak": h.batch_peak,
            "world_size": h.world_size, "sharding": h.sharding, "decode": h.decode,
            "prompt_cache": {"entries": h.prompt_cache_entries, "quantized": h.prompt_cache_quantized,
                             "bytes": h.prompt_cache_bytes,
                             "disk_bytes": h.prompt_cache_disk_bytes}}
    return body, 200 if h.status == "ok" else 503
