"""What a user sees of generation: identical bytes per seed, the guidance reset, truncation by tokens, JPEGs."""

from __future__ import annotations

import logging

import pytest
import torch

from model.engine import FluxEngine
from model.prompts import clip_token_ids, encode_prompts, t5_token_ids
from model.schema import MAX_PROMPT_CHARS, GenerateRequest
from tests.conftest import LogRecorder, decode_jpeg

SIZE = {"width": 1216, "height": 832}


def generate(engine: FluxEngine, **fields) -> str:
    return engine.generate(GenerateRequest(**{"prompt": "a fox in a misty forest", **SIZE, **fields})).data


def test_same_seed_gives_identical_bytes(engine: FluxEngine) -> None:
    assert generate(engine, seed=7) == generate(engine, seed=7)


def test_different_seeds_give_different_images(engine: FluxEngine) -> None:
    assert generate(engine, seed=1) != generate(engine, seed=2)


def test_seed_zero_is_a_real_seed(engine: FluxEngine) -> None:
    response = engine.generate(GenerateRequest(prompt="x", seed=0, **SIZE))
    assert response.seed == 0
    assert response.data == generate(engine, prompt="x", seed=0)


def test_random_seed_is_returned_and_reproduces_the_image(engine: FluxEngine) -> None:
    first = engine.generate(GenerateRequest(prompt="x", **SIZE))
    assert first.data == generate(engine, prompt="x", seed=first.seed)


def test_prompt2_changes_the_image(engine: FluxEngine) -> None:
    assert generate(engine, seed=3) != generate(engine, seed=3, prompt2="with large windows")


@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (1216, 832), (896, 1152)])
def test_response_is_a_jpeg_of_the_requested_size(engine: FluxEngine, width: int, height: int) -> None:
    response = engine.generate(GenerateRequest(prompt="x", width=width, height=height, seed=5))
    assert (response.width, response.height) == (width, height)
    assert decode_jpeg(response.data).size == (width, height)


def test_guidance_is_reset_to_zero_with_a_warning(engine: FluxEngine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model.engine"):
        guided = generate(engine, seed=11, guidance_scale=7.5)
    assert any("guidance_scale 7.5 reset to 0.0" in record.getMessage() for record in caplog.records)
    assert guided == generate(engine, seed=11)


def test_long_prompts_are_truncated_by_tokens(engine: FluxEngine) -> None:
    # One T5 token per character in the tiny tokenizer: the first 15 characters plus </s> fit in 16 tokens.
    head = "abcdefghijklmno"
    ids = t5_token_ids(engine.pipe, head + " and a long tail", max_tokens=16, padded_length=256)
    assert ids.shape == (1, 256)
    assert ids[0, :16].tolist() == t5_token_ids(engine.pipe, head, max_tokens=16, padded_length=256)[0, :16].tolist()
    # The tail past the token limit cannot change the image; CLIP reads `prompt`, so vary only prompt2.
    short = generate(engine, seed=4, prompt2=head, max_sequence_length=16)
    long = generate(engine, seed=4, prompt2=head + " and a long tail", max_sequence_length=16)
    assert short == long
    assert long != generate(engine, seed=4, prompt2=head + " and a long tail", max_sequence_length=64)


def test_words_are_not_the_unit_of_truncation(engine: FluxEngine) -> None:
    # A single 40-character word is cut at the token limit, not kept or dropped whole.
    word = "x" * 40
    ids = t5_token_ids(engine.pipe, word, max_tokens=10, padded_length=256)[0].tolist()
    pad = engine.pipe.tokenizer_2.pad_token_id
    assert sum(token != pad for token in ids) == 10


def test_a_long_prompt_never_reaches_the_logs(
    engine: FluxEngine, all_logs: LogRecorder, capfd: pytest.CaptureFixture[str]
) -> None:
    # Past CLIP's 77 tokens and the request's 16 T5 tokens: diffusers' own CLIP encoding logs such a tail.
    tail = ["zebra", "quartz", "umbrella"]
    prompt = "a lighthouse on a cliff " * 8 + " ".join(tail)
    engine.generate(GenerateRequest(prompt=prompt, max_sequence_length=16, seed=1, **SIZE))
    out, err = capfd.readouterr()
    for text in (all_logs.text(), out, err):
        assert not [word for word in tail if word in text], text
    clip_tokens = len(engine.pipe.tokenizer(prompt)["input_ids"])
    assert f"prompt truncated from {clip_tokens} to 77 CLIP tokens" in all_logs.text()
    assert "to 16 T5 tokens" in all_logs.text()


@pytest.mark.parametrize("prompt", ["a fox", "a lighthouse on a cliff " * 8, "x" * MAX_PROMPT_CHARS])
def test_clip_encoding_is_the_one_diffusers_computes(engine: FluxEngine, prompt: str) -> None:
    pipe = engine.pipe
    assert clip_token_ids(pipe, prompt).shape == (1, pipe.tokenizer_max_length)
    _, pooled = encode_prompts(pipe, prompt, None, max_tokens=256, padded_length=256)
    with torch.inference_mode():
        # The private FluxPipeline method that prompts.py no longer calls, as the reference for identical images.
        expected = pipe._get_clip_prompt_embeds(prompt=prompt, device=pipe.transformer.device)
    assert torch.equal(pooled, expected.to(pipe.transformer.dtype))
