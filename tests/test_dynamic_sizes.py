"""Sizes without a static graph run on one dynamic-shape graph, compiled and warmed up at load(): no request compiles.

The real compiler, the production path (precompiled static regions beside the dynamic graph): on the tiny model
everywhere, and on the full-size architecture (random bf16 weights) where a CUDA GPU is present.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from model.coldstart import CompileCounters
from model.engine import FluxEngine, Job
from model.graph_route import on_dynamic_graph
from model.model import Model
from model.repaint import ImageInputs
from model.resolutions import Resolution
from model.settings import config_metadata

pytestmark = pytest.mark.slow

ENV = {
    "FLUX_COMPILE": "1",
    "FLUX_RESOLUTIONS": "1024x1024",
    "FLUX_TEXT_LENGTHS": "256,512",
    "FLUX_CACHE_BACKEND": "none",
}
STATIC = Resolution(1024, 1024)
# Never warmed up: the smallest square, a near-2-megapixel landscape, the narrowest portrait, an odd one.
UNSEEN = [
    (Resolution(256, 256), 256),
    (Resolution(1536, 1296), 512),
    (Resolution(272, 1536), 256),
    (Resolution(1008, 784), 512),
]


def job(size: Resolution, text_length: int, seed: int = 3) -> Job:
    return Job("a red bicycle", None, size, seed, 2, text_length, text_length)


def pixels(engine: FluxEngine, size: Resolution, text_length: int) -> np.ndarray:
    [image] = engine.run(job(size, text_length))
    return np.asarray(image)


ON_A_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", params=["tiny", pytest.param("full-random", marks=ON_A_GPU)])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Model, np.ndarray]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLUX_MODEL_SOURCE", request.param)
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        for key, value in ENV.items():
            patch.setenv(key, value)
        model = Model(config={"model_metadata": config_metadata()})
        model.load()
        # Before any size without a static graph has run.
        static_image = pixels(model._engine, STATIC, 256)
        yield model, static_image
    torch.compiler.set_stance("default")


def test_load_warms_up_the_dynamic_graph_and_checks_it(served: tuple[Model, np.ndarray]) -> None:
    report = served[0].cold_start
    assert report.compiled and report.eager_fallback_reason is None
    shapes = report.warmup.runs_per_shape
    assert {"1152x640@256", "640x1152@512"} <= set(shapes)
    # A size never warmed up ran at both text lengths with compiling forbidden, and load() said so.
    assert report.dynamic_check == "passed"


def test_sizes_never_seen_compile_nothing(served: tuple[Model, np.ndarray]) -> None:
    engine = served[0]._engine
    before = CompileCounters.now()
    # A guard that fails would recompile, or run eagerly under the serving stance: here it raises.
    with torch.compiler.set_stance("fail_on_recompile"):
        for size, text_length in UNSEEN:
            [image] = engine.run(job(size, text_length))
            assert image.size == (size.width, size.height)
    assert CompileCounters.now() - before == CompileCounters(0, 0, 0, 0, 0)


def test_image_to_image_and_inpainting_compile_nothing(served: tuple[Model, np.ndarray]) -> None:
    """Their steps run the compiled transformer as text-to-image ones do, at the static size and on the any-size
    graph; on a GPU load() also ran image-to-image once at the static size, for the VAE's encoder."""
    engine = served[0]._engine
    grey = Image.new("RGB", (300, 260), (128, 128, 128))
    mask = Image.new("L", grey.size, 0)
    mask.paste(255, (60, 60, 200, 200))
    before = CompileCounters.now()
    with torch.compiler.set_stance("fail_on_recompile"):
        for size in (STATIC, Resolution(1008, 784)):
            for inputs in (ImageInputs(grey, None, "a", None), ImageInputs(grey, mask, "a", "m")):
                [image] = engine.run(replace(job(size, 256), strength=0.5), (), inputs)
                assert image.size == (size.width, size.height)
    assert CompileCounters.now() - before == CompileCounters(0, 0, 0, 0, 0)
    warmed = set(served[0].cold_start.warmup.runs_per_shape)
    assert (f"{STATIC}@image" in warmed) == torch.cuda.is_available(), "warmed up on a GPU, where kernels load lazily"


def test_a_static_size_keeps_its_own_graph_after_other_sizes(served: tuple[Model, np.ndarray]) -> None:
    model, static_image = served
    model._engine.run(job(Resolution(1200, 816), 512))
    assert np.array_equal(pixels(model._engine, STATIC, 256), static_image)


def test_a_size_without_a_static_graph_gives_the_same_image_each_time(served: tuple[Model, np.ndarray]) -> None:
    engine = served[0]._engine
    assert np.array_equal(pixels(engine, Resolution(272, 1536), 256), pixels(engine, Resolution(272, 1536), 256))


def test_only_sizes_without_a_static_graph_take_the_dynamic_route(
    engine: FluxEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes: list[bool] = []
    real = engine.denoise

    def denoise(*args, **kwargs):
        routes.append(on_dynamic_graph())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "denoise", denoise)
    static = next(iter(engine.resolutions))
    engine.run(job(static, engine.text_lengths[0]))
    engine.run(job(Resolution(512, 512), engine.text_lengths[0]))
    assert routes == [False, True]
    assert not on_dynamic_graph(), "the route ends with the request"
