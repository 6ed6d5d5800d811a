"""Image-to-image and inpainting on the tiny model: inputs inline and from a real loopback server, and bad ones."""

from __future__ import annotations

import base64
import io
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from model.engine import FluxEngine, InvalidRequest
from model.schema import GenerateRequest
from tests.conftest import RunningServer, tiny_engine
from tests.test_server import predict
from tests.web_server import WebServer, web_server

BODY = {"prompt": "a red barn in snow", "seed": 5, "num_inference_steps": 2}


def encoded(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PICTURE = encoded(Image.new("RGB", (300, 260), (180, 40, 30)))
MASK = Image.new("L", (300, 260), 0)
MASK.paste(255, (100, 80, 200, 180))
MASK_PNG = encoded(MASK)


@pytest.fixture(scope="module")
def files() -> Iterator[WebServer]:
    root = Path(tempfile.mkdtemp(prefix="inputs-"))
    (root / "picture.png").write_bytes(PICTURE)
    (root / "mask.png").write_bytes(MASK_PNG)
    with web_server(root) as server:
        yield server


@pytest.fixture(scope="module")
def local_engine(settings) -> FluxEngine:
    engine = tiny_engine(settings)
    engine.allow_private_urls = True  # the inputs are served on loopback
    return engine


def generate(engine: FluxEngine, **fields: object) -> str:
    return engine.generate(GenerateRequest(**{**BODY, **fields})).data


def test_image_to_image_is_deterministic_and_inline_equals_url(local_engine: FluxEngine, files: WebServer) -> None:
    inline = generate(local_engine, image=b64(PICTURE), strength=0.6)
    assert generate(local_engine, image=b64(PICTURE), strength=0.6) == inline
    assert generate(local_engine, image=f"{files.base}/files/picture.png", strength=0.6) == inline
    assert generate(local_engine, image=f"data:image/png;base64,{b64(PICTURE)}", strength=0.6) == inline
    # About strength x steps steps run (diffusers rounds the skipped ones down): 2 of 4, then all 4.
    half = generate(local_engine, image=b64(PICTURE), strength=0.5, num_inference_steps=4)
    assert half != generate(local_engine, image=b64(PICTURE), strength=1.0, num_inference_steps=4)
    assert (
        half != local_engine.generate(GenerateRequest(**{**BODY, "num_inference_steps": 4}, width=288, height=256)).data
    )


def test_inpainting_differs_from_image_to_image_and_is_deterministic(
    local_engine: FluxEngine, files: WebServer
) -> None:
    painted = generate(local_engine, image=b64(PICTURE), mask=b64(MASK_PNG))
    assert generate(local_engine, image=b64(PICTURE), mask=f"{files.base}/files/mask.png") == painted
    assert painted != generate(local_engine, image=b64(PICTURE))


def test_the_size_is_the_image_fitted_to_the_bounds(local_engine: FluxEngine) -> None:
    response = local_engine.generate(GenerateRequest(**BODY, image=b64(PICTURE)))
    assert (response.width, response.height) == (288, 256), "300x260 rounded down to the 16-grid"
    large = encoded(Image.new("RGB", (4000, 3000), (10, 90, 200)), "JPEG")
    assert local_engine.fitted(4000, 3000) == local_engine.resolution_for(
        GenerateRequest(**BODY, image=b64(large)), local_engine.read_inputs(GenerateRequest(**BODY, image=b64(large)))
    )
    fitted = local_engine.fitted(4000, 3000)
    assert (fitted.width, fitted.height) == (1536, 1152) and fitted.width * fitted.height <= 2e6
    asked = local_engine.generate(GenerateRequest(**BODY, image=b64(PICTURE), width=256, height=256))
    assert (asked.width, asked.height) == (256, 256)


def test_transparency_is_composited_onto_white_and_cmyk_converted(local_engine: FluxEngine) -> None:
    clear = encoded(Image.new("RGBA", (300, 260), (255, 0, 0, 0)))
    white = encoded(Image.new("RGB", (300, 260), (255, 255, 255)))
    assert generate(local_engine, image=b64(clear)) == generate(local_engine, image=b64(white))
    cmyk = encoded(Image.new("CMYK", (300, 260), (0, 200, 200, 0)), "JPEG")
    assert generate(local_engine, image=b64(cmyk))


def _animated() -> bytes:
    frames = [Image.new("RGB", (64, 64), color) for color in ((255, 0, 0), (0, 255, 0))]
    return encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"image": "not base64!!"}, "image", "neither an http(s) URL nor valid base64"),
        ({"image": b64(b"GIF89a not really")}, "image", "not a PNG, JPEG or WebP image"),
        ({"image": b64(encoded(Image.new("RGB", (8, 8)), "BMP"))}, "image", "a BMP image"),
        ({"image": b64(_animated())}, "image", "animated image of 2 frames"),
        ({"image": b64(encoded(Image.new("L", (5000, 4000))))}, "image", "5000x4000 is over 16 megapixels"),
        ({"image": b64(PICTURE), "mask": b64(encoded(Image.new("L", (100, 100))))}, "mask", "but the image is 300x260"),
        ({"image": "https://127.0.0.1/picture.png"}, "image", "private, loopback or reserved"),
        ({"image": "ftp://example.com/picture.png"}, "image", "scheme must be https"),
    ],
)
def test_bad_inputs_are_refused_by_field(settings, fields: dict, field: str, words: str) -> None:
    engine = tiny_engine(settings)
    with pytest.raises(InvalidRequest, match=re.escape(words)) as refused:
        engine.generate(GenerateRequest(**BODY, **fields))
    assert refused.value.field_name == field


def test_a_missing_input_url_is_refused(local_engine: FluxEngine, files: WebServer) -> None:
    with pytest.raises(InvalidRequest, match="404") as refused:
        generate(local_engine, image=f"{files.base}/files/missing.png")
    assert refused.value.field_name == "image"


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"mask": "abc"}, "a mask needs an image"),
        ({"image": "abc", "strength": 0}, "greater than 0"),
        ({"image": "abc", "strength": 1.5}, "less than or equal to 1"),
    ],
)
def test_the_schema_refuses_a_mask_alone_and_strength_out_of_range(fields: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        GenerateRequest(**BODY, **fields)


@pytest.mark.slow
def test_over_http_an_image_by_url_or_inline_gives_the_same_bytes(open_server: RunningServer, files: WebServer) -> None:
    by_url = predict(open_server, {**BODY, "image": f"{files.base}/files/picture.png"})
    assert by_url.status_code == 200, by_url.text
    inline = predict(open_server, {**BODY, "image": b64(PICTURE)})
    assert inline.json()["data"] == by_url.json()["data"]
    assert (by_url.json()["width"], by_url.json()["height"]) == (288, 256)
    refused = predict(open_server, {**BODY, "image": b64(b"not an image")})
    assert refused.status_code == 400 and "image" in refused.text
    assert predict(open_server, BODY).status_code == 200, "the replica stays healthy"
