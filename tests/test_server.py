"""The real Truss server, end to end, from truss's generated build context."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import RunningServer, decode_jpeg
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
    assert set(payload) == {"data", "seed", "width", "height"}
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
        ({"prompt": "x", "width": 512, "height": 512}, "width/height"),
    ],
)
def test_invalid_bodies_get_400_naming_the_field(server: RunningServer, body: dict, field: str) -> None:
    response = predict(server, body)
    assert response.status_code == 400, response.text
    assert field in response.text


def test_unserved_size_lists_the_served_ones(server: RunningServer) -> None:
    response = predict(server, {"prompt": "x", "width": 640, "height": 640})
    assert response.status_code == 400
    for size in ("1024x1024", "1216x832", "896x1152"):
        assert size in response.text


def test_non_json_body_is_a_400(server: RunningServer) -> None:
    response = requests.post(
        server.url(PREDICT_PATH), data=b"not json", headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 400


def test_schema_is_published(server: RunningServer) -> None:
    schema = requests.get(server.url("/v1/models/model/schema"), timeout=10).json()
    properties = schema["input_schema"]["properties"]
    assert {"prompt", "prompt2", "width", "height", "seed", "guidance_scale"} <= set(properties)
