"""Ahead-of-time compiled regions, saved as files in the inductor directory, so a cache hit skips Dynamo.

A restored Inductor cache skips code generation, but Dynamo still traces every graph again on a hit, which was
most of what a hit added to load() (BENCHMARKS.md). `torch.compile(...).aot_compile`
(experimental in torch) captures a traced and compiled function that can be saved and loaded without
tracing. Each compiled region (a transformer block kind, or the VAE's decoder) gets one such
function per input signature; the files live under the inductor directory, so every cache backend archives
them. Guards beyond the signature are not checked: the engine always runs under inference mode.

A region compiled for any size (the dynamic-shape graph of model.compile) is keyed by its inputs without their
sizes, and keeps its shape guards: a size that one of its functions' guards refuses gets a function of its own.
Like Dynamo's regions, no region compiles once load() has set the `eager_on_recompile` stance: an input nothing
was compiled for then runs eagerly.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch

from model.artifacts import CompileArtifacts
from model.compat import (
    aot_compile,
    aot_compile_enabled,
    compile_stance,
    guards_accept,
    inductor_mode_options,
    keep_input_guards,
    skip_guard_check,
    specialized_floats,
)

log = logging.getLogger(__name__)

# Functions read from their files ahead of their first call (`preload`), by path; each is taken once.
_PRELOADED: dict[Path, Callable[..., Any]] = {}

# Read by model.coldstart's CompileCounters: how many functions were compiled, and loaded from files, in this process,
# and how many calls after warm-up found no function and ran eagerly.
COUNTERS = {"compiled": 0, "loaded": 0, "eager_calls": 0}


def input_signature(value: Any, sizes: bool = True) -> Hashable:
    """Everything a compiled function specializes on: tensor shape, strides, dtype, device; plain values as is.
    Without `sizes`, a tensor's rank stands for its shape and strides."""
    if isinstance(value, torch.Tensor):
        layout = (tuple(value.shape), value.stride()) if sizes else (value.dim(),)
        return ("tensor", *layout, str(value.dtype), str(value.device))
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(input_signature(v, sizes) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, input_signature(v, sizes)) for k, v in sorted(value.items())))
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot precompile for an input of type {type(value).__name__}")


class PrecompiledRegion:
    """One compiled region: `function(owner, *args, **kwargs)`, with compiled functions per input signature.

    A signature seen for the first time loads its files when there are some, and otherwise compiles and saves one.
    With `any_size` the signature leaves out sizes, and the first function whose guards accept the call runs it.
    """

    def __init__(
        self, name: str, function: Callable[..., Any], directory: Path, mode: str, any_size: bool = False
    ) -> None:
        self.name = name
        self.directory = directory
        self.function = function
        self.any_size = any_size
        inductor_options = {
            **inductor_mode_options(mode),
            # Parameters are inputs, not constants, so one function serves every block of a kind: only the call's
            # own inputs keep guards (compat.keep_input_guards), and __call__ keys them by signature.
            "guard_filter_fn": functools.partial(keep_input_guards, owner=_first_argument(function), shapes=any_size),
        }
        with aot_compile_enabled():
            self._compile = torch.compile(function, fullgraph=True, dynamic=any_size, options=inductor_options)
        self._functions: dict[Hashable, list[Callable[..., Any]]] = {}
        # Signatures that ran eagerly after warm-up, each logged once: a request calls each region dozens of times.
        self._eager_signatures: set[Hashable] = set()

    def __call__(self, owner: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        key = input_signature((args, kwargs), sizes=not self.any_size)
        functions = self._functions.get(key)
        if functions is None:
            functions = self._functions[key] = self._load(key)
        # Guards are checked here, once, and only for any size: a full signature already matched.
        accepting = (f for f in functions if not self.any_size or guards_accept(f, owner, *args, **kwargs))
        compiled = next(accepting, None)
        if compiled is None:
            # After load()'s warm-up, an input nothing was compiled for runs eagerly, as under Dynamo's stance.
            if (stance := compile_stance()) != "default":
                if stance == "fail_on_recompile":
                    raise RuntimeError(f"{self.name}: no compiled function accepts this input, and compiling is off")
                COUNTERS["eager_calls"] += 1
                if key not in self._eager_signatures:
                    self._eager_signatures.add(key)
                    log.warning("%s: no compiled function accepts this input; it runs eagerly (logged once)", self.name)
                return self.function(owner, *args, **kwargs)
            compiled = self._compile_and_save(key, len(functions), owner, args, kwargs)
            functions.append(compiled)
        return compiled(owner, *args, **kwargs)

    def _path(self, key: Hashable, index: int = 0) -> Path:
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        return self.directory / f"{self.name}-{digest}{f'-{index}' if index else ''}.bin"

    def _load(self, key: Hashable) -> list[Callable[..., Any]]:
        """The saved functions of `key`, in the order they were compiled; a damaged file ends the list there."""
        functions: list[Callable[..., Any]] = []
        while (path := self._path(key, len(functions))).is_file():
            try:
                compiled = _PRELOADED.pop(path, None) or _read(path)
            except Exception as exc:  # a damaged or incompatible file costs a compile, never a failure
                log.warning("precompiled %s unusable, compiling again: %r", path.name, exc)
                break
            skip_guard_check(compiled)  # checked in __call__ where needed
            COUNTERS["loaded"] += 1
            functions.append(compiled)
        return functions

    def _compile_and_save(
        self, key: Hashable, index: int, owner: torch.nn.Module, args: tuple, kwargs: dict
    ) -> Callable[..., Any]:
        with specialized_floats(self.any_size):
            compiled = aot_compile(self._compile, owner, args, kwargs)
        skip_guard_check(compiled)
        COUNTERS["compiled"] += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key, index)
        compiled.save_compiled_function(str(path))
        log.info("precompiled %s for a new input signature: %s", self.name, path.name)
        return compiled


def _read(path: Path) -> Callable[..., Any]:
    with path.open("rb") as file:
        return torch.compiler.load_compiled_function(file)


def preload(directory: Path) -> int:
    """Read every precompiled function in `directory` ahead of its first call; returns how many were read.

    A file that cannot be read is left for its first call, which logs why and compiles again.
    """
    count = 0
    for path in sorted(directory.glob("*.bin")):
        if path in _PRELOADED:  # read by an earlier load() of this process that failed later
            continue
        try:
            _PRELOADED[path] = _read(path)
            count += 1
        except Exception:
            continue
    return count


def _first_argument(function: Callable[..., Any]) -> str:
    return next(iter(inspect.signature(function).parameters))


def precompiled_regions(
    modules: list[torch.nn.Module], artifacts: CompileArtifacts, mode: str, any_size: bool
) -> dict[type, PrecompiledRegion]:
    """One PrecompiledRegion of the forward of each class among `modules`, shared by all its modules."""
    suffix = ".any_size" if any_size else ""
    return {
        kind: PrecompiledRegion(
            f"{kind.__name__}.forward{suffix}", kind.forward, artifacts.precompiled_dir, mode, any_size
        )
        for kind in dict.fromkeys(type(m) for m in modules)
    }
