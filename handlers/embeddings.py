"""POST /v1/embeddings."""
from __future__ import annotations

import base64

import numpy as np
from connexion import request

from engine.errors import InvalidRequest


def _texts(value) -> list[str]:
    """OpenAI allows a string, strings, token ids or lists of token ids; we take text only."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidRequest("Token-id inputs are not supported: openmlx's embedding models use their own "
                         "tokenizers, not OpenAI's. Send the text instead.", param="input",
                         code="unsupported_input")


def _encode(vector: np.ndarray, encoding: str):
    if encoding == "base64":  # little-endian float32, as the official clients decode it
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


async def create(body: dict):
    engine = request.state.engine
    texts = _texts(body["input"])
    encoding = body.get("encoding_format") or "float"
    result = await engine.embed(body["model"], texts, body.get("dimensions"))
    tokens = sum(result.token_counts)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, encoding)}
                 for i, v in enumerate(result.vectors)],
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
