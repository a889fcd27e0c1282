"""The bearer scheme openapi.yaml declares, and the Host and Origin checks every request passes first.

Keys are checked before Connexion sees the request (handlers.asgi.middleware.ApiKeyMiddleware, constant
time, only when keys are configured); by the time Connexion asks, the token is already accepted.

Host and Origin (`OriginMiddleware`): a web page the user visits can rebind its own name to
127.0.0.1 and is then same-origin to a local server, and any page can post a `multipart/form-data`
form (an audio upload) with no preflight. So a server listening on a loopback address answers
only loopback names (or those `--allowed-hosts` lists), and a request that does work (POST, PUT,
PATCH, DELETE) from a browser page of another origin is refused, unless `--cors-origin` allows
that origin. An API key does not replace either check: a server with no key is the default.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional, Sequence
from urllib.parse import urlsplit

from handlers.asgi.middleware import ASGIApp, Receive, Scope, Send, _header, send_error

WORK_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def bearer_info(token: str) -> dict:
    """Connexion's x-bearerInfoFunc: the token passed the API-key check (or none is required)."""
    return {"sub": "client"}


def api_key_info(key: str, required_scopes: object = None) -> dict:
    """Connexion's x-apikeyInfoFunc for Anthropic's `x-api-key` (checked by the middleware first)."""
    return {"sub": "client"}


def _split_host(value: str) -> tuple[str, Optional[int]]:
    """`name`, `name:port`, `[v6]` or `[v6]:port` as (lowercased name without brackets or trailing
    dot, port or None). A port that is not a number leaves the port None and the name as given."""
    value = value.strip().lower()
    port: Optional[int] = None
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif value.count(":") == 1:
        name, _, digits = value.partition(":")
        port = int(digits) if digits.isdigit() else None
    else:
        name = value  # a bare IPv6 address or a plain name
    return name.rstrip("."), port


def is_loopback_name(name: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1, IPv4-mapped 127.x)."""
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@dataclass(frozen=True)
class HostPolicy:
    """Which Host names are answered and which browser origins may make requests that do work.

    `names`: allowed host names besides the loopback ones (lowercased; `.example.com` matches its
    subdomains too); `any_host`: no Host check at all. `origins`: `--cors-origin`'s list (`*`: any).
    """

    names: tuple[str, ...] = ()
    any_host: bool = False
    origins: tuple[str, ...] = ()

    def host_allowed(self, name: str) -> bool:
        return self.any_host or is_loopback_name(name) or self.named(name)

    def named(self, name: str) -> bool:
        """`name` is one that --allowed-hosts lists (not merely allowed by `*`)."""
        return any(name == n or (n.startswith(".") and (name.endswith(n) or name == n[1:])) for n in self.names)

    def origin_allowed(self, origin: str, host: Optional[str]) -> bool:
        """The server's own origin (the request's Host, or a name --allowed-hosts lists), or one
        --cors-origin allows. `null` (sandboxed frames, file pages) is foreign unless allowed."""
        if "*" in self.origins or origin.rstrip("/").lower() in self.origins:
            return True
        try:
            parts = urlsplit(origin)
            scheme, origin_port = parts.scheme.lower(), parts.port
        except ValueError:
            return False
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            return False
        origin_name = parts.hostname.lower().rstrip(".")
        if self.named(origin_name):
            return True  # a reverse proxy may hand on its own Host; the admin named this one
        if host is None:
            return False
        host_name, host_port = _split_host(host)
        default = _DEFAULT_PORTS[scheme]
        return origin_name == host_name and (origin_port or default) == (host_port or default)


def host_policy(bind_host: str, allowed_hosts: Sequence[str], cors_origins: Sequence[str]) -> HostPolicy:
    """The policy for a server listening on `bind_host`.

    On a loopback address only loopback names are answered, plus those `allowed_hosts` lists
    (`*`: any name). On any other address (0.0.0.0, a LAN address) every name is answered unless
    `allowed_hosts` is given, as Ollama does: whoever binds there chose to be reached by names
    this server can't know. Origins are checked either way."""
    names = tuple(sorted({_split_host(h)[0] if not h.strip().startswith(".") else h.strip().lower().rstrip(".")
                          for h in allowed_hosts if h.strip() and h.strip() != "*"}))
    any_host = any(h.strip() == "*" for h in allowed_hosts) or (not allowed_hosts and not is_loopback_name(
        _split_host(bind_host)[0]))
    origins = tuple(o.rstrip("/").lower() if o != "*" else o for o in cors_origins)
    return HostPolicy(names, any_host, origins)


class OriginMiddleware:
    """403 before any route for a Host this server doesn't answer to (DNS rebinding), and for a
    request that does work sent by a page of a foreign origin (cross-site forms, no-cors fetches)."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_host = _header(scope, b"host")
        host = raw_host.decode("latin-1") if raw_host is not None else None
        if host is not None and not self.policy.host_allowed(_split_host(host)[0]):
            name = _split_host(host)[0][:100]
            await send_error(scope, send, 403, f"This server does not answer to the host name '{name}' (a guard "
                             "against DNS rebinding). To reach it under that name (a LAN host, a reverse proxy), "
                             f"start it with --allowed-hosts {name}.", "host_not_allowed", "permission_error")
            return
        raw_origin = _header(scope, b"origin")
        if raw_origin is not None and scope.get("method") in WORK_METHODS:
            origin = raw_origin.decode("latin-1")
            if not self.policy.origin_allowed(origin, host):
                await send_error(scope, send, 403, f"Requests from web pages of the origin '{origin[:200]}' are "
                                 "not accepted (this server's own pages are). To let a page of that origin use "
                                 "it, start the server with --cors-origin for it.", "origin_not_allowed",
                                 "permission_error")
                return
        await self.app(scope, receive, send)
