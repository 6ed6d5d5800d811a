"""The Truss adapter: read config and secrets, wire the parts in load(), answer predict() and is_healthy().

No `from __future__ import annotations` here: Truss reads predict's annotations at run time to
parse requests into GenerateRequest and publish the schema, and string annotations hide the type.
"""

import logging
import shutil
import subprocess
import time
from typing import TYPE_CHECKING, Any

# Imported with the module, as the server starts: load()'s cache key needs it (the device, the versions) before the
# restore can start, unlike the engine's modules, which load() imports beside the restore.
import torch  # noqa: F401
from fastapi import HTTPException
from starlette.requests import Request

from model.health import ReplicaHealth, gpu_failed_message
from model.precision import gpu_facts
from model.restore import PendingRestore, begin_restore
from model.schema import GenerateRequest, GenerateResponse
from model.settings import Settings

if TYPE_CHECKING:  # the engine's modules import diffusers: load() imports them once the cache restore has started
    from model.coldstart import ColdStartReport
    from model.engine import FluxEngine

log = logging.getLogger(__name__)

# nvidia-smi only feeds a diagnostic log line; a wedged driver can make it hang, and that must not stall load().
NVIDIA_SMI_TIMEOUT_S = 30.0


class Model:
    def __init__(self, **kwargs: Any) -> None:
        config = kwargs.get("config") or {}
        self._settings = Settings.from_sources(config.get("model_metadata") or {})
        self._hf_token = _optional_secret(kwargs.get("secrets"), "hf_access_token")
        self._engine: FluxEngine | None = None
        self._health = ReplicaHealth()
        self._restore: PendingRestore | None = None
        self.cold_start: ColdStartReport | None = None

    def load(self) -> None:
        """The cache restore beside the weights, then compile, warm-up and cache save (model.coldstart). Safe to call
        again after a failure."""
        if self._engine is not None:
            log.info("already loaded")
            return
        started = time.perf_counter()
        # Reading the GPU's facts initialises CUDA here, before the restore's thread starts.
        settings = self._settings.resolved(gpu_facts())
        # A retry after the weights failed joins the restore the failed attempt started, rather than racing it.
        if self._restore is None:
            self._restore = begin_restore(settings)
        _log_gpu()
        from model.coldstart import load_engine  # diffusers and transformers: seconds, beside the restore

        imports_s = time.perf_counter() - started
        self._engine, self.cold_start = load_engine(settings, self._hf_token, self._restore)
        self.cold_start.imports_s = imports_s
        log.info("serving %s, static sizes %s; %s", settings.model_source, settings.resolutions, settings.bounds)

    async def preprocess(self, request: GenerateRequest, raw_request: Request) -> GenerateRequest:
        """Refuse a body over `max_body_mb`, measured on the bytes received: a chunked body declares no length.

        Truss has read and parsed the whole body before this runs, so this bounds no memory: only the platform's
        ingress limit bounds the read. It gives every oversized body that parsed the same answer.
        """
        # The server's own Request, whose body Truss has read already: this returns that copy.
        received = len(await raw_request.body())
        limit = int(self._settings.max_body_mb * 2**20)
        if received > limit:
            raise HTTPException(status_code=413, detail=f"request body of {received} bytes, over {limit}")
        return request

    def predict(self, request: GenerateRequest, raw_request: Request) -> GenerateResponse:
        if self._engine is None:
            raise RuntimeError("predict called before load")
        if (device_error := self._health.device_error) is not None:
            # Every CUDA call fails after a sticky error: answer at once instead of queueing for a dead GPU.
            raise HTTPException(status_code=503, detail=gpu_failed_message(device_error, earlier=True))
        from model.engine import InvalidRequest, UploadFailed  # imported by load() already

        try:
            response = self._engine.generate(request)
        except InvalidRequest as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        except UploadFailed as exc:
            # The storage's failure, not this replica's: health is untouched, and the images travel in the answer.
            detail = {"message": str(exc), "field": exc.field_name, "storage_status": exc.status}
            raise HTTPException(status_code=502, detail={**detail, **exc.response.model_dump()}) from exc
        except Exception as exc:
            device_error = self._health.record_failure(exc)
            if device_error is None:
                raise
            raise HTTPException(status_code=500, detail=gpu_failed_message(device_error)) from exc
        self._health.record_success()
        return response

    def is_healthy(self) -> bool:
        """Truss's readiness route answers 503 while this is False; Baseten then stops traffic and restarts.

        Reads what requests recorded (model/health.py): it never waits for the pipeline's lock or touches the GPU.
        """
        return self._engine is not None and self._health.healthy


def _optional_secret(secrets: Any, name: str) -> str | None:
    """A secret's value, or None when unset: Truss raises SecretNotFound on any access to an unset one."""
    if secrets is None:
        return None
    try:
        return secrets[name] or None
    except Exception:  # SecretNotFound lives in the server's package; any failure means "not set"
        return None


def _log_gpu() -> None:
    if shutil.which("nvidia-smi") is None:
        log.info("no nvidia-smi on this machine: running without a GPU")
        return
    try:
        result = subprocess.run(
            ["nvidia-smi"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except (subprocess.TimeoutExpired, OSError) as exc:
        log.warning("nvidia-smi gave no answer, loading without its report: %s", exc)
        return
    log.info("nvidia-smi:\n%s", result.stdout or result.stderr)
