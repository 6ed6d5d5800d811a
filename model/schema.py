"""The typed request and response: the one place that validates input.

Truss parses the body into `GenerateRequest` before predict runs, so a wrong type, a missing or
unknown field, or an out-of-range value is answered with HTTP 400 naming the field, and the
schema is published at /v1/models/model/schema. Checks that depend on the deployment (the size bounds,
the aspect-ratio registry and the text lengths) run in the engine, which knows them, and also answer 400.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

# Defaults of FLUX.1-schnell: timestep-distilled for 4 steps without classifier-free guidance.
DEFAULT_SIDE = 1024
DEFAULT_STEPS = 4
MAX_STEPS = 16
DEFAULT_MAX_SEQUENCE_LENGTH = 256
MAX_SEQUENCE_LENGTH = 512  # T5's positional limit in FLUX.1
SCHNELL_GUIDANCE = 0.0
MAX_SEED = 2**32 - 1
MAX_OUTPUTS = 4
OutputFormat = Literal["jpeg", "png", "webp"]
# "jpg" as cog-flux spells it; a response always names the format "jpeg".
RequestedFormat = Literal["jpeg", "jpg", "png", "webp"]
# The JPEG quality of every response before output_quality existed: the default keeps those bytes.
DEFAULT_OUTPUT_QUALITY = 90
# Checked before tokenization, so a multi-megabyte prompt never reaches the tokenizer.
MAX_PROMPT_CHARS = 4000
# Decimals (msgpack bodies only) of more digits are refused before conversion; valid values have at most 10.
MAX_INTEGER_DIGITS = 19
DEFAULT_STRENGTH = 0.8  # cog-flux's prompt strength
MAX_LORAS = 4  # adapters in one request; a deployment's max_loras may allow fewer
MAX_LORA_SCALE = 4.0
MAX_URL_CHARS = 4096  # a presigned URL carries its signature in the query


class LoraRequest(BaseModel):
    """One adapter of a request: where its file is, and how strongly it applies."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="An https URL to a .safetensors file, a Hugging Face reference (owner/repo or "
        "owner/repo/file.safetensors), or a preset name of the deployment.",
    )
    scale: float = Field(
        default=1.0,
        ge=-MAX_LORA_SCALE,
        le=MAX_LORA_SCALE,
        allow_inf_nan=False,
        description="The adapter's weight; 0 gives the bytes of the same request without it.",
    )

    @field_validator("scale", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        return value


class GenerateRequest(BaseModel):
    """One text-to-image request. Unknown fields are rejected, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", strict=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    prompt2: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description="Prompt for the T5 encoder; the CLIP encoder always reads `prompt`. Defaults to `prompt`.",
    )
    width: int | None = Field(
        default=None,
        description=f"A multiple of 16 within the deployment's bounds; {DEFAULT_SIDE} unless aspect_ratio is given.",
    )
    height: int | None = Field(
        default=None,
        description=f"A multiple of 16 within the deployment's bounds; {DEFAULT_SIDE} unless aspect_ratio is given.",
    )
    # Declared after width and height, whose values its check reads.
    aspect_ratio: str | None = Field(
        default=None,
        max_length=16,
        description="A name from the deployment's registry, e.g. '16:9', instead of width and height.",
    )
    # Declared before seed, whose check reads it.
    num_outputs: int = Field(
        default=1, ge=1, le=MAX_OUTPUTS, description="Images generated one after another; image i uses seed + i."
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Random when omitted; 0 is valid. Every image's seed, seed + num_outputs - 1, must be valid too.",
    )
    guidance_scale: float = Field(
        default=SCHNELL_GUIDANCE,
        allow_inf_nan=False,
        description="FLUX.1-schnell needs 0.0; any other value is reset to 0.0 with a warning.",
    )
    num_inference_steps: int = Field(default=DEFAULT_STEPS, ge=1, le=MAX_STEPS)
    max_sequence_length: int = Field(
        default=DEFAULT_MAX_SEQUENCE_LENGTH,
        ge=1,
        le=MAX_SEQUENCE_LENGTH,
        description="T5 tokens kept from the prompt; longer prompts are truncated by tokens.",
    )
    output_format: RequestedFormat = Field(
        default="jpeg", description='The encoding of every image; "jpg" is "jpeg", and the response says "jpeg".'
    )
    output_quality: int = Field(
        default=DEFAULT_OUTPUT_QUALITY, ge=1, le=100, description="For jpeg and webp; png is lossless and ignores it."
    )
    image: str | None = Field(
        default=None,
        description="A starting image (PNG, JPEG or WebP) as an http(s) URL or base64: image-to-image, or "
        "inpainting with `mask`. Without a size, the image's own, scaled down to fit the bounds.",
    )
    mask: str | None = Field(
        default=None,
        description="With `image`: what to repaint (white) and keep (black), the image's size; URL or base64.",
    )
    strength: float = Field(
        default=DEFAULT_STRENGTH,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="With `image`: how much of it is repainted, from just above 0 (little) to 1 (all); about "
        "strength x num_inference_steps steps run.",
    )
    output_urls: list[str] | None = Field(
        default=None,
        max_length=MAX_OUTPUTS,
        description="One presigned HTTP PUT URL per image: each image is uploaded there, and the response lists "
        "the URLs instead of carrying base64.",
    )
    loras: list[LoraRequest] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description="LoRA adapters applied in order, up to the deployment's max_loras (0: LoRA is off).",
    )

    @classmethod
    def parse_raw(cls, b: str | bytes, **_: Any) -> GenerateRequest:  # type: ignore[override]
        """The server parses bodies with this pydantic-v1 entry point, whose json.loads raises
        RecursionError on deeply nested JSON: a 500. pydantic-core's own parser bounds the depth and
        reports a ValidationError instead, which the server answers with 400."""
        return cls.model_validate_json(b)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("output_format")
    @classmethod
    def _one_name_for_jpeg(cls, value: str) -> str:
        return "jpeg" if value == "jpg" else value

    @field_validator("aspect_ratio")
    @classmethod
    def _not_with_a_size(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and (info.data.get("width") is not None or info.data.get("height") is not None):
            raise ValueError("give either aspect_ratio or width and height, not both")
        return value

    @field_validator("mask")
    @classmethod
    def _only_with_an_image(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("image") is None:
            raise ValueError("a mask needs an image to repaint: send `image` too")
        return value

    @field_validator("output_urls")
    @classmethod
    def _one_url_per_image(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        count = info.data.get("num_outputs", 1)
        if value is not None and len(value) != count:
            raise ValueError(f"one URL per image: {len(value)} URLs for num_outputs {count}")
        if value is not None and any(len(url) > MAX_URL_CHARS for url in value):
            raise ValueError(f"each URL must have at most {MAX_URL_CHARS} characters")
        return value

    @field_validator("seed")
    @classmethod
    def _room_for_every_image(cls, value: int | None, info: ValidationInfo) -> int | None:
        count = info.data.get("num_outputs", 1)
        if value is not None and value + count - 1 > MAX_SEED:
            raise ValueError(
                f"image i uses seed + i, so with num_outputs {count} the seed must be at most {MAX_SEED - count + 1}"
            )
        return value

    @field_validator(
        "width",
        "height",
        "num_outputs",
        "seed",
        "num_inference_steps",
        "max_sequence_length",
        "output_quality",
        mode="before",
    )
    @classmethod
    def _no_bool_or_fraction(cls, value: object) -> object:
        # JSON true would otherwise pass as 1, and 1024.5 be rejected with a less clear message.
        if isinstance(value, bool):
            raise ValueError("must be an integer, not a boolean")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ValueError("must be an integer")
        if isinstance(value, Decimal):
            return _decimal_integer(value)
        return value

    @field_validator("guidance_scale", "strength", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        return value


def _decimal_integer(value: Decimal) -> int:
    """A decimal from a msgpack body (Truss decodes its Decimal extension) as an int, refusing it while cheap.

    Pydantic turns a decimal into an int by expanding it: 1E+100000000 took minutes of the event loop, which
    parses bodies, and a range check comes only after that.
    """
    if value.is_zero():
        return 0
    if not value.is_finite() or value != value.to_integral_value():
        raise ValueError("must be an integer")
    if value.adjusted() >= MAX_INTEGER_DIGITS:
        raise ValueError(f"must have at most {MAX_INTEGER_DIGITS} digits")
    return int(value)


class _WithoutNulls(BaseModel):
    """Serialized without its unset fields: an image carries `data` or `url`, never a null beside it."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class GeneratedImage(_WithoutNulls):
    data: str | None = Field(default=None, description="The image, base64-encoded in the response's format.")
    url: str | None = Field(default=None, description="With output_urls: where the image was uploaded, instead.")
    seed: int = Field(description="This image's seed: a single-image request with it returns the same bytes.")


class AppliedLora(BaseModel):
    url: str = Field(description="The adapter as the request named it.")
    scale: float
    sha256: str = Field(description="The sha256 of the file applied: with the rest of the request, the same bytes.")


class GenerateResponse(_WithoutNulls):
    data: str | None = Field(
        description="The first image, base64-encoded in `format`: the same as images[0].data; null with output_urls."
    )
    seed: int = Field(description="The seed used; send it back to get the same images.")
    width: int
    height: int
    format: OutputFormat
    images: list[GeneratedImage] = Field(description="Every image in order; image i used seed + i.")
    loras: list[AppliedLora] = Field(default_factory=list, description="Each adapter applied, in order.")
