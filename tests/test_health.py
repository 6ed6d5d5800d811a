"""Replica health: what counts as a dead GPU, failures in a row, recovery, and is_healthy never waiting."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi import HTTPException

from model.engine import FluxEngine, Job
from model.health import MAX_CONSECUTIVE_FAILURES, ReplicaHealth, sticky_device_error
from model.model import Model
from model.schema import GenerateRequest
from model.settings import config_metadata
from tests.conftest import TINY_EAGER
from tests.harness import NO_BODY

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"
SERVED = {"prompt": "a lighthouse", "width": 1024, "height": 1024, "seed": 1}


class InjectedFailure(RuntimeError):
    """An unexpected failure that is not a device error."""


def wrapped(outer: str, inner: BaseException) -> RuntimeError:
    try:
        raise inner
    except BaseException as exc:
        try:
            raise RuntimeError(outer) from exc
        except RuntimeError as chained:
            return chained


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (torch.AcceleratorError(ILLEGAL_ACCESS), "illegal memory access"),
        (RuntimeError("CUDA error: device-side assert triggered"), "device-side assert"),
        (RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"), "illegal memory access"),
        (
            RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`"),
            "cublas_status_execution_failed",
        ),
        (RuntimeError("CUDA error: unspecified launch failure"), "unspecified launch failure"),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), "uncorrectable ecc error"),
        (RuntimeError("CUDA driver error: unknown error"), "cuda driver error: unknown error"),
        (wrapped("decode failed", torch.AcceleratorError(ILLEGAL_ACCESS)), "illegal memory access"),
    ],
)
def test_sticky_device_errors_are_recognised(error: BaseException, kind: str) -> None:
    assert sticky_device_error(error) == kind


@pytest.mark.parametrize(
    "error",
    [
        # An OOM leaves the CUDA context usable: one request fails, the next one runs.
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        torch.AcceleratorError("CUDA error: out of memory"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("CUDA error: invalid configuration argument"),
        RuntimeError("unknown error"),
        ValueError("the prompt says: an illegal memory access was encountered"),
        KeyError("x"),
    ],
)
def test_other_failures_are_not_device_errors(error: BaseException) -> None:
    assert sticky_device_error(error) is None


def test_failures_in_a_row_turn_unhealthy_and_a_success_recovers() -> None:
    health = ReplicaHealth(max_consecutive_failures=3)
    for _ in range(2):
        assert health.record_failure(InjectedFailure("boom")) is None
    assert health.healthy, "two failures in a row are not enough"
    health.record_success()
    for _ in range(2):
        health.record_failure(InjectedFailure("boom"))
    assert health.healthy, "the success reset the count"
    health.record_failure(torch.OutOfMemoryError("CUDA out of memory"))
    assert not health.healthy and health.device_error is None
    health.record_success()
    assert health.healthy and health.consecutive_failures == 0


def test_a_device_error_is_unhealthy_for_good() -> None:
    health = ReplicaHealth()
    assert health.record_failure(torch.AcceleratorError(ILLEGAL_ACCESS)) == "illegal memory access"
    assert not health.healthy
    for _ in range(5):
        health.record_success()
    assert not health.healthy and health.device_error == "illegal memory access"


def test_the_transition_to_unhealthy_is_logged_once_at_error(caplog: pytest.LogCaptureFixture) -> None:
    health = ReplicaHealth(max_consecutive_failures=2)
    with caplog.at_level(logging.DEBUG, logger="model.health"):
        for _ in range(4):
            health.record_failure(InjectedFailure("boom"))
        for _ in range(3):
            health.record_failure(torch.AcceleratorError(ILLEGAL_ACCESS))
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert [record.getMessage().split(":")[0] for record in errors] == [
        "replica unhealthy",
        "replica unhealthy for good",
    ]
    assert "illegal memory access" in errors[1].getMessage()


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> Model:
    for key, value in TINY_EAGER.items():
        monkeypatch.setenv(key, value)
    loaded = Model(config={"model_metadata": config_metadata()})
    loaded.load()
    return loaded


def fail_runs_with(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    def run(self: FluxEngine, job: Job, *adapters: object) -> None:
        raise error

    monkeypatch.setattr(FluxEngine, "run", run)


def predict(model: Model, **fields: object) -> None:
    model.predict(GenerateRequest(**{**SERVED, **fields}), NO_BODY)


def test_not_healthy_before_load() -> None:
    assert Model(config={"model_metadata": config_metadata()}).is_healthy() is False


def test_a_device_error_is_a_500_naming_it_and_every_later_request_a_503(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert model.is_healthy()
    secret_in_message = "hf_FAKE_token_in_an_exception_message"
    with monkeypatch.context() as patch:
        fail_runs_with(patch, torch.AcceleratorError(f"{ILLEGAL_ACCESS} ({secret_in_message})"))
        with pytest.raises(HTTPException) as failed:
            predict(model)
    assert failed.value.status_code == 500
    assert failed.value.detail == (
        "GPU failed (illegal memory access); this replica reports unhealthy and will be restarted"
    )
    assert secret_in_message not in failed.value.detail
    assert not model.is_healthy()
    # The engine works again here, but a real CUDA context would not: the replica refuses instead of queueing.
    with pytest.raises(HTTPException) as refused:
        predict(model)
    assert refused.value.status_code == 503 and "GPU failed earlier" in refused.value.detail
    assert not model.is_healthy()


def test_bad_requests_leave_health_alone_and_unexpected_failures_count(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(MAX_CONSECUTIVE_FAILURES + 2):
        with pytest.raises(HTTPException) as bad:
            predict(model, width=500, height=512)  # off the 16-grid
        assert bad.value.status_code == 400
    assert model.is_healthy()
    with monkeypatch.context() as patch:
        fail_runs_with(patch, InjectedFailure("an unexpected failure"))
        for _ in range(MAX_CONSECUTIVE_FAILURES):
            with pytest.raises(InjectedFailure):
                predict(model)
    assert not model.is_healthy()
    predict(model)
    assert model.is_healthy(), "a success makes the replica healthy again"


def test_is_healthy_never_waits_for_the_engine_lock(model: Model) -> None:
    engine = model._engine
    assert engine is not None
    held = threading.Event()
    release = threading.Event()

    def hold_the_lock() -> None:
        with engine._lock:
            held.set()
            release.wait(timeout=30)

    holder = threading.Thread(target=hold_the_lock)
    pool = ThreadPoolExecutor(max_workers=1)
    holder.start()
    try:
        assert held.wait(timeout=10)
        assert pool.submit(model.is_healthy).result(timeout=2) is True
    finally:
        # Released before the pool shuts down, so a failing is_healthy cannot hang the test.
        release.set()
        holder.join()
        pool.shutdown()
