"""Whose prompt cache entries a request may reuse (engine/request.py `CacheScope`): its API key
(the hash ApiKeyMiddleware put in the request's state; none when the server has no keys) and its
`cache_salt`."""
from __future__ import annotations

import hashlib
from typing import Any

from connexion import request

from engine.request import CacheScope


def key_owner(token: bytes) -> str:
    """What the engine knows of an API key: a hash, never the key."""
    return hashlib.sha256(b"openmlx-cache-owner:" + token).hexdigest()


def of(body: dict[str, Any]) -> CacheScope:
    """The scope of the request being handled, with `body`'s cache_salt."""
    return CacheScope(getattr(request.state, "cache_owner", "") or "", body.get("cache_salt") or "")
