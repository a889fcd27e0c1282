"""GET /v1/models and /v1/models/{model}: OpenAI Model objects plus type and context length."""
from __future__ import annotations

import asyncio

from connexion import request

from engine.engine import ModelInfo


def model_object(info: ModelInfo) -> dict:
    return {"id": info.id, "object": "model", "created": info.created, "owned_by": info.owned_by,
            "type": info.type, "context_length": info.context_length, "dimensions": info.embedding_dim,
            "loaded": info.loaded, **({"world_size": info.world_size, "sharding": info.sharding}
                                      if info.world_size > 1 else {}),
            **({"dtype": info.dtype, "dtype_reason": info.dtype_reason} if info.dtype else {})}


async def list_models() -> dict:
    # The store is scanned off the event loop (disk reads).
    infos = await asyncio.to_thread(request.state.engine.list_models)
    return {"object": "list", "data": [model_object(i) for i in infos]}


async def retrieve(model: str) -> dict:
    return model_object(await asyncio.to_thread(request.state.engine.model_info, model))
