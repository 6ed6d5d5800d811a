"""torch.compile of the transformer and the VAE decode, and the warm-up of every served shape."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers import FluxPipeline

from model import precompile
from model.artifacts import CompileArtifacts
from model.compat import (
    allow_recompiles,
    compiled_call,
    repeated_block_names,
    set_compiled_call,
)
from model.settings import CompileSettings

log = logging.getLogger(__name__)


def compile_pipeline(
    pipe: FluxPipeline, settings: CompileSettings, shapes: int, artifacts: CompileArtifacts
) -> Callable[[], None]:
    """Wrap the transformer and vae.decode in torch.compile; return a function that undoes it.

    `shapes` is the number of served (resolution, text length) pairs: each is its own static graph. Precompiled
    functions are saved in `artifacts.precompiled_dir`, kept per cache key as the archives are.
    """
    allow_recompiles(2 * shapes)
    eager_decode = pipe.vae.decode

    def undo() -> None:
        for module in [*pipe.transformer.modules(), pipe.vae.decoder]:
            set_compiled_call(module, None)
        pipe.vae.decode = eager_decode
        torch.compiler.reset()

    try:
        _wrap(pipe, settings, eager_decode, artifacts)
    except BaseException:
        # The caller gets no undo from a raising call, so undo here whatever was wrapped before the failure:
        # otherwise the engine would run half compiled while the log says eager.
        undo()
        raise
    log.info(
        "%s the %s transformer%s with mode=%s dynamic=%s",
        "precompiling" if settings.precompile else "compiling",
        "regional (repeated blocks)" if settings.regional else "whole",
        " and the VAE decode" if settings.compile_vae else "",
        settings.mode,
        settings.dynamic,
    )
    return undo


def _wrap(
    pipe: FluxPipeline, settings: CompileSettings, eager_decode: Callable[..., Any], artifacts: CompileArtifacts
) -> None:
    """Route the transformer (its repeated blocks, or all of it) and the VAE decode through compiled functions."""
    if settings.precompile:
        _precompile(pipe, settings, artifacts)
    else:
        options = {"mode": settings.mode, "dynamic": settings.dynamic, "fullgraph": True}
        if settings.regional:
            pipe.transformer.compile_repeated_blocks(**options)
        else:
            pipe.transformer.compile(**options)
        if settings.compile_vae:
            pipe.vae.decode = torch.compile(eager_decode, **options)
    # Both paths fill the blocks' compiled-call slot; precompile is always regional (model.settings turns it off
    # without regional compilation).
    if settings.regional and settings.shared_block_layout:
        _share_single_block_layout(pipe.transformer.single_transformer_blocks[0])


def _precompile(pipe: FluxPipeline, settings: CompileSettings, artifacts: CompileArtifacts) -> None:
    """Route the repeated blocks, and the VAE's decoder, through functions compiled ahead of time."""
    transformer = pipe.transformer
    # A parameter that requires grad makes aot_compile capture a training graph, which inference mode rejects.
    transformer.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    repeated = repeated_block_names(transformer)
    modules = [m for m in transformer.modules() if type(m).__name__ in repeated]
    if settings.compile_vae:
        # vae.decode itself is wrapped by a diffusers decorator, which cannot be saved; its decoder module can.
        modules.append(pipe.vae.decoder)
    precompile.precompile_modules(modules, artifacts, settings.mode, settings.dynamic)


def _share_single_block_layout(first_single_block: torch.nn.Module) -> None:
    """Give the first single block its two inputs as slices of one tensor, as every later single block gets them.

    A single block returns its text and image states as slices of one joined tensor, but the first one receives
    two separate tensors from the last double block. Dynamo guards on strides, so each served shape would compile
    the single block twice; one extra concatenation per step before the compiled call saves that graph.
    """
    compiled = compiled_call(first_single_block)

    def call_with_shared_layout(*args: Any, **kwargs: Any) -> Any:
        text, image = kwargs.get("encoder_hidden_states"), kwargs.get("hidden_states")
        if isinstance(text, torch.Tensor) and isinstance(image, torch.Tensor):
            joined = torch.cat([text, image], dim=1)
            kwargs["encoder_hidden_states"], kwargs["hidden_states"] = joined.split([text.shape[1], image.shape[1]], 1)
        return compiled(*args, **kwargs)

    # The same slot nn.Module.compile fills; undo() clears it on every module.
    set_compiled_call(first_single_block, call_with_shared_layout)
