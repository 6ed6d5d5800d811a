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
    set_inductor_option,
)
from model.graph_route import on_dynamic_graph
from model.settings import CompileSettings

log = logging.getLogger(__name__)


def compile_pipeline(
    pipe: FluxPipeline, settings: CompileSettings, shapes: int, artifacts: CompileArtifacts
) -> Callable[[], None]:
    """Wrap the transformer and vae.decode in torch.compile; return a function that undoes it.

    `shapes` is the number of served (resolution, text length) pairs: each is its own static graph. Precompiled
    functions are saved in `artifacts.precompiled_dir`, kept per cache key as the archives are.
    """
    # Two graphs per static shape at most (T5's first block, which computes the position bias, and the rest), and
    # the dynamic function's warm-up adds up to three per region.
    allow_recompiles(2 * shapes + 3)
    # A previous load() in this process sealed its graphs (model.coldstart); this one compiles.
    torch.compiler.set_stance("default")
    options_before = {
        "deterministic": set_inductor_option("deterministic", settings.deterministic),
        "dynamic_scale_rblock": set_inductor_option("dynamic_scale_rblock", settings.scale_rblock),
    }

    def undo() -> None:
        for name, value in options_before.items():
            set_inductor_option(name, value)
        for module in [*pipe.transformer.modules(), pipe.vae.decoder, *_text_encoder_layers(pipe)]:
            set_compiled_call(module, None)
        torch.compiler.set_stance("default")
        torch.compiler.reset()

    try:
        _wrap(pipe, settings, artifacts)
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


def _wrap(pipe: FluxPipeline, settings: CompileSettings, artifacts: CompileArtifacts) -> None:
    """Route the transformer (its repeated blocks, or all of it) and the VAE's decoder through compiled functions."""
    if settings.precompile:
        _precompile(pipe, settings, artifacts)
    else:
        options = {"mode": settings.mode, "dynamic": settings.dynamic, "fullgraph": True}
        if settings.regional:
            pipe.transformer.compile_repeated_blocks(**options)
        else:
            pipe.transformer.compile(**options)
        if settings.compile_vae:
            pipe.vae.decoder.compile(**options)
    # Both paths fill the regions' compiled-call slots; precompile is always regional (model.settings turns it off
    # without regional compilation).
    if not settings.dynamic:
        # With static graphs, sizes without one of their own need the dynamic-shape graph (model.graph_route).
        _add_dynamic_graphs(_regions(pipe, settings), settings, artifacts)
    if settings.regional and settings.shared_block_layout:
        _share_single_block_layout(pipe.transformer.single_transformer_blocks[0])
    if settings.text_encoders:
        # Dynamo's own compile, not precompiled: HF's layers take optional inputs a saved function cannot name.
        for layer in _text_encoder_layers(pipe):
            layer.compile(mode=settings.mode, dynamic=False)


# The repeated layers of the text encoders: compiled like the transformer's blocks, one graph serving them all.
TEXT_ENCODER_LAYERS = ("T5Block", "CLIPEncoderLayer")


def _text_encoder_layers(pipe: FluxPipeline) -> list[torch.nn.Module]:
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    return [m for encoder in encoders for m in encoder.modules() if type(m).__name__ in TEXT_ENCODER_LAYERS]


def _regions(pipe: FluxPipeline, settings: CompileSettings) -> list[torch.nn.Module]:
    """The modules whose compiled-call slot holds a compiled function."""
    transformer = pipe.transformer
    if settings.regional:
        repeated = repeated_block_names(transformer)
        regions = [m for m in transformer.modules() if type(m).__name__ in repeated]
    else:
        regions = [transformer]
    return [*regions, pipe.vae.decoder] if settings.compile_vae else regions


def _add_dynamic_graphs(regions: list[torch.nn.Module], settings: CompileSettings, artifacts: CompileArtifacts) -> None:
    """Give each region a second compiled function, for the sizes that have no static graph; its eager forward
    when `compile_any_size` is off.

    Precompiled like the static regions when they are (a hit then loads it instead of tracing it: 22 s on an
    H200), else the class's `forward` under its own torch.compile, whose cache entries Dynamo never hands to
    another torch.compile's calls (its backend check). Either way the route alone decides which graph a size runs on.
    Both are symbolic from their first size (`dynamic=True`): with automatic dynamic shapes the first graph depends
    on which sizes this code object was traced at before, which a cache miss (static graphs traced) and a hit
    (static graphs loaded from files) do not share, and the hit compiled three graphs the miss never had.
    Dimensions fixed by the weights' shapes (channels, heads) and the batch of 1 still specialize.
    """
    if not settings.any_size:
        dynamic = {type(m): type(m).forward for m in regions}
    elif settings.precompile:
        dynamic = precompile.precompiled_regions(regions, artifacts, settings.mode, any_size=True)
    else:
        dynamic = {
            kind: torch.compile(kind.forward, mode=settings.mode, fullgraph=True, dynamic=True)
            for kind in dict.fromkeys(type(m) for m in regions)
        }
    for module in regions:
        set_compiled_call(module, _routed(module, compiled_call(module), dynamic[type(module)]))


def _routed(module: torch.nn.Module, static: Callable[..., Any] | None, dynamic: Callable[..., Any]) -> Callable:
    if static is None:
        raise RuntimeError(f"{type(module).__name__} has no static compiled function to route beside")

    def call(*args: Any, **kwargs: Any) -> Any:
        if on_dynamic_graph():
            return dynamic(module, *args, **kwargs)
        return static(*args, **kwargs)

    return call


def _precompile(pipe: FluxPipeline, settings: CompileSettings, artifacts: CompileArtifacts) -> None:
    """Route the repeated blocks, and the VAE's decoder, through functions compiled ahead of time."""
    # A parameter that requires grad makes aot_compile capture a training graph, which inference mode rejects.
    pipe.transformer.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    precompile.precompile_modules(_regions(pipe, settings), artifacts, settings.mode, any_size=settings.dynamic)


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
