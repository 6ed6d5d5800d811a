"""torch.compile of the transformer's repeated blocks and the VAE's decoder, and the undo that serves eager again.

Each region (a block kind, the decoder) gets a static function, compiled per served shape, and a dynamic-shape one
for every other size; model.graph_route routes each call to one of them. Every function is compiled ahead of time
and saved as a file (model.precompile), so a cache hit skips Dynamo.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from diffusers import FluxPipeline

from model import precompile
from model.artifacts import CompileArtifacts
from model.compat import allow_recompiles, repeated_block_names
from model.graph_route import route, unroute
from model.settings import CompileSettings

log = logging.getLogger(__name__)

# "default": the seed's max-autotune-no-cudagraphs cost ten times the compile time and fifteen times the cache, and
# denoised no faster on an H200 (BENCHMARKS.md, "compile mode"). Regional compilation (one graph per block kind,
# shared by its 57 blocks) compiled 2.5 times faster than the whole transformer, at the same latency (same section).
COMPILE_MODE = "default"


def _regions(pipe: FluxPipeline, vae: bool = True) -> list[torch.nn.Module]:
    """The modules routed through compiled functions: every repeated transformer block, and the VAE's decoder."""
    repeated = repeated_block_names(pipe.transformer)
    blocks = [m for m in pipe.transformer.modules() if type(m).__name__ in repeated]
    return [*blocks, pipe.vae.decoder] if vae else blocks


def compile_pipeline(
    pipe: FluxPipeline, settings: CompileSettings, shapes: int, artifacts: CompileArtifacts
) -> Callable[[], None]:
    """Route the regions through compiled functions; return a function that undoes it.

    `shapes` is the number of served (resolution, text length) pairs: each is its own static graph. Precompiled
    functions are saved in `artifacts.precompiled_dir`, kept per cache key as the archives are.
    """
    # Past Dynamo's limit a region silently runs eager. Static and dynamic functions share each class's forward:
    # two graphs per static shape at most (the first single block's, and T5-length pairs), the dynamic graph's warm-up
    # a handful more. After load() no region compiles at all (the eager_on_recompile stance), so a generous limit
    # cannot let a request recompile without end.
    allow_recompiles(4 * shapes + 16)
    # A previous load() in this process sealed its graphs (model.coldstart); this one compiles.
    torch.compiler.set_stance("default")
    modules = _regions(pipe, settings.vae)
    # A parameter that requires grad makes the compile capture a training graph, which inference mode rejects.
    pipe.transformer.requires_grad_(False)
    pipe.vae.requires_grad_(False)

    def undo() -> None:
        for module in modules:
            unroute(module)
        torch.compiler.set_stance("default")
        torch.compiler.reset()

    try:
        # A hit loads each function instead of tracing it (Dynamo took 22 s for the dynamic one on an H200, and most
        # of an fp8 hit's 37 s). The dynamic ones are symbolic from their first size: with automatic dynamic shapes
        # the first graph depends on which sizes were traced before, which a miss (static graphs traced) and a hit
        # (static graphs loaded from files) do not share.
        static = precompile.precompiled_regions(modules, artifacts, COMPILE_MODE, any_size=False)
        if settings.any_size:
            dynamic = precompile.precompiled_regions(modules, artifacts, COMPILE_MODE, any_size=True)
        else:  # the sizes that have no static graph run each class's eager forward
            dynamic = {type(m): type(m).forward for m in modules}
        first_single_block = pipe.transformer.single_transformer_blocks[0]
        for module in modules:
            route(module, static[type(module)], dynamic[type(module)], shared_layout=module is first_single_block)
    except BaseException:
        # The caller gets no undo from a raising call: undo whatever was routed before the failure, or the engine
        # would run half compiled while the log says eager.
        undo()
        raise
    log.info(
        "precompiling the transformer's repeated blocks%s, mode %s; other sizes: %s",
        " and the VAE decode" if settings.vae else "",
        COMPILE_MODE,
        "one dynamic-shape graph" if settings.any_size else "eager",
    )
    return undo
