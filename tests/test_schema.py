"""The request schema: which bodies are accepted, and what a rejection names."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
from pydantic import ValidationError

from model.engine import FluxEngine, InvalidRequest
from model.schema import MAX_PROMPT_CHARS, MAX_SEED, GenerateRequest

ACCEPTED = [
    ({"prompt": "a cozy reading nook with warm sunlight"}, {"width": 1024, "height": 1024, "seed": None}),
    ({"prompt": "fox", "width": 1216, "height": 832, "seed": 42}, {"width": 1216, "seed": 42}),
    ({"prompt": "a room", "prompt2": "with plants"}, {"prompt2": "with plants"}),
    ({"prompt": "x", "seed": 0}, {"seed": 0}),
    ({"prompt": "x", "seed": MAX_SEED}, {"seed": MAX_SEED}),
    ({"prompt": "x", "guidance_scale": 3.5}, {"guidance_scale": 3.5}),
    ({"prompt": "x", "num_inference_steps": 1}, {"num_inference_steps": 1}),
    ({"prompt": "x", "max_sequence_length": 512}, {"max_sequence_length": 512}),
    ({"prompt": "x", "width": 1024.0}, {"width": 1024}),
    ({"prompt": "x", "prompt2": None}, {"prompt2": None}),
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


def test_non_finite_guidance_is_rejected_from_json() -> None:
    with pytest.raises(ValidationError, match="guidance_scale"):
        GenerateRequest.model_validate_json(json.dumps({"prompt": "x", "guidance_scale": float("nan")}))


@pytest.mark.parametrize(("width", "height"), [(512, 512), (1024, 1216), (1000, 1000), (0, 1024), (99999, 1024)])
def test_unserved_size_lists_the_served_ones(engine: FluxEngine, width: int, height: int) -> None:
    with pytest.raises(InvalidRequest) as info:
        engine.job_for(GenerateRequest(prompt="x", width=width, height=height))
    message = str(info.value)
    assert "width/height" in message
    for resolution in engine.resolutions:
        assert str(resolution) in message


def test_every_served_size_is_accepted(engine: FluxEngine) -> None:
    for resolution in engine.resolutions:
        job = engine.job_for(GenerateRequest(prompt="x", width=resolution.width, height=resolution.height))
        assert job.resolution == resolution


def test_sequence_length_rounds_up_to_a_compiled_text_length(engine: FluxEngine) -> None:
    lengths = engine.text_lengths
    assert engine.job_for(GenerateRequest(prompt="x", max_sequence_length=1)).text_length == lengths[0]
    assert engine.job_for(GenerateRequest(prompt="x", max_sequence_length=lengths[-1])).text_length == lengths[-1]


def test_omitted_seed_is_random_and_reported(engine: FluxEngine) -> None:
    seeds = {engine.job_for(GenerateRequest(prompt="x")).seed for _ in range(8)}
    assert len(seeds) > 1
    assert all(0 <= seed <= MAX_SEED for seed in seeds)


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
