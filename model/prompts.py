"""Prompt encoding: CLIP's pooled vector and T5's token sequence.

FLUX pads the T5 sequence to a fixed length, and that length is part of the transformer's
input shape. The compiled graphs are static, so the sequence is always padded to one of the
served text lengths, while the prompt itself is cut at the request's max_sequence_length tokens.

Both encoders are tokenized here rather than by FluxPipeline, whose CLIP path logs the truncated part of
a long prompt at WARNING: user text would reach the logs. Only token counts are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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


# The text encoders' work on the device, from token ids to the embeddings the transformer reads: what
# model.text_graphs captures in a CUDA graph per text length.
TextEncoders = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def token_ids(
    pipe: FluxPipeline, prompt: str, prompt2: str | None, max_tokens: int, padded_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP's ids, T5's ids) of a request, on the host: CLIP reads `prompt`, T5 `prompt2` when given."""
    t5_text = prompt2 if prompt2 is not None else prompt
    return clip_token_ids(pipe, prompt), t5_token_ids(pipe, t5_text, max_tokens, padded_length)


def eager_text_encoders(pipe: FluxPipeline) -> TextEncoders:
    """The encoders as the pipeline holds them: (CLIP ids, T5 ids) -> (T5 sequence, CLIP pooled) on the
    transformer's device and in its dtype, as FluxPipeline expects them."""

    def run(clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clip, t5 = pipe.text_encoder, pipe.text_encoder_2
        pooled = clip(clip_ids.to(clip.device), output_hidden_states=False).pooler_output
        sequence = t5(t5_ids.to(t5.device), output_hidden_states=False)[0]
        device, dtype = pipe.transformer.device, pipe.transformer.dtype
        return sequence.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)

    return run


@torch.inference_mode()
def encode_prompts(
    pipe: FluxPipeline,
    prompt: str,
    prompt2: str | None,
    max_tokens: int,
    padded_length: int,
    encoders: TextEncoders | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (T5 sequence embeddings, CLIP pooled embeddings), through `encoders` (the eager ones when None)."""
    run = encoders if encoders is not None else eager_text_encoders(pipe)
    return run(*token_ids(pipe, prompt, prompt2, max_tokens, padded_length))
