"""The decoder's pixels to images, and images to the bytes a response carries: base64 JPEG, PNG or WebP."""

from __future__ import annotations

import base64
import io

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from model.schema import OutputFormat


class OnDevicePostprocessor(VaeImageProcessor):
    """diffusers' postprocessing with the 8-bit conversion done where the pixels are (the GPU): the same arithmetic
    in the same order (denormalize in the decoder's dtype, then float32 x 255, round half to even, to uint8), so the
    same bytes, with a quarter of the bytes copied to the host and no per-pixel work left to the CPU."""

    def postprocess(
        self, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None
    ) -> list[Image.Image] | object:
        if output_type != "pil":
            return super().postprocess(image, output_type, do_denormalize)
        pixels = super().postprocess(image, "pt", do_denormalize)
        rgb = (pixels.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(array) for array in rgb]


CONTENT_TYPES: dict[OutputFormat, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def encode(image: Image.Image, output_format: OutputFormat, quality: int) -> bytes:
    """The image encoded in `output_format`; `quality` applies to the lossy ones (jpeg, webp), png ignores it."""
    buffer = io.BytesIO()
    rgb = image.convert("RGB")
    if output_format == "png":
        rgb.save(buffer, format="PNG")
    else:
        rgb.save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()


def to_base64(encoded: bytes) -> str:
    return base64.b64encode(encoded).decode("ascii")
