"""The real Truss server, end to end, from truss's generated build context."""

from __future__ import annotations

import pytest
import requests

from model.schema import MAX_SEED
from tests.conftest import RunningServer, decode_image, decode_jpeg
from tests.truss_server import PREDICT_PATH, READY_PATH

pytestmark = pytest.mark.slow

# The three example requests of the README.
EXAMPLES = [
    ({"prompt": "a cozy reading nook with warm sunlight"}, (1024, 1024)),
    (
        {"prompt": "a watercolor painting of a fox in a misty forest", "width": 1216, "height": 832, "seed": 42},
        (1216, 832),
    ),
    (
        {"prompt": "a modern living room, scandinavian style", "prompt2": "with large windows and houseplants"},
        (1024, 1024),
    ),
]


def predict(server: RunningServer, body: object, **kwargs) -> requests.Response:
    return requests.post(server.url(PREDICT_PATH), json=body, timeout=120, **kwargs)


def test_ready_after_load(server: RunningServer) -> None:
    assert requests.get(server.url(READY_PATH), timeout=10).status_code == 200


@pytest.mark.parametrize(("body", "size"), EXAMPLES)
def test_examples_return_jpegs_of_the_right_size(server: RunningServer, body: dict, size: tuple[int, int]) -> None:
    response = predict(server, body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload) == {"data", "seed", "width", "height", "format", "images", "loras"}
    assert payload["loras"] == []
    assert payload["format"] == "jpeg"
    assert payload["images"] == [{"data": payload["data"], "seed": payload["seed"]}]
    assert decode_jpeg(payload["data"]).size == size
    assert (payload["width"], payload["height"]) == size
    if "seed" in body:
        assert payload["seed"] == body["seed"]


def test_same_seed_same_bytes_over_http(server: RunningServer) -> None:
    body = {"prompt": "a lighthouse at dusk", "seed": 3, "width": 1216, "height": 832}
    assert predict(server, body).json()["data"] == predict(server, body).json()["data"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "width": "wide"}, "width"),
        ({"prompt": "x", "seed": -5}, "seed"),
        ({"prompt": "x", "num_inference_steps": "four"}, "num_inference_steps"),
        ({"prompt": "x", "max_sequence_length": 4096}, "max_sequence_length"),
        ({"prompt": "x", "unknown": 1}, "unknown"),
        ({"prompt": "x", "aspect_ratio": "16:9", "width": 1344}, "`aspect_ratio`: Value error, give either"),
        ({"prompt": "x", "aspect_ratio": "7:3"}, "aspect_ratio: '7:3' is not one of 21:9, 16:9, 3:2"),
        ({"prompt": "x", "width": 1000}, "width: 1000 is not allowed: width and height must be multiples of 16"),
        ({"prompt": "x", "width": 1536, "height": 1536}, "width/height: 1536x1536 is 2.36 megapixels"),
        ({"prompt": "x", "num_outputs": 5}, "num_outputs"),
        ({"prompt": "x", "seed": MAX_SEED, "num_outputs": 2}, "`seed`: Value error, image i uses seed + i"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "output_quality": 0}, "output_quality"),
    ],
)
def test_invalid_bodies_get_400_naming_the_field(server: RunningServer, body: dict, field: str) -> None:
    response = predict(server, body)
    assert response.status_code == 400, response.text
    assert field in response.text


@pytest.mark.parametrize(
    ("body", "output_format", "size"),
    [
        ({"width": 512, "height": 256, "num_outputs": 3, "output_format": "png"}, "png", (512, 256)),
        (
            {"aspect_ratio": "21:9", "num_outputs": 2, "output_format": "webp", "output_quality": 60},
            "webp",
            (1536, 640),
        ),
    ],
)
def test_several_images_in_a_format(
    server: RunningServer, body: dict, output_format: str, size: tuple[int, int]
) -> None:
    response = predict(server, {"prompt": "a lighthouse at dusk", "seed": 11, **body})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert (payload["format"], payload["width"], payload["height"], payload["seed"]) == (output_format, *size, 11)
    assert [image["seed"] for image in payload["images"]] == list(range(11, 11 + body["num_outputs"]))
    assert payload["data"] == payload["images"][0]["data"]
    for image in payload["images"]:
        assert decode_image(image["data"], output_format).size == size
    single = predict(server, {"prompt": "a lighthouse at dusk", "seed": 12, **body, "num_outputs": 1}).json()
    assert single["data"] == payload["images"][1]["data"]


def test_non_json_body_is_a_400(server: RunningServer) -> None:
    response = requests.post(
        server.url(PREDICT_PATH), data=b"not json", headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 400


def test_schema_is_published(server: RunningServer) -> None:
    schema = requests.get(server.url("/v1/models/model/schema"), timeout=10).json()
    properties = schema["input_schema"]["properties"]
    assert {"prompt", "prompt2", "width", "height", "seed", "guidance_scale"} <= set(properties)
    assert {"aspect_ratio", "num_outputs", "output_format", "output_quality"} <= set(properties)
