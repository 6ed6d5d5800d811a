"""The transformer's and T5's precisions for the GPU that load() finds: the `auto` rules of `precision` and
`text_encoder_precision`.

Each rule is a pure function of the GPU's facts (memory, compute capability), so a CPU test can feed it every card.
Figures it rests on (BENCHMARKS.md): bf16 peaked at 33.8 GiB serving 1024x1024 on an H200, fp8 at 21.6 GiB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from model.resolutions import DEFAULT_BOUNDS

log = logging.getLogger(__name__)

Precision = Literal["bf16", "fp8", "int8"]
PrecisionSetting = Literal["auto", "bf16", "fp8", "int8"]
TextEncoderPrecision = Literal["bf16", "int8", "int4"]
TextEncoderPrecisionSetting = Literal["auto", "bf16", "int8", "int4"]

# The measured peak of bf16 serving (eager, the larger of eager and compiled), and the headroom a card needs
# above it: the caching allocator's fragmentation and the CUDA context are not in the peak.
BF16_PEAK_GIB = 33.8
HEADROOM_GIB = 4.0
# float8 tensor cores: Ada (8.9: L4) and Hopper (9.0: H100, H200) on; torchao's fp8 kernels need them.
FP8_COMPUTE_CAPABILITY = (8, 9)
# The largest area `max_megapixels: auto` serves where bf16 does not fit (the 24 GB cards). In the L4's profile (fp8,
# T5 int4, 22 GiB cap) the 2-megapixel decode reserved 18.44 GiB compiled, over the 18 GiB its headroom leaves, and
# eager peaked 1.4 GiB above compiled at 1 megapixel (BENCHMARKS.md). Every aspect ratio is within it.
SMALL_CARD_MEGAPIXELS = 1.2
# Below this even the weight-only int8 transformer beside an int4 T5 was never measured to fit.
SMALLEST_MEASURED_GIB = 22.0


@dataclass(frozen=True)
class GpuFacts:
    name: str
    memory_gib: float
    compute_capability: tuple[int, int]


# What torch.cuda.get_device_properties reports on each card Baseten offers, by its `resources.accelerator` name.
CARDS: dict[str, GpuFacts] = {
    "L4": GpuFacts("NVIDIA L4", 22.0, (8, 9)),
    "A10G": GpuFacts("NVIDIA A10G", 22.0, (8, 6)),
    "H100_40GB": GpuFacts("NVIDIA H100 MIG 3g.40gb", 39.5, (9, 0)),
    "H100": GpuFacts("NVIDIA H100 80GB HBM3", 79.1, (9, 0)),
    "H200": GpuFacts("NVIDIA H200", 139.8, (9, 0)),
    "B200": GpuFacts("NVIDIA B200", 178.4, (10, 0)),
}


def gpu_facts() -> GpuFacts | None:
    """The facts of the GPU this process serves on; None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return GpuFacts(properties.name, properties.total_memory / 2**30, (properties.major, properties.minor))


def holds_bf16(gpu: GpuFacts) -> bool:
    """Whether the card holds bf16's measured peak, T5's bf16 weights included, with the headroom to spare."""
    return gpu.memory_gib >= BF16_PEAK_GIB + HEADROOM_GIB


def choose_precision(requested: PrecisionSetting, gpu: GpuFacts | None) -> tuple[Precision, str]:
    """The precision to serve in, and why. An explicit value is kept; `auto` picks by the GPU's facts."""
    if requested != "auto":
        if requested == "bf16" and gpu is not None and not holds_bf16(gpu):
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
    if holds_bf16(gpu):
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


def choose_max_megapixels(requested: float | Literal["auto"], gpu: GpuFacts | None) -> tuple[float, str]:
    """The largest width x height served, in megapixels, and why. An explicit value is kept."""
    if requested != "auto":
        return requested, "set explicitly"
    if gpu is None or holds_bf16(gpu):
        return DEFAULT_BOUNDS.max_megapixels, "the largest the package serves"
    return SMALL_CARD_MEGAPIXELS, (
        f"{gpu.memory_gib:.1f} GiB: the 2-megapixel decode leaves a quantized model less headroom than it needs"
    )


def compiles_at(precision: Precision) -> tuple[bool, str]:
    """Whether load() compiles the model at `precision`, and why not."""
    if precision == "int8":
        # Measured on an H200 (BENCHMARKS.md): 158 s and 136 s for the first two shapes against about 20 s in bf16.
        return False, "Inductor compiles int8's weight-only matmuls for over two minutes per served shape"
    return True, ""


def choose_text_encoder_precision(
    requested: TextEncoderPrecisionSetting, transformer: Precision, gpu: GpuFacts | None
) -> tuple[TextEncoderPrecision, str]:
    """T5's precision, and why: `auto` quantizes its weights only where the card has no room for them in bf16.

    T5's 9.5 GB of bf16 weights are the largest part left once the transformer is in fp8 or int8, and a card
    that needs a quantized transformer has no room for them. A card that holds bf16's whole peak, T5 included,
    keeps them in bf16 even beside a quantized transformer: int4's kernels took 93 ms of a request's GPU time on
    an H200 against 11 ms in bf16 (BENCHMARKS.md). int4 (tinygemm's CUDA kernels) rather than int8: with int8
    weights an eager request still peaked at 18.4 GiB on an L4's cap, over the 18 GiB the profile allows
    (BENCHMARKS.md). Without a GPU, int8.
    """
    if requested != "auto":
        return requested, "set explicitly"
    if transformer == "bf16":
        return "bf16", "the transformer is bf16: the card has room for T5's bf16 weights"
    if gpu is None:
        return "int8", f"the transformer is {transformer} and int4's kernels need a GPU: int8 weights, 4.8 GB"
    if holds_bf16(gpu):
        return "bf16", f"{gpu.memory_gib:.1f} GiB holds bf16's {BF16_PEAK_GIB} GiB peak, T5's bf16 weights included"
    return "int4", f"the transformer is {transformer}: T5's weights in int4 take 2.4 GB instead of 9.5 GB"
