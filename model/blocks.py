"""The transformer as a sequence of parts that can reach the GPU one at a time.

Loaders that must never hold the whole bf16 transformer on the GPU (a quantized precision: 22 GiB of bf16
weights would set the peak it is meant to lower) move or create it part by part and hand each part
to a `BlockHook` as soon as it is there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

# Called with each part once its weights are on the serving device; may replace them in place.
BlockHook = Callable[[torch.nn.Module], None]


def transformer_parts(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every block of the repeated stacks, and each other top-level child whole."""
    for child in transformer.children():
        if isinstance(child, torch.nn.ModuleList):
            yield from child
        else:
            yield child
