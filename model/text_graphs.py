"""The text encoders replayed from CUDA graphs: one graph per compiled text length.

T5 and CLIP run a few milliseconds of arithmetic through hundreds of small kernels, so their phase is bound by
the host launching them (BENCHMARKS.md, "where a request's time without kernels goes"). Their shapes are static:
CLIP always reads 77 tokens and T5 one of the compiled text lengths. So each length is captured once, after the
warm-up, and a request copies its token ids into the graph's input and replays every kernel with one launch.
Replays run the kernels captured from the same modules, so they give the eager encoders' bytes.

A capture that fails (no CUDA, or an encoder that synchronizes with the host) leaves the eager encoders in place
and says why in the log: a deployment never fails for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline

from model.prompts import TextEncoders, clip_token_ids, eager_text_encoders, t5_token_ids

log = logging.getLogger(__name__)

# Eager runs on a side stream before each capture: cuBLAS creates its handles and workspaces on first use, which
# a capture must not contain. Two, as PyTorch's CUDA graph notes do.
RUNS_BEFORE_CAPTURE = 2


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    clip_ids: torch.Tensor  # the graph's inputs: a request's ids are copied in before a replay
    t5_ids: torch.Tensor
    sequence: torch.Tensor  # the graph's outputs, overwritten by the next replay
    pooled: torch.Tensor


class CapturedTextEncoders:
    """Replays the captured graph of a request's text length; lengths never captured run eagerly."""

    def __init__(self, pipe: FluxPipeline, text_lengths: Iterable[int]) -> None:
        self._eager = eager_text_encoders(pipe)
        self._graphs: dict[int, _Captured] = {}
        device = pipe.transformer.device
        # The graphs never run at once (the engine runs one request at a time and copies the outputs out), so one
        # memory pool serves them all.
        pool = torch.cuda.graph_pool_handle()
        clip_ids = clip_token_ids(pipe, "")
        for length in sorted(set(text_lengths)):
            t5_ids = t5_token_ids(pipe, "", length, length)
            self._graphs[length] = self._capture(clip_ids.to(device), t5_ids.to(device), pool)

    @property
    def text_lengths(self) -> tuple[int, ...]:
        return tuple(self._graphs)

    @torch.inference_mode()
    def _capture(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor, pool: tuple[int, int]) -> _Captured:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(RUNS_BEFORE_CAPTURE):
                self._eager(clip_ids, t5_ids)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            sequence, pooled = self._eager(clip_ids, t5_ids)
        return _Captured(graph, clip_ids, t5_ids, sequence, pooled)

    def __call__(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured = self._graphs.get(t5_ids.shape[-1])
        if captured is None:
            return self._eager(clip_ids, t5_ids)
        captured.clip_ids.copy_(clip_ids)
        captured.t5_ids.copy_(t5_ids)
        captured.graph.replay()
        # The prompt cache keeps what this returns, and the next replay overwrites the graph's outputs.
        return captured.sequence.clone(), captured.pooled.clone()


def capture_text_encoders(pipe: FluxPipeline, text_lengths: Iterable[int]) -> TextEncoders:
    """The encoders replayed from CUDA graphs, one per text length; the eager ones when capturing fails."""
    if not torch.cuda.is_available() or pipe.transformer.device.type != "cuda":
        log.info("text encoder CUDA graphs need a CUDA GPU: the text encoders run eagerly")
        return eager_text_encoders(pipe)
    started = time.perf_counter()
    try:
        captured = CapturedTextEncoders(pipe, text_lengths)
    except Exception as exc:
        log.warning("text encoder CUDA graphs could not be captured, the text encoders run eagerly: %r", exc)
        return eager_text_encoders(pipe)
    log.info(
        "text encoders captured in CUDA graphs for text lengths %s in %.2f s",
        ", ".join(map(str, captured.text_lengths)),
        time.perf_counter() - started,
    )
    return captured
