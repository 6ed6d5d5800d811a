"""The VAE decode replayed from CUDA graphs: one graph per static size, from packed latents to 8-bit pixels.

The decode phase held milliseconds with no kernel running (BENCHMARKS.md). A static size's decode always has the
same shapes, so it is captured once after the warm-up, and a request copies its latents into the graph's input
and replays the decoder and the 8-bit conversion with one launch; only the copy to the host and PIL follow.
Replays run the kernels captured from the same modules, so they give the same bytes as decode_latents.

Sizes without a static graph, batches of more than one, and a capture that fails run decode_latents, and the log
says why: a deployment never fails for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from model.cuda_graphs import capture
from model.images import Decoder, OnDevicePostprocessor, decode_latents, pil_images, vae_pixels
from model.resolutions import Resolution

if TYPE_CHECKING:
    from model.engine import FluxEngine

log = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    latents: torch.Tensor  # the graph's input: a request's latents are copied in before a replay
    pixels: torch.Tensor  # the graph's output, overwritten by the next replay


class CapturedDecoder:
    """Replays the captured decode of a static size; anything else runs decode_latents."""

    def __init__(self, engine: FluxEngine) -> None:
        pipe = self._pipe = engine.pipe
        processor = pipe.image_processor
        if not isinstance(processor, OnDevicePostprocessor):
            raise ValueError("the decode is captured with its 8-bit conversion: it needs postprocess_on_device")
        device, dtype = pipe.transformer.device, pipe.transformer.dtype
        # One request at a time, and the pixels are copied out before the next replay: one pool serves every size.
        pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[Resolution, _Captured] = {}
        for resolution in engine.resolutions:
            latents = engine.noise(resolution, 0, dtype).to(device)
            graph, pixels = capture(
                lambda latents=latents, resolution=resolution: processor.to_uint8(
                    vae_pixels(pipe, latents, resolution)
                ),
                pool,
            )
            self._graphs[resolution] = _Captured(graph, latents, pixels)

    @property
    def resolutions(self) -> tuple[Resolution, ...]:
        return tuple(self._graphs)

    def __call__(self, packed_latents: torch.Tensor, resolution: Resolution) -> list[Image.Image]:
        captured = self._graphs.get(resolution)
        if captured is None or packed_latents.shape != captured.latents.shape:
            return decode_latents(self._pipe, packed_latents, resolution)
        captured.latents.copy_(packed_latents)
        captured.graph.replay()
        return pil_images(captured.pixels)


def capture_decoder(engine: FluxEngine) -> Decoder:
    """The decode replayed from CUDA graphs, one per static size; decode_latents when capturing fails."""
    pipe = engine.pipe

    def eager(packed_latents: torch.Tensor, resolution: Resolution) -> list[Image.Image]:
        return decode_latents(pipe, packed_latents, resolution)

    if not torch.cuda.is_available() or pipe.transformer.device.type != "cuda":
        log.info("VAE decode CUDA graphs need a CUDA GPU: the decode runs as it is")
        return eager
    started = time.perf_counter()
    reserved = torch.cuda.memory_reserved()
    try:
        captured = CapturedDecoder(engine)
    except Exception as exc:
        log.warning("the VAE decode could not be captured in CUDA graphs, it runs as it is: %r", exc)
        return eager
    log.info(
        "VAE decode captured in CUDA graphs for %s in %.2f s, %.2f GiB more reserved",
        ", ".join(map(str, captured.resolutions)),
        time.perf_counter() - started,
        (torch.cuda.memory_reserved() - reserved) / 2**30,
    )
    return captured
