"""Image sources in requests -> bytes, before a vision model sees them.

`data:` URLs (base64) always work. `http(s)` URLs are fetched only when the server allows it
(`--allow-image-urls`; servers often run offline), and then only from public addresses: the host
is resolved, every address checked (loopback, private, link-local, cloud metadata and the rest
are refused unless `--image-url-allow-private` / `--image-url-allow-network` say otherwise), the
connection goes to the address that was checked (no second lookup to rebind), each redirect hop
is checked the same way, and one deadline covers all of a request's fetches. Every fetch failure
is the same 400, so the server can't be used to scan ports. Local files (`file:` URLs or paths)
only under the directory `--image-dir` names. Counts and inline sizes are checked before anything
is fetched or decoded. Everything else is a 400 naming the part.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from engine.config import ImageLimits
from engine.engine import Network, address_allowed  # noqa: F401  (address_allowed: tests use it from here)
from engine.errors import InvalidRequest
from engine.request import ImageInput
from engine.request import ChatMessage

log = logging.getLogger("openmlx.http")
MAX_REDIRECTS = 5
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                             "fc00::/7"))


@dataclass(frozen=True)
class ImageSources:
    """What the server lets requests point at."""

    allow_urls: bool = False
    directory: Optional[Path] = None
    max_bytes: int = ImageLimits.max_bytes  # --max-image-bytes limits both
    timeout_s: float = 10.0  # all of one request's fetches together
    max_images: int = ImageLimits.max_images  # counted before anything is fetched
    allowed_networks: tuple[Network, ...] = field(default_factory=tuple)  # non-public ranges let through


class _Refused(Exception):
    """A fetch that must not (or could not) happen; the client sees the one uniform 400."""


def _fetch_failed(image: ImageInput, sources: ImageSources) -> InvalidRequest:
    return InvalidRequest(f"The image URL could not be fetched: it must be a public http(s) URL that answers "
                          f"200 with an image of at most {sources.max_bytes} bytes within {sources.timeout_s:g} s.",
                          param=image.param, code="image_fetch_failed")


async def _checked_address(host: str, port: int, sources: ImageSources) -> str:
    """The one address to connect to: every address the host resolves to must be allowed."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    ips = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not ips or not all(address_allowed(ip, sources.allowed_networks) for ip in ips):
        raise _Refused(f"{host} resolves to {', '.join(map(str, ips)) or 'nothing'}, not an allowed address")
    return str(ips[0])


async def _fetch_pinned(url_text: str, sources: ImageSources) -> bytes:
    import httpx

    url = httpx.URL(url_text)
    # No proxies from the environment: the connection must go to the address checked here.
    async with httpx.AsyncClient(timeout=sources.timeout_s, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            if url.scheme not in ("http", "https") or not url.host:
                raise _Refused(f"scheme {url.scheme!r}")
            port = url.port or (443 if url.scheme == "https" else 80)
            address = await _checked_address(url.host, port, sources)
            host_header = url.netloc.decode("ascii")
            extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
            async with client.stream("GET", url.copy_with(host=address), headers={"Host": host_header},
                                     extensions=extensions) as response:
                if response.is_redirect and "location" in response.headers:
                    url = url.join(response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise _Refused(f"HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > sources.max_bytes:
                    raise _Refused(f"Content-Length {declared}")
                data = bytearray()
                async for piece in response.aiter_bytes():
                    data += piece
                    if len(data) > sources.max_bytes:
                        raise _Refused("larger than the limit")
                return bytes(data)
    raise _Refused("too many redirects")


async def _fetch(image: ImageInput, sources: ImageSources) -> bytes:
    import httpx

    if not sources.allow_urls:
        raise InvalidRequest("This server does not fetch image URLs (start it with --allow-image-urls); "
                             "send the image as a base64 data: URL.", param=image.param, code="image_url_not_allowed")
    try:
        return await _fetch_pinned(image.source, sources)
    except (_Refused, httpx.HTTPError, httpx.InvalidURL, OSError, UnicodeError, ValueError) as e:
        log.info("image fetch refused or failed (%s): %s", image.param, e)  # the reason stays in the log
        raise _fetch_failed(image, sources) from e


def _data_url(image: ImageInput, max_bytes: int) -> bytes:
    header, _, payload = image.source.partition(",")
    if not header.endswith(";base64") or not payload:
        raise InvalidRequest("A data: URL image must be base64 (data:image/png;base64,...).", param=image.param,
                             code="invalid_image")
    if len(payload) // 4 * 3 > max_bytes + 3:  # decided from the text's length, before decoding it
        raise InvalidRequest(f"The image is about {len(payload) // 4 * 3} bytes; the limit is {max_bytes}.",
                             param=image.param, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"The image's base64 data is invalid ({e}).", param=image.param,
                             code="invalid_image") from e


def _read_file(image: ImageInput, sources: ImageSources) -> bytes:
    refused = InvalidRequest("The image file is not a file under the server's --image-dir.", param=image.param,
                             code="image_file_not_allowed")
    if sources.directory is None:
        raise InvalidRequest("This server does not read local image files (start it with --image-dir DIR).",
                             param=image.param, code="image_file_not_allowed")
    raw = unquote(urlparse(image.source).path) if image.source.startswith("file:") else image.source
    if "\0" in raw:
        raise refused
    root = sources.directory.resolve()
    try:
        path = (root / raw).resolve() if not os.path.isabs(raw) else Path(raw).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise refused
        if path.stat().st_size > sources.max_bytes:
            raise InvalidRequest(f"The image file is larger than {sources.max_bytes} bytes.", param=image.param,
                                 code="image_too_large")
        return path.read_bytes()
    except (OSError, ValueError) as e:  # a name the file system refuses
        raise refused from e


async def load(image: ImageInput, sources: ImageSources) -> ImageInput:
    """The image with its bytes."""
    if image.data is not None:
        return image
    scheme = image.source.split(":", 1)[0].lower() if ":" in image.source else ""
    if scheme == "data":
        data = _data_url(image, sources.max_bytes)
    elif scheme in ("http", "https"):
        data = await _fetch(image, sources)
    elif scheme == "file" or scheme == "":
        data = await asyncio.to_thread(_read_file, image, sources)
    else:
        raise InvalidRequest(f"Image URLs with scheme '{scheme}' are not supported.", param=image.param,
                             code="invalid_image")
    if len(data) > sources.max_bytes:
        raise InvalidRequest(f"The image is {len(data)} bytes; the limit is {sources.max_bytes}.",
                             param=image.param, code="image_too_large")
    return image.with_data(data)


async def load_all(messages: list[ChatMessage], sources: ImageSources, param: str = "messages") -> list[ChatMessage]:
    """The messages with every image's bytes loaded: the count is checked first, then all
    fetches share one deadline."""
    count = sum(len(m.images) for m in messages)
    if count > sources.max_images:
        raise InvalidRequest(f"The conversation has {count} images; this server takes at most "
                             f"{sources.max_images} per request.", param=param, code="too_many_images")
    urls = [i for m in messages for i in m.images if i.data is None and i.source[:5].lower() in ("http:", "https")]

    async def every() -> list[ChatMessage]:
        out = []
        for m in messages:
            if m.images:
                m = ChatMessage(m.role, m.content, tuple([await load(i, sources) for i in m.images]),
                                m.tool_calls, m.tool_call_id)
            out.append(m)
        return out

    try:
        return await asyncio.wait_for(every(), sources.timeout_s)
    except asyncio.TimeoutError:
        raise _fetch_failed(urls[0] if urls else ImageInput("", "messages"), sources) from None
