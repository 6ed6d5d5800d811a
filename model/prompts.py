"""Prompt encoding: CLIP's pooled vector and T5's token sequence.

FLUX pads the T5 sequence to a fixed length, and that length is part of the transformer's
input shape. The compiled graphs are static, so the sequence is always padded to one of the
served text lengths, while the prompt itself is cut at the request's max_sequence_length tokens.

Both encoders are tokenized here rather than by FluxPipeline, whose CLIP path logs the truncated part of
a long prompt at WARNING: user text would reach the logs. Only token counts are logged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import FluxPipeline

log = logging.getLogger(__name__)


def t5_token_ids(pipe: FluxPipeline, text: str, max_tokens: int, padded_length: int) -> torch.Tensor:
    """Token ids truncated at `max_tokens` (end-of-sequence included), padded to `padded_length`."""
    tokenizer = pipe.tokenizer_2
    ids = tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
    _log_truncation(tokenizer, text, len(ids), "T5")
    ids = ids + [tokenizer.pad_token_id] * (padded_length - len(ids))
    return torch.tensor([ids])


def clip_token_ids(pipe: FluxPipeline, text: str) -> torch.Tensor:
    """CLIP's token ids, truncated and padded to its fixed length (77), as FluxPipeline tokenizes them."""
    tokenizer = pipe.tokenizer
    length = pipe.tokenizer_max_length
    ids = tokenizer(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    _log_truncation(tokenizer, text, length, "CLIP")
    return ids


def _log_truncation(tokenizer: Any, text: str, kept: int, encoder: str) -> None:
    """Log how many tokens a prompt lost, never the text itself: prompts are user data."""
    full_length = len(tokenizer(text, truncation=False)["input_ids"])
    if full_length > kept:
        log.info("prompt truncated from %d to %d %s tokens", full_length, kept, encoder)


@torch.inference_mode()
def encode_prompts(
    pipe: FluxPipeline, prompt: str, prompt2: str | None, max_tokens: int, padded_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (T5 sequence embeddings, CLIP pooled embeddings), as FluxPipeline expects them."""
    device = pipe.transformer.device
    clip = pipe.text_encoder
    pooled = clip(clip_token_ids(pipe, prompt).to(clip.device), output_hidden_states=False).pooler_output
    ids = t5_token_ids(pipe, prompt2 if prompt2 is not None else prompt, max_tokens, padded_length)
    sequence = pipe.text_encoder_2(ids.to(pipe.text_encoder_2.device), output_hidden_states=False)[0]
    dtype = pipe.transformer.dtype
    return sequence.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)
