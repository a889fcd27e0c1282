"""The bearer scheme openapi.yaml declares. Keys are checked before Connexion sees the request
(handlers.asgi.middleware.ApiKeyMiddleware, constant time, only when keys are configured); by the time
Connexion asks, the token is already accepted."""
from __future__ import annotations


def bearer_info(token: str) -> dict:
    """Connexion's x-bearerInfoFunc: the token passed the API-key check (or none is required)."""
    return {"sub": "client"}


def api_key_info(key: str, required_scopes: object = None) -> dict:
    """Connexion's x-apikeyInfoFunc for Anthropic's `x-api-key` (checked by the middleware first)."""
    return {"sub": "client"}
