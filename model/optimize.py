"""What load() applies to the process and the pipeline around compilation: the optimizations that won.

Each one measured a gain on an H200 (BENCHMARKS.md), so each is the only path; the ones that did not (fused QKV,
channels-last VAE, cuDNN or flash attention, per-tensor fp8 scaling, Inductor's deterministic mode, compiled
text encoders, ...) were removed with their code, and BENCHMARKS.md keeps their figures.
"""

from __future__ import annotations

import logging

import torch
from diffusers import FluxPipeline

from model.blocks import BlockHook
from model.compat import set_cuda_allocator_settings, set_inductor_option
from model.images import OnDevicePostprocessor
from model.precision import Precision, TextEncoderPrecision

log = logging.getLogger(__name__)


def configure_process() -> None:
    """Process-wide options, set before the weights load and anything compiles."""
    # The caching allocator keeps freed blocks for reuse at their size; weights quantized as they load and the VAE's
    # large activations then leave reserved memory in pieces none of them fits (3 GiB on an L4's cap, BENCHMARKS.md).
    # Expandable segments grow and shrink in place, so what is reserved stays near what is used.
    if torch.cuda.is_available():
        set_cuda_allocator_settings("expandable_segments:True")
    # Inductor may give a register-bound reduction a half-RBLOCK candidate, timed against the first on its first run
    # in every process: torch 2.11's cache does not hand that choice back (pytorch/pytorch#189121), so replicas
    # picked by timing noise and served other bytes for one seed. Off, every replica runs the same kernels; it cost
    # nothing measurable (BENCHMARKS.md, "why replicas parted").
    set_inductor_option("dynamic_scale_rblock", False)


def optimize(pipe: FluxPipeline) -> None:
    """Apply the pipeline's optimizations in place, after the weights load and before compilation."""
    # The decode phase took 56 ms on an H200 for 34 ms of kernels, part of it the host scaling 4-byte floats to 8
    # bits; converting on the GPU gives the same bytes and cut the phase by a third (BENCHMARKS.md).
    pipe.image_processor = OnDevicePostprocessor.from_config(pipe.image_processor.config)


def block_hook(precision: Precision) -> BlockHook | None:
    """What each transformer part goes through as it reaches the GPU (see model.blocks); None in bf16."""
    return None if precision == "bf16" else _quantizer(precision)


def text_encoder_hook(precision: TextEncoderPrecision) -> BlockHook | None:
    """What the T5 encoder goes through once on the GPU, before the transformer arrives; None in bf16."""
    return None if precision == "bf16" else _quantizer(precision)


def _quantizer(precision: str) -> BlockHook:
    # Imported lazily: torchao is only needed by the quantized precisions.
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    # set_inductor_config=False: torchao's recommended settings turn on coordinate-descent tuning for the whole
    # process, which autotuned every Triton kernel on its first run and kept an fp8 load() compiling for minutes.
    if precision == "fp8":
        # Per row: one scale per token keeps an outlier token from flattening every other token's range; per
        # tensor measured no faster (BENCHMARKS.md).
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    elif precision == "int4":
        # tinygemm's layout: its kernels ship with torch's CUDA build, where the default layout needs another library.
        config = Int4WeightOnlyConfig(
            group_size=128, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )
    else:
        config = Int8WeightOnlyConfig(set_inductor_config=False)

    def quantize(part: torch.nn.Module) -> None:
        quantize_(part, config)

    return quantize
