"""The VAE's latents to images, and images to the bytes a response carries: base64 JPEG, PNG or WebP."""

from __future__ import annotations

import base64
import io

import torch
from diffusers import FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from model.compat import unpack_latents
from model.resolutions import Resolution
from model.schema import OutputFormat


def vae_pixels(pipe: FluxPipeline, packed_latents: torch.Tensor, resolution: Resolution) -> torch.Tensor:
    """The VAE decoder's output for the pipeline's packed latents: pixels in [-1, 1], where the VAE runs."""
    latents = unpack_latents(pipe, packed_latents, resolution.height, resolution.width)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    return pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]


def decode_latents(pipe: FluxPipeline, packed_latents: torch.Tensor, resolution: Resolution) -> list[Image.Image]:
    """One image per latent of the batch (a request's is a batch of one)."""
    return pipe.image_processor.postprocess(vae_pixels(pipe, packed_latents, resolution), output_type="pil")


class OnDevicePostprocessor(VaeImageProcessor):
    """diffusers' postprocessing with the 8-bit conversion done where the pixels are (the GPU): the same arithmetic
    in the same order (denormalize in the decoder's dtype, then float32 x 255, round half to even, to uint8), so the
    same bytes, with a quarter of the bytes copied to the host and no per-pixel work left to the CPU."""

    def to_uint8(self, image: torch.Tensor, do_denormalize: list[bool] | None = None) -> torch.Tensor:
        """The batch as 8-bit (batch, height, width, RGB) pixels, where `image` is."""
        pixels = super().postprocess(image, "pt", do_denormalize)
        return (pixels.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)

    def postprocess(
        self, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None
    ) -> list[Image.Image] | object:
        if output_type != "pil":
            return super().postprocess(image, output_type, do_denormalize)
        return pil_images(self.to_uint8(image, do_denormalize))


def pil_images(rgb: torch.Tensor) -> list[Image.Image]:
    """One image per entry of an 8-bit (batch, height, width, RGB) tensor, copied to the host."""
    return [Image.fromarray(array) for array in rgb.cpu().numpy()]


def to_base64(image: Image.Image, output_format: OutputFormat, quality: int) -> str:
    """The image encoded in `output_format`; `quality` applies to the lossy ones (jpeg, webp), png ignores it."""
    buffer = io.BytesIO()
    rgb = image.convert("RGB")
    if output_format == "png":
        rgb.save(buffer, format="PNG")
    else:
        rgb.save(buffer, format=output_format.upper(), quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
