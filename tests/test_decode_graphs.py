"""The VAE decode replayed from CUDA graphs gives the same pixels, and anything it cannot replay decodes as before."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from model import decode_graphs
from model.decode_graphs import CapturedDecoder, capture_decoder
from model.engine import FluxEngine
from model.images import OnDevicePostprocessor, decode_latents
from model.pipeline import load_pipeline
from model.resolutions import Resolution
from model.schema import GenerateRequest
from model.settings import Settings
from tests.conftest import TINY_EAGER

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def same_pixels(first: list[Image.Image], second: list[Image.Image]) -> bool:
    return len(first) == len(second) and all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second, strict=True)
    )


def test_the_engine_decodes_through_the_decoder_load_gives_it(engine: FluxEngine) -> None:
    request = GenerateRequest(prompt="a red bicycle", width=256, height=256, seed=1)
    expected = engine.generate(request).data
    sizes: list[Resolution] = []

    def recording(packed: torch.Tensor, resolution: Resolution) -> list[Image.Image]:
        sizes.append(resolution)
        return decode_latents(engine.pipe, packed, resolution)

    engine.decoder = recording
    try:
        assert engine.generate(request).data == expected
    finally:
        engine.decoder = None
    assert sizes == [Resolution(256, 256)]


def test_without_a_gpu_the_decode_runs_as_it_is_and_the_log_says_so(
    engine: FluxEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=decode_graphs.__name__)
    decoder = capture_decoder(engine)
    assert not isinstance(decoder, CapturedDecoder)
    assert "need a CUDA GPU" in caplog.text
    size = Resolution(256, 256)
    latents = engine.noise(size, 3, torch.float32)
    with torch.inference_mode():
        assert same_pixels(decoder(latents, size), decode_latents(engine.pipe, latents, size))


STATIC = (Resolution(256, 256), Resolution(512, 256))


@pytest.fixture(scope="module")
def gpu_engine() -> FluxEngine:
    settings = Settings.from_sources(environ=TINY_EAGER)
    pipe = load_pipeline(settings, device="cuda")
    pipe.image_processor = OnDevicePostprocessor.from_config(pipe.image_processor.config)
    return FluxEngine(pipe, STATIC, settings.text_lengths)


def latents_for(engine: FluxEngine, size: Resolution, seed: int) -> torch.Tensor:
    return engine.noise(size, seed, engine.pipe.transformer.dtype).to("cuda")


@needs_cuda
@pytest.mark.gpu
def test_replays_give_the_same_pixels_at_every_static_size(gpu_engine: FluxEngine) -> None:
    decoder = capture_decoder(gpu_engine)
    assert isinstance(decoder, CapturedDecoder) and set(decoder.resolutions) == set(STATIC)
    for size in STATIC:
        for seed in (1, 2):  # two inputs: a replay reads the latents copied in, not the captured ones
            latents = latents_for(gpu_engine, size, seed)
            with torch.inference_mode():
                assert same_pixels(decoder(latents, size), decode_latents(gpu_engine.pipe, latents, size)), size


@needs_cuda
@pytest.mark.gpu
def test_a_size_or_batch_never_captured_decodes_as_before(gpu_engine: FluxEngine) -> None:
    decoder = capture_decoder(gpu_engine)
    other = Resolution(384, 256)
    batch = torch.cat([latents_for(gpu_engine, STATIC[0], 1), latents_for(gpu_engine, STATIC[0], 2)])
    with torch.inference_mode():
        for latents, size in ((latents_for(gpu_engine, other, 1), other), (batch, STATIC[0])):
            assert same_pixels(decoder(latents, size), decode_latents(gpu_engine.pipe, latents, size))


@needs_cuda
@pytest.mark.gpu
def test_a_decode_that_cannot_be_captured_runs_as_it_is(
    gpu_engine: FluxEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=decode_graphs.__name__)
    plain = decode_graphs.vae_pixels

    def synchronizing(pipe, latents: torch.Tensor, resolution: Resolution) -> torch.Tensor:  # noqa: ANN001
        pixels = plain(pipe, latents, resolution)
        float(pixels.sum())  # a host sync: not allowed while a CUDA graph captures
        return pixels

    monkeypatch.setattr(decode_graphs, "vae_pixels", synchronizing)
    decoder = capture_decoder(gpu_engine)
    assert not isinstance(decoder, CapturedDecoder)
    assert "could not be captured" in caplog.text
    latents = latents_for(gpu_engine, STATIC[0], 1)
    with torch.inference_mode():
        assert same_pixels(decoder(latents, STATIC[0]), decode_latents(gpu_engine.pipe, latents, STATIC[0]))
