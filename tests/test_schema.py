"""The request schema: which bodies are accepted, and what a rejection names."""

from __future__ import annotations

import json
import secrets
import time
from decimal import Decimal

import pytest
from pydantic import ValidationError

from model.engine import FluxEngine, InvalidRequest
from model.resolutions import Resolution
from model.schema import MAX_OUTPUTS, MAX_PROMPT_CHARS, MAX_SEED, GenerateRequest

ACCEPTED = [
    (
        {"prompt": "a cozy reading nook with warm sunlight"},
        {
            "width": None,
            "height": None,
            "aspect_ratio": None,
            "seed": None,
            "num_outputs": 1,
            "output_format": "jpeg",
            "output_quality": 90,
        },
    ),
    ({"prompt": "fox", "width": 1216, "height": 832, "seed": 42}, {"width": 1216, "seed": 42}),
    ({"prompt": "a room", "prompt2": "with plants"}, {"prompt2": "with plants"}),
    ({"prompt": "x", "seed": 0}, {"seed": 0}),
    ({"prompt": "x", "seed": MAX_SEED}, {"seed": MAX_SEED}),
    ({"prompt": "x", "guidance_scale": 3.5}, {"guidance_scale": 3.5}),
    ({"prompt": "x", "num_inference_steps": 1}, {"num_inference_steps": 1}),
    ({"prompt": "x", "max_sequence_length": 512}, {"max_sequence_length": 512}),
    ({"prompt": "x", "width": 1024.0}, {"width": 1024}),
    ({"prompt": "x", "prompt2": None}, {"prompt2": None}),
    ({"prompt": "x", "aspect_ratio": "16:9"}, {"aspect_ratio": "16:9", "width": None}),
    ({"prompt": "x", "aspect_ratio": "16:9", "width": None}, {"aspect_ratio": "16:9"}),
    ({"prompt": "x", "width": 512}, {"width": 512, "height": None}),
    ({"prompt": "x", "num_outputs": MAX_OUTPUTS, "seed": MAX_SEED - MAX_OUTPUTS + 1}, {"num_outputs": MAX_OUTPUTS}),
    ({"prompt": "x", "num_outputs": 2.0}, {"num_outputs": 2}),
    ({"prompt": "x", "output_format": "png", "output_quality": 1}, {"output_format": "png", "output_quality": 1}),
    ({"prompt": "x", "output_format": "webp", "output_quality": 100}, {"output_format": "webp"}),
]

REJECTED = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n\t"}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
    ({"prompt": "x", "prompt2": ["a"]}, "prompt2"),
    ({"prompt": "x", "width": "wide"}, "width"),
    ({"prompt": "x", "width": 1024.5}, "width"),
    ({"prompt": "x", "height": True}, "height"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": MAX_SEED + 1}, "seed"),
    ({"prompt": "x", "seed": "42x"}, "seed"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": False}, "guidance_scale"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 1000}, "num_inference_steps"),
    ({"prompt": "x", "max_sequence_length": 0}, "max_sequence_length"),
    ({"prompt": "x", "max_sequence_length": 513}, "max_sequence_length"),
    ({"prompt": "x", "negative_prompt": "blurry"}, "negative_prompt"),
    ({"prompt": "x", "aspect_ratio": "16:9", "width": 1344}, "aspect_ratio"),
    ({"prompt": "x", "aspect_ratio": "16:9", "height": 768}, "aspect_ratio"),
    ({"prompt": "x", "aspect_ratio": 1.5}, "aspect_ratio"),
    ({"prompt": "x", "aspect_ratio": "1:1" * 10}, "aspect_ratio"),
    ({"prompt": "x", "num_outputs": 0}, "num_outputs"),
    ({"prompt": "x", "num_outputs": MAX_OUTPUTS + 1}, "num_outputs"),
    ({"prompt": "x", "num_outputs": True}, "num_outputs"),
    ({"prompt": "x", "seed": MAX_SEED, "num_outputs": 2}, "seed"),
    ({"prompt": "x", "seed": MAX_SEED - 2, "num_outputs": 4}, "seed"),
    ({"prompt": "x", "output_format": "gif"}, "output_format"),
    ({"prompt": "x", "output_format": "JPEG"}, "output_format"),
    ({"prompt": "x", "output_quality": 0}, "output_quality"),
    ({"prompt": "x", "output_quality": 101}, "output_quality"),
    ({"prompt": "x", "output_quality": 90.5}, "output_quality"),
]


@pytest.mark.parametrize(("body", "expected"), ACCEPTED)
def test_accepted_bodies(body: dict, expected: dict) -> None:
    request = GenerateRequest.model_validate(body)
    for key, value in expected.items():
        assert getattr(request, key) == value


@pytest.mark.parametrize(("body", "field"), REJECTED)
def test_rejected_bodies_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate(body)
    assert field in {str(loc) for error in info.value.errors() for loc in error["loc"]}


def test_aspect_ratio_with_a_size_names_both() -> None:
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"prompt": "x", "aspect_ratio": "1:1", "width": 1024, "height": 1024})
    [error] = info.value.errors()
    assert error["loc"] == ("aspect_ratio",)
    assert "give either aspect_ratio or width and height, not both" in error["msg"]


def test_a_seed_without_room_for_every_image_says_how_far_it_may_go() -> None:
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"prompt": "x", "seed": MAX_SEED, "num_outputs": 3})
    [error] = info.value.errors()
    assert error["loc"] == ("seed",)
    assert f"with num_outputs 3 the seed must be at most {MAX_SEED - 2}" in error["msg"]


def test_non_finite_guidance_is_rejected_from_json() -> None:
    with pytest.raises(ValidationError, match="guidance_scale"):
        GenerateRequest.model_validate_json(json.dumps({"prompt": "x", "guidance_scale": float("nan")}))


@pytest.mark.parametrize(
    ("size", "field"),
    [
        ({"width": 1000, "height": 1024}, "width"),
        ({"width": 1024, "height": 1000}, "height"),
        ({"width": 1000}, "width"),
        ({"height": 1000}, "height"),
        ({"width": 0, "height": 1024}, "width"),
        ({"width": -16, "height": 1024}, "width"),
        ({"width": 240, "height": 1024}, "width"),
        ({"width": 1552, "height": 256}, "width"),
        ({"width": 99999, "height": 1024}, "width"),
        ({"width": 1536, "height": 1536}, "width/height"),
    ],
)
def test_a_size_off_the_grid_or_out_of_bounds_states_the_rule(engine: FluxEngine, size: dict, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        engine.job_for(GenerateRequest(prompt="x", **size))
    assert info.value.field_name == field
    assert str(info.value).startswith(f"{field}: ")
    assert "multiples of 16 from 256 to 1536, at most 2 megapixels" in str(info.value)


@pytest.mark.parametrize(("width", "height"), [(256, 256), (512, 512), (1024, 1216), (256, 1536), (1536, 1296)])
def test_any_size_on_the_grid_within_bounds_is_accepted(engine: FluxEngine, width: int, height: int) -> None:
    job = engine.job_for(GenerateRequest(prompt="x", width=width, height=height))
    assert job.resolution == Resolution(width, height)
    assert not engine.is_static(job.resolution), "only the configured resolutions have static graphs"


def test_every_static_size_is_accepted_and_static(engine: FluxEngine) -> None:
    for resolution in engine.resolutions:
        job = engine.job_for(GenerateRequest(prompt="x", width=resolution.width, height=resolution.height))
        assert job.resolution == resolution
        assert engine.is_static(job.resolution)


def test_shapes_are_the_static_sizes_at_every_text_length(engine: FluxEngine) -> None:
    assert engine.shapes() == [(r, n) for r in engine.resolutions for n in engine.text_lengths]


def test_an_omitted_size_is_1024_square_and_one_side_defaults_alone(engine: FluxEngine) -> None:
    assert engine.job_for(GenerateRequest(prompt="x")).resolution == Resolution(1024, 1024)
    assert engine.job_for(GenerateRequest(prompt="x", width=512)).resolution == Resolution(512, 1024)


def test_every_aspect_ratio_gives_its_registered_size(engine: FluxEngine) -> None:
    for name, size in engine.sizes.aspect_ratios.items():
        job = engine.job_for(GenerateRequest(prompt="x", aspect_ratio=name))
        assert job.resolution == size
    assert engine.job_for(GenerateRequest(prompt="x", aspect_ratio="16:9")).resolution == Resolution(1344, 768)


@pytest.mark.parametrize("name", ["7:3", "16/9", "", "1:1 "])
def test_an_unknown_aspect_ratio_lists_the_valid_ones(engine: FluxEngine, name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        engine.job_for(GenerateRequest(prompt="x", aspect_ratio=name))
    assert str(info.value).startswith(f"aspect_ratio: {name!r} is not one of 21:9, 16:9, 3:2, 4:3, 5:4, 1:1,")
    assert all(ratio in str(info.value) for ratio in engine.sizes.aspect_ratios)


def test_sequence_length_rounds_up_to_a_compiled_text_length(engine: FluxEngine) -> None:
    lengths = engine.text_lengths
    assert engine.job_for(GenerateRequest(prompt="x", max_sequence_length=1)).text_length == lengths[0]
    assert engine.job_for(GenerateRequest(prompt="x", max_sequence_length=lengths[-1])).text_length == lengths[-1]


def test_omitted_seed_is_random_and_reported(engine: FluxEngine) -> None:
    seeds = {engine.job_for(GenerateRequest(prompt="x")).seed for _ in range(8)}
    assert len(seeds) > 1
    assert all(0 <= seed <= MAX_SEED for seed in seeds)


@pytest.mark.parametrize("count", [1, 2, MAX_OUTPUTS])
def test_an_omitted_seed_leaves_room_for_every_image(
    engine: FluxEngine, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    monkeypatch.setattr(secrets, "randbelow", lambda bound: bound - 1)  # the largest draw
    job = engine.job_for(GenerateRequest(prompt="x", num_outputs=count))
    assert list(job.seeds) == list(range(MAX_SEED - count + 1, MAX_SEED + 1))


@pytest.mark.parametrize("field", ["width", "seed", "num_inference_steps"])
@pytest.mark.parametrize("value", ["1E+100000000", "-1E+100000000", "1E-100000000", "NaN", "sNaN", "-Infinity", "2.5"])
def test_msgpack_decimals_are_refused_before_they_are_expanded(field: str, value: str) -> None:
    # Truss decodes its Decimal extension in msgpack bodies; expanding 1E+100000000 to an int took minutes.
    started = time.perf_counter()
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"prompt": "x", field: Decimal(value)})
    assert time.perf_counter() - started < 1
    assert [error["loc"] for error in info.value.errors()] == [(field,)]


@pytest.mark.parametrize(("value", "seed"), [("42", 42), ("42.000", 42), ("0E+100000000", 0), ("4.2E+1", 42)])
def test_integral_decimals_are_accepted(value: str, seed: int) -> None:
    assert GenerateRequest.model_validate({"prompt": "x", "seed": Decimal(value)}).seed == seed
