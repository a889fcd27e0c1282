"""Build the Connexion app: openapi.yaml bound to handlers, the engine in the lifespan."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import connexion
from connexion.middleware import MiddlewarePosition
from connexion.resolver import Resolver

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import EngineError
from handlers.wire import errors
from handlers.metrics import MetricsMiddleware
from handlers.conversation.images import ImageSources
from handlers.conversation import response_store
from handlers.conversation.response_store import ResponseStore
from handlers.asgi.security import OriginMiddleware, host_policy
from handlers.asgi.middleware import (ApiKeyMiddleware, BodyLimitMiddleware, DrainMiddleware, RequestIdMiddleware,
                                 RequestLifetimeMiddleware, SpecMiddleware)

log = logging.getLogger("openmlx.http")


def spec_path() -> Path:
    """openapi.yaml: packaged inside `handlers/` in a wheel, at the repository root in a checkout."""
    packaged = Path(__file__).with_name("openapi.yaml")
    return packaged if packaged.is_file() else Path(__file__).resolve().parent.parent / "openapi.yaml"


@dataclass
class ServerConfig:
    """HTTP-level settings (the engine has its own)."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    max_body_bytes: int = 10 << 20
    max_audio_bytes: int = 25 << 20  # uploads to /v1/audio/*
    validate_responses: bool = True
    api_keys: list[str] = field(default_factory=list)  # empty: no auth
    cors_origins: list[str] = field(default_factory=list)  # empty: CORS off
    bind_host: str = "127.0.0.1"  # the address listened on: loopback answers loopback Host names only
    allowed_hosts: list[str] = field(default_factory=list)  # more Host names (--allowed-hosts; "*": any)
    responses_max: int = response_store.DEFAULT_MAX_ENTRIES  # stored Responses API responses
    responses_ttl: float = response_store.DEFAULT_TTL_S
    responses_dir: Optional[Path] = None
    responses_max_bytes: int = response_store.DEFAULT_MAX_BYTES  # stored responses' bytes (each inline image counted once)
    image_sources: ImageSources = field(default_factory=ImageSources)  # what image URLs may point at
    max_batch_tokens: int = 65536  # prompts plus max_tokens, times n/best_of, in one request
    body_timeout_s: float = 60.0  # a request body arrives whole within this long, or 408


class HandlerResolver(Resolver):
    """operationIds are OpenAI's names (what generated clients call their methods); each operation
    names the function that answers it in `x-openmlx-handler`."""

    def resolve_operation_id(self, operation: Any) -> str:
        return operation._operation.get("x-openmlx-handler") or super().resolve_operation_id(operation)


class StreamPassThrough:
    """Connexion's response validator for NDJSON: none. Its `*/*json` validator would match
    application/x-ndjson and buffer a whole stream to parse it as one JSON document; each line
    is checked in contract/ instead (as SSE events are)."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def wrap_send(self, send: Any) -> Any:
        return send


def validator_map() -> dict[str, Any]:
    from connexion.datastructures import MediaTypeDict
    from connexion.validators import VALIDATOR_MAP

    return {"response": MediaTypeDict({**VALIDATOR_MAP["response"], "application/x-ndjson": StreamPassThrough})}


def create_app(config: Optional[ServerConfig] = None, engine: Optional[Engine] = None) -> connexion.AsyncApp:
    """The ASGI app. The engine starts (and preloads its model) in the lifespan."""
    config = config or ServerConfig()

    @contextlib.asynccontextmanager
    async def lifespan(_app: object) -> AsyncIterator[dict]:
        eng = engine or Engine(config.engine)
        try:
            await asyncio.to_thread(eng.start)
        except EngineError as e:
            log.error("openmlx: cannot start: %s", e.message)
            raise
        try:
            yield {"engine": eng, "responses": ResponseStore(config.responses_max, config.responses_ttl,
                                                             config.responses_dir, config.responses_max_bytes),
                   "image_sources": config.image_sources, "max_batch_tokens": config.max_batch_tokens}
        finally:
            await asyncio.to_thread(eng.stop)

    spec = spec_path()
    app = connexion.AsyncApp(__name__, specification_dir=str(spec.parent), lifespan=lifespan,
                             swagger_ui_options=connexion.options.SwaggerUIOptions(swagger_ui_path="/docs"))
    app.add_api(spec.name, validate_responses=config.validate_responses, strict_validation=False,
                resolver=HandlerResolver(), validator_map=validator_map())
    errors.register(app)
    # Connexion runs middleware added at one position in the order added: the request id wraps
    # everything, Host and Origin are checked before any route, CORS answers preflights before auth,
    # auth runs before a body is read.
    app.add_middleware(RequestIdMiddleware, position=MiddlewarePosition.BEFORE_EXCEPTION)
    app.add_middleware(MetricsMiddleware, position=MiddlewarePosition.BEFORE_EXCEPTION, spec=spec)
    # Host and Origin before anything that does work (CORS preflights included: a foreign Host gets
    # nothing); counted by the metrics like any response.
    app.add_middleware(OriginMiddleware, position=MiddlewarePosition.BEFORE_EXCEPTION,
                       policy=host_policy(config.bind_host, config.allowed_hosts, config.cors_origins))
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, position=MiddlewarePosition.BEFORE_EXCEPTION,
                           allow_origins=config.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID", "x-api-key",
                                          "anthropic-version", "anthropic-beta"],
                           expose_headers=["X-Request-ID", "X-OpenMLX-Warning"])
    app.add_middleware(SpecMiddleware, position=MiddlewarePosition.BEFORE_EXCEPTION, spec=spec)
    app.add_middleware(DrainMiddleware, position=MiddlewarePosition.BEFORE_EXCEPTION)
    app.add_middleware(ApiKeyMiddleware, position=MiddlewarePosition.BEFORE_EXCEPTION, keys=config.api_keys)
    app.add_middleware(BodyLimitMiddleware, position=MiddlewarePosition.BEFORE_EXCEPTION,
                       max_bytes=config.max_body_bytes, audio_max_bytes=config.max_audio_bytes,
                       body_timeout_s=config.body_timeout_s)
    app.add_middleware(RequestLifetimeMiddleware, position=MiddlewarePosition.BEFORE_EXCEPTION,
                       timeout_s=config.engine.request_timeout_s)
    return app
