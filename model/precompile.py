"""Ahead-of-time compiled regions, saved as files in the inductor directory, so a cache hit skips Dynamo.

A restored Inductor cache skips code generation, but Dynamo still traces every graph again on a hit, which was
most of what a hit added to load() (BENCHMARKS.md). `torch.compile(...).aot_compile`
(experimental in torch) captures a traced and compiled function that can be saved and loaded without
tracing. Each compiled region (a transformer block kind, or the VAE's decoder) gets one such
function per input signature; the files live under the inductor directory, so every cache backend archives
them. Guards beyond the signature are not checked: the engine always runs under inference mode.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch

from model.artifacts import CompileArtifacts
from model.compat import aot_compile_enabled, inductor_mode_options, set_compiled_call

log = logging.getLogger(__name__)

# Read by model.coldstart's CompileCounters: how many functions were compiled, and loaded from files, in this process.
COUNTERS = {"compiled": 0, "loaded": 0}


def input_signature(value: Any) -> Hashable:
    """Everything a compiled function specializes on: tensor shape, strides, dtype, device; plain values as is."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), str(value.dtype), str(value.device))
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(input_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, input_signature(v)) for k, v in sorted(value.items())))
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot precompile for an input of type {type(value).__name__}")


class PrecompiledRegion:
    """One compiled region: `function(owner, *args, **kwargs)`, with a compiled function per input signature.

    A signature seen for the first time loads its file when there is one, and otherwise compiles and saves it.
    """

    def __init__(self, name: str, function: Callable[..., Any], directory: Path, mode: str, dynamic: bool) -> None:
        self.name = name
        self.directory = directory
        inductor_options = {
            **inductor_mode_options(mode),
            # Parameters are inputs, not constants, so one function serves every block of a kind. The signature
            # checked in __call__ covers the tensor guards; the others (module identity) cannot be saved.
            "guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe,
        }
        with aot_compile_enabled():
            self._compile = torch.compile(function, fullgraph=True, dynamic=dynamic, options=inductor_options)
        self._functions: dict[Hashable, Callable[..., Any]] = {}

    def __call__(self, owner: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        key = input_signature((args, kwargs))
        compiled = self._functions.get(key)
        if compiled is None:
            compiled = self._functions[key] = self._load_or_compile(key, owner, args, kwargs)
        return compiled(owner, *args, **kwargs)

    def _path(self, key: Hashable) -> Path:
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        return self.directory / f"{self.name}-{digest}.bin"

    def _load_or_compile(self, key: Hashable, owner: torch.nn.Module, args: tuple, kwargs: dict) -> Callable[..., Any]:
        path = self._path(key)
        if path.is_file():
            try:
                with path.open("rb") as file:
                    compiled = torch.compiler.load_compiled_function(file)
            except Exception as exc:  # a damaged or incompatible file costs a compile, never a failure
                log.warning("precompiled %s unusable, compiling again: %r", path.name, exc)
            else:
                compiled.disable_guard_check()  # the signature above already matched
                COUNTERS["loaded"] += 1
                return compiled
        compiled = self._compile.aot_compile(((owner, *args), kwargs))
        compiled.disable_guard_check()
        COUNTERS["compiled"] += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        compiled.save_compiled_function(str(path))
        log.info("precompiled %s for a new input signature: %s", self.name, path.name)
        return compiled


def precompile_modules(modules: list[torch.nn.Module], artifacts: CompileArtifacts, mode: str, dynamic: bool) -> None:
    """Route calls of `modules` through one PrecompiledRegion of their forward per class, as nn.Module.compile does."""
    regions: dict[type, PrecompiledRegion] = {}
    for module in modules:
        kind = type(module)
        if kind not in regions:
            regions[kind] = PrecompiledRegion(
                f"{kind.__name__}.forward", kind.forward, artifacts.precompiled_dir, mode, dynamic
            )
        set_compiled_call(module, _bound(regions[kind], module))


def _bound(region: PrecompiledRegion, owner: torch.nn.Module) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return region(owner, *args, **kwargs)

    return call
