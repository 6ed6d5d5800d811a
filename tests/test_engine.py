"""What a user sees of generation: identical bytes per seed, the guidance reset, truncation by tokens, the images'
number and formats."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.engine import FluxEngine
from model.prompts import clip_token_ids, encode_prompts, t5_token_ids
from model.schema import MAX_OUTPUTS, MAX_PROMPT_CHARS, GenerateRequest
from model.settings import Settings, config_metadata
from tests.conftest import TINY_EAGER, LogRecorder, decode_image, decode_jpeg, tiny_engine

ROOT = Path(__file__).resolve().parent.parent

SIZE = {"width": 1216, "height": 832}
# A size with no static graph, small enough for several images on a CPU.
SMALL = {"width": 256, "height": 512}

# sha256 of the JPEG that the seed's example requests (the README's, with seed 42 where they give none, and
# config.yaml's example_model_input) returned on the tiny model before the API grew any field: the defaults must
# keep those bytes. Pinned under PORTABLE_MATH, where the code of then gives the same bytes as today's.
EXAMPLE_BYTES = [
    (
        {"prompt": "a cozy reading nook with warm sunlight", "seed": 42},
        "792bf9244c95708964c8751a6fb63df916bda70aa8886b602e1b04193b357290",
    ),
    (
        config_metadata()["example_model_input"],
        "34ba790e4898f21328f54fb9cc79220df0d6ede026a25a438e26159bb156f5b5",
    ),
    (
        {
            "prompt": "a modern living room, scandinavian style",
            "prompt2": "with large windows and houseplants",
            "seed": 42,
        },
        "3181c7758dfe77b16100b2f2a9a3df5f535f026d367dcdb851383e57cb43216e",
    ),
]
# CPU math libraries pick a code path by the CPU's vector units (MKL's GEMM, oneDNN's convolutions, ATen's own
# kernels), and the paths round differently, so pinned bytes hold on every x86-64 CPU only with each held to its
# baseline path and one thread.
PORTABLE_MATH = {
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "ATEN_CPU_CAPABILITY": "default",
    "OMP_NUM_THREADS": "1",
}


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


def example_digests() -> list[tuple[str, str]]:
    """Each example's (sha256 of its image, its format), from the engine the `engine` fixture is."""
    engine = tiny_engine(Settings.from_sources(environ=TINY_EAGER))
    responses = [engine.generate(GenerateRequest(**body)) for body, _ in EXAMPLE_BYTES]
    return [(hashlib.sha256(base64.b64decode(r.data)).hexdigest(), r.format) for r in responses]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the pins are x86-64's baseline paths")
def test_the_examples_keep_their_bytes() -> None:
    # A fresh process: the libraries read PORTABLE_MATH once, when they load.
    probe = "import json, tests.test_engine as t; print(json.dumps(t.example_digests()))"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={**os.environ, **PORTABLE_MATH},
        capture_output=True,
        text=True,
        check=True,
    )
    digests = json.loads(done.stdout.splitlines()[-1])
    assert digests == [[sha256, "jpeg"] for _, sha256 in EXAMPLE_BYTES]


def test_image_zero_of_several_is_the_single_image_byte_for_byte(engine: FluxEngine) -> None:
    several = engine.generate(GenerateRequest(prompt="a fox", seed=30, num_outputs=MAX_OUTPUTS, **SMALL))
    assert [image.seed for image in several.images] == [30, 31, 32, 33]
    assert several.seed == 30 and several.data == several.images[0].data
    assert len({image.data for image in several.images}) == MAX_OUTPUTS
    for index in (0, 2):
        single = engine.generate(GenerateRequest(prompt="a fox", seed=30 + index, **SMALL))
        assert single.images == [several.images[index]]
        assert single.data == several.images[index].data


def test_several_images_are_the_same_for_the_same_seed(engine: FluxEngine) -> None:
    request = GenerateRequest(prompt="a fox", seed=5, num_outputs=2, output_format="png", **SMALL)
    assert engine.generate(request) == engine.generate(request)


@pytest.mark.parametrize("output_format", ["jpeg", "png", "webp"])
def test_each_format_decodes_at_the_requested_size(engine: FluxEngine, output_format: str) -> None:
    response = engine.generate(GenerateRequest(prompt="x", seed=2, num_outputs=2, output_format=output_format, **SMALL))
    assert response.format == output_format
    for image in response.images:
        assert decode_image(image.data, output_format).size == (SMALL["width"], SMALL["height"])


def test_quality_changes_the_lossy_formats_and_png_ignores_it(engine: FluxEngine) -> None:
    def data(output_format: str, quality: int) -> str:
        request = GenerateRequest(prompt="x", seed=6, output_format=output_format, output_quality=quality, **SMALL)
        return engine.generate(request).data

    assert data("jpeg", 90) == engine.generate(GenerateRequest(prompt="x", seed=6, **SMALL)).data
    for lossy in ("jpeg", "webp"):
        assert len(base64.b64decode(data(lossy, 10))) < len(base64.b64decode(data(lossy, 95)))
    assert data("png", 1) == data("png", 100)


def test_prompt2_changes_the_image(engine: FluxEngine) -> None:
    assert generate(engine, seed=3) != generate(engine, seed=3, prompt2="with large windows")


@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (1216, 832), (896, 1152), (512, 768)])
def test_response_is_a_jpeg_of_the_requested_size(engine: FluxEngine, width: int, height: int) -> None:
    response = engine.generate(GenerateRequest(prompt="x", width=width, height=height, seed=5))
    assert (response.width, response.height) == (width, height)
    assert decode_jpeg(response.data).size == (width, height)


def test_an_aspect_ratio_gives_its_size(engine: FluxEngine) -> None:
    response = engine.generate(GenerateRequest(prompt="x", aspect_ratio="21:9", seed=5))
    assert (response.width, response.height) == (1536, 640)
    assert decode_jpeg(response.data).size == (1536, 640)


def test_guidance_is_reset_to_zero_with_a_warning(
    engine: FluxEngine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model.engine import GuidanceResets

    monkeypatch.setattr(engine, "_guidance_resets", GuidanceResets())  # the first reset is always logged
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


def test_a_client_sending_guidance_on_every_request_cannot_flood_the_log(
    engine: FluxEngine, caplog: pytest.LogCaptureFixture
) -> None:
    from model.engine import GuidanceResets

    resets = GuidanceResets()
    with caplog.at_level(logging.WARNING, logger="model.engine"):
        for _ in range(1000):
            resets.record(7.5)
    lines = [r.getMessage() for r in caplog.records if "guidance_scale 7.5 reset" in r.getMessage()]
    assert len(lines) == 4, "the 1st, 10th, 100th and 1000th"
    assert "(1000 requests so far" in lines[-1]


def test_jpg_is_jpeg_and_the_response_says_jpeg(engine: FluxEngine) -> None:
    as_jpg = engine.generate(GenerateRequest(prompt="a red bicycle", seed=3, output_format="jpg", **SMALL))
    as_jpeg = engine.generate(GenerateRequest(prompt="a red bicycle", seed=3, output_format="jpeg", **SMALL))
    assert as_jpg.format == "jpeg" and as_jpg.data == as_jpeg.data
    decode_jpeg(as_jpg.data)


class Served(Exception):
    """Ends a stubbed request once it holds the pipeline: only the order matters here."""


def test_concurrent_requests_are_served_in_arrival_order(engine: FluxEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    order: list[int] = []

    def hold_the_pipeline(job):
        order.append(job.seed)
        time.sleep(0.05)
        raise Served

    monkeypatch.setattr(engine, "encode_text", hold_the_pipeline)

    def request(seed: int) -> None:
        job = engine.job_for(GenerateRequest(prompt="x", seed=seed, **SMALL))
        with pytest.raises(Served):
            engine.run(job)

    # predict_concurrency 4 and more: a burst queues behind the request being served, each a little after the last.
    threads = []
    for seed in range(12):
        thread = threading.Thread(target=request, args=(seed,))
        thread.start()
        threads.append(thread)
        time.sleep(0.005)
    for thread in threads:
        thread.join()
    assert order == list(range(12))


def test_a_request_arriving_at_a_handover_never_overtakes_one_already_waiting(engine: FluxEngine) -> None:
    # A plain lock lets whichever thread asks first after a release take it: a new request could overtake queued ones.
    import threading
    import time

    order: list[str] = []
    lock = engine._lock

    def wait_for_the_pipeline() -> None:
        with lock:
            order.append("waiting")

    with lock:
        waiting = threading.Thread(target=wait_for_the_pipeline)
        waiting.start()
        time.sleep(0.2)  # queued behind the request being served
    with lock:  # arrives just as the pipeline is handed over
        order.append("arrived at the handover")
    waiting.join()
    assert order == ["waiting", "arrived at the handover"]
