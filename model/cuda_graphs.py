"""Capturing a static-shape piece of a request in a CUDA graph, for model.text_graphs and model.decode_graphs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Outputs = TypeVar("Outputs")

# Eager runs on a side stream before each capture: cuBLAS creates its handles and workspaces on first use, which
# a capture must not contain. Two, as PyTorch's CUDA graph notes do.
RUNS_BEFORE_CAPTURE = 2


@torch.inference_mode()
def capture(run: Callable[[], Outputs], pool: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """`run` captured in a graph that allocates from `pool`, and the tensors it returned: a replay overwrites them.

    `run` reads its inputs from tensors it closes over; copy new inputs into those before each replay.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(RUNS_BEFORE_CAPTURE):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph, outputs
