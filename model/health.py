"""Replica health, judged from what requests saw: a failed GPU, or failures in a row, make a replica unhealthy.

Requests record their outcome here; Truss asks `healthy` on its readiness route (Baseten every 10 seconds), which
stops traffic to, then restarts, a replica that stays unhealthy. Answering reads two fields under a lock that is
held for microseconds: never the pipeline's lock, never the GPU, so a long generation never delays a health check.
This module imports no torch: it classifies exceptions by type and message only.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

# Three unexpected failures with no success between them: a replica that fails every request is taken out within
# three requests, while one unlucky request (an OOM, a bug hit by one input) never takes a healthy replica down.
MAX_CONSECUTIVE_FAILURES = 3

# The text of CUDA errors after which this process cannot use the GPU again: "sticky" errors, which corrupt the CUDA
# context so that every later call fails the same way (the CUDA runtime API docs: "the process must be terminated
# and relaunched"), and a device that failed or went away. Matched, lowercased, anywhere in the message, because
# torch ("CUDA error: ..."), its driver calls ("CUDA driver error: ..."), Triton ("Triton Error [CUDA]: ...") and the
# libraries word the prefix differently.
#
# Not here, on purpose: "out of memory" in every wording (torch.OutOfMemoryError, "CUDA error: out of memory",
# CUBLAS_STATUS_ALLOC_FAILED). An allocation that fails leaves the context intact, the caching allocator frees the
# request's tensors, and the next request runs; a replica that keeps running out of memory is caught by
# MAX_CONSECUTIVE_FAILURES instead. Nor errors a bad launch configuration gives ("invalid argument", "invalid
# configuration argument", "too many resources requested"): they fail one call, not the context.
STICKY_DEVICE_ERRORS: tuple[str, ...] = (
    "illegal memory access",  # cudaErrorIllegalAddress: a kernel wrote or read outside its memory
    "device-side assert",  # cudaErrorAssert: a kernel's assert fired
    "unspecified launch failure",  # cudaErrorLaunchFailure: a kernel died, also what a GPU lost mid-kernel can report
    "misaligned address",  # cudaErrorMisalignedAddress
    "illegal instruction",  # cudaErrorIllegalInstruction
    "hardware stack error",  # cudaErrorHardwareStackError
    "invalid program counter",  # cudaErrorInvalidPc
    "launch timed out",  # cudaErrorLaunchTimeout: a kernel ran past the watchdog
    "uncorrectable ecc error",  # cudaErrorECCUncorrectable: the memory itself failed
    "busy or unavailable",  # cudaErrorDevicesUnavailable: the device was taken away
    "no cuda-capable device",  # cudaErrorNoDevice: the device is gone
    "cuda error: unknown error",  # cudaErrorUnknown: what a device that fell off the bus can report
    "cuda driver error: unknown error",
    "[cuda]: unknown error",
    "cublas_status_execution_failed",  # a cuBLAS kernel failed to run on the device
    "cudnn_status_execution_failed",  # the same for cuDNN
)

# How far down __cause__ / __context__ to look: wrappers add a level or two, never dozens.
_MAX_CHAIN = 8


def sticky_device_error(exc: BaseException) -> str | None:
    """The sticky CUDA error that `exc`, or an exception it was raised from, reports; None for any other failure.

    Only RuntimeErrors count (torch.AcceleratorError, torch's CUDA errors and Triton's are all RuntimeErrors), so a
    message that merely quotes such words in another kind of error is never taken for a dead GPU.
    """
    current: BaseException | None = exc
    for _ in range(_MAX_CHAIN):
        if current is None:
            break
        if isinstance(current, RuntimeError):
            text = str(current).lower()
            for marker in STICKY_DEVICE_ERRORS:
                if marker in text:
                    return marker
        current = current.__cause__ or current.__context__
    return None


def gpu_failed_message(device_error: str, *, earlier: bool = False) -> str:
    """What a client is told: the kind of error from STICKY_DEVICE_ERRORS only, never the exception's own text."""
    when = " earlier" if earlier else ""
    return f"GPU failed{when} ({device_error}); this replica reports unhealthy and will be restarted"


class ReplicaHealth:
    """Healthy until a sticky device error (for good) or `max_consecutive_failures` failures in a row (until a
    success). Safe to record from several request threads at once."""

    def __init__(self, max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES) -> None:
        if max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures must be at least 1, not {max_consecutive_failures}")
        self._max_consecutive_failures = max_consecutive_failures
        self._lock = threading.Lock()
        self._consecutive_failures = 0
        self._device_error: str | None = None

    @property
    def healthy(self) -> bool:
        with self._lock:
            return self._healthy_holding_lock()

    @property
    def device_error(self) -> str | None:
        """The sticky device error seen, if any: the replica cannot serve again in this process."""
        with self._lock:
            return self._device_error

    @property
    def consecutive_failures(self) -> int:
        with self._lock:
            return self._consecutive_failures

    def record_success(self) -> None:
        with self._lock:
            recovered = self._device_error is None and not self._healthy_holding_lock()
            self._consecutive_failures = 0
        if recovered:
            log.warning("replica healthy again: a request succeeded after failures in a row")

    def record_failure(self, exc: BaseException) -> str | None:
        """Count an unexpected failure; return the sticky device error it reports, if it does."""
        device_error = sticky_device_error(exc)
        with self._lock:
            was_healthy = self._healthy_holding_lock()
            first_device_error = device_error is not None and self._device_error is None
            if first_device_error:
                self._device_error = device_error
            self._consecutive_failures += 1
            failures = self._consecutive_failures
        # Logged once per transition, outside the lock: Truss already logs each failed request's traceback.
        if first_device_error:
            log.error(
                "replica unhealthy for good: the GPU failed (%s: %s); the CUDA context cannot recover, so the "
                "health check fails until the replica is restarted",
                type(exc).__name__,
                device_error,
            )
        elif was_healthy and failures >= self._max_consecutive_failures:
            log.error(
                "replica unhealthy: %d requests failed in a row, the last with %s; healthy again after a success",
                failures,
                type(exc).__name__,
            )
        return device_error

    def _healthy_holding_lock(self) -> bool:
        return self._device_error is None and self._consecutive_failures < self._max_consecutive_failures
