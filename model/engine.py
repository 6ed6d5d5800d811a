"""The inference engine: validated request in, base64 images out. It knows nothing about HTTP.

A request runs in four named phases (`encode_text`, `denoise`, `decode`, `respond`), each a method, so that a
benchmark can time them from outside by wrapping the methods of its own engine; the engine itself keeps no
timing and no per-request state. A request for several images encodes its text once, denoises and decodes each
image in turn, and encodes them all in one `respond`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from diffusers import FluxPipeline
from PIL import Image

from model.adapters import AdapterStore, AppliedAdapter
from model.compat import unpack_latents
from model.graph_route import dynamic_graph
from model.image_inputs import ImageInputError, open_image, read_image_bytes
from model.images import CONTENT_TYPES, encode, to_base64
from model.lora import AdapterError, LoraMerger, PreparedAdapter
from model.prompt_cache import PromptEmbeddingCache, PromptKey
from model.prompts import TextEncoders, encode_prompts
from model.remote import FetchError, UploadError, check_url, put
from model.repaint import ImageInputs, Repainter
from model.resolutions import Resolution, ResolutionRegistry, ServedSizes
from model.schema import (
    DEFAULT_OUTPUT_QUALITY,
    DEFAULT_SIDE,
    MAX_SEED,
    SCHNELL_GUIDANCE,
    AppliedLora,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    OutputFormat,
)

log = logging.getLogger(__name__)


class FairLock:
    """A lock that admits its waiters in the order they arrived. threading.Lock promises no order, and with
    `predict_concurrency` above 1 a request that came later could take the pipeline first, again and again."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._condition.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *_: object) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()


class GuidanceResets:
    """Counts requests whose guidance_scale was reset, logging at the 1st, 10th, 100th, ...: a client sending it on
    every request cannot flood the log."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def record(self, requested: float) -> None:
        with self._lock:
            self._count += 1
            count = self._count
        if count == 10 ** (len(str(count)) - 1):
            log.warning(
                "guidance_scale %s reset to %s: FLUX.1-schnell is guidance-distilled (%d request%s so far; logged at "
                "the 1st, 10th, 100th, ...)",
                requested,
                SCHNELL_GUIDANCE,
                count,
                "" if count == 1 else "s",
            )


class InvalidRequest(ValueError):
    """A request that parsed but that this deployment cannot serve; the adapter answers 400."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


class UploadFailed(Exception):
    """An image the storage at `output_urls[i]` never took; `response` carries every image as base64 instead, so
    nothing generated is lost."""

    def __init__(self, field_name: str, message: str, status: int | None, response: GenerateResponse) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name
        self.status = status
        self.response = response


@dataclass(frozen=True)
class Job:
    """Everything that determines the images; equal jobs give identical bytes."""

    prompt: str
    prompt2: str | None
    resolution: Resolution
    seed: int
    steps: int
    max_tokens: int
    text_length: int
    # A job built without a request (the warm-up's) makes one image and never encodes it: the request defaults.
    num_outputs: int = 1
    output_format: OutputFormat = "jpeg"
    output_quality: int = DEFAULT_OUTPUT_QUALITY
    loras: tuple[AppliedAdapter, ...] = ()
    output_urls: tuple[str, ...] = ()
    # Image-to-image and inpainting: the sha256 of the input files, and how much is repainted.
    image_sha256: str | None = None
    mask_sha256: str | None = None
    strength: float | None = None

    @property
    def seeds(self) -> range:
        """Each image's seed, in order: image i uses seed + i, so image 0 is the single-image request's."""
        return range(self.seed, self.seed + self.num_outputs)


# Inputs by URL: the largest file fetched (a 16-megapixel PNG is at most ~48 MB).
INPUT_IMAGE_MAX_BYTES = 64 << 20


class FluxEngine:
    def __init__(
        self,
        pipe: FluxPipeline,
        resolutions: ResolutionRegistry,
        text_lengths: Iterable[int],
        sizes: ServedSizes | None = None,
        prompt_cache: PromptEmbeddingCache | None = None,
        lora: LoraMerger | None = None,
        adapters: AdapterStore | None = None,
        allow_private_urls: bool = False,
    ) -> None:
        self.pipe = pipe
        # What merges a request's adapters into the transformer, and where they come from; None where LoRA is off.
        self.lora = lora
        self.adapters = adapters
        self.allow_private_urls = allow_private_urls
        self._repainter = Repainter(pipe)
        self.resolutions = resolutions
        self.text_lengths = tuple(sorted(set(text_lengths)))
        # The declared defaults when not given: an engine that only runs jobs (a warm-up, a test) validates none.
        self.sizes = sizes if sizes is not None else ServedSizes()
        # A budget of 0 keeps nothing: every request runs the text encoders (a warm-up, a test).
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptEmbeddingCache(0)
        # The pipeline's own encoders until load() swaps in faster ones that give the same bytes (model.text_graphs).
        self.text_encoders: TextEncoders | None = None
        # One pipeline, one CUDA stream: concurrent requests queue here, in arrival order, instead of interleaving.
        self._lock = FairLock()
        self._guidance_resets = GuidanceResets()

    def shapes(self) -> list[tuple[Resolution, int]]:
        """Every (static resolution, text length) compiled and warmed up at load: one static graph each."""
        return [(r, n) for r in self.resolutions for n in self.text_lengths]

    def is_static(self, resolution: Resolution) -> bool:
        """Whether `resolution` has its own static graphs; any other valid size runs on graphs not specialised to it."""
        return resolution in self.resolutions

    def resolution_for(self, request: GenerateRequest, inputs: ImageInputs | None = None) -> Resolution:
        """The size a request asks for, by aspect ratio or by width and height (else its image's, fitted to the
        bounds), or InvalidRequest naming the field."""
        if inputs is not None and request.aspect_ratio is None and request.width is None and request.height is None:
            return self.fitted(*inputs.image.size)
        if request.aspect_ratio is not None:
            ratios = self.sizes.aspect_ratios
            if request.aspect_ratio not in ratios:
                raise InvalidRequest(
                    "aspect_ratio", f"{request.aspect_ratio!r} is not one of {', '.join(ratios)} on this deployment"
                )
            return ratios[request.aspect_ratio]
        width = DEFAULT_SIDE if request.width is None else request.width
        height = DEFAULT_SIDE if request.height is None else request.height
        if problem := self.sizes.bounds.problem(width, height):
            raise InvalidRequest(*problem)
        return Resolution(width, height)

    def fitted(self, width: int, height: int) -> Resolution:
        """An input image's size scaled down to fit the bounds (never up), each side rounded down to the 16-grid."""
        bounds = self.sizes.bounds
        scale = min(
            1.0, bounds.max_side / max(width, height), math.sqrt(bounds.max_megapixels * 1e6 / (width * height))
        )
        fit = Resolution(*(max(bounds.min_side, int(side * scale) // 16 * 16) for side in (width, height)))
        if problem := bounds.problem(fit.width, fit.height):
            raise InvalidRequest("image", f"{width}x{height} cannot be fitted ({problem[1]}): give width and height")
        return fit

    def read_inputs(self, request: GenerateRequest) -> ImageInputs | None:
        """The request's image and mask, fetched or decoded before the pipeline's lock, or InvalidRequest."""
        if request.image is None:
            return None
        images, digests = [], []
        for field_name, source in (("image", request.image), ("mask", request.mask)):
            if source is None:
                continue
            try:
                data = read_image_bytes(source, INPUT_IMAGE_MAX_BYTES, self.allow_private_urls)
                images.append(open_image(data, mask=field_name == "mask"))
            except ImageInputError as exc:
                raise InvalidRequest(field_name, str(exc)) from exc
            digests.append(hashlib.sha256(data).hexdigest())
        image, mask = images[0], images[1] if len(images) > 1 else None
        if mask is not None and mask.size != image.size:
            raise InvalidRequest(
                "mask",
                f"{mask.width}x{mask.height}, but the image is {image.width}x{image.height}: send the image's size",
            )
        return ImageInputs(image, mask, digests[0], digests[1] if mask is not None else None)

    def job_for(self, request: GenerateRequest, inputs: ImageInputs | None = None) -> Job:
        """Apply the deployment's rules to a parsed request, raising InvalidRequest for what it cannot serve."""
        resolution = self.resolution_for(request, inputs)
        fitting = [n for n in self.text_lengths if n >= request.max_sequence_length]
        if not fitting:
            raise InvalidRequest("max_sequence_length", f"must be at most {self.text_lengths[-1]} on this deployment")
        if request.loras:
            most = 0 if self.lora is None else self.lora.max_adapters
            if not most:
                raise InvalidRequest(
                    "loras", "LoRA is off on this deployment: set max_loras (FLUX_MAX_LORAS) to 1 or more to serve it"
                )
            if len(request.loras) > most:
                raise InvalidRequest(
                    "loras", f"{len(request.loras)} adapters, over this deployment's max_loras of {most}"
                )
        for index, url in enumerate(request.output_urls or ()):
            try:  # before any GPU time is spent on images that could not be delivered
                check_url(url, self.allow_private_urls)
            except FetchError as exc:
                raise InvalidRequest(f"output_urls[{index}]", str(exc)) from exc
        if request.guidance_scale != SCHNELL_GUIDANCE:
            self._guidance_resets.record(request.guidance_scale)
        # A random seed leaves room for every image's: the last, seed + num_outputs - 1, is still a valid seed.
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 2 - request.num_outputs)
        return Job(
            prompt=request.prompt,
            prompt2=request.prompt2,
            resolution=resolution,
            seed=seed,
            steps=request.num_inference_steps,
            max_tokens=request.max_sequence_length,
            text_length=fitting[0],
            num_outputs=request.num_outputs,
            output_format=request.output_format,
            output_quality=request.output_quality,
            output_urls=tuple(request.output_urls or ()),
            image_sha256=None if inputs is None else inputs.image_sha256,
            mask_sha256=None if inputs is None else inputs.mask_sha256,
            strength=None if inputs is None else request.strength,
        )

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        inputs = self.read_inputs(request)
        job = self.job_for(request, inputs)
        job, adapters = self.fetch_adapters(job, request)
        return self.respond(job, self.run(job, adapters, inputs))

    def fetch_adapters(self, job: Job, request: GenerateRequest) -> tuple[Job, list[PreparedAdapter]]:
        """The request's adapters, fetched and checked before the pipeline's lock: a slow URL stalls no other
        request, and a bad one is refused before any weight changes."""
        if not request.loras or self.adapters is None:
            return job, []
        applied, prepared = [], []
        for index, lora in enumerate(request.loras):
            try:
                sha, adapter = self.adapters.get(lora.url)
            except FetchError as exc:
                raise InvalidRequest(f"loras[{index}].url", str(exc)) from exc
            except AdapterError as exc:
                raise InvalidRequest(f"loras[{index}]", f"{lora.url}: {exc}") from exc
            applied.append(AppliedAdapter(lora.url, lora.scale, sha))
            prepared.append(adapter)
        return replace(job, loras=tuple(applied)), prepared

    @torch.inference_mode()
    def run(
        self, job: Job, adapters: Sequence[PreparedAdapter] = (), inputs: ImageInputs | None = None
    ) -> list[Image.Image]:
        """The job's images in seed order, one after another, from one text encoding, with `adapters` (prepared
        for `job.loras`) merged into the transformer, from `inputs` where the job starts from an image."""
        # A size compiled statically runs its own graph; any other runs the dynamic-shape one (model.compile).
        with self._lock, dynamic_graph(not self.is_static(job.resolution)):
            if self.lora is not None:
                self.lora.apply([(a.sha256, p, a.scale) for a, p in zip(job.loras, adapters, strict=True)])
            embeds, pooled = self.encode_text(job)
            if inputs is not None:
                return [
                    self.decode(self.repaint(job, inputs, embeds, pooled, seed), job.resolution) for seed in job.seeds
                ]
            return [self.decode(self.denoise(job, embeds, pooled, seed), job.resolution) for seed in job.seeds]

    def encode_text(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        key = PromptKey(job.prompt, job.prompt2, job.text_length, job.max_tokens)
        if (cached := self.prompt_cache.get(key)) is not None:
            return cached
        embeddings = encode_prompts(
            self.pipe, job.prompt, job.prompt2, job.max_tokens, job.text_length, self.text_encoders
        )
        self.prompt_cache.put(key, embeddings)
        return embeddings

    def denoise(self, job: Job, embeds: torch.Tensor, pooled: torch.Tensor, seed: int) -> torch.Tensor:
        return self.pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            latents=self.noise(job.resolution, seed, embeds.dtype),
            width=job.resolution.width,
            height=job.resolution.height,
            num_inference_steps=job.steps,
            guidance_scale=SCHNELL_GUIDANCE,
            output_type="latent",
            return_dict=False,
        )[0]

    def repaint(
        self, job: Job, inputs: ImageInputs, embeds: torch.Tensor, pooled: torch.Tensor, seed: int
    ) -> torch.Tensor:
        """Image-to-image, or inpainting with a mask (model.repaint): the packed latents of one image."""
        assert job.strength is not None  # a job made from inputs has one
        return self._repainter(inputs, embeds, pooled, job.resolution, job.steps, job.strength, seed)

    def noise(self, resolution: Resolution, seed: int, dtype: torch.dtype) -> torch.Tensor:
        """The packed starting latents of one image, made on the host as FluxPipeline makes them from a generator.

        A CPU generator gives the same noise for a seed on every device. Made here, before the pipeline's first
        host sync, the CPU draws it (7 ms at 1024x1024 on an H200's host, BENCHMARKS.md) while the GPU is still
        encoding the text, rather than with the GPU waiting.
        """
        pipe = self.pipe
        generator = torch.Generator("cpu").manual_seed(seed)
        channels = pipe.transformer.config.in_channels // 4
        latents, _ = pipe.prepare_latents(1, channels, resolution.height, resolution.width, dtype, "cpu", generator)
        return latents

    def decode(self, packed_latents: torch.Tensor, resolution: Resolution) -> Image.Image:
        return self.decode_batch(packed_latents, resolution)[0]

    def decode_batch(self, packed_latents: torch.Tensor, resolution: Resolution) -> list[Image.Image]:
        """One image per latent of the batch (a request's is a batch of one)."""
        pipe = self.pipe
        latents = unpack_latents(pipe, packed_latents, resolution.height, resolution.width)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        pixels = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(pixels, output_type="pil")

    def respond(self, job: Job, images: list[Image.Image]) -> GenerateResponse:
        """The images as base64, or uploaded to the job's output URLs (outside the pipeline's lock)."""
        encoded = [encode(image, job.output_format, job.output_quality) for image in images]

        def inline() -> GenerateResponse:  # base64 only where the images travel in the answer
            pairs = zip(encoded, job.seeds, strict=True)
            return self._response(job, [GeneratedImage(data=to_base64(data), seed=seed) for data, seed in pairs])

        if not job.output_urls:
            return inline()
        for index, (url, data) in enumerate(zip(job.output_urls, encoded, strict=True)):
            try:
                put(url, data, CONTENT_TYPES[job.output_format], self.allow_private_urls)
            except (UploadError, FetchError) as exc:
                status = exc.status if isinstance(exc, UploadError) else None
                raise UploadFailed(f"output_urls[{index}]", str(exc), status, inline()) from exc
        uploaded = zip(job.output_urls, job.seeds, strict=True)
        return self._response(job, [GeneratedImage(url=url, seed=seed) for url, seed in uploaded])

    def _response(self, job: Job, images: list[GeneratedImage]) -> GenerateResponse:
        return GenerateResponse(
            data=images[0].data,
            seed=job.seed,
            width=job.resolution.width,
            height=job.resolution.height,
            format=job.output_format,
            images=images,
            loras=[AppliedLora(url=a.url, scale=a.scale, sha256=a.sha256) for a in job.loras],
        )
