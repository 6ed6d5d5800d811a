"""LoRA adapters for the tiny model, written as files in each key format the package accepts.

diffusers' own (PEFT) keys name the transformer's modules; kohya-style keys name the original FLUX.1 layout (fused
q, k, v), which diffusers converts. Both come from one seed, so each format's file is the same adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


def peft_state_dict(
    layers: Mapping[str, tuple[int, int]], rank: int, seed: int, only: str = "transformer_blocks"
) -> dict:
    """A rank-`rank` adapter on every layer of `layers` ({name: (in, out)}, the transformer's) whose name starts
    with `only`, in diffusers' keys."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (in_features, out_features) in sorted(layers.items()):
        if not name.startswith(only):
            continue
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.5
    return state


def kohya_state_dict(transformer: torch.nn.Module, rank: int, seed: int) -> dict:
    """A rank-`rank` adapter on each double block's image attention (fused q, k, v) and output projection, in
    kohya's keys for FLUX.1's original layout, with its alpha."""
    generator = torch.Generator().manual_seed(seed)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    state = {}
    for index in range(len(transformer.transformer_blocks)):
        for layer, out_features in (("img_attn_qkv", 3 * dim), ("img_attn_proj", dim)):
            prefix = f"lora_unet_double_blocks_{index}_{layer}"
            state[f"{prefix}.lora_down.weight"] = torch.randn(rank, dim, generator=generator)
            state[f"{prefix}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.5
            state[f"{prefix}.alpha"] = torch.tensor(float(rank) / 2)
    return state


def write(path: Path, state: dict) -> Path:
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path
