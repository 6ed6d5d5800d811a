"""The named optimization switches reach the pipeline through settings, and keep the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.engine import FluxEngine
from model.model import Model
from model.optimize import Optimizations, block_hook, optimize
from model.pipeline import load_pipeline
from model.schema import GenerateRequest
from model.settings import Settings, config_metadata
from tests.conftest import TINY_EAGER

REQUEST = GenerateRequest(prompt="a red bicycle", width=1216, height=832, seed=5)


def pixels(engine: FluxEngine) -> np.ndarray:
    [image] = engine.run(engine.job_for(REQUEST))
    return np.asarray(image, dtype=np.int16)


def test_switches_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**TINY_EAGER, "FLUX_FUSE_QKV": "1", "FLUX_VAE_CHANNELS_LAST": "true"}.items():
        monkeypatch.setenv(key, value)
    model = Model(config={"model_metadata": config_metadata()})
    model.load()
    pipe = model._engine.pipe
    assert any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules())
    conv = next(m for m in pipe.vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_switches_keep_the_image(settings: Settings, engine: FluxEngine) -> None:
    pipe = load_pipeline(settings, device="cpu")
    optimize(pipe, Optimizations(fuse_qkv=True, vae_channels_last=True, attention_backend="_native_math"))
    optimized = FluxEngine(pipe, settings.resolutions, settings.text_lengths)
    # Fused GEMMs and NHWC convolutions sum in another order: a pixel may move by a level or two.
    assert np.abs(pixels(optimized) - pixels(engine)).max() <= 2


def test_only_switches_that_keep_every_pixel_are_on_by_default() -> None:
    assert Optimizations().enabled() == [
        "expandable_segments",
        "vae_inplace_silu",
        "postprocess_on_device",
        "text_encoder_cuda_graphs",
    ]


def test_inplace_silu_keeps_every_pixel(settings: Settings) -> None:
    plain = load_pipeline(settings, device="cpu")
    optimize(plain, Optimizations(vae_inplace_silu=False))
    inplace = load_pipeline(settings, device="cpu")
    optimize(inplace, Optimizations(vae_inplace_silu=True))
    assert any(getattr(m, "inplace", False) for m in inplace.vae.decoder.modules())
    assert not any(getattr(m, "inplace", False) for m in plain.vae.decoder.modules())
    same = [FluxEngine(pipe, settings.resolutions, settings.text_lengths) for pipe in (plain, inplace)]
    assert np.array_equal(pixels(same[0]), pixels(same[1]))


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantizing_leaves_inductor_settings_alone(precision: str) -> None:
    from torch._inductor import config

    quantize = block_hook(Optimizations(precision=precision))
    assert quantize is not None
    with config.patch(coordinate_descent_tuning=False, coordinate_descent_check_all_directions=False):
        try:
            quantize(torch.nn.Sequential(torch.nn.Linear(64, 64, dtype=torch.bfloat16)))
        except AssertionError as exc:  # no float8 tensor cores here; torchao checks that after its settings
            assert "compute capability" in str(exc)
        assert not config.coordinate_descent_tuning
        assert not config.coordinate_descent_check_all_directions


def test_postprocessing_on_the_device_gives_the_same_bytes(settings: Settings, engine: FluxEngine) -> None:
    from diffusers.image_processor import VaeImageProcessor

    from model.images import OnDevicePostprocessor

    # The decoder's range and past it, in bf16, with 0.0, which lands on 127.5 and tests the rounding of halves.
    values = torch.cat([torch.tensor([0.0, -1.0, 1.0]), torch.linspace(-1.1, 1.1, 8 * 3 * 16 * 16 - 3)])
    decoded = values.to(torch.bfloat16).reshape(8, 3, 16, 16)
    reference = VaeImageProcessor(vae_scale_factor=16).postprocess(decoded, output_type="pil")
    on_device = OnDevicePostprocessor(vae_scale_factor=16).postprocess(decoded, output_type="pil")
    assert [np.asarray(i).tobytes() for i in on_device] == [np.asarray(i).tobytes() for i in reference]

    pipe = load_pipeline(settings, device="cpu")
    optimize(pipe, Optimizations(postprocess_on_device=True))
    assert isinstance(pipe.image_processor, OnDevicePostprocessor)
    switched = FluxEngine(pipe, settings.resolutions, settings.text_lengths)
    assert np.array_equal(pixels(switched), pixels(engine))
