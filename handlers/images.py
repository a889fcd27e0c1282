"""Image sources in requests -> bytes, before a vision model sees them.

`data:` URLs (base64) always work. `http(s)` URLs are fetched only when the server allows it
(`--allow-image-urls`; servers often run offline), with a size limit enforced while reading and
a timeout. Local files (`file:` URLs or paths) only under the directory `--image-dir` names.
Everything else is a 400 naming the part.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from engine.errors import InvalidRequest
from engine.images import ImageInput
from engine.text import ChatMessage


@dataclass(frozen=True)
class ImageSources:
    """What the server lets requests point at."""

    allow_urls: bool = False
    directory: Optional[Path] = None
    max_bytes: int = 20 << 20
    timeout_s: float = 10.0


def _data_url(image: ImageInput) -> bytes:
    header, _, payload = image.source.partition(",")
    if not header.endswith(";base64") or not payload:
        raise InvalidRequest("A data: URL image must be base64 (data:image/png;base64,...).", param=image.param,
                             code="invalid_image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"The image's base64 data is invalid ({e}).", param=image.param,
                             code="invalid_image") from e


async def _fetch(image: ImageInput, sources: ImageSources) -> bytes:
    import httpx

    if not sources.allow_urls:
        raise InvalidRequest("This server does not fetch image URLs (start it with --allow-image-urls); "
                             "send the image as a base64 data: URL.", param=image.param, code="image_url_not_allowed")
    try:
        async with httpx.AsyncClient(timeout=sources.timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", image.source) as response:
                if response.status_code != 200:
                    raise InvalidRequest(f"Fetching the image gave HTTP {response.status_code}.", param=image.param,
                                         code="image_fetch_failed")
                data = bytearray()
                async for piece in response.aiter_bytes():
                    data += piece
                    if len(data) > sources.max_bytes:
                        raise InvalidRequest(f"The image at the URL is larger than {sources.max_bytes} bytes.",
                                             param=image.param, code="image_too_large")
                return bytes(data)
    except httpx.HTTPError as e:
        raise InvalidRequest(f"The image could not be fetched ({type(e).__name__}).", param=image.param,
                             code="image_fetch_failed") from e


def _read_file(image: ImageInput, sources: ImageSources) -> bytes:
    if sources.directory is None:
        raise InvalidRequest("This server does not read local image files (start it with --image-dir DIR).",
                             param=image.param, code="image_file_not_allowed")
    raw = unquote(urlparse(image.source).path) if image.source.startswith("file:") else image.source
    root = sources.directory.resolve()
    path = (root / raw).resolve() if not os.path.isabs(raw) else Path(raw).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise InvalidRequest("The image file is not a file under the server's --image-dir.", param=image.param,
                             code="image_file_not_allowed")
    if path.stat().st_size > sources.max_bytes:
        raise InvalidRequest(f"The image file is larger than {sources.max_bytes} bytes.", param=image.param,
                             code="image_too_large")
    return path.read_bytes()


async def load(image: ImageInput, sources: ImageSources) -> ImageInput:
    """The image with its bytes."""
    if image.data is not None:
        return image
    scheme = image.source.split(":", 1)[0].lower() if ":" in image.source else ""
    if scheme == "data":
        data = _data_url(image)
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


async def load_all(messages: list[ChatMessage], sources: ImageSources) -> list[ChatMessage]:
    """The messages with every image's bytes loaded."""
    out = []
    for m in messages:
        if m.images:
            m = ChatMessage(m.role, m.content, tuple([await load(i, sources) for i in m.images]))
        out.append(m)
    return out
