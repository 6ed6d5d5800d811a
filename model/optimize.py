"""Named optimization switches, applied in one place before compilation.

Each switch is declared, with the reason it exists, as a field of `model.settings.Optimizations`;
BENCHMARKS.md has what each one measured on an H200, and config.yaml turns on those that paid off.
"""

from __future__ import annotations

import logging

import torch
from diffusers import FluxPipeline

from model.blocks import BlockHook
from model.compat import set_cuda_allocator_settings, set_inductor_option
from model.images import OnDevicePostprocessor
from model.settings import Optimizations

log = logging.getLogger(__name__)


def optimize(pipe: FluxPipeline, opts: Optimizations) -> None:
    """Apply every enabled switch to the loaded `pipe` in place.

    Quantized precisions are the exception: they apply while the weights load, through `block_hook` and
    `text_encoder_hook`.
    """
    if opts.fuse_qkv:
        pipe.transformer.fuse_qkv_projections()
    if opts.postprocess_on_device:
        pipe.image_processor = OnDevicePostprocessor.from_config(pipe.image_processor.config)
    if opts.attention_backend:
        pipe.transformer.set_attention_backend(opts.attention_backend)
    if opts.vae_channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
    # Set either way: the option is process-wide and a previous load() in this process may have turned it off.
    set_inductor_option("layout_optimization", not opts.vae_compiled_nchw)
    if opts.vae_inplace_silu:
        for module in pipe.vae.decoder.modules():
            if isinstance(module, torch.nn.SiLU):
                module.inplace = True
    if opts.enabled():
        log.info("optimizations: %s", ", ".join(opts.enabled()))


def configure_allocator(opts: Optimizations) -> None:
    """The allocator switches; before the weights load, since they apply to memory reserved from then on."""
    if opts.expandable_segments and torch.cuda.is_available():
        set_cuda_allocator_settings("expandable_segments:True")


def block_hook(opts: Optimizations) -> BlockHook | None:
    """What each transformer part goes through as it reaches the GPU (see model.blocks); None when nothing."""
    if opts.precision not in ("fp8", "int8"):
        return None
    return _quantizer(opts.precision, opts.fp8_scaling)


def text_encoder_hook(opts: Optimizations) -> BlockHook | None:
    """What the T5 encoder goes through once on the GPU, before the transformer arrives; None when nothing."""
    if opts.text_encoder_precision == "bf16":
        return None
    return _quantizer(opts.text_encoder_precision)


def _quantizer(precision: str, fp8_scaling: str = "row") -> BlockHook:
    # Imported lazily: torchao is only needed by the quantized precisions.
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    # set_inductor_config=False: torchao's recommended settings turn on coordinate-descent tuning for the whole
    # process, which autotuned every Triton kernel on its first run and kept an fp8 load() compiling for minutes.
    if precision == "fp8":
        granularity = PerRow() if fp8_scaling == "row" else PerTensor()
        config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)
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
