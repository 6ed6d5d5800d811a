"""The transformer's precision for the GPU that load() finds: the `precision` setting's `auto` rule.

The rule is a pure function of the GPU's facts (memory, compute capability), so a CPU test can feed it every card.
Figures it rests on (BENCHMARKS.md): bf16 peaked at 33.8 GiB serving 1024x1024 on an H200, fp8 at 21.6 GiB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

Precision = Literal["bf16", "fp8", "int8"]
PrecisionSetting = Literal["auto", "bf16", "fp8", "int8"]

# The measured peak of bf16 serving (eager, the larger of eager and compiled), and the headroom a card needs
# above it: the caching allocator's fragmentation and the CUDA context are not in the peak.
BF16_PEAK_GIB = 33.8
HEADROOM_GIB = 4.0
# float8 tensor cores: Ada (8.9: L4) and Hopper (9.0: H100, H200) on; torchao's fp8 kernels need them.
FP8_COMPUTE_CAPABILITY = (8, 9)
# Below this even the weight-only int8 transformer and the bf16 encoders were never measured to fit.
SMALLEST_MEASURED_GIB = 22.0


@dataclass(frozen=True)
class GpuFacts:
    name: str
    memory_gib: float
    compute_capability: tuple[int, int]


def gpu_facts() -> GpuFacts | None:
    """The facts of the GPU this process serves on; None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return GpuFacts(properties.name, properties.total_memory / 2**30, (properties.major, properties.minor))


def choose_precision(requested: PrecisionSetting, gpu: GpuFacts | None) -> tuple[Precision, str]:
    """The precision to serve in, and why. An explicit value is kept; `auto` picks by the GPU's facts."""
    if requested != "auto":
        if requested == "bf16" and gpu is not None and gpu.memory_gib < BF16_PEAK_GIB + HEADROOM_GIB:
            log.warning(
                "precision bf16 on %s: bf16 peaked at %.1f GiB on an H200 (BENCHMARKS.md) and this card has "
                "%.1f GiB: expect an out-of-memory error, or set precision to auto",
                gpu.name,
                BF16_PEAK_GIB,
                gpu.memory_gib,
            )
        return requested, "set explicitly"
    if gpu is None:
        return "bf16", "no GPU: nothing to save (the CPU serves in float32)"
    if gpu.memory_gib >= BF16_PEAK_GIB + HEADROOM_GIB:
        return "bf16", f"{gpu.memory_gib:.1f} GiB holds bf16's {BF16_PEAK_GIB} GiB peak with room to spare"
    if gpu.compute_capability >= FP8_COMPUTE_CAPABILITY:
        return "fp8", (
            f"{gpu.memory_gib:.1f} GiB is short of bf16's {BF16_PEAK_GIB} GiB peak, and compute capability "
            f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]} has float8 tensor cores"
        )
    reason = (
        f"{gpu.memory_gib:.1f} GiB is short of bf16's {BF16_PEAK_GIB} GiB peak, and compute capability "
        f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]} has no float8 tensor cores: int8 weights"
    )
    if gpu.memory_gib < SMALLEST_MEASURED_GIB:
        log.warning("%s has %.1f GiB, less than any card this package was measured on", gpu.name, gpu.memory_gib)
    return "int8", reason
