"""torch.compile of the transformer and the VAE decode, and the warm-up of every served shape."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline

from model import precompile
from model.cache import inductor_cache_dir
from model.engine import FluxEngine, Job
from model.resolutions import Resolution
from model.settings import CompileSettings

log = logging.getLogger(__name__)

WARMUP_PROMPT = "a warm-up prompt that exercises the text encoders"
# Every denoising step calls the transformer with the same shapes, so one step compiles and checks the same
# graphs as four; the 57 block calls inside it already reuse each block graph. Fewer steps, shorter load().
WARMUP_STEPS = 1


@dataclass
class CompileCounters:
    """Dynamo and Inductor counters; differences between two snapshots tell what a phase compiled."""

    graphs: int
    fxgraph_misses: int
    fxgraph_hits: int
    precompiled: int = 0  # functions compiled ahead of time and saved (model.precompile)
    precompiled_loaded: int = 0

    @classmethod
    def now(cls) -> CompileCounters:
        from torch._dynamo.utils import counters

        return cls(
            graphs=int(counters["stats"]["unique_graphs"]),
            fxgraph_misses=int(counters["inductor"]["fxgraph_cache_miss"]),
            fxgraph_hits=int(counters["inductor"]["fxgraph_cache_hit"]),
            precompiled=precompile.COUNTERS["compiled"],
            precompiled_loaded=precompile.COUNTERS["loaded"],
        )

    def __sub__(self, other: CompileCounters) -> CompileCounters:
        return CompileCounters(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def compiled_new(self) -> bool:
        """Of a difference: Inductor produced a graph it did not find in its cache, or a region was precompiled."""
        return self.fxgraph_misses > 0 or self.precompiled > 0


@dataclass
class WarmupReport:
    seconds_per_shape: dict[str, float] = field(default_factory=dict)
    compiled: CompileCounters = field(default_factory=lambda: CompileCounters(0, 0, 0))
    runs_per_shape: dict[str, int] = field(default_factory=dict)

    @property
    def compiled_new(self) -> bool:
        """True when the warm-up compiled something the cache did not have: the cache is worth saving."""
        return self.compiled.compiled_new


def compile_pipeline(pipe: FluxPipeline, settings: CompileSettings, shapes: int, key: str) -> Callable[[], None]:
    """Wrap the transformer and vae.decode in torch.compile; return a function that undoes it.

    `shapes` is the number of served (resolution, text length) pairs: each is its own static graph. `key` is the
    cache fingerprint: precompiled functions are kept per fingerprint, as the archives are.
    """
    # Past Dynamo's recompile limit (8 per code object) a block would silently run eager.
    limit = max(torch._dynamo.config.recompile_limit, 2 * shapes)
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4 * limit)
    eager_decode = pipe.vae.decode

    def undo() -> None:
        # nn.Module.compile stores the compiled forward in _compiled_call_impl; clearing it restores eager.
        for module in [*pipe.transformer.modules(), pipe.vae.decoder]:
            module._compiled_call_impl = None
        pipe.vae.decode = eager_decode
        torch._dynamo.reset()

    try:
        _wrap(pipe, settings, eager_decode, key)
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


def _wrap(pipe: FluxPipeline, settings: CompileSettings, eager_decode: Callable[..., Any], key: str) -> None:
    """Route the transformer (its repeated blocks, or all of it) and the VAE decode through compiled functions."""
    if settings.precompile:
        _precompile(pipe, settings, inductor_cache_dir() / precompile.SUBDIRECTORY / key)
    else:
        options = {"mode": settings.mode, "dynamic": settings.dynamic, "fullgraph": True}
        if settings.regional:
            pipe.transformer.compile_repeated_blocks(**options)
        else:
            pipe.transformer.compile(**options)
        if settings.compile_vae:
            pipe.vae.decode = torch.compile(eager_decode, **options)
    # Both paths fill the blocks' _compiled_call_impl; precompile is always regional (model.settings
    # turns it off without regional compilation).
    if settings.regional and settings.shared_block_layout:
        _share_single_block_layout(pipe.transformer.single_transformer_blocks[0])


def _precompile(pipe: FluxPipeline, settings: CompileSettings, directory: Path) -> None:
    """Route the repeated blocks, and the VAE's decoder, through functions compiled ahead of time."""
    # `directory` is per fingerprint: a function saved for other switches (fp8, fused QKV) would run its own graph
    # unchecked, since its guards on the modules are not saved.
    transformer = pipe.transformer
    # A parameter that requires grad makes aot_compile capture a training graph, which inference mode rejects.
    transformer.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    repeated = set(transformer._repeated_blocks)
    modules = [m for m in transformer.modules() if type(m).__name__ in repeated]
    if settings.compile_vae:
        # vae.decode itself is wrapped by a diffusers decorator, which cannot be saved; its decoder module can.
        modules.append(pipe.vae.decoder)
    precompile.precompile_modules(modules, directory, settings.mode, settings.dynamic)


def _share_single_block_layout(first_single_block: torch.nn.Module) -> None:
    """Give the first single block its two inputs as slices of one tensor, as every later single block gets them.

    A single block returns its text and image states as slices of one joined tensor, but the first one receives
    two separate tensors from the last double block. Dynamo guards on strides, so each served shape would compile
    the single block twice; one extra concatenation per step before the compiled call saves that graph.
    """
    compiled_call = first_single_block._compiled_call_impl

    def call_with_shared_layout(*args: Any, **kwargs: Any) -> Any:
        text, image = kwargs.get("encoder_hidden_states"), kwargs.get("hidden_states")
        if isinstance(text, torch.Tensor) and isinstance(image, torch.Tensor):
            joined = torch.cat([text, image], dim=1)
            kwargs["encoder_hidden_states"], kwargs["hidden_states"] = joined.split([text.shape[1], image.shape[1]], 1)
        return compiled_call(*args, **kwargs)

    # The same slot nn.Module.compile fills; undo() clears it on every module.
    first_single_block._compiled_call_impl = call_with_shared_layout


def warm_up(engine: FluxEngine, runs_per_shape: int) -> WarmupReport:
    """Run every served resolution at every compiled text length, logging progress and seconds.

    A shape runs `runs_per_shape` times when its first run compiled something new, and once otherwise.
    """
    shapes = engine.shapes()
    report = WarmupReport()
    before = CompileCounters.now()
    for index, (resolution, text_length) in enumerate(shapes, start=1):
        started = time.perf_counter()
        before_shape = CompileCounters.now()
        engine.run(_warmup_job(resolution, text_length))
        runs = runs_per_shape if (CompileCounters.now() - before_shape).compiled_new else 1
        for _ in range(runs - 1):
            engine.run(_warmup_job(resolution, text_length))
        seconds = time.perf_counter() - started
        shape = f"{resolution}@{text_length}"
        report.seconds_per_shape[shape] = round(seconds, 3)
        report.runs_per_shape[shape] = runs
        log.info(
            "warm-up %s, text %d: %d of %d in %.1f s (%d run%s)",
            resolution,
            text_length,
            index,
            len(shapes),
            seconds,
            runs,
            "" if runs == 1 else "s",
        )
    report.compiled = CompileCounters.now() - before
    return report


def _warmup_job(resolution: Resolution, text_length: int) -> Job:
    return Job(
        prompt=WARMUP_PROMPT,
        prompt2=None,
        resolution=resolution,
        seed=0,
        steps=WARMUP_STEPS,
        max_tokens=text_length,
        text_length=text_length,
    )
