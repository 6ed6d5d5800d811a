"""The real Truss server under generated bad input, concurrent load and oversized requests.

The fuzz runs FUZZ_EXAMPLES generated bodies (60 by default; `make fuzz` runs 600).
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.schema import MAX_BODY_BYTES, MAX_PROMPT_CHARS, MAX_STEPS
from tests.conftest import RunningServer, decode_jpeg, start_server
from tests.truss_server import PREDICT_PATH, READY_PATH

pytestmark = pytest.mark.slow

# Small served sizes keep the tiny model fast enough for hundreds of requests on a CPU.
SIZES = [(256, 256), (512, 256), (256, 512)]
FAKE_TOKEN = "hf_FAKEfakeFAKE0123456789secretvalue"
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
STATUS_COUNTS: Counter[int] = Counter()


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {
        "FLUX_RESOLUTIONS": ",".join(f"{w}x{h}" for w, h in SIZES),
        "TRUSS_SECRET_hf_access_token": FAKE_TOKEN,
    }
    yield from start_server(tmp_path_factory.mktemp("reliability"), env)


def post(server: RunningServer, data: bytes, timeout: float = 120) -> requests.Response:
    return requests.post(
        server.url(PREDICT_PATH), data=data, headers={"Content-Type": "application/json"}, timeout=timeout
    )


def assert_well_formed(response: requests.Response) -> None:
    """200 with a JPEG, or a 4xx whose JSON says what is wrong; never a 5xx."""
    STATUS_COUNTS[response.status_code] += 1
    assert response.status_code < 500, response.text
    assert FAKE_TOKEN not in response.text
    if response.status_code == 200:
        decode_jpeg(response.json()["data"])
        return
    assert 400 <= response.status_code < 500
    payload = response.json()
    message = payload.get("error") or payload.get("detail")
    assert isinstance(message, str) and message.strip(), payload


# --- the fuzz ------------------------------------------------------------------------------------

FIELDS = [
    "prompt",
    "prompt2",
    "width",
    "height",
    "seed",
    "guidance_scale",
    "num_inference_steps",
    "max_sequence_length",
]
odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["", "   ", "\u0000", "\ud7ff\ue000", "🦊" * 50, "\u202e\u200b", "a" * (MAX_PROMPT_CHARS + 1), "ｆｏｘ"]
)
numbers = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 15, 16, 17, 255, 256, 512, 1024, 100000, -1, 2**31, 2**32, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
)
any_value = (
    st.none()
    | odd_text
    | numbers
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
sizes = st.sampled_from(SIZES)


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mostly_valid", "random_fields", "not_an_object", "nested", "not_json", "huge"]))
    if kind == "mostly_valid":
        width, height = draw(sizes)
        body = {
            "prompt": draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40).filter(str.strip)),
            "width": width,
            "height": height,
            "seed": draw(st.integers(min_value=0, max_value=2**32 - 1)),
        }
        if draw(st.booleans()):  # half of them break one field
            body[draw(st.sampled_from(FIELDS))] = draw(any_value)
        return json.dumps(body).encode()
    if kind == "random_fields":
        keys = draw(st.lists(st.sampled_from([*FIELDS, "num_images", "negative_prompt", ""]), max_size=6))
        return json.dumps({key: draw(any_value) for key in keys}).encode()
    if kind == "not_an_object":
        return json.dumps(draw(any_value)).encode()
    if kind == "nested":
        depth = draw(st.integers(min_value=10, max_value=20000))
        return (
            ("[" * depth + "]" * depth).encode()
            if draw(st.booleans())
            else ('{"prompt":' * depth + '"x"' + "}" * depth).encode()
        )
    if kind == "not_json":
        return draw(st.binary(max_size=200) | st.sampled_from([b"", b"{", b"prompt=x", b"\xff\xfe", b"NaN"]))
    size = draw(st.sampled_from([MAX_BODY_BYTES + 1, 3 * 2**20]))
    return (
        json.dumps({"prompt": "x" * size}).encode() if draw(st.booleans()) else b'{"prompt": "x"' + b" " * size + b"}"
    )


def test_fuzz_never_5xx_and_always_explains(small_server: RunningServer) -> None:
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=request_bodies())
    def run(body: bytes) -> None:
        assert_well_formed(post(small_server, body))

    run()
    print("\nfuzz status counts:", json.dumps(dict(sorted(STATUS_COUNTS.items()))))
    assert sum(STATUS_COUNTS.values()) >= FUZZ_EXAMPLES
    assert requests.get(small_server.url(READY_PATH), timeout=10).status_code == 200


# --- bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, 400, "prompt"),
        ({"prompt": "x", "prompt2": "y" * (MAX_PROMPT_CHARS + 1)}, 400, "prompt2"),
        ({"prompt": "x", "num_inference_steps": MAX_STEPS + 1}, 400, "num_inference_steps"),
        ({"prompt": "x", "num_images": 64}, 400, "num_images"),
        ({"prompt": "x", "width": 65536, "height": 65536}, 400, "width/height"),
        ({"prompt": "x", "max_sequence_length": 100000}, 400, "max_sequence_length"),
    ],
)
def test_limits_are_400s_naming_the_field(small_server: RunningServer, body: dict, status: int, reason: str) -> None:
    response = post(small_server, json.dumps(body).encode())
    assert response.status_code == status
    assert reason in response.text


def test_body_size_limit_is_a_413(small_server: RunningServer) -> None:
    padded = b'{"prompt": "x", "width": 256, "height": 256' + b" " * MAX_BODY_BYTES + b"}"
    response = post(small_server, padded)
    assert response.status_code == 413
    assert str(MAX_BODY_BYTES) in response.text
    just_under = b'{"prompt": "x", "width": 256, "height": 256' + b" " * (MAX_BODY_BYTES // 2) + b"}"
    assert post(small_server, just_under).status_code == 200


# --- concurrency ---------------------------------------------------------------------------------

CLIENTS = 32
REQUESTS = 200


def test_concurrent_clients_get_their_own_images(small_server: RunningServer) -> None:
    unique = [
        {"prompt": f"request {i}", "width": w, "height": h, "seed": 1000 + i} for i, (w, h) in enumerate(SIZES * 6)
    ]
    expected = {}
    for body in unique:  # each request alone, one at a time
        response = post(small_server, json.dumps(body).encode())
        assert response.status_code == 200
        expected[body["seed"]] = response.json()["data"]

    bodies = [unique[i % len(unique)] for i in range(REQUESTS)]

    def send(body: dict) -> tuple[dict, requests.Response, float]:
        started = time.perf_counter()
        response = post(small_server, json.dumps(body).encode(), timeout=600)
        return body, response, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        results = list(pool.map(send, bodies))
    elapsed = time.perf_counter() - started

    latencies = sorted(seconds for _, _, seconds in results)
    for body, response, _ in results:
        assert response.status_code == 200, response.text
        payload = response.json()
        assert payload["seed"] == body["seed"]
        assert payload["data"] == expected[body["seed"]], "a response carried another request's image"
        assert decode_jpeg(payload["data"]).size == (body["width"], body["height"])
    figures = {
        "clients": CLIENTS,
        "requests": REQUESTS,
        "throughput_rps": round(REQUESTS / elapsed, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
    }
    print("\nconcurrency:", json.dumps(figures))


# --- secrets -------------------------------------------------------------------------------------


def test_the_token_never_reaches_a_log_or_a_response(small_server: RunningServer) -> None:
    for body in ({"prompt": "x", "width": 256, "height": 256}, {"prompt": ""}, {"hf_access_token": "?"}):
        response = post(small_server, json.dumps(body).encode())
        assert FAKE_TOKEN not in response.text
    assert FAKE_TOKEN not in small_server.log()
    assert base64.b64encode(FAKE_TOKEN.encode()).decode() not in small_server.log()
