"""output_urls: each image PUT to its presigned URL by a real upload to a real loopback server, and the ways a
storage fails."""

from __future__ import annotations

import functools
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from model import engine as engine_module
from model.engine import FluxEngine, InvalidRequest, UploadFailed
from model.schema import GenerateRequest
from tests.conftest import RunningServer, tiny_engine
from tests.test_server import predict
from tests.web_server import WebServer, web_server

BODY = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "seed": 7, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def storage() -> Iterator[WebServer]:
    with web_server(Path(tempfile.mkdtemp(prefix="storage-"))) as server:
        yield server


@pytest.fixture(scope="module")
def local_engine(settings) -> FluxEngine:
    engine = tiny_engine(settings)
    engine.allow_private_urls = True  # the storage is on loopback
    return engine


def test_each_image_is_uploaded_with_its_content_type(local_engine: FluxEngine, storage: WebServer) -> None:
    inline = local_engine.generate(GenerateRequest(**BODY, num_outputs=2, output_format="png"))
    urls = [f"{storage.base}/put/a.png?X-Amz-Signature=abc", f"{storage.base}/put/b.png"]
    uploaded = local_engine.generate(GenerateRequest(**BODY, num_outputs=2, output_format="png", output_urls=urls))
    assert uploaded.data is None
    assert [(image.url, image.seed, image.data) for image in uploaded.images] == [
        (urls[0], 7, None),
        (urls[1], 8, None),
    ]
    for path, image in zip(("/put/a.png?X-Amz-Signature=abc", "/put/b.png"), inline.images, strict=True):
        content_type, body = storage.uploads[path]
        assert content_type == "image/png"
        assert Image.open(io.BytesIO(body)).format == "PNG"
        assert body == __import__("base64").b64decode(image.data), "the bytes the inline answer carries"


def test_a_transient_failure_is_retried_and_a_slow_storage_waited_for(
    local_engine: FluxEngine, storage: WebServer
) -> None:
    for path in ("/put-flaky/x.jpg", "/put-slow/y.jpg"):
        response = local_engine.generate(GenerateRequest(**BODY, output_urls=[storage.base + path]))
        assert response.images[0].url == storage.base + path and path in storage.uploads
    assert storage.attempts["/put-flaky/x.jpg"] == 2


def test_a_refused_upload_names_the_url_and_the_status_and_carries_the_images(
    local_engine: FluxEngine, storage: WebServer
) -> None:
    inline = local_engine.generate(GenerateRequest(**BODY, num_outputs=2))
    urls = [f"{storage.base}/put/ok.jpg", f"{storage.base}/put-403/no.jpg"]
    with pytest.raises(UploadFailed) as failed:
        local_engine.generate(GenerateRequest(**BODY, num_outputs=2, output_urls=urls))
    assert failed.value.field_name == "output_urls[1]" and failed.value.status == 403
    assert "HTTP 403" in str(failed.value) and storage.attempts["/put-403/no.jpg"] == 1, "a 403 is final"
    assert [image.data for image in failed.value.response.images] == [image.data for image in inline.images]


def test_an_upload_that_times_out_still_answers(
    local_engine: FluxEngine, storage: WebServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "put", functools.partial(engine_module.put, attempts=2, timeout_s=0.5))
    with pytest.raises(UploadFailed, match="timed out") as failed:
        local_engine.generate(GenerateRequest(**BODY, output_urls=[f"{storage.base}/put-slow/late.jpg"]))
    assert failed.value.status is None and failed.value.response.data


@pytest.mark.parametrize(
    ("urls", "words"),
    [
        (["http://example.com/a.jpg"], "scheme must be https"),
        (["ftp://example.com/a.jpg"], "scheme must be https"),
        (["https://127.0.0.1/a.jpg"], "private, loopback or reserved"),
        (["https://user:pw@example.com/a.jpg"], "credentials"),
    ],
)
def test_a_bad_output_url_is_refused_before_any_work(settings, urls: list[str], words: str) -> None:
    engine = tiny_engine(settings)  # allow_private_urls off, as deployed
    with pytest.raises(InvalidRequest, match=words) as refused:
        engine.job_for(GenerateRequest(**BODY, output_urls=urls))
    assert refused.value.field_name == "output_urls[0]"


def test_one_url_per_image() -> None:
    with pytest.raises(ValueError, match="one URL per image: 1 URLs for num_outputs 2"):
        GenerateRequest(**BODY, num_outputs=2, output_urls=["https://example.com/a.jpg"])


@pytest.mark.slow
def test_over_http_images_go_to_their_urls_and_a_failed_upload_is_a_502_carrying_them(
    open_server: RunningServer, storage: WebServer
) -> None:
    body = {**BODY, "width": 1024, "height": 1024}
    response = predict(open_server, {**body, "output_urls": [f"{storage.base}/put/http.jpg"]})
    assert response.status_code == 200, response.text
    assert response.json()["images"] == [{"url": f"{storage.base}/put/http.jpg", "seed": 7}]
    assert "data" not in response.json()
    assert storage.uploads["/put/http.jpg"][0] == "image/jpeg"
    failed = predict(open_server, {**body, "output_urls": [f"{storage.base}/put-403/http.jpg"]})
    assert failed.status_code == 502, failed.text
    error = failed.json()["error"]
    assert error["field"] == "output_urls[0]" and error["storage_status"] == 403
    assert error["images"][0]["data"] == error["data"] and error["data"]
    assert requests.get(open_server.url("/v1/models/model"), timeout=10).status_code == 200, "still healthy"
    refused = predict(open_server, {**body, "output_urls": ["ftp://example.com/a.jpg"]})
    assert refused.status_code == 400 and "output_urls[0]" in refused.text
