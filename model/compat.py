"""Every private internal of torch, diffusers and b10-transfer that this package reaches, in one place.

Each function names one internal and says why the package needs it. tests/test_compat.py exercises all of
them against the pinned versions, so an upgrade that moves one fails there, by name, and nowhere else.
Imports are lazy: importing this module costs nothing until a function is called.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline


def inductor_cache_dir() -> Path:
    """Inductor's cache directory (TORCHINDUCTOR_CACHE_DIR, else its per-user default): what the cache archives.

    torch has no public getter, and the default depends on the user name. Its own module, which imports nothing of
    Inductor, is read from its file: importing it by name imports all of Inductor first (1.2 s on an H200's host),
    and the restore, which starts after the cache key, needs only this directory.
    """
    import importlib.util
    import sys

    import torch

    module = sys.modules.get("torch._inductor.runtime.cache_dir_utils")
    if module is None:
        path = Path(torch.__file__).parent / "_inductor" / "runtime" / "cache_dir_utils.py"
        spec = importlib.util.spec_from_file_location("inductor_cache_dir_utils", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot read {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return Path(module.cache_dir())


def triton_kernels_bundled() -> bool:
    """Whether Inductor's compiled entries carry their own Triton kernels, which makes its kernel directory a copy."""
    from torch._inductor.triton_bundler import TritonBundler

    return TritonBundler.is_enabled()


def compile_counts() -> dict[str, int]:
    """Dynamo's unique graphs and Inductor's FX-graph cache misses and hits so far in this process.

    Differences between two readings say what a phase compiled; torch exposes these counters nowhere else.
    """
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "fxgraph_misses": int(counters["inductor"]["fxgraph_cache_miss"]),
        "fxgraph_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
    }


def allow_recompiles(per_code_object: int) -> None:
    """Raise Dynamo's recompile limits to at least `per_code_object` (four times that overall).

    Past the limit (8 per code object by default) a compiled block silently falls back to eager.
    """
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, per_code_object)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * config.recompile_limit)


def repeated_block_names(transformer: torch.nn.Module) -> set[str]:
    """The class names of a diffusers model's repeated blocks: what compile_repeated_blocks() compiles."""
    return set(transformer._repeated_blocks)


def set_cuda_allocator_settings(settings: str) -> None:
    """Change the CUDA caching allocator's settings from inside the process (PYTORCH_CUDA_ALLOC_CONF's syntax).

    The environment variable is read once, when CUDA starts; load() decides after the GPU's facts are read.
    torch's only setter is private, and moved: torch.cuda.memory's (torch 2.11, which serves) warns from 2.13 on,
    which has the accelerator-wide one. It applies to memory reserved from then on.
    """
    import torch

    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter(settings)


def unpack_latents(pipe: FluxPipeline, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FluxPipeline's packed 2x2 latent patches back to the VAE's layout; the pipeline only does it inside __call__."""
    return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)


def inductor_mode_options(mode: str) -> dict[str, Any]:
    """The Inductor options a torch.compile mode stands for, to pass with others where a mode cannot be."""
    import torch._inductor

    return torch._inductor.list_mode_options(mode)


@contextmanager
def aot_compile_enabled() -> Iterator[None]:
    """Let torch.compile attach .aot_compile: torch 2.11 only does so while this Dynamo flag is on."""
    import torch._dynamo

    with torch._dynamo.config.patch(enable_aot_compile=True):
        yield


def aot_compile(compile_wrapper: Callable[..., Any], owner: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Trace and compile `function(owner, *args, **kwargs)` ahead of time into a function that can be saved.

    `.aot_compile` on torch.compile's wrapper is experimental in torch 2.11 (and only attached under
    `aot_compile_enabled`); it is the one way to save a compiled function that a later process loads without Dynamo.
    """
    return compile_wrapper.aot_compile(((owner, *args), kwargs))


def skip_guard_check(compiled: Any) -> None:
    """Stop a precompiled function checking its guards on every call: its caller keys calls by input signature, and a
    region's 57 blocks call it hundreds of times a request. Experimental: `disable_guard_check` of aot_compile's
    result."""
    compiled.disable_guard_check()


def guards_accept(compiled: Any, *args: Any, **kwargs: Any) -> bool:
    """Whether a precompiled function's saved guards accept these inputs: what a function compiled for any size
    checks, once per call, to find the function whose size range fits. Experimental: `guard_check`."""
    return bool(compiled.guard_check(*args, **kwargs))


def keep_input_guards(entries: list[Any], owner: str, shapes: bool) -> list[bool]:
    """The guards a precompiled function keeps: tensor guards on the call's inputs, none on what the module `owner`
    (the function's first argument) holds, and with `shapes` the relations between symbolic sizes (guard type
    "SHAPE_ENV", a name torch does not export), which say which sizes a function compiled for any size is valid for.

    The module's tensors go: one function serves every block of a kind, whose weights are inputs, not constants.
    Keeping a guard on any of them puts the module in the saved guard state, and saving pickles what the module
    holds: torchao's quantized weights (no `empty_like` for their meta copies), the `extra_repr` partial torchao
    attaches, and the routed forward with its compiled functions. A guard's name is Dynamo's source name, which
    starts with the argument it is rooted at (`x`, `owner._modules[...]`, or `L['x']` in older releases); torch has
    no public way to ask for that argument."""
    return [
        (entry.guard_type == "TENSOR_MATCH" and _guarded_argument(entry.name) != owner)
        or (shapes and entry.guard_type == "SHAPE_ENV")
        for entry in entries
    ]


def _guarded_argument(name: str) -> str | None:
    match = re.match(r"L\['(\w+)'\]|(\w+)", name)
    return match and (match[1] or match[2])


def b10fs_enabled_by_b10_transfer() -> bool:
    """b10-transfer's own reading of BASETEN_FS_ENABLED: True, False, or an exception for a value it refuses.

    Its only exact definition; raises ImportError when b10-transfer is not installed.
    """
    from b10_transfer.utils import _is_b10fs_enabled

    return _is_b10fs_enabled()


def compile_stance() -> str:
    """torch.compile's current stance: "default" lets a graph compile, and load() sets "eager_on_recompile" once its
    warm-up is done; regions compiled ahead of time follow it too (model.precompile). torch has no public getter."""
    from torch._dynamo.eval_frame import _stance

    return _stance.stance


@contextmanager
def specialized_floats(on: bool = True) -> Iterator[None]:
    """Trace Python floats as constants, as torch did before 2.6. With symbolic sizes, a float computed from a size
    otherwise becomes a tensor through an analysis that restarts the trace, and aot_compile cannot restart one."""
    import torch._dynamo

    with torch._dynamo.config.patch(specialize_float=True) if on else nullcontext():
        yield


def set_inductor_option(name: str, value: Any) -> Any:
    """Set one of Inductor's process-wide options (`torch._inductor.config`), returning its previous value.

    Used for `dynamic_scale_rblock` (whether a reduction may gain a half-RBLOCK candidate when it loads), which is
    read when a graph compiles and is part of Inductor's own cache key.
    """
    import torch._inductor.config

    previous = getattr(torch._inductor.config, name)
    setattr(torch._inductor.config, name, value)
    return previous
