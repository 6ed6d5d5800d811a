"""The inference engine: validated request in, base64 JPEG out. It knows nothing about HTTP.

A request runs in four named phases (`encode_text`, `denoise`, `decode`, `respond`), each a method, so that a
benchmark can time them from outside by wrapping the methods of its own engine; the engine itself keeps no
timing and no per-request state.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline
from PIL import Image

from model.compat import unpack_latents
from model.graph_route import dynamic_graph
from model.images import to_base64_jpeg
from model.prompts import encode_prompts
from model.resolutions import Resolution, ResolutionRegistry
from model.schema import MAX_SEED, SCHNELL_GUIDANCE, GenerateRequest, GenerateResponse

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """A request that parsed but that this deployment cannot serve; the adapter answers 400."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


@dataclass(frozen=True)
class Job:
    """Everything that determines the image; equal jobs give identical bytes."""

    prompt: str
    prompt2: str | None
    resolution: Resolution
    seed: int
    steps: int
    max_tokens: int
    text_length: int


class FluxEngine:
    def __init__(self, pipe: FluxPipeline, resolutions: ResolutionRegistry, text_lengths: Iterable[int]) -> None:
        self.pipe = pipe
        self.resolutions = resolutions
        self.text_lengths = tuple(sorted(set(text_lengths)))
        # One pipeline, one CUDA stream: concurrent requests queue here instead of interleaving.
        self._lock = threading.Lock()

    def shapes(self) -> list[tuple[Resolution, int]]:
        """Every (resolution, text length) the transformer sees: one static graph each."""
        return [(r, n) for r in self.resolutions for n in self.text_lengths]

    def job_for(self, request: GenerateRequest) -> Job:
        """Apply the deployment's rules to a parsed request, raising InvalidRequest for what it cannot serve."""
        try:
            resolution: Resolution | None = Resolution(request.width, request.height)
        except ValueError:
            resolution = None
        if resolution is None or resolution not in self.resolutions:
            raise InvalidRequest(
                "width/height",
                f"{request.width}x{request.height} is not served; served sizes (width x height): {self.resolutions}",
            )
        fitting = [n for n in self.text_lengths if n >= request.max_sequence_length]
        if not fitting:
            raise InvalidRequest("max_sequence_length", f"must be at most {self.text_lengths[-1]} on this deployment")
        if request.guidance_scale != SCHNELL_GUIDANCE:
            log.warning(
                "guidance_scale %s reset to %s: FLUX.1-schnell is guidance-distilled",
                request.guidance_scale,
                SCHNELL_GUIDANCE,
            )
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return Job(
            prompt=request.prompt,
            prompt2=request.prompt2,
            resolution=resolution,
            seed=seed,
            steps=request.num_inference_steps,
            max_tokens=request.max_sequence_length,
            text_length=fitting[0],
        )

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        job = self.job_for(request)
        return self.respond(job, self.run(job))

    @torch.inference_mode()
    def run(self, job: Job) -> Image.Image:
        # A size compiled statically runs its own graph; any other runs the dynamic-shape one (model.compile).
        with self._lock, dynamic_graph(job.resolution not in self.resolutions):
            embeds, pooled = self.encode_text(job)
            latents = self.denoise(job, embeds, pooled)
            return self.decode(latents, job.resolution)

    def encode_text(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompts(self.pipe, job.prompt, job.prompt2, job.max_tokens, job.text_length)

    def denoise(self, job: Job, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        # A CPU generator gives the same noise for a seed on every device.
        generator = torch.Generator("cpu").manual_seed(job.seed)
        return self.pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            width=job.resolution.width,
            height=job.resolution.height,
            num_inference_steps=job.steps,
            guidance_scale=SCHNELL_GUIDANCE,
            generator=generator,
            output_type="latent",
            return_dict=False,
        )[0]

    def decode(self, packed_latents: torch.Tensor, resolution: Resolution) -> Image.Image:
        pipe = self.pipe
        latents = unpack_latents(pipe, packed_latents, resolution.height, resolution.width)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        pixels = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(pixels, output_type="pil")[0]

    def respond(self, job: Job, image: Image.Image) -> GenerateResponse:
        return GenerateResponse(
            data=to_base64_jpeg(image), seed=job.seed, width=job.resolution.width, height=job.resolution.height
        )
