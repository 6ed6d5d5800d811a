"""Injects faults into a real server from outside the product: failing requests, or a failing torch.compile.

Python imports `sitecustomize` at start-up from any directory on PYTHONPATH; the fault tests put this one there
for the server they start. It does nothing unless they also set INJECT_DEVICE_ERROR_ON (a prompt containing it
raises the error an illegal memory access gives), INJECT_FAILURE_ON (a plain RuntimeError), or
INJECT_COMPILE_FAILURE (every torch.compile call raises). The product code carries no hook: the engine is patched
as soon as Truss imports `model.engine`, and torch.compile as soon as anything imports `model.compile`.
HARNESS_COMPILE_SETTINGS (tests.harness) narrows what a server compiles, e.g. without the VAE's slow CPU compile.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def _patch_engine(module: ModuleType, device_error_word: str, failure_word: str) -> None:
    import torch

    # torch.AcceleratorError is what a CUDA error raises since torch 2.8; older releases raise a RuntimeError.
    device_error = getattr(torch, "AcceleratorError", RuntimeError)
    engine = module.FluxEngine
    original_run = engine.run

    def run(self: Any, job: Any, *adapters: Any) -> Any:
        if device_error_word and device_error_word in job.prompt:
            raise device_error(ILLEGAL_ACCESS)
        if failure_word and failure_word in job.prompt:
            raise RuntimeError("injected failure: not a device error")
        return original_run(self, job, *adapters)

    engine.run = run


def _patch_compile_settings(module: ModuleType, overrides: str) -> None:
    import dataclasses
    import json

    # On top of what the settings decide (enabled, any_size): only the named fields change.
    decided = module.Settings.compile_settings.fget
    changes = json.loads(overrides)
    module.Settings.compile_settings = property(lambda self: dataclasses.replace(decided(self), **changes))


def _break_torch_compile() -> None:
    import torch

    def failing_compile(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected failure: torch.compile raised")

    torch.compile = failing_compile


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, device_error_word: str, failure_word: str, compile_failure: bool, overrides: str) -> None:
        self._words = (device_error_word, failure_word)
        self._compile_failure = compile_failure
        self._overrides = overrides

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "model.compile" and self._compile_failure:
            _break_torch_compile()
            return None
        patches = {"model.engine": lambda m: _patch_engine(m, *self._words) if any(self._words) else None}
        if self._overrides:
            patches["model.settings"] = lambda m: _patch_compile_settings(m, self._overrides)
        if fullname not in patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            patches[fullname](module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_device_error_word = os.environ.get("INJECT_DEVICE_ERROR_ON", "")
_failure_word = os.environ.get("INJECT_FAILURE_ON", "")
_compile_failure = bool(os.environ.get("INJECT_COMPILE_FAILURE"))
_overrides = os.environ.get("HARNESS_COMPILE_SETTINGS", "")
if _device_error_word or _failure_word or _compile_failure or _overrides:
    sys.meta_path.insert(0, _PatchOnImport(_device_error_word, _failure_word, _compile_failure, _overrides))
