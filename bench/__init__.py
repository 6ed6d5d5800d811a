"""Benchmarks that print JSON lines; see BENCHMARKS.md for the figures and the commands."""

import logging
import sys

from starlette.requests import Request

# Model.predict's second argument when it is called outside the server: a request declaring no body.
NO_BODY = Request({"type": "http", "headers": []})

# Each named configuration is a set of FLUX_* overrides of config.yaml; "a+b" combines them.
CONFIGS: dict[str, dict[str, str]] = {
    "eager": {"FLUX_COMPILE": "0"},
    "default": {},
    "whole": {"FLUX_COMPILE_REGIONAL": "0", "FLUX_COMPILE_PRECOMPILE": "0"},
    "regional": {"FLUX_COMPILE_REGIONAL": "1"},
    "no_vae_compile": {"FLUX_COMPILE_VAE": "0"},
    "fuse_qkv": {"FLUX_FUSE_QKV": "1"},
    "no_fuse_qkv": {"FLUX_FUSE_QKV": "0"},
    "channels_last": {"FLUX_VAE_CHANNELS_LAST": "1"},
    "cudnn": {"FLUX_ATTENTION_BACKEND": "_native_cudnn"},
    "flash": {"FLUX_ATTENTION_BACKEND": "_native_flash"},
    "sdpa": {"FLUX_ATTENTION_BACKEND": ""},
    "max_autotune": {"FLUX_COMPILE_MODE": "max-autotune"},
    "max_autotune_no_cudagraphs": {"FLUX_COMPILE_MODE": "max-autotune-no-cudagraphs"},
    "dynamic": {"FLUX_COMPILE_DYNAMIC": "1"},
    "no_shared_layout": {"FLUX_COMPILE_SHARED_BLOCK_LAYOUT": "0"},
    "precompile": {"FLUX_COMPILE_PRECOMPILE": "1"},
    "no_precompile": {"FLUX_COMPILE_PRECOMPILE": "0"},
    "fp8": {"FLUX_FP8": "1"},
}


def config_env(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for part in name.split("+"):
        env.update(CONFIGS[part])
    return env


def log_to_stderr() -> None:
    """In a benchmark's child process: load()'s progress goes to stderr, which the parent streams."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
