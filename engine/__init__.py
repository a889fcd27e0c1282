"""openmlx engine: finds, checks, loads and runs models. Never imports a web framework.

The map (imports run downwards only: handlers -> the facade and the request values -> sub-packages;
no sub-package imports the facade):

    engine.py, request.py, errors.py   the facade handlers call, the values they pass, the errors they map
    model_manager.py  the facade's model management (list, show, keep, load, pull, copy, delete)
    config.py, scheduler.py, runners.py  settings, the worker queue, the runner interface every model kind meets
    residency.py  which models are loaded (loads runners and side models on first use, unloads by LRU/idle)
    addresses.py  which network addresses may be fetched (image URLs, Hub downloads)
    models/       finding and loading a model: store, hub and its downloads, default model, GGUF import, probe,
                  policy, memory gate, weights
    formats/      reading files MLX can't load itself: GGUF, CTranslate2 Whisper
    generation/   the text path: runner and its chat prompts, batching, speculation, sampling, stopping, scoring,
                  prompt cache (in memory, on disk and its files' checks), budget
    constrained/  grammar-constrained output (llguidance) and tool calls in each model family's format
    media/        side models and inputs: vision (mlx-vlm), images, speech (mlx-audio), embeddings
    cpu/          the CPU fast path: the BLAS choice and numpy's vectorized elementwise math
    distributed/  one model over several processes (mlx.launch), rank 0 serving

OpenBLAS must be loaded before mlx.core is imported (see engine.cpu.blas), so it happens here,
before any engine module can import mlx.
"""
from engine.cpu import blas as _blas

_blas.activate()
