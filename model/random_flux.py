"""Flux architectures built offline from configs, with deterministic random weights.

`tiny` is the embedded model that lets the server, the tests and CI run on a CPU with no download.
`full` is the real FLUX.1-schnell architecture (11.9 B transformer parameters): random bf16
weights do the same arithmetic as the real ones, so the GPU benchmarks use it.
Both go through the same FluxPipeline code path as real weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from model.blocks import BlockHook, transformer_parts

# The real VAE downsamples by 8 (four blocks), so the tiny one serves the same resolutions.
_VAE_BLOCKS = 4


@dataclass(frozen=True)
class FluxSpec:
    """Sizes of every component; the rest of each config is FLUX.1-schnell's."""

    name: str
    layers: int
    single_layers: int
    heads: int
    head_dim: int
    rope_axes: tuple[int, int, int]
    text_dim: int  # T5 d_model == the transformer's joint_attention_dim
    t5_layers: int
    t5_heads: int
    t5_ff: int
    t5_vocab: int
    clip_dim: int  # CLIP hidden size == the transformer's pooled_projection_dim
    clip_layers: int
    clip_heads: int
    latent_channels: int
    vae_channels: int
    vae_groups: int
    vae_mid_attention: bool
    # Random init can give huge activations; scaling matrices keeps bf16 finite without changing the cost.
    weight_scale: float = 1.0


SPECS: dict[str, FluxSpec] = {
    "tiny": FluxSpec(
        name="tiny",
        layers=1,
        # Two single blocks, so that a single block's output feeds another, as in the real model.
        single_layers=2,
        heads=2,
        head_dim=16,
        rope_axes=(4, 6, 6),
        text_dim=32,
        t5_layers=1,
        t5_heads=2,
        t5_ff=37,
        t5_vocab=0,
        clip_dim=32,
        clip_layers=1,
        clip_heads=2,
        latent_channels=4,
        vae_channels=8,
        vae_groups=4,
        # Attention over 128x128 latents would dominate a CPU run; the real VAE keeps it.
        vae_mid_attention=False,
    ),
    "full": FluxSpec(
        name="full",
        layers=19,
        single_layers=38,
        heads=24,
        head_dim=128,
        rope_axes=(16, 56, 56),
        text_dim=4096,
        t5_layers=24,
        t5_heads=64,
        t5_ff=10240,
        t5_vocab=32128,
        clip_dim=768,
        clip_layers=12,
        clip_heads=12,
        latent_channels=16,
        vae_channels=0,
        vae_groups=32,
        vae_mid_attention=True,
        weight_scale=0.5,
    ),
}

_CLIP_MAX_LENGTH = 77


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with no merges: one token per byte, no files needed."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5TokenizerFast:
    """A character-level unigram tokenizer with T5's special tokens."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(code), -1.0) for code in range(33, 127)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _vae_channels(spec: FluxSpec) -> list[int]:
    if spec.vae_channels:
        return [spec.vae_channels] * _VAE_BLOCKS
    return [128, 256, 512, 512]


@contextmanager
def _born(device: torch.device, dtype: torch.dtype, seed: int) -> Iterator[None]:
    """Modules created inside get weights of `dtype` on `device` from `seed`; the caller's RNG is untouched."""
    previous_dtype = torch.get_default_dtype()
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), device:
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_dtype)


def _scale_matrices(module: torch.nn.Module, scale: float) -> None:
    if scale != 1.0:
        with torch.no_grad():
            for param in module.parameters():
                if param.dim() >= 2:
                    param.mul_(scale)


def _random_transformer(
    spec: FluxSpec, device: torch.device, dtype: torch.dtype, seed: int, on_block: BlockHook | None
) -> FluxTransformer2DModel:
    """Built on the meta device, then given weights one part at a time, each part from its own seed."""
    with _born(torch.device("meta"), dtype, seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=spec.latent_channels * 4,
            num_layers=spec.layers,
            num_single_layers=spec.single_layers,
            attention_head_dim=spec.head_dim,
            num_attention_heads=spec.heads,
            joint_attention_dim=spec.text_dim,
            pooled_projection_dim=spec.clip_dim,
            guidance_embeds=False,
            axes_dims_rope=spec.rope_axes,
        )
    for index, part in enumerate(transformer_parts(transformer), start=1):
        part.to_empty(device=device)
        with _born(device, dtype, seed + index), torch.no_grad():
            for module in part.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        _scale_matrices(part, spec.weight_scale)
        if on_block is not None:
            on_block(part)
    return transformer


def build_random_pipeline(
    spec_name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    on_block: BlockHook | None = None,
    on_text_encoder: BlockHook | None = None,
) -> FluxPipeline:
    """Build a FluxPipeline of the named spec directly on `device`; the same seed gives the same weights.

    The T5 encoder goes through `on_text_encoder` before any transformer part exists, and each transformer
    part goes through `on_block` before the next one exists, so hooks that quantize never have the whole bf16
    model on the device. The weights do not depend on them.
    """
    try:
        spec = SPECS[spec_name]
    except KeyError:
        raise ValueError(f"unknown architecture {spec_name!r}; known: {', '.join(SPECS)}") from None
    device = torch.device(device)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    with _born(device, dtype, seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=spec.latent_channels,
            block_out_channels=_vae_channels(spec),
            layers_per_block=2 if spec.name == "full" else 1,
            down_block_types=["DownEncoderBlock2D"] * _VAE_BLOCKS,
            up_block_types=["UpDecoderBlock2D"] * _VAE_BLOCKS,
            norm_num_groups=spec.vae_groups,
            mid_block_add_attention=spec.vae_mid_attention,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=spec.clip_dim,
                intermediate_size=spec.clip_dim * 4,
                num_attention_heads=spec.clip_heads,
                num_hidden_layers=spec.clip_layers,
                projection_dim=spec.clip_dim,
                vocab_size=len(tokenizer),
                max_position_embeddings=_CLIP_MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                hidden_act="quick_gelu",
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=spec.t5_vocab or len(tokenizer_2),
                d_model=spec.text_dim,
                d_kv=spec.text_dim // spec.t5_heads,
                d_ff=spec.t5_ff,
                num_layers=spec.t5_layers,
                num_heads=spec.t5_heads,
                feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32,
            )
        )
    for module in (vae, clip, t5):
        _scale_matrices(module, spec.weight_scale)
    if on_text_encoder is not None:
        on_text_encoder(t5)
    transformer = _random_transformer(spec, device, dtype, seed, on_block)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        text_encoder=clip.eval(),
        tokenizer=tokenizer,
        text_encoder_2=t5.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
        vae=vae.eval(),
    )
