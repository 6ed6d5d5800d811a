"""Image-to-image and inpainting: diffusers' pipelines for them, over the served pipeline's own modules.

No weight is loaded twice, and the compiled transformer runs their steps as it runs text-to-image ones (nothing
compiles for them: tests/test_dynamic_sizes.py). Their noise comes from a CPU generator, the same on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline
from PIL import Image

from model.resolutions import Resolution
from model.schema import SCHNELL_GUIDANCE

Repainting = FluxImg2ImgPipeline | FluxInpaintPipeline


@dataclass(frozen=True)
class ImageInputs:
    """A request's starting image, and its mask for inpainting, decoded (model.image_inputs)."""

    image: Image.Image
    mask: Image.Image | None
    image_sha256: str
    mask_sha256: str | None


class Repainter:
    """Runs image-to-image or inpainting on `pipe`'s modules; each pipeline is built at its first use."""

    def __init__(self, pipe: FluxPipeline) -> None:
        self.pipe = pipe
        self._pipelines: dict[type[Repainting], Repainting] = {}

    def __call__(
        self,
        inputs: ImageInputs,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        resolution: Resolution,
        steps: int,
        strength: float,
        seed: int,
    ) -> torch.Tensor:
        """The packed latents of one image, as FluxPipeline's output_type="latent" gives them."""
        cls = FluxInpaintPipeline if inputs.mask is not None else FluxImg2ImgPipeline
        extra = {"mask_image": inputs.mask} if inputs.mask is not None else {}
        return self._pipeline(cls)(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            image=inputs.image,
            width=resolution.width,
            height=resolution.height,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=SCHNELL_GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
            return_dict=False,
            **extra,
        )[0]

    def _pipeline(self, cls: type[Repainting]) -> Repainting:
        """Not diffusers' from_pipe: it casts every module it shares to its dtype argument, float32 by default, in
        place. The scheduler is a copy: it keeps per-call state."""
        if cls not in self._pipelines:
            scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
            pipeline = cls(**{**self.pipe.components, "scheduler": scheduler})
            pipeline.set_progress_bar_config(disable=True)
            self._pipelines[cls] = pipeline
        return self._pipelines[cls]
