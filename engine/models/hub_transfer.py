"""The Hub's traffic, guarded. huggingface_hub does every transfer through one httpx client, which
openmlx makes (`set_client_factory`), so that while a pull runs:
- every request, each redirect hop included, goes to the configured endpoint's host or to a
  public address (engine/addresses.py): a hostile hub can't point a download at the server's own
  network and have the answer stored as a model file;
- the pull receives at most the bytes its repo declared (plus a little for metadata) and ends by
  its deadline: a hub that streams 2 GB for a file declared as 12.9 MB, or a byte a minute, is cut
  off mid-transfer;
- connects and reads have timeouts (huggingface_hub sets none).
Outside a pull (transformers reading a tokenizer, say) the client behaves as huggingface_hub's own.
Downloads through hf_xet's own transport are not seen here (the bytes never pass through httpx).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

import httpx2  # huggingface_hub's HTTP client

from engine.addresses import address_allowed, host_addresses

METADATA_SLACK = 4 << 20  # model info, HEAD answers, error bodies: small beside the weights


@dataclass
class TransferLimits:
    """What one pull may still receive, and until when."""

    repo_id: str
    bytes_left: int
    deadline: float  # time.monotonic()
    refusal: Optional[str] = None  # why a transfer was cut, for the error the client sees


_LIMITS: contextvars.ContextVar[Optional[TransferLimits]] = contextvars.ContextVar("openmlx_hub_limits", default=None)
_INSTALLED = threading.Lock()
_installed = False


class TransferRefused(Exception):
    """A request or response broke the pull's limits (hop to a non-public address, too many bytes, too slow)."""


def _endpoint_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""


def _refuse(limits: TransferLimits, reason: str) -> None:
    limits.refusal = reason
    raise TransferRefused(reason)


def _check_request(request: Any) -> None:
    limits = _LIMITS.get()
    if limits is None:
        return
    if time.monotonic() > limits.deadline:
        _refuse(limits, "the download did not finish within its time limit (--download-timeout)")
    host = request.url.host
    if host == _endpoint_host():
        return
    try:
        addresses = host_addresses(host, request.url.port or 443)
    except OSError:
        _refuse(limits, f"the Hub sent the download to {host}, which does not resolve")
    if not addresses or not all(address_allowed(ip) for ip in addresses):
        _refuse(limits, f"the Hub sent the download to {host} ({', '.join(map(str, addresses))}), "
                        "which is not a public address")


class _CountedStream(httpx2.SyncByteStream):
    """A response body that stops once the pull's byte budget or deadline is spent."""

    def __init__(self, inner: Any, limits: TransferLimits) -> None:
        self.inner = inner
        self.limits = limits

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.limits.bytes_left -= len(chunk)
            if self.limits.bytes_left < 0:
                _refuse(self.limits, "the Hub sent more bytes than the repo's files declare")
            if time.monotonic() > self.limits.deadline:
                _refuse(self.limits, "the download did not finish within its time limit (--download-timeout)")
            yield chunk

    def close(self) -> None:
        self.inner.close()


def _client() -> Any:
    """huggingface_hub's default client, plus the request hook and the counting transport."""
    from huggingface_hub.utils._http import hf_request_event_hook

    class CountingTransport(httpx2.HTTPTransport):
        def handle_request(self, request: Any) -> Any:
            response = super().handle_request(request)
            limits = _LIMITS.get()
            if limits is not None:
                response.stream = _CountedStream(response.stream, limits)
            return response

    return httpx2.Client(event_hooks={"request": [hf_request_event_hook, _check_request]}, follow_redirects=True,
                         max_redirects=5, timeout=httpx2.Timeout(60.0, connect=10.0), transport=CountingTransport())


def install() -> None:
    """Make huggingface_hub use the guarded client (once per process)."""
    global _installed
    with _INSTALLED:
        if not _installed:
            from huggingface_hub import set_client_factory

            set_client_factory(_client)
            _installed = True


@contextlib.contextmanager
def limited(repo_id: str, declared_bytes: int, timeout_s: float) -> Iterator[TransferLimits]:
    """Transfers in this block (this thread) get `declared_bytes` (+ metadata slack) and `timeout_s`."""
    install()
    limits = TransferLimits(repo_id, declared_bytes + METADATA_SLACK, time.monotonic() + timeout_s)
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)
