"""Every error a client sees is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.

Connexion's problem+json (400/404/405/415/422) and unexpected exceptions are translated here;
422 never reaches a client (it becomes 400, as in OpenAI's API).
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any, Optional

from connexion.exceptions import ProblemException
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from starlette.exceptions import HTTPException

from engine.errors import EngineError

log = logging.getLogger("openmlx.http")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}
_PARAM_AT_END = re.compile(r" - '([^']*)'$")
_REQUIRED = re.compile(r"^'([^']+)' is a required property")


# Anthropic's error types by status, for the /v1/messages routes.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
                    503: "overloaded_error", 504: "timeout_error"}


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def anthropic_error_body(status: int, message: str, request_id: Optional[str] = None) -> dict[str, Any]:
    """Anthropic's error object: {"type": "error", "error": {"type", "message"}}."""
    type_ = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}


def is_anthropic_path(path: str) -> bool:
    """Routes that speak Anthropic's API, and so its error shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def is_ollama_path(path: str) -> bool:
    """Routes that speak Ollama's API, and so its error shape `{"error": "..."}`."""
    return path.startswith("/api/")


def error_payload(path: str, status: int, message: str, type_: Optional[str] = None, param: Optional[str] = None,
                  code: Optional[str] = None, request_id: Optional[str] = None) -> dict[str, Any]:
    """The error body a client of `path` expects: Anthropic's on /v1/messages, Ollama's on /api/*,
    OpenAI's elsewhere."""
    if is_ollama_path(path):
        return {"error": message}
    if is_anthropic_path(path):
        return anthropic_error_body(status, message, request_id)
    return error_body(message, type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                      param, code)


def error_response(status: int, message: str, type_: Optional[str] = None, param: Optional[str] = None,
                   code: Optional[str] = None, headers: Optional[dict[str, str]] = None,
                   request: Optional[ConnexionRequest] = None) -> ConnexionResponse:
    path = request.url.path if request is not None else ""
    rid = (request.scope.get("state") or {}).get("request_id") if request is not None else None
    body = error_payload(path, status, message, type_, param, code, rid)
    return ConnexionResponse(status_code=status, body=json.dumps(body), content_type="application/json",
                             headers=headers or {})


class BodyTooLarge(Exception):
    """The body passed its limit while it was being read (raised by the body middleware's receive)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than this server accepts ({limit} bytes).")
        self.limit = limit


class BodyTooSlow(Exception):
    """The body did not arrive whole within --body-timeout."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"The request body did not arrive within {timeout_s:g} s (--body-timeout).")
        self.timeout_s = timeout_s


def engine_error_body(exc: EngineError) -> dict[str, Any]:
    return error_body(exc.message, exc.type, exc.param, exc.code)


def _param_from_detail(detail: str) -> tuple[str, Optional[str]]:
    """Connexion's detail ends with the failing field (`... - 'messages.0.role'`): that is `param`."""
    m = _PARAM_AT_END.search(detail)
    if m:
        field = m.group(1)
        return f"Invalid value for '{field}': {detail[: m.start()]}", field or None
    m = _REQUIRED.match(detail)
    if m:
        return f"Missing required parameter: '{m.group(1)}'.", m.group(1)
    return detail, None


def _problem_code(status: int, exc: Exception) -> Optional[str]:
    if status == 404:
        return "unknown_url"
    if status == 405:
        return "method_not_allowed"
    if status == 413:
        return "request_too_large"
    if status == 415:
        return "unsupported_media_type"
    if isinstance(exc.__context__, json.JSONDecodeError):
        return "invalid_json"
    return None


async def on_problem(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    """Connexion's own errors (validation, routing, content type) in OpenAI's shape."""
    status = getattr(exc, "status", None) or getattr(exc, "status_code", 500)
    detail = str(getattr(exc, "detail", None) or getattr(exc, "title", "") or exc)
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 422:
        status = 400
    if status == 404:
        message, param = f"Unknown request URL: {request.method} {request.url.path}.", None
    elif status == 405:
        message, param = f"Method {request.method} is not allowed for {request.url.path}.", None
    elif isinstance(exc.__context__, json.JSONDecodeError):
        message, param = f"The request body is not valid JSON ({detail}).", None
    else:
        message, param = _param_from_detail(detail)
    return error_response(status, message, param=param, code=_problem_code(status, exc), headers=headers,
                          request=request)


async def on_engine_error(request: ConnexionRequest, exc: EngineError) -> ConnexionResponse:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers, request=request)


async def on_exception(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    """Last resort. Input the parser could not read is the client's fault (400), not a 500."""
    if isinstance(exc, EngineError):
        return await on_engine_error(request, exc)
    path = request.url.path
    if isinstance(exc, (UnicodeDecodeError, json.JSONDecodeError)):
        return error_response(400, "The request body is not valid UTF-8 JSON.", code="invalid_json", request=request)
    if isinstance(exc, BodyTooSlow):  # raised inside the app while it read the body
        return error_response(408, str(exc), code="request_timeout", headers={"Connection": "close"}, request=request)
    if isinstance(exc, BodyTooLarge):
        return error_response(413, str(exc), code="request_too_large",
                              headers={"Connection": "close"}, request=request)
    if isinstance(exc, RecursionError):  # the parser or the validator gave up on the nesting
        return error_response(400, "The request body's JSON is nested too deeply.", code="invalid_json", request=request)
    if type(exc).__name__ == "MultiPartException":
        return error_response(400, f"The multipart body is malformed: {exc}", code="invalid_multipart", request=request)
    log.exception("unhandled error on %s %s", request.method, path)
    return error_response(500, "The server had an error while processing your request.", "server_error", request=request)


def register(app: Any) -> None:
    """Install the handlers on a Connexion app."""
    app.add_error_handler(ProblemException, on_problem)
    app.add_error_handler(HTTPException, on_problem)
    app.add_error_handler(EngineError, on_engine_error)
    app.add_error_handler(Exception, on_exception)
