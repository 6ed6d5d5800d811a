"""Images to the bytes a response carries: base64 JPEG, PNG or WebP."""

from __future__ import annotations

import base64
import io

from PIL import Image

from model.schema import OutputFormat


def to_base64(image: Image.Image, output_format: OutputFormat, quality: int) -> str:
    """The image encoded in `output_format`; `quality` applies to the lossy ones (jpeg, webp), png ignores it."""
    buffer = io.BytesIO()
    rgb = image.convert("RGB")
    if output_format == "png":
        rgb.save(buffer, format="PNG")
    else:
        rgb.save(buffer, format=output_format.upper(), quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
