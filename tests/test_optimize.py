"""The optimizations load() applies keep the image, and quantizing leaves the process's compiler settings alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.engine import FluxEngine
from model.optimize import block_hook, configure_process, optimize
from model.pipeline import load_pipeline
from model.schema import GenerateRequest
from model.settings import Settings

REQUEST = GenerateRequest(prompt="a red bicycle", width=1216, height=832, seed=5)


def pixels(engine: FluxEngine) -> np.ndarray:
    [image] = engine.run(engine.job_for(REQUEST))
    return np.asarray(image, dtype=np.int16)


def test_the_process_is_set_up_for_the_same_kernels_in_every_replica() -> None:
    # Half-RBLOCK candidates are timed again in every process, so replicas would pick other reduction orders.
    import torch._inductor.config as inductor

    with inductor.patch(dynamic_scale_rblock=True):
        configure_process()
        assert inductor.dynamic_scale_rblock is False


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantizing_leaves_inductor_settings_alone(precision: str) -> None:
    from torch._inductor import config

    quantize = block_hook(precision)
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
    optimize(pipe)
    assert isinstance(pipe.image_processor, OnDevicePostprocessor)
    switched = FluxEngine(pipe, settings.resolutions, settings.text_lengths)
    assert np.array_equal(pixels(switched), pixels(engine))
