"""Builds the FluxPipeline from a weights mount, a HF repo id, a local path, or an offline architecture."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import FluxPipeline

from model.blocks import BlockHook, transformer_parts
from model.random_flux import build_random_pipeline
from model.settings import Settings

log = logging.getLogger(__name__)

# model_source values that build an architecture offline instead of reading weights.
OFFLINE_SOURCES = {"tiny": "tiny", "full-random": "full"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def serving_dtype() -> torch.dtype:
    # bf16 is how FLUX.1 is served; CPU bf16 matmuls are slow and only the tiny model is served there.
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _mounted(settings: Settings) -> bool:
    return settings.weights_path is not None and settings.weights_path.is_dir()


def describe_source(settings: Settings) -> str:
    """Where the weights come from, for logs (never includes the token)."""
    source = settings.model_source
    if source in OFFLINE_SOURCES:
        return f"offline architecture {OFFLINE_SOURCES[source]!r} with random weights"
    if source == "hf":
        return (
            f"weights mount {settings.weights_path}" if _mounted(settings) else f"Hugging Face repo {settings.repo_id}"
        )
    return f"local path {source}"


def load_pipeline(
    settings: Settings,
    hf_token: str | None = None,
    device: str | None = None,
    on_block: BlockHook | None = None,
    on_text_encoder: BlockHook | None = None,
) -> FluxPipeline:
    """Load the pipeline named by settings.model_source onto `device` (cuda when present).

    With `on_block`, the transformer reaches `device` one part at a time and each part goes through
    the hook on arrival, so the whole bf16 transformer is never there at once. With `on_text_encoder`, the T5
    encoder goes through it as soon as it is on `device`, before any of the transformer is.
    """
    device = device or default_device()
    dtype = serving_dtype()
    source = settings.model_source
    log.info("loading pipeline from %s on %s in %s", describe_source(settings), device, dtype)
    if source in OFFLINE_SOURCES:
        pipe = build_random_pipeline(
            OFFLINE_SOURCES[source], device=device, dtype=dtype, on_block=on_block, on_text_encoder=on_text_encoder
        )
    else:
        if source == "hf":
            location = str(settings.weights_path) if _mounted(settings) else settings.repo_id
        elif Path(source).is_dir():
            location = source
        else:
            raise FileNotFoundError(f"model_source {source!r} is neither 'hf', an offline spec, nor a directory")
        if on_block is None and on_text_encoder is None:
            # Straight from the files onto the device, without a host copy of every weight first.
            pipe = FluxPipeline.from_pretrained(location, dtype=dtype, token=hf_token, device_map=device)
        else:
            # Read into host memory first; T5 then moves whole, the transformer part by part, the rest whole.
            pipe = FluxPipeline.from_pretrained(location, dtype=dtype, token=hf_token)
            pipe.text_encoder_2.to(device)
            if on_text_encoder is not None:
                on_text_encoder(pipe.text_encoder_2)
            for part in transformer_parts(pipe.transformer):
                part.to(device)
                if on_block is not None:
                    on_block(part)
            pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
