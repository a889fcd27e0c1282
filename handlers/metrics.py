"""GET /metrics (Prometheus text format) and what feeds it: HTTP requests by route and status,
tokens, time to first token, request latency, queue depth, resident models, the prompt cache's
bytes and MLX's memory.

One registry per process; the HTTP layer owns it (the engine only reports its state).
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

from connexion import request
from starlette.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import ProcessCollector

from engine.request import Finished

log = logging.getLogger("openmlx.requests")

# Prometheus' text exposition format (openapi.yaml declares its media type, text/plain).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, cpu seconds, open fds
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

HTTP_REQUESTS = Counter("openmlx_http_requests", "HTTP requests by route and status", ["route", "status"],
                        registry=REGISTRY)
HTTP_LATENCY = Histogram("openmlx_http_request_duration_seconds", "Time to the end of the response",
                         ["route"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TOKENS = Counter("openmlx_tokens", "Tokens processed", ["model", "kind"], registry=REGISTRY)
TTFT = Histogram("openmlx_time_to_first_token_seconds", "From request to first generated text",
                 ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
GENERATIONS = Counter("openmlx_generations", "Finished generations by finish reason", ["model", "finish_reason"],
                      registry=REGISTRY)
SPECULATIVE = Counter("openmlx_speculative_tokens", "Speculative decoding: draft tokens proposed and accepted",
                      ["model", "kind"], registry=REGISTRY)
QUEUE = Gauge("openmlx_queue_depth", "Requests queued or generating", registry=REGISTRY)
RESIDENT = Gauge("openmlx_resident_models", "Models loaded in memory", registry=REGISTRY)
PROMPT_CACHE = Gauge("openmlx_prompt_cache_bytes", "KV caches kept for reuse by the loaded model", ["where"],
                     registry=REGISTRY)
# What of process_resident_memory_bytes is MLX's: arrays alive now, the most alive at once since
# start (RSS keeps that high-water mark while requests keep coming), and freed buffers kept for reuse.
MLX_MEMORY = Gauge("openmlx_mlx_memory_bytes", "MLX arrays: active now, peak since start, buffer cache", ["kind"],
                   registry=REGISTRY)


def spec_routes(spec: Path) -> list[tuple[re.Pattern, str]]:
    """openapi.yaml's paths as (matcher, label): the route labels are the spec's own templates
    (`/v1/responses/{response_id}`), so every operation is named and none is hand-listed. Fixed
    paths come before templated ones (`/v1/responses/input_tokens` is not a response id)."""
    import yaml

    paths = list((yaml.safe_load(spec.read_text()).get("paths") or {}).keys())
    paths.sort(key=lambda p: ("{" in p, -p.count("/")))  # fixed first; then the longest templates
    def pattern(path: str) -> re.Pattern:
        # A parameter ends a segment, except at the end, where it may hold slashes (org/model ids).
        body = re.sub(r"\\{[^/]+?\\}$", ".+", re.escape(path))
        return re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", body) + "$")

    return [(pattern(p), p) for p in paths]


def route_label(routes: list[tuple[re.Pattern, str]], path: str) -> str:
    """The spec path a request path matches ("other" for none: 404s stay one label)."""
    return next((label for pattern, label in routes if pattern.match(path)), "other")


class MetricsMiddleware:
    """Counts every response by route (the spec's paths) and status, and times it to its last byte."""

    def __init__(self, app: Any, spec: Path) -> None:
        self.app = app
        self.routes = spec_routes(spec)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def recording_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = route_label(self.routes, scope.get("path", ""))
            HTTP_REQUESTS.labels(route, str(status["code"])).inc()
            HTTP_LATENCY.labels(route).observe(time.perf_counter() - start)


class GenerationObserver:
    """Records one generation's tokens, TTFT and a structured log line when it finishes."""

    def __init__(self, endpoint: str, model: str) -> None:
        self.endpoint = endpoint
        self.model = model
        self.start = time.perf_counter()
        self.ttft: Optional[float] = None
        state = getattr(request, "state", None)
        self.request_id = getattr(state, "request_id", None) if state is not None else None

    def first_text(self) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.start
            TTFT.labels(self.model).observe(self.ttft)

    def finished(self, done: Finished) -> None:
        """Count a generation's tokens and log it; one the client abandoned (finish_reason
        "cancelled") too, with what it had read and written by then."""
        TOKENS.labels(self.model, "prompt").inc(done.prompt_tokens)
        TOKENS.labels(self.model, "completion").inc(done.completion_tokens)
        # Prompt tokens the prompt cache covered ("cached") and those computed ("computed").
        TOKENS.labels(self.model, "cached").inc(done.cached_tokens)
        TOKENS.labels(self.model, "computed").inc(max(done.prompt_tokens - done.cached_tokens, 0))
        GENERATIONS.labels(self.model, done.finish_reason).inc()
        if done.drafted:
            SPECULATIVE.labels(self.model, "proposed").inc(done.drafted)
            SPECULATIVE.labels(self.model, "accepted").inc(done.accepted)
        log.info("%s %s finished (%s)", self.endpoint, self.model, done.finish_reason, extra={
            "request_id": self.request_id, "model": self.model, "endpoint": self.endpoint,
            "cancelled": done.finish_reason == "cancelled", "cached_tokens": done.cached_tokens,
            "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "finish_reason": done.finish_reason, "draft_proposed": done.drafted, "draft_accepted": done.accepted,
            "ttft_s": round(self.ttft, 4) if self.ttft else None,
            "duration_s": round(time.perf_counter() - self.start, 4)})


async def get():
    engine = request.state.engine
    QUEUE.set(engine.scheduler.load())
    RESIDENT.set(engine.resident_models())
    health = engine.health()
    PROMPT_CACHE.labels("memory").set(health.prompt_cache_bytes)
    PROMPT_CACHE.labels("disk").set(health.prompt_cache_disk_bytes)
    memory = engine.mlx_memory()
    for kind in ("active", "peak", "cache"):
        MLX_MEMORY.labels(kind).set(getattr(memory, kind))
    # A ready Response: Connexion would otherwise insist on the bare media type of the spec.
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE)
