"""Images in a conversation: what a message carries, how they are checked and decoded, and how
they are numbered across turns.

Fetching is the API layer's job (it knows about URLs and flags); here bytes become checked RGB
images: a known format, within the byte and pixel limits, actually decodable.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional, Sequence

from engine.errors import InvalidRequest

if TYPE_CHECKING:
    from PIL import Image as PILImage

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}


@dataclass(frozen=True)
class ImageInput:
    """One image part of a message, as the client sent it and (once fetched) its bytes."""

    source: str  # a data:, http(s):// or file: URL, or a path
    param: str  # where it is in the request, for errors
    data: Optional[bytes] = None

    def with_data(self, data: bytes) -> "ImageInput":
        return replace(self, data=data)

    @property
    def digest(self) -> str:
        """Identity for stable numbering: the same picture sent again keeps its number."""
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else self.source


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 << 20
    max_pixels: int = 4096 * 4096
    max_images: int = 32
    chunk_size: int = 4  # images per generation pass (request `image_chunk_size` may change it)
    max_chunk_size: int = 8  # the most one pass may take, whatever the request asks


def attachment_marker(count: int) -> str:
    """What images become in a turn the model can't see them in (as the seed does)."""
    return f"[{count} {'attachment was' if count == 1 else 'attachments were'} attached]"


def _opened(image: ImageInput, limits: ImageLimits) -> "PILImage.Image":
    """The image opened from its header (no pixel buffer yet), or a 400 naming the part:
    empty, too many bytes, unknown format, too many pixels (a decompression bomb included)."""
    from PIL import Image, UnidentifiedImageError

    data = image.data or b""
    if not data:
        raise InvalidRequest("The image is empty.", param=image.param, code="invalid_image")
    if len(data) > limits.max_bytes:
        raise InvalidRequest(f"The image is {len(data)} bytes; the limit is {limits.max_bytes}.",
                             param=image.param, code="image_too_large")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's own guard, from the header
        raise InvalidRequest(f"The image is too large to decode ({e}); the limit is {limits.max_pixels} pixels.",
                             param=image.param, code="image_too_large") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InvalidRequest(f"The image could not be decoded ({e}).", param=image.param, code="invalid_image") from e
    if img.format not in FORMATS:
        raise InvalidRequest(f"Image format {img.format} is not supported; send PNG, JPEG, WebP or GIF.",
                             param=image.param, code="unsupported_image_format")
    width, height = img.size
    if width * height > limits.max_pixels:  # checked from the header, before decoding
        raise InvalidRequest(f"The image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels.",
                             param=image.param, code="image_too_large")
    return img


def check(image: ImageInput, limits: ImageLimits) -> None:
    """Everything decode() checks that the header tells, without decoding a pixel."""
    _opened(image, limits)


def decode(image: ImageInput, limits: ImageLimits) -> "PILImage.Image":
    """Bytes -> an RGB image, or a 400 naming the part: unknown format, too large, undecodable."""
    from PIL import Image

    img = _opened(image, limits)
    try:
        img.seek(0)  # an animated GIF: its first frame
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidRequest(f"The image could not be decoded ({e}).", param=image.param, code="invalid_image") from e


def numbering(images: Sequence[ImageInput]) -> dict[str, int]:
    """Image numbers in order of first appearance across the conversation (the seed's
    `image_id_map`): a picture sent again keeps its number, so "Image 2" means the same picture
    in every turn."""
    numbers: dict[str, int] = {}
    for image in images:
        numbers.setdefault(image.digest, len(numbers) + 1)
    return numbers
