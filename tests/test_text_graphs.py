"""The text encoders replayed from CUDA graphs give the eager encoders' bytes, and a failed capture serves eagerly."""

from __future__ import annotations

import logging

import pytest
import torch

from model import text_graphs
from model.engine import FluxEngine
from model.pipeline import load_pipeline
from model.prompts import eager_text_encoders, encode_prompts
from model.schema import GenerateRequest
from model.settings import Settings
from model.text_graphs import CapturedTextEncoders, capture_text_encoders
from tests.conftest import TINY_EAGER

PROMPTS = ["a red bicycle", "a lighthouse on a cliff at dusk, oil on canvas"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def identical(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]) -> bool:
    """Every tensor of two encodings equal in shape and in every element."""
    return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_the_engine_encodes_through_the_encoders_load_gives_it(engine: FluxEngine) -> None:
    request = GenerateRequest(prompt=PROMPTS[0], width=256, height=256, seed=1)
    expected = engine.generate(request).data
    calls: list[int] = []
    eager = eager_text_encoders(engine.pipe)

    def recording(clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(t5_ids.shape[-1])
        return eager(clip_ids, t5_ids)

    engine.text_encoders = recording
    try:
        assert engine.generate(request).data == expected
    finally:
        engine.text_encoders = None
    assert calls == [engine.text_lengths[0]]


def test_without_a_gpu_the_encoders_stay_eager_and_the_log_says_so(
    engine: FluxEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=text_graphs.__name__)
    encoders = capture_text_encoders(engine.pipe, engine.text_lengths)
    assert not isinstance(encoders, CapturedTextEncoders)
    assert "need a CUDA GPU" in caplog.text
    eager = encode_prompts(engine.pipe, PROMPTS[0], None, 256, 256)
    through = encode_prompts(engine.pipe, PROMPTS[0], None, 256, 256, encoders)
    assert identical(eager, through)


@pytest.fixture(scope="module")
def gpu_pipe():  # noqa: ANN201
    return load_pipeline(Settings.from_sources(environ=TINY_EAGER), device="cuda")


@needs_cuda
@pytest.mark.gpu
def test_replays_give_the_eager_bytes_at_every_text_length(gpu_pipe) -> None:
    captured = capture_text_encoders(gpu_pipe, (256, 512))
    assert isinstance(captured, CapturedTextEncoders) and captured.text_lengths == (256, 512)
    for length in (256, 512):
        for prompt in PROMPTS:
            eager = encode_prompts(gpu_pipe, prompt, None, length, length)
            replayed = encode_prompts(gpu_pipe, prompt, None, length, length, captured)
            assert identical(eager, replayed), (prompt, length)


@needs_cuda
@pytest.mark.gpu
def test_what_a_replay_returned_survives_the_next_replay(gpu_pipe) -> None:
    captured = capture_text_encoders(gpu_pipe, (256,))
    first = encode_prompts(gpu_pipe, PROMPTS[0], None, 256, 256, captured)
    kept = [t.clone() for t in first]
    encode_prompts(gpu_pipe, PROMPTS[1], None, 256, 256, captured)
    assert identical(first, tuple(kept))


@needs_cuda
@pytest.mark.gpu
def test_a_length_never_captured_runs_eagerly(gpu_pipe) -> None:
    captured = capture_text_encoders(gpu_pipe, (256,))
    eager = encode_prompts(gpu_pipe, PROMPTS[0], None, 128, 128)
    through = encode_prompts(gpu_pipe, PROMPTS[0], None, 128, 128, captured)
    assert identical(eager, through)


@needs_cuda
@pytest.mark.gpu
def test_an_encoder_that_cannot_be_captured_serves_eagerly(
    gpu_pipe, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=text_graphs.__name__)
    eager = eager_text_encoders(gpu_pipe)

    def synchronizing(pipe):  # noqa: ANN001, ANN202
        def run(clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sequence, pooled = eager(clip_ids, t5_ids)
            float(pooled.sum())  # a host sync: not allowed while a CUDA graph captures
            return sequence, pooled

        return run

    monkeypatch.setattr(text_graphs, "eager_text_encoders", synchronizing)
    encoders = capture_text_encoders(gpu_pipe, (256,))
    assert not isinstance(encoders, CapturedTextEncoders)
    assert "could not be captured" in caplog.text
    expected = encode_prompts(gpu_pipe, PROMPTS[0], None, 256, 256)
    served = encode_prompts(gpu_pipe, PROMPTS[0], None, 256, 256, encoders)
    assert identical(expected, served)
