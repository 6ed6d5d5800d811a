"""A request's input images (`image`, `mask`): from base64 or a URL to checked RGB (or mask) pictures.

An image is read from its header first: its format must be PNG, JPEG or WebP, a single frame, and its header's
size at most MAX_INPUT_MEGAPIXELS, before a pixel is decoded, so a decompression bomb allocates nothing. An image
with transparency is composited onto white; other modes (CMYK, palette, greyscale, 16-bit) are converted to RGB by
Pillow. A mask is read as greyscale: white repaints, black keeps.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image

from model.remote import FetchError, FetchPolicy, fetch_bytes

FORMATS = {"PNG", "JPEG", "WEBP"}
MAX_INPUT_MEGAPIXELS = 16.0  # larger inputs are refused before decoding; every served size is at most 2 MP
FETCH_TIMEOUT_S = 60.0


class ImageInputError(ValueError):
    """An input image that cannot be used; the message says why (the caller names the field)."""


def read_image_bytes(source: str, max_bytes: int, allow_private: bool) -> bytes:
    """The bytes `source` names: an http(s) URL, fetched under the same rules as every URL, or base64 (optionally
    a data: URI)."""
    if "://" in source[:16]:
        try:
            return fetch_bytes(source, FetchPolicy(max_bytes, FETCH_TIMEOUT_S, allow_private))
        except FetchError as exc:
            raise ImageInputError(str(exc)) from exc
    payload = source.split(",", 1)[1] if source.startswith("data:") else source
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError("neither an http(s) URL nor valid base64") from exc


def open_image(data: bytes, mask: bool = False) -> Image.Image:
    """The picture in `data`, checked and decoded: RGB, or greyscale for a mask."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageInputError(f"its header claims over {MAX_INPUT_MEGAPIXELS:g} megapixels") from exc
    except OSError as exc:
        raise ImageInputError("not a PNG, JPEG or WebP image") from exc
    if image.format not in FORMATS:
        raise ImageInputError(f"a {image.format} image; send PNG, JPEG or WebP")
    width, height = image.size
    if width * height > MAX_INPUT_MEGAPIXELS * 1e6:
        raise ImageInputError(f"{width}x{height} is over {MAX_INPUT_MEGAPIXELS:g} megapixels; send a smaller image")
    if getattr(image, "n_frames", 1) > 1:
        raise ImageInputError(f"an animated image of {image.n_frames} frames; send a single frame")
    try:
        image.load()
    except (OSError, ValueError) as exc:
        raise ImageInputError(f"the image could not be decoded ({exc})") from exc
    if mask:
        return image.convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
