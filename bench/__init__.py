"""Benchmarks that print JSON lines; see BENCHMARKS.md for the figures and the commands.

They run the model from outside through tests.harness, the same harness the tests use."""

from typing import Any

import numpy as np

from model.settings import ENV_PREFIX, Settings

# Each named configuration overrides some of config.yaml's settings, by their declared keys; "a+b" combines them.
CONFIGS: dict[str, dict[str, Any]] = {
    # bench.latency runs `eager` uncapped in bf16 as every other configuration's reference; `uncompiled` is the
    # same setting where a card is stood in for.
    "eager": {"compile": False},
    "uncompiled": {"compile": False},
    "default": {},
    # Static graphs only: sizes without one run eager.
    "static_only": {"compile_any_size": False},
    "bf16": {"precision": "bf16"},
    "fp8": {"precision": "fp8"},
    "int8": {"precision": "int8"},
    # T5's weights on their own; with a quantized transformer, `auto` already makes them int4 on a GPU.
    "t5bf16": {"text_encoder_precision": "bf16"},
    "t5int8": {"text_encoder_precision": "int8"},
    "t5int4": {"text_encoder_precision": "int4"},
    # Up to two LoRA adapters a request (none unless it names some); loopback URLs for bench.latency's own adapters.
    "lora2": {"max_loras": 2, "allow_private_urls": True},
    # bench.latency turns the prompt cache off, as its requests repeat one prompt; this turns it back on.
    "prompt_cache": {"prompt_cache_mb": 256},
}


def env_for(**overrides: Any) -> dict[str, str]:
    """FLUX_* environment variables for the given settings by key, checked as the server will read them."""
    env = {ENV_PREFIX + key.upper(): _env_value(value) for key, value in overrides.items()}
    Settings.from_sources(environ=env)  # a bad key or value fails here, not in a child process
    return env


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def card_env(card: str) -> dict[str, str]:
    """The FLUX_* environment of what every `auto` decides on `card` (an L4, an A10G, ...), not on the GPU the
    benchmark runs on: T5's precision depends on the card's memory too."""
    from model.precision import CARDS, choose_max_megapixels, choose_precision, choose_text_encoder_precision

    facts = CARDS[card]
    precision = choose_precision("auto", facts)[0]
    return env_for(
        precision=precision,
        text_encoder_precision=choose_text_encoder_precision("auto", precision, facts)[0],
        max_megapixels=choose_max_megapixels("auto", facts)[0],
    )


def config_env(name: str) -> dict[str, str]:
    """The FLUX_* environment of a named configuration, or of several joined by "+" (later ones win)."""
    overrides: dict[str, Any] = {}
    for part in name.split("+"):
        overrides.update(CONFIGS[part])
    return env_for(**overrides)


def psnr_db(pixels: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of 8-bit pixels against a reference, in dB; identical images get a finite ceiling instead of inf."""
    mse = float(np.mean((pixels.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return round(10 * np.log10(255**2 / max(mse, 1e-12)), 2)
