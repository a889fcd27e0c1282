"""Images in a conversation: what a message carries, how they are checked and decoded, and how
they are numbered across turns.

Fetching is the API layer's job (it knows about URLs and flags); here bytes become checked RGB
images: a known format, within the byte and pixel limits, actually decodable.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence

from engine.config import ImageLimits
from engine.errors import InvalidRequest
from engine.request import ImageInput

if TYPE_CHECKING:
    from PIL import Image as PILImage

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}


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
