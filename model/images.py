"""Images to the bytes a response carries: base64 JPEG."""

from __future__ import annotations

import base64
import io

from PIL import Image

JPEG_QUALITY = 90


def to_base64_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
