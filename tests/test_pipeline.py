"""Loading: the tiny model is deterministic, and a saved one reloads through the real-weights path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.blocks import transformer_parts
from model.engine import FluxEngine
from model.pipeline import describe_source, load_pipeline
from model.random_flux import build_random_pipeline
from model.schema import GenerateRequest
from model.settings import Settings


def test_tiny_weights_are_deterministic() -> None:
    first = build_random_pipeline("tiny").transformer.state_dict()
    second = build_random_pipeline("tiny").transformer.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    build_random_pipeline("tiny")
    assert torch.equal(torch.rand(1), expected)


def test_tiny_vae_matches_the_real_scale_factor() -> None:
    assert build_random_pipeline("tiny").vae_scale_factor == 8


def _pixels(pipe, settings: Settings) -> np.ndarray:
    """The decoded image before JPEG, whose block quantization would magnify 1-level differences."""
    engine = FluxEngine(pipe, settings.resolutions, settings.text_lengths)
    job = engine.job_for(GenerateRequest(prompt="a lighthouse", width=896, height=1152, seed=9))
    [image] = engine.run(job)
    return np.asarray(image, dtype=np.int16)


def assert_same_image(first: np.ndarray, second: np.ndarray) -> None:
    # Reloaded weights are bit-identical, but their memory layout may change float summation
    # order at the 1e-6 level, which can flip the rounding of a pixel by one level.
    assert first.shape == second.shape
    assert np.abs(first - second).max() <= 1


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "flux-tiny"
    build_random_pipeline("tiny").save_pretrained(path)
    return path


def test_saved_tiny_reloads_from_a_local_path(settings: Settings, saved_tiny: Path) -> None:
    reloaded = load_pipeline(settings.model_copy(update=dict(model_source=str(saved_tiny))), device="cpu")
    assert_same_image(_pixels(reloaded, settings), _pixels(load_pipeline(settings, device="cpu"), settings))


def test_weights_mount_is_preferred_to_the_hub(settings: Settings, saved_tiny: Path) -> None:
    # The repo id does not exist; only the mount can satisfy the load, and no download is tried.
    mounted = settings.model_copy(update=dict(model_source="hf", repo_id="nobody/not-a-repo", weights_path=saved_tiny))
    assert describe_source(mounted) == f"weights mount {saved_tiny}"
    assert_same_image(
        _pixels(load_pipeline(mounted, device="cpu"), settings),
        _pixels(load_pipeline(settings, device="cpu"), settings),
    )


def test_missing_mount_falls_back_to_the_repo_id(settings: Settings, tmp_path: Path) -> None:
    unmounted = settings.model_copy(update=dict(model_source="hf", weights_path=tmp_path / "absent"))
    assert describe_source(unmounted) == f"Hugging Face repo {settings.repo_id}"


def test_missing_local_directory_fails_clearly(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither"):
        load_pipeline(settings.model_copy(update=dict(model_source=str(tmp_path / "absent"))), device="cpu")


@pytest.mark.parametrize("source", ["offline", "local path"])
def test_block_hook_sees_every_part_with_its_weights_unchanged(
    settings: Settings, saved_tiny: Path, source: str
) -> None:
    if source == "local path":
        settings = settings.model_copy(update=dict(model_source=str(saved_tiny)))
    seen: list[torch.nn.Module] = []

    def hook(part: torch.nn.Module) -> None:
        assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in part.parameters())
        seen.append(part)

    hooked = load_pipeline(settings, device="cpu", on_block=hook)
    assert [id(part) for part in seen] == [id(part) for part in transformer_parts(hooked.transformer)]
    plain = load_pipeline(settings, device="cpu").transformer.state_dict()
    assert all(torch.equal(plain[name], value) for name, value in hooked.transformer.state_dict().items())
