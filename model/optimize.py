"""Named optimization switches, applied in one place before compilation.

Each switch is a field of `Optimizations` with the reason it exists; BENCHMARKS.md has what
each one measured on an H200, and config.yaml turns on those that paid off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Optimizations:
    # One matmul for Q, K and V instead of three: fewer, larger GEMMs and kernel launches.
    fuse_qkv: bool = False
    # The VAE decoder is all convolutions; NHWC is the layout cuDNN's tensor-core kernels want.
    vae_channels_last: bool = False
    # diffusers' attention dispatcher backend, e.g. "_native_cudnn" (cuDNN's fused attention in SDPA)
    # or "_native_flash"; None keeps SDPA's own choice.
    attention_backend: str | None = None
    # float8 dynamic row-wise activations and weights for the transformer's linears (torchao): half the
    # weight bytes and twice the tensor-core rate on Hopper, at a small numerical cost (see BENCHMARKS.md).
    fp8: bool = False

    def enabled(self) -> list[str]:
        return [name for name, value in vars(self).items() if value]


def optimize(pipe: FluxPipeline, opts: Optimizations, device: str) -> None:
    """Apply every enabled switch to `pipe` in place, and leave it on `device`."""
    if opts.fuse_qkv:
        pipe.transformer.fuse_qkv_projections()
    if opts.attention_backend:
        pipe.transformer.set_attention_backend(opts.attention_backend)
    if opts.fp8:
        _quantize_fp8_onto(pipe.transformer, device)
    pipe.to(device)
    if opts.vae_channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
    if opts.enabled():
        log.info("optimizations: %s", ", ".join(opts.enabled()))


def _quantize_fp8_onto(transformer: torch.nn.Module, device: str) -> None:
    """Move the transformer to `device` one block at a time, quantizing each on arrival.

    The bf16 transformer alone is 22 GiB: moved whole it would set the peak memory, which fp8 is
    meant to bring under 22 GiB for a 24 GB GPU.
    """
    # Imported lazily: torchao is only needed by the fp8 opt-in.
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    for child in transformer.children():
        for part in child if isinstance(child, torch.nn.ModuleList) else [child]:
            part.to(device)
            quantize_(part, config)
    transformer.to(device)
