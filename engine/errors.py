"""Engine errors carry what a client needs to know: an HTTP status and OpenAI's error fields.

The engine never imports a web framework; handlers turn these into responses.
"""
from __future__ import annotations

from typing import Optional


class EngineError(Exception):
    """A failure the client should see, with OpenAI's `type`, `code` and `param`."""

    status: int = 400
    type: str = "invalid_request_error"
    code: Optional[str] = None

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 status: Optional[int] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}


class InvalidRequest(EngineError):
    """The request is well-formed JSON but asks for something we can't do (400)."""


class ModelNotFound(EngineError):
    status = 404
    code = "model_not_found"

    def __init__(self, model: str, hint: Optional[str] = None) -> None:
        if hint is None and _looks_like_repo(model):
            hint = f"To serve it from the Hugging Face Hub, run `openmlx pull {model}` (or start the " \
                   f"server with --allow-download)."
        super().__init__(f"The model '{model}' does not exist or is not available on this server."
                         + (f" {hint}" if hint else ""), param="model")


def _looks_like_repo(model: str) -> bool:
    """ORG/NAME with plain parts: what a Hub repo id looks like (not a path or garbage)."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(@[\w./-]{1,80})?", model) is not None \
        and ".." not in model


class DownloadFailed(EngineError):
    """The Hub could not be reached, or the download broke off (502); nothing was kept."""

    status = 502
    type = "server_error"
    code = "download_failed"


class ModelAccessDenied(EngineError):
    """A gated or private repo and no (valid) HF_TOKEN on the server (403)."""

    status = 403
    type = "permission_error"
    code = "model_access_denied"


class ContextLengthExceeded(EngineError):
    code = "context_length_exceeded"


class Unsupported(EngineError):
    status = 501
    type = "not_implemented_error"
    code = "unsupported_model"


class InsufficientMemory(EngineError):
    status = 507
    type = "server_error"
    code = "insufficient_memory"


class Overloaded(EngineError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class ShuttingDown(EngineError):
    status = 503
    type = "server_error"
    code = "shutting_down"


class RequestTimeout(EngineError):
    status = 504
    type = "server_error"
    code = "timeout"
