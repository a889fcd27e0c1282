"""Connection limits under uvicorn: caps on open connections (in all, and per client address) and a
deadline for request headers (the body's deadline is handlers.asgi.middleware.BodyLimitMiddleware's).

Without them ~2,000 idle TCP connections exhaust the process's file limit (every request then
gets a reset, silently), and a client that sends its headers a byte at a time holds a socket
forever. Past the cap a new connection gets an immediate OpenAI-shaped 503 and is closed; a
connection that has not sent a whole request head within `header_timeout` seconds (after
connecting, or after its previous response) is closed. Idle keep-alive connections are closed by
uvicorn's own keep-alive timeout.
"""
from __future__ import annotations

import asyncio
import json
import logging
import resource
import uuid
from collections import Counter
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from handlers.wire.errors import error_payload

log = logging.getLogger("openmlx.http")


def raise_file_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 65536)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _refusal() -> bytes:
    body = json.dumps(error_payload("", 503, "The server has too many open connections; retry shortly.",
                                    code="too_many_connections")).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n"
            f"x-request-id: req_{uuid.uuid4().hex}\r\n\r\n")
    return head.encode() + body


def guarded_protocol(max_connections: int, header_timeout: float, per_client: int | None = None) -> type:
    """An h11 protocol class for uvicorn.Config(http=...) with the caps (all connections, and each
    client address's) and the header deadline."""
    state = {"over": False, "client_over": False}  # log each cap once each time it is reached
    per_client = per_client or max_connections
    by_client: Counter[str] = Counter()

    class GuardedH11Protocol(H11Protocol):
        _header_timer: Any = None
        _armed_for: Any = None
        _peer: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            host = peer[0] if isinstance(peer, tuple) and peer else "?"
            if len(self.connections) > max_connections:
                if not state["over"]:
                    state["over"] = True
                    log.warning("connection cap reached (%d, --max-connections): new connections get 503",
                                max_connections)
                transport.write(_refusal())
                transport.close()
                return
            if by_client[host] >= per_client:
                # One client (slow bodies, idle sockets) must not take every connection from the others.
                if not state["client_over"]:
                    state["client_over"] = True
                    log.warning("per-client connection cap reached (%d, --max-connections-per-client)", per_client)
                transport.write(_refusal())
                transport.close()
                return
            self._peer = host
            by_client[host] += 1
            if state["over"] and len(self.connections) < max_connections * 0.9:
                state["over"] = False
            self._arm()

        def _arm(self) -> None:
            """Expect a new request head within header_timeout."""
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._armed_for = self.cycle
            self._header_timer = self.loop.call_later(header_timeout, self._check_head)

        def _check_head(self) -> None:
            self._header_timer = None
            if self.cycle is self._armed_for and not self.transport.is_closing():
                self.transport.close()  # no request head arrived in time (or a slow one)

        def on_response_complete(self) -> None:
            finished = self.cycle
            super().on_response_complete()
            # A request pipelined behind this one has already sent its head (uvicorn started it just
            # now): the header deadline is for the next head, not for this one's answer.
            if not self.transport.is_closing() and self.cycle is finished:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            if self._peer is not None:
                by_client[self._peer] -= 1
                if by_client[self._peer] <= 0:
                    del by_client[self._peer]
                    state["client_over"] = False
                self._peer = None
            super().connection_lost(exc)

    return GuardedH11Protocol
