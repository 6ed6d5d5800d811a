"""Benchmarks that print JSON lines; see BENCHMARKS.md for the figures and the commands."""

import logging
import sys
from typing import Any

import numpy as np
from starlette.requests import Request

from model.settings import env_for

# Model.predict's second argument when it is called outside the server: a request declaring no body.
NO_BODY = Request({"type": "http", "headers": []})

# Each named configuration overrides some of config.yaml's settings, by their declared keys; "a+b" combines them.
CONFIGS: dict[str, dict[str, Any]] = {
    # bench.latency runs `eager` uncapped in bf16 as every other configuration's reference; `uncompiled` is the
    # same switch where a card is stood in for.
    "eager": {"compile": False},
    "uncompiled": {"compile": False},
    "default": {},
    "whole": {"compile_regional": False, "compile_precompile": False},
    "regional": {"compile_regional": True},
    "no_vae_compile": {"compile_vae": False},
    "compile_text": {"compile_text_encoders": True},
    "fuse_qkv": {"fuse_qkv": True},
    "no_fuse_qkv": {"fuse_qkv": False},
    "channels_last": {"vae_channels_last": True},
    "postprocess_on_device": {"postprocess_on_device": True},
    "no_postprocess_on_device": {"postprocess_on_device": False},
    "text_graphs": {"text_encoder_cuda_graphs": True},
    "no_text_graphs": {"text_encoder_cuda_graphs": False},
    "conv_nchw": {"vae_compiled_nchw": True},
    "fp8_tensor": {"precision": "fp8", "fp8_scaling": "tensor"},
    "deterministic": {"compile_deterministic": True},
    "scale_rblock": {"compile_scale_rblock": True},
    "cudnn": {"attention_backend": "_native_cudnn"},
    "flash": {"attention_backend": "_native_flash"},
    "sdpa": {"attention_backend": None},
    "max_autotune": {"compile_mode": "max-autotune"},
    "max_autotune_no_cudagraphs": {"compile_mode": "max-autotune-no-cudagraphs"},
    "dynamic": {"compile_dynamic": True},
    # Static graphs only, as every compiled configuration was before the dynamic-shape graph for other sizes.
    "static_only": {"compile_any_size": False},
    "no_shared_layout": {"compile_shared_block_layout": False},
    "precompile": {"compile_precompile": True},
    "no_precompile": {"compile_precompile": False},
    "no_expandable": {"expandable_segments": False},
    "no_inplace_silu": {"vae_inplace_silu": False},
    "bf16": {"precision": "bf16"},
    "fp8": {"precision": "fp8"},
    "int8": {"precision": "int8"},
    # T5's weights on their own; with a quantized transformer, `auto` already makes them int8.
    "t5bf16": {"text_encoder_precision": "bf16"},
    "t5int8": {"text_encoder_precision": "int8"},
    "t5int4": {"text_encoder_precision": "int4"},
    # bench.latency turns the prompt cache off, as its requests repeat one prompt; this turns it back on.
    "prompt_cache": {"prompt_cache_mb": 256},
}


def config_env(name: str) -> dict[str, str]:
    """The FLUX_* environment of a named configuration, or of several joined by "+" (later ones win)."""
    overrides: dict[str, Any] = {}
    for part in name.split("+"):
        overrides.update(CONFIGS[part])
    return env_for(**overrides)


def log_to_stderr() -> None:
    """In a benchmark's child process: load()'s progress goes to stderr, which the parent streams."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


def psnr_db(pixels: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of 8-bit pixels against a reference, in dB; identical images get a finite ceiling instead of inf."""
    mse = float(np.mean((pixels.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return round(10 * np.log10(255**2 / max(mse, 1e-12)), 2)
