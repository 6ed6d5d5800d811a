"""The real Truss server under generated bad input, concurrent load and oversized requests.

The fuzz runs FUZZ_EXAMPLES generated bodies (60 by default; `make fuzz` runs 600), JSON and msgpack.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import os
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgpack  # the Truss server's own requirement: it decodes application/octet-stream bodies with it
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from truss.templates.shared.serialization import truss_msgpack_deserialize, truss_msgpack_serialize

from model.schema import MAX_PROMPT_CHARS, MAX_STEPS
from tests.conftest import RunningServer, decode_image, decode_jpeg, start_server
from tests.truss_server import PREDICT_PATH, READY_PATH

pytestmark = pytest.mark.slow

# Small served sizes keep the tiny model fast enough for hundreds of requests on a CPU.
SIZES = [(256, 256), (512, 256), (256, 512)]
FAKE_TOKEN = "hf_FAKEfakeFAKE0123456789secretvalue"
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
JSON = "application/json"
MSGPACK = "application/octet-stream"  # the content type for which Truss decodes the body as msgpack
STATUS_COUNTS: Counter[tuple[str, int]] = Counter()
# The server's max_body_mb here: the old 256 KiB, so that oversized bodies stay quick to send hundreds of times.
MAX_BODY_BYTES = 256 * 1024


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str = JSON

    @property
    def encoding(self) -> str:
        return "msgpack" if self.content_type == MSGPACK else "json"


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {
        "FLUX_RESOLUTIONS": ",".join(f"{w}x{h}" for w, h in SIZES),
        "TRUSS_SECRET_hf_access_token": FAKE_TOKEN,
        "FLUX_MAX_BODY_MB": str(MAX_BODY_BYTES / 2**20),
    }
    yield from start_server(tmp_path_factory.mktemp("reliability"), env)


def post(
    server: RunningServer, data: bytes | Iterable[bytes], content_type: str = JSON, timeout: float = 120
) -> requests.Response:
    """POST a body; an iterable of chunks goes out with chunked transfer encoding and no Content-Length."""
    return requests.post(server.url(PREDICT_PATH), data=data, headers={"Content-Type": content_type}, timeout=timeout)


def in_chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


# A 4xx message must say what is wrong: name a field the schema has or the body sent, or give one of these reasons.
ROOT_REASONS = ("Invalid JSON", "Input should be an object", "Input should be a valid dictionary")


def names_the_field_or_the_reason(message: str, sent_keys: set[str]) -> bool:
    if message.startswith(("Input Parsing Error:\n", "Input Parsing Errors:\n")):
        # Truss lists each pydantic error as "`field`: what is wrong"; the body itself is the empty location.
        named = {*FIELDS, *sent_keys} - {""}
        reasons = [*ROOT_REASONS, *(["Extra inputs are not permitted"] if "" in sent_keys else [])]
        # An item of a list field is named by its path, e.g. `loras.0.url`.
        return any(f"`{name}`: " in message or f"`{name}." in message for name in named) or any(
            f"``: {why}" in message for why in reasons
        )
    # The engine's 400s start with the field they refuse (an item by its index: output_urls[0]); the 413 states the
    # size it measured.
    fields = [*FIELDS, "width/height"]
    return message.startswith((*(f"{name}: " for name in fields), *(f"{name}[" for name in fields))) or (
        message.startswith("request body of ") and str(MAX_BODY_BYTES) in message
    )


@pytest.mark.parametrize(
    ("message", "sent", "explains"),
    [
        ("Input Parsing Error:\n  `seed`: Input should be greater than or equal to 0.", set(), True),
        ("Input Parsing Error:\n  `colour`: Extra inputs are not permitted.", {"colour"}, True),
        ("Input Parsing Error:\n  ``: Extra inputs are not permitted.", {""}, True),
        ("Input Parsing Error:\n  ``: Invalid JSON: expected value at line 1 column 1.", set(), True),
        ("width/height: 1536x1536 is 2.36 megapixels: width and height must be multiples of 16", set(), True),
        ("width: 1000 is not allowed: width and height must be multiples of 16", set(), True),
        ("aspect_ratio: '7:3' is not one of 21:9, 16:9", set(), True),
        ("Input Parsing Error:\n  `aspect_ratio`: Value error, give either aspect_ratio or width", set(), True),
        (f"request body of 300000 bytes, over {MAX_BODY_BYTES}", set(), True),
        ("", set(), False),
        ("Bad request", set(), False),
        ("Input Parsing Error:\n  ``: Extra inputs are not permitted.", set(), False),
        ("Input Parsing Error:\n  ``: Value error.", set(), False),
        ("Input Parsing Error:\n  `colour`: Extra inputs are not permitted.", set(), False),
        ("Unhandled exception: TypeError: prompt", set(), False),
    ],
)
def test_the_message_check_refuses_vague_messages(message: str, sent: set[str], explains: bool) -> None:
    assert names_the_field_or_the_reason(message, sent) is explains


def sent_keys(body: Body) -> set[str]:
    try:
        decoded = json.loads(body.data) if body.content_type == JSON else truss_msgpack_deserialize(body.data)
    except (ValueError, RecursionError):  # what the server refuses to parse names no field
        return set()
    return {str(key) for key in decoded} if isinstance(decoded, dict) else set()


def assert_well_formed(response: requests.Response, body: Body) -> None:
    """200 with a JPEG, or a 4xx whose JSON names the field or the reason; never a 5xx."""
    STATUS_COUNTS[body.encoding, response.status_code] += 1
    assert response.status_code < 500, response.text
    assert FAKE_TOKEN not in response.text
    if response.status_code == 200:
        payload = response.json() if body.content_type == JSON else msgpack.unpackb(response.content)
        size = (payload["width"], payload["height"])
        assert payload["data"] == payload["images"][0]["data"]
        assert [image["seed"] for image in payload["images"]] == list(
            range(payload["seed"], payload["seed"] + len(payload["images"]))
        )
        for image in payload["images"]:
            assert decode_image(image["data"], payload["format"]).size == size
        return
    assert 400 <= response.status_code < 500
    message = response.json().get("error")
    assert isinstance(message, str), response.text
    if body.content_type == MSGPACK:
        try:
            truss_msgpack_deserialize(body.data)
        except ValueError as exc:
            # Bytes that are not msgpack: Truss answers with its decoder's own words, which can be empty
            # ("" for a reserved byte or nesting too deep). Only Truss can word that better.
            assert (response.status_code, message) == (400, str(exc))
            return
    assert names_the_field_or_the_reason(message, sent_keys(body)), message


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
    "aspect_ratio",
    "num_outputs",
    "output_format",
    "output_quality",
    "image",
    "mask",
    "strength",
    "output_urls",
    "loras",
]
odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["", "   ", "\u0000", "\ud7ff\ue000", "🦊" * 50, "\u202e\u200b", "a" * (MAX_PROMPT_CHARS + 1), "ｆｏｘ"]
    + ["16:9", "1:1", "7:3", "16/9", "jpeg", "jpg", "png", "webp", "gif", "JPEG"]
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


# Values only a msgpack body can carry: Truss's extension types, numpy through msgpack-numpy, and raw bytes.
msgpack_only_value = st.sampled_from(
    [
        decimal.Decimal("256"),
        decimal.Decimal("2.5"),
        decimal.Decimal("NaN"),
        decimal.Decimal("1E+100000000"),  # expanding it to an int took minutes: the schema refuses it first
        decimal.Decimal("-1E-100000000"),
        datetime.datetime(2026, 1, 1),
        datetime.date(2026, 1, 1),
        datetime.timedelta(days=1),
        uuid.UUID(int=7),
        np.int64(256),
        np.float32("nan"),
        np.array([256]),
        np.array(["x"]),
        b"raw bytes",
    ]
)


def draw_value(draw: st.DrawFn, kind: str, values: st.SearchStrategy) -> object:
    if kind == "mostly_valid":
        width, height = draw(sizes)
        body = {
            "prompt": draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40).filter(str.strip)),
            "width": width,
            "height": height,
            "seed": draw(st.integers(min_value=0, max_value=2**32 - 1)),
        }
        if draw(st.booleans()):  # half of them ask for more than the defaults: several images, another format
            body["num_outputs"] = draw(st.integers(min_value=1, max_value=2))
            body["output_format"] = draw(st.sampled_from(["jpeg", "jpg", "png", "webp"]))
            body["output_quality"] = draw(st.integers(min_value=1, max_value=100))
        if draw(st.booleans()):  # half of them break one field
            body[draw(st.sampled_from(FIELDS))] = draw(values)
        return body
    if kind == "random_fields":
        keys = draw(st.lists(st.sampled_from([*FIELDS, "num_images", "negative_prompt", ""]), max_size=6))
        return {key: draw(values) for key in keys}
    return draw(values)  # not an object


@st.composite
def request_bodies(draw: st.DrawFn) -> Body:
    kinds = ["mostly_valid", "random_fields", "not_an_object", "nested", "not_json", "huge"]
    kind = draw(st.sampled_from([*kinds, "msgpack", "msgpack", "odd_msgpack"]))
    if kind == "msgpack":
        value = draw_value(draw, draw(st.sampled_from(kinds[:3])), any_value | msgpack_only_value)
        try:
            return Body(truss_msgpack_serialize(value), MSGPACK)
        except OverflowError:  # msgpack has no integers beyond 64 bits: send that one as JSON
            return Body(json.dumps(value, default=str).encode())
    if kind == "odd_msgpack":  # not msgpack, cut off, nested deep, or over the body limit
        valid = truss_msgpack_serialize({"prompt": "x", "width": 256, "height": 256})
        depth = draw(st.integers(min_value=10, max_value=20000))
        data = draw(
            st.binary(max_size=200)
            | st.just(valid[: draw(st.integers(min_value=0, max_value=len(valid) - 1))])
            | st.just(b"\x91" * depth + b"\x90")  # arrays nested `depth` deep
            | st.just(truss_msgpack_serialize({"prompt": "x" * draw(st.sampled_from([MAX_BODY_BYTES, 3 * 2**20]))}))
        )
        return Body(data, MSGPACK)
    if kind in kinds[:3]:
        return Body(json.dumps(draw_value(draw, kind, any_value)).encode())
    if kind == "nested":
        depth = draw(st.integers(min_value=10, max_value=20000))
        return Body(
            ("[" * depth + "]" * depth).encode()
            if draw(st.booleans())
            else ('{"prompt":' * depth + '"x"' + "}" * depth).encode()
        )
    if kind == "not_json":
        return Body(draw(st.binary(max_size=200) | st.sampled_from([b"", b"{", b"prompt=x", b"\xff\xfe", b"NaN"])))
    size = draw(st.sampled_from([MAX_BODY_BYTES + 1, 3 * 2**20]))
    return Body(
        json.dumps({"prompt": "x" * size}).encode() if draw(st.booleans()) else b'{"prompt": "x"' + b" " * size + b"}"
    )


def test_fuzz_never_5xx_and_always_explains(small_server: RunningServer) -> None:
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=request_bodies())
    def run(body: Body) -> None:
        assert_well_formed(post(small_server, body.data, body.content_type), body)

    run()
    counts = {f"{encoding} {status}": n for (encoding, status), n in sorted(STATUS_COUNTS.items())}
    print("\nfuzz status counts:", json.dumps(counts))
    assert sum(STATUS_COUNTS.values()) >= FUZZ_EXAMPLES
    assert {encoding for encoding, _ in STATUS_COUNTS} == {"json", "msgpack"}
    assert requests.get(small_server.url(READY_PATH), timeout=10).status_code == 200


@pytest.mark.parametrize(("field", "value"), [("seed", "1E+100000000"), ("width", "1E+100000"), ("width", "2.5")])
def test_msgpack_decimals_are_quick_400s(small_server: RunningServer, field: str, value: str) -> None:
    # Pydantic expanded 1E+100000000 to an int for minutes, blocking the event loop; a 1E+100000 width was a 500.
    body = {"prompt": "x", "width": 256, "height": 256, field: decimal.Decimal(value)}
    started = time.perf_counter()
    response = post(small_server, truss_msgpack_serialize(body), MSGPACK, timeout=30)
    assert time.perf_counter() - started < 10
    assert response.status_code == 400 and f"`{field}`: " in response.json()["error"]


# Truss's own msgpack decoder raises more than ValueError on its extension types, before the model runs, and its
# server answers those with its own error: only Truss chooses that status. What this package promises is that such a
# body never reaches the model and costs the replica nothing.
CRAFTED_MSGPACK = [
    ("InvalidOperation", {b"__decimal__": True, b"data": "not a number"}),
    ("TypeError", {b"__dt_datetime_iso__": True, b"data": 5}),
    ("TypeError", {b"__dt_timedelta__": True, b"data": ["a", 1, 2]}),
    ("OverflowError", {b"__dt_timedelta__": True, b"data": [10**9, 0, 0]}),
    ("AttributeError", {b"__uuid__": True, b"data": 5}),
    ("TypeError", {b"nd": True, b"kind": b"", b"type": "no such dtype", b"shape": [1], b"data": b"x"}),
]


@pytest.mark.parametrize(("error", "crafted"), CRAFTED_MSGPACK)
def test_crafted_msgpack_is_refused_and_the_replica_serves_on(
    small_server: RunningServer, error: str, crafted: dict
) -> None:
    data = msgpack.packb({"prompt": "x", "width": 256, "height": 256, "seed": crafted})
    with pytest.raises(Exception) as raised:
        truss_msgpack_deserialize(data)
    assert type(raised.value).__name__ == error and not isinstance(raised.value, ValueError)
    assert post(small_server, data, MSGPACK).status_code >= 400, "never served as a request"
    assert requests.get(small_server.url(READY_PATH), timeout=10).status_code == 200, "the replica stays healthy"
    valid = msgpack.packb({"prompt": "x", "width": 256, "height": 256, "seed": 1})
    assert post(small_server, valid, MSGPACK).status_code == 200, "and serves the next request"


# --- bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, 400, "prompt"),
        ({"prompt": "x", "prompt2": "y" * (MAX_PROMPT_CHARS + 1)}, 400, "prompt2"),
        ({"prompt": "x", "num_inference_steps": MAX_STEPS + 1}, 400, "num_inference_steps"),
        ({"prompt": "x", "num_images": 64}, 400, "num_images"),
        ({"prompt": "x", "width": 65536, "height": 65536}, 400, "width: 65536 is not allowed"),
        ({"prompt": "x", "width": 1536, "height": 1536}, 400, "width/height: 1536x1536 is 2.36 megapixels"),
        ({"prompt": "x", "num_outputs": 64}, 400, "num_outputs"),
        ({"prompt": "x", "max_sequence_length": 100000}, 400, "max_sequence_length"),
    ],
)
def test_limits_are_400s_naming_the_field(small_server: RunningServer, body: dict, status: int, reason: str) -> None:
    response = post(small_server, json.dumps(body).encode())
    assert response.status_code == status
    assert reason in response.text


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_size_limit_is_a_413(small_server: RunningServer, framing: str) -> None:
    def send(data: bytes) -> requests.Response:
        return post(small_server, data if framing == "content-length" else in_chunks(data))

    padded = b'{"prompt": "x", "width": 256, "height": 256' + b" " * MAX_BODY_BYTES + b"}"
    response = send(padded)
    assert response.status_code == 413
    assert f"request body of {len(padded)} bytes, over {MAX_BODY_BYTES}" in response.json()["error"]
    just_under = b'{"prompt": "x", "width": 256, "height": 256' + b" " * (MAX_BODY_BYTES // 2) + b"}"
    assert send(just_under).status_code == 200


def test_an_oversized_body_is_read_and_parsed_before_the_limit(small_server: RunningServer) -> None:
    # Truss reads the whole body, whatever its size or framing, and parses it before the model sees it: a body
    # that fails to parse gets the parser's 400, never the 413. Only the platform's ingress bounds that read.
    huge = json.dumps({"prompt": "x" * 3 * 2**20, "width": 256, "height": 256}).encode()
    response = post(small_server, in_chunks(huge))
    assert response.status_code == 400
    assert "`prompt`: String should have at most" in response.json()["error"]


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
