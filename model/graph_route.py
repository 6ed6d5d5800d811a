"""Which compiled function a region's call runs: its size's static graph, or the one dynamic-shape graph.

The engine knows the request's size and whether it was compiled statically (`dynamic_graph`); each compiled region
reads that here while it runs, so one pipeline serves both without a request ever choosing a graph by accident.
A context variable, so concurrent threads each see their own request's route.

A route is the module's own `forward`, set on the instance: nn.Module's call then runs every hook the module has,
before and after the compiled function, exactly as it does around the eager forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

_ON_DYNAMIC_GRAPH: ContextVar[bool] = ContextVar("on_dynamic_graph", default=False)


@contextmanager
def dynamic_graph(on: bool) -> Iterator[None]:
    """Inside the block, compiled regions run their dynamic-shape graph when `on`, their static one otherwise."""
    token = _ON_DYNAMIC_GRAPH.set(on)
    try:
        yield
    finally:
        _ON_DYNAMIC_GRAPH.reset(token)


def on_dynamic_graph() -> bool:
    return _ON_DYNAMIC_GRAPH.get()


def route(
    module: torch.nn.Module,
    static: Callable[..., Any],
    dynamic: Callable[..., Any],
    shared_layout: bool = False,
) -> None:
    """Make `module`'s forward call `static(module, ...)`, or `dynamic(module, ...)` on the dynamic route.

    With `shared_layout` (the first single block) the two inputs become slices of one tensor first, as every later
    single block receives them: a single block returns its text and image states as slices of one joined tensor,
    but the first one gets two separate tensors from the last double block. Dynamo guards on strides, so each
    served shape would otherwise compile the single block twice; one concatenation per step saves that graph.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        if shared_layout:
            text, image = kwargs.get("encoder_hidden_states"), kwargs.get("hidden_states")
            if isinstance(text, torch.Tensor) and isinstance(image, torch.Tensor):
                joined = torch.cat([text, image], dim=1)
                kwargs["encoder_hidden_states"], kwargs["hidden_states"] = joined.split(
                    [text.shape[1], image.shape[1]], 1
                )
        function = dynamic if on_dynamic_graph() else static
        return function(module, *args, **kwargs)

    module.forward = forward


def unroute(module: torch.nn.Module) -> None:
    """The module's class forward again: eager."""
    module.__dict__.pop("forward", None)


def routed(module: torch.nn.Module) -> bool:
    return "forward" in module.__dict__
