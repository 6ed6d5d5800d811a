"""Which compiled graph a request runs on: its size's own static graph, or the one dynamic-shape graph.

The engine knows the request's size and whether it was compiled statically; the compiled regions (model.compile)
read that here while they run, so one pipeline serves both without a request ever choosing a graph by accident.
A context variable, so concurrent threads each see their own request's route.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

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
