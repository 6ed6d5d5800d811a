"""Phase timing attached to an engine from outside, as flux-fast's `annotate` attaches profiling.

The engine runs a request in named phases (FluxEngine.encode_text, denoise, decode, respond; denoise and decode
once per image). `timed_phases` wraps those methods on one engine instance for the duration of a `with` block,
synchronizing the GPU at each phase's end so the seconds are the GPU's too, and records one dict per request.
Nothing in the engine knows: a benchmark times its own engine, one request at a time, so no request can write
another's figures.
With `memory=True` each phase also reports the most GPU memory allocated while it ran (`<phase>_peak_gib`); that
resets the process's peak statistics, so read the peaks of a whole run before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from model.engine import FluxEngine

# Engine method -> the phase name it reports under.
PHASES = {"encode_text": "text_s", "denoise": "denoise_s", "decode": "decode_s", "respond": "jpeg_s"}


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _reset_peak() -> None:
    import torch

    torch.cuda.reset_peak_memory_stats()


@contextmanager
def timed_phases(engine: FluxEngine, memory: bool = False) -> Iterator[list[dict[str, float]]]:
    """Yield a list that gains one {phase: seconds} dict per request the engine completes inside the block."""
    import torch

    memory = memory and torch.cuda.is_available()
    requests: list[dict[str, float]] = []
    current: dict[str, float] = {}

    def timed(method_name: str, phase: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _synchronize()
            if memory:
                _reset_peak()
            started = time.perf_counter()
            result = method(*args, **kwargs)
            _synchronize()
            # A request for several images denoises and decodes once per image: its figures are the sum and the peak.
            current[phase] = current.get(phase, 0.0) + time.perf_counter() - started
            if memory:
                peak = phase.removesuffix("_s") + "_peak_gib"
                current[peak] = max(current.get(peak, 0.0), _peak_gib())
            if method_name == "respond":  # the last phase of a request
                requests.append(dict(current))
                current.clear()
            return result

        return wrapper

    with _wrapped_phases(engine, timed):
        yield requests


@contextmanager
def annotated_phases(engine: FluxEngine) -> Iterator[None]:
    """Name each phase in torch.profiler's trace (flux-fast's `annotate`): each phase runs inside a
    `record_function` range called by its PHASES name."""
    import torch

    def annotated(_method_name: str, phase: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(phase):
                return method(*args, **kwargs)

        return wrapper

    with _wrapped_phases(engine, annotated):
        yield


@contextmanager
def _wrapped_phases(
    engine: FluxEngine, wrap: Callable[[str, str, Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Route each phase method of this engine instance through `wrap(method name, phase, method)` inside the block."""
    originals = {name: getattr(engine, name) for name in PHASES}
    for name, phase in PHASES.items():
        setattr(engine, name, wrap(name, phase, originals[name]))
    try:
        yield
    finally:
        for name in PHASES:
            delattr(engine, name)  # the instance attributes go; the class's methods show through again
