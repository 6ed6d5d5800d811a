"""Health after load, on the real Truss server: a GPU failure turns the readiness route unhealthy.

The fault is injected from outside the product: tests/fault_injection/sitecustomize.py, put on the server's
PYTHONPATH, makes FluxEngine.run raise the error an illegal memory access gives when a prompt holds a chosen word.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from model.health import MAX_CONSECUTIVE_FAILURES
from tests.conftest import RunningServer, decode_jpeg, start_server
from tests.harness import with_fault_injection
from tests.truss_server import PREDICT_PATH, READY_PATH

pytestmark = pytest.mark.slow

DEVICE_ERROR_WORD = "zebra-illegal-access"
FAILURE_WORD = "zebra-flaky"
SERVED = {"prompt": "a lighthouse at dusk", "width": 1024, "height": 1024, "seed": 5}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    env = with_fault_injection({"INJECT_DEVICE_ERROR_ON": DEVICE_ERROR_WORD, "INJECT_FAILURE_ON": FAILURE_WORD})
    yield from start_server(tmp_path, env)


def predict(server: RunningServer, prompt: str, **fields: object) -> requests.Response:
    return requests.post(server.url(PREDICT_PATH), json={**SERVED, "prompt": prompt, **fields}, timeout=120)


def status(server: RunningServer, path: str) -> int:
    return requests.get(server.url(path), timeout=10).status_code


def assert_serves(server: RunningServer) -> None:
    response = predict(server, SERVED["prompt"])
    assert response.status_code == 200, response.text
    assert decode_jpeg(response.json()["data"]).size == (1024, 1024)


def test_a_gpu_failure_answers_500_and_turns_readiness_unhealthy(server: RunningServer) -> None:
    assert status(server, READY_PATH) == 200
    assert_serves(server)

    failed = predict(server, f"a fox, {DEVICE_ERROR_WORD}")
    assert failed.status_code == 500
    assert failed.json()["error"] == (
        "GPU failed (illegal memory access); this replica reports unhealthy and will be restarted"
    )
    for _ in range(3):
        assert status(server, READY_PATH) == 503
    # Later requests are refused without touching the GPU, and the replica stays unhealthy.
    refused = predict(server, SERVED["prompt"])
    assert refused.status_code == 503 and "GPU failed earlier" in refused.json()["error"]
    assert status(server, READY_PATH) == 503
    # Truss's other routes do not ask is_healthy(): liveness stays up, and load() did finish.
    assert status(server, "/") == 200
    assert status(server, READY_PATH + "/loaded") == 200

    log = server.log()
    assert log.count("replica unhealthy for good") == 1
    assert "illegal memory access" in log
    assert "Health check failed." in log, "Truss logs each readiness check that is_healthy() failed"


def test_bad_requests_leave_health_alone_and_failures_in_a_row_do_not(server: RunningServer) -> None:
    for _ in range(MAX_CONSECUTIVE_FAILURES + 2):
        assert predict(server, "a fox", width=500, height=512).status_code == 400
    assert status(server, READY_PATH) == 200

    for attempt in range(1, MAX_CONSECUTIVE_FAILURES + 1):
        assert predict(server, f"a fox, {FAILURE_WORD}").status_code == 500
        expected = 200 if attempt < MAX_CONSECUTIVE_FAILURES else 503
        assert status(server, READY_PATH) == expected, f"after {attempt} failures in a row"

    assert_serves(server)
    assert status(server, READY_PATH) == 200, "a success makes the replica healthy again"
    assert server.log().count("replica unhealthy: ") == 1
